# Module runs: the zygote, the spare runners and the runs in flight.
#
# The agent itself stays small and never forks runners: a "zygote" (forked once, at the first
# module run) holds the warm state (module_utils imported, code compiled) and forks runners on
# request, ahead of time. A spare runner copies its memory (prefault) and waits for a request
# on a pipe; it runs the AnsiballZ payload in-process with stdout/stderr on memfds, reports its
# exit code on a second pipe once its output is complete, then exits. The agent replies as soon
# as that code arrives, or, if the runner dies without one, when the zygote reports its status.
# Forking, copying memory and reaping thus happen between tasks, not during them (fork costs
# milliseconds on some VMs, and so do the copy-on-write faults of a fresh fork).
from __future__ import absolute_import

import json
import os
import select
import socket
import struct
import time

from .ansiballz import split_payload, unstrip_payload
from .framing import HEADER
from .isolation import module_fqn, shares
from .memory import HotPages
from .procs import memfd, now, rc_of, read_all, reaped, recv_fds
from .runner import runs_per_runner
from .warm import WarmState
from .zygote import Zygote


class RunnerPool(object):
    """The agent's side of module runs (a mixin of server.Agent, which owns the poll loop, the
    connections and `_send`/`_reply`/`_done_with`): the zygote, the spare runners, handing a
    request to one, and replying when it is done."""

    def _pool_init(self, cfg):
        self.runners = {}  # pid -> the runner's fds and its request, while it runs one
        self.warm = WarmState(cfg)  # the agent's copy: version and learned, from the zygote
        self.zips = {}  # sha1 -> base64 zip text of recent payloads (see strip_payload)
        self.hot = None  # HotPages, shared with the zygote and its runners
        # spare runners, oldest first: a module run takes the oldest, whose memory copy
        # (prefault) has had the most time to finish; two cover a module run that follows
        # another at once (copy's stat then copy)
        self.spares = []
        self.spare_pending = 0  # asked of the zygote, not arrived yet
        self.spare_stale = 0  # of those, asked before a learn: discarded on arrival
        self.pool = max(1, int(cfg.get("spares", 2)))
        self.runs_per_runner = runs_per_runner(cfg)  # see runner.InProcess
        self.zsock = None  # the zygote's socket (see _zygote_start)
        self.zpid = None
        self.by_done = {}  # done pipe fd -> runner pid
        self.exited = {}  # runner pid -> wait status (from the zygote)

    def _zygote_start(self):
        if self.hot is None and self.cfg.get("prefault", True):
            try:
                self.hot = HotPages()
            except Exception:
                self.hot = None
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            a.close()
            try:
                Zygote(self, b).serve()
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(0)
        b.close()
        self.zsock = a
        self.zpid = pid
        self.poller.register(a.fileno(), select.POLLIN)

    def _zsend(self, msg, fds=()):
        data = json.dumps(msg, separators=(",", ":")).encode("utf-8")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))] if fds else []
        self.zsock.sendmsg([data], anc)

    def _zreadable(self, block=False):
        """Handles one message from the zygote; returns it (None if none was waiting)."""
        self.zsock.setblocking(block)
        try:
            msg, fds = recv_fds(self.zsock)
        except (BlockingIOError, InterruptedError):
            return None
        finally:
            self.zsock.setblocking(True)
        if msg is None:
            raise RuntimeError("the zygote exited")
        kind = msg.get("ev")
        if kind == "spare":
            self.spare_pending = max(0, self.spare_pending - 1)
            stale = self.spare_stale > 0
            self.spare_stale = max(0, self.spare_stale - 1)
            if len(fds) == 5:
                runner = {"pid": msg["pid"], "req_w": fds[0], "done_r": fds[1], "out": fds[2], "err": fds[3], "in": fds[4]}
                if stale or len(self.spares) >= self.pool:
                    self._discard(runner)
                else:
                    self.spares.append(runner)
        elif kind == "exit":
            pid = msg["pid"]
            if pid in self.runners:
                self.exited[pid] = msg["status"]
                runner = self.runners[pid]
                if runner.get("eof"):
                    self._finish(pid, rc_of(msg["status"]))
        elif kind == "warmed":
            self.warm.version = msg.get("version") or False
        return msg

    def _zwait(self, kind):
        while True:
            msg = self._zreadable(block=True)
            if msg is not None and msg.get("ev") == kind:
                return msg

    def _with_payload_fd(self, payload):
        fd = memfd("spawntrace-payload")
        view = memoryview(payload)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _want_spare(self, needed=False):
        """Asks the zygote for spares up to the pool size (`needed`: one for a run at hand, even
        while stopping)."""
        while (
            self.zsock is not None
            and (needed or not self.stopping)
            and len(self.spares) + self.spare_pending - self.spare_stale < (self.pool if not self.stopping else 1)
        ):
            self.spare_pending += 1
            self._zsend({"op": "spare"})

    def _discard_spares(self):
        for runner in self.spares:
            self._discard(runner)
        self.spares = []

    def _discard(self, runner):
        for k in ("req_w", "done_r", "out", "err", "in"):
            fd = runner.get(k)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                runner[k] = None

    def _run(self, conn, req, payload):
        t_recv = now()
        sha = req.get("zip_sha")
        verified = None  # the sha1 of the payload's zip text, as this agent computed it
        if sha and req.get("stripped"):
            data = self.zips.get(sha)
            if data is None:
                self._send(conn, {"ok": False, "need_zip": True})
                return False
            payload = unstrip_payload(payload, data)
            verified = sha
        elif sha and payload:
            import hashlib

            parts = split_payload(payload)
            if parts is not None and hashlib.sha1(parts[2]).hexdigest() == sha:
                if len(self.zips) >= 32:
                    self.zips.pop(next(iter(self.zips)))
                self.zips[sha] = parts[2]
                verified = sha
        path = req.get("path")
        if path and not payload:
            with open(path, "rb") as f:
                payload = f.read()
        if self.zsock is None:
            self._zygote_start()
            fd = self._with_payload_fd(payload)
            try:
                self._zsend({"op": "warm", "req": req}, [fd])
            finally:
                os.close(fd)
            self._zwait("warmed")
        share = self.runs_per_runner > 1 and shares(req.get("isolation"), module_fqn(payload))
        runner = self._take_runner(fresh=not share)
        data = json.dumps(dict(req, share=share, zip_sha=verified), separators=(",", ":")).encode("utf-8")
        reusable = share
        try:
            # the request in the runner's memfd, then one byte on its pipe to start it
            if runner.get("runs"):
                os.ftruncate(runner["in"], 0)
                os.lseek(runner["in"], 0, os.SEEK_SET)
            os.write(runner["in"], HEADER.pack(len(data), len(payload)) + data)
            view = memoryview(payload)
            while view:
                n = os.write(runner["in"], view)
                view = view[n:]
            # reported before the runner may start anything: a runner that runs several modules
            # (in-process) is attributed by time, so its report must precede the module's forks
            reported = self.sender.runner_start(runner["pid"], os.getpid(), req)
            os.write(runner["req_w"], b"!")
        except OSError:
            reusable = False
            raise
        finally:
            if not reusable:
                os.close(runner["req_w"])
                os.close(runner["in"])
                runner["req_w"] = runner["in"] = None
        runner["runs"] = runner.get("runs", 0) + 1
        pid = runner["pid"]
        os.set_blocking(runner["done_r"], False)
        runner.update(conn=conn, req=req, payload=payload, done=b"", t_recv=t_recv, t_accept=self.t_accept)
        self.runners[pid] = runner
        self.by_done[runner["done_r"]] = pid
        self.poller.register(runner["done_r"], select.POLLIN)
        self._send(conn, {"started": True, "pid": pid, "agent_pid": os.getpid(), "reported": reported})
        return True

    def _take_runner(self, fresh):
        """A spare runner: the first (a runner that shared its last run goes first, warm), or,
        for a run that must not share (`fresh`), one that has run nothing yet."""
        while True:
            for i, runner in enumerate(self.spares):
                if not fresh or not runner.get("runs"):
                    return self.spares.pop(i)
            if self.spares and len(self.spares) + self.spare_pending - self.spare_stale >= self.pool:
                self._discard(self.spares.pop())  # only used runners: room for a fresh one
            self._want_spare(needed=True)
            self._zwait("spare")

    def _done_readable(self, fd):
        pid = self.by_done.get(fd)
        runner = self.runners.get(pid)
        if runner is None:
            return
        eof = False
        try:
            while True:
                b = os.read(fd, 64)
                if not b:
                    eof = True
                    break
                runner["done"] += b
        except (BlockingIOError, InterruptedError):
            pass
        if runner["done"].endswith(b"\n"):
            fields = runner["done"].split()
            # "rc started ended [again [why]]": the times and why are diagnostics
            runner["run_started"], runner["run_ended"] = ([int(x) for x in fields[1:3]] + [None, None])[:2]
            runner["again"] = len(fields) > 3 and fields[3] == b"1" and runner.get("req_w") is not None
            runner["retired"] = fields[4].decode("ascii", "replace").replace("+", " ") if len(fields) > 4 and fields[4] != b"-" else None
            runner["done"] = b""
            self._finish(pid, int(fields[0]))
        elif eof:
            # no exit code: the runner died (a signal, os._exit in the module); the zygote
            # reports its status
            runner["eof"] = True
            try:
                self.poller.unregister(fd)
            except (KeyError, ValueError):
                pass
            if pid in self.exited:
                self._finish(pid, rc_of(self.exited[pid]))

    def _finish(self, pid, rc):
        runner = self.runners.pop(pid)
        self.exited.pop(pid, None)
        fd = runner["done_r"]
        self.by_done.pop(fd, None)
        try:
            self.poller.unregister(fd)
        except (KeyError, ValueError):
            pass
        again = runner.pop("again", False) and not self.stopping
        try:
            out, err = read_all(runner["out"]), read_all(runner["err"])
            if again:
                for fd in (runner["out"], runner["err"]):
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            again = False
            raise
        finally:
            if not again:
                self._discard(runner)
        conn = runner.pop("conn")
        payload = runner.get("payload")
        req = runner.pop("req")
        # where the run's time went, monotonic ns (the client's SPAWNTRACE_AGENT_TIMING)
        timing = {
            "accepted": runner["t_accept"],
            "read": runner["t_recv"],
            "runner_start": runner.get("run_started"),
            "runner_done": runner.get("run_ended"),
            "replied": now(),
            "retired": runner.get("retired") if not again else None,
        }
        # queued (see _send): a client that does not read its reply holds up nobody
        self._reply(conn, rc, out, err, timing=timing)
        self._done_with(conn, req)
        if again:
            # the run shared its runner (isolation.py) and left nothing behind: warm, it goes first
            for k in ("payload", "done", "run_started", "run_ended", "t_recv", "t_accept", "eof", "retired"):
                runner.pop(k, None)
            if len(self.spares) >= self.pool:
                self._discard(self.spares.pop())
            self.spares.insert(0, runner)
        module = req.get("module")
        if module and module not in self.warm.learned and self.warm.version and req.get("ansible_version") == self.warm.version:
            # new to the zygote: let it compile and import what this payload brings, and replace
            # the spare made before that
            self.warm.learned.add(module)
            fd = self._with_payload_fd(payload)
            try:
                self._zsend({"op": "learn", "req": req}, [fd])
            finally:
                os.close(fd)
            self._discard_spares()
            self.spare_stale = self.spare_pending
        self._want_spare()
        self.last = time.monotonic()

    def _reap(self):
        for pid, _status in reaped():
            if pid == self.zpid:
                # the zygote died: runners in flight report through their done pipes; start anew
                try:
                    self.poller.unregister(self.zsock.fileno())
                except (KeyError, ValueError):
                    pass
                self.zsock.close()
                self.zsock = self.zpid = None
                self.warm.version = None
                self.spare_pending = self.spare_stale = 0
                self.warm.learned = set()
                self._discard_spares()
                for pid2, runner in list(self.runners.items()):
                    if runner.get("eof"):
                        self._finish(pid2, 1)
