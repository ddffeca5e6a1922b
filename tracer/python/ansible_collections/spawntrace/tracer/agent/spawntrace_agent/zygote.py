# The zygote: the agent's fork that holds the warm state and forks runners ahead of time.
from __future__ import absolute_import

import json
import os
import select
import signal
import socket
import struct

from .procs import drain, memfd, open_fds, read_all, reaped, recv_fds, sigchld_wakeup
from .runner import Runner


class Zygote(object):
    """The agent's fork that keeps the warm state and forks runners (see pool.py).
    Messages from the agent: warm / learn (with the payload in a memfd), spare; to the agent:
    warmed, spare (with the runner's request pipe, done pipe and output memfds), exit."""

    def __init__(self, agent, sock):
        self.agent = agent
        self.sock = sock

    def _send(self, msg, fds=()):
        data = json.dumps(msg, separators=(",", ":")).encode("utf-8")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def serve(self):
        a = self.agent
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        keep = (0, 1, 2, self.sock.fileno())
        for fd in open_fds():
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        rfd, wfd = self.wakeup = sigchld_wakeup()
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(rfd, select.POLLIN)
        try:
            while True:
                try:
                    events = poller.poll(5000)
                except InterruptedError:
                    events = []
                for fd, _ev in events:
                    if fd == self.sock.fileno():
                        try:
                            msg, fds = recv_fds(self.sock)
                        except (BlockingIOError, InterruptedError):
                            continue
                        if msg is None:
                            return  # the agent is gone
                        self._handle(msg, fds)
                    elif fd == rfd:
                        drain(rfd)
                self._reap()
        finally:
            a.warm.cleanup()

    def _handle(self, msg, fds):
        a = self.agent
        op = msg.get("op")
        payload = b""
        if fds:
            try:
                payload = read_all(fds[0])
            finally:
                for fd in fds:
                    os.close(fd)
        if op == "warm":
            try:
                a.warm.warm(msg["req"], payload)
            except Exception:
                import traceback

                traceback.print_exc()
                a.warm.version = False
            self._send({"ev": "warmed", "version": a.warm.version or None})
        elif op == "learn":
            try:
                a.warm.learn(msg["req"], payload)
            except Exception:
                import traceback

                traceback.print_exc()
        elif op == "spare":
            pid, rfds = self._fork_runner()
            try:
                self._send({"ev": "spare", "pid": pid}, rfds)
            finally:
                for fd in rfds:
                    os.close(fd)

    def _fork_runner(self):
        out_fd, err_fd, in_fd = memfd("spawntrace-out"), memfd("spawntrace-err"), memfd("spawntrace-in")
        req_r, req_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                Runner(self.agent.cfg, self.agent.baseline, self.agent.hot, self.agent.warm.version).main(
                    req_r, done_w, out_fd, err_fd, in_fd
                )
            finally:
                os._exit(1)
        os.close(req_r)
        os.close(done_w)
        return pid, [req_w, done_r, out_fd, err_fd, in_fd]

    def _reap(self):
        for pid, status in reaped():
            try:
                self._send({"ev": "exit", "pid": pid, "status": status})
            except OSError:
                pass
