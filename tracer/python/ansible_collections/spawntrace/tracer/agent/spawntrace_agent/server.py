# The agent's server loop: its listening socket, non-blocking client connections, requests and
# replies; module runs are handed to the runner pool (pool.py).
from __future__ import absolute_import

import os
import select
import signal
import time

from . import files
from .framing import BIG, PROTOCOL, FrameReader, ProtocolError, encode_frame
from .messages import Sender
from .pool import RunnerPool
from .procs import alive, drain, now, peer_uid, sigchld_wakeup
from .runner import Baseline
from .shell_ops import DEFERRABLE, MAX_DEFERRED, rm_warning, run_op


class Conn(object):
    """A client connection of the agent (non-blocking): the request being read, the reply being
    written (a queue of memoryviews), and when each last made progress."""

    def __init__(self, sock):
        import collections

        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader()
        self.t_accept = now()
        self.t_read = None  # monotonic time of the last bytes of a partial request
        self.t_write = None  # monotonic time the reply last made progress
        self.out = collections.deque()
        self.kept = False  # kept between requests (`keep`)
        self.reading = False  # waiting for a request
        self.close_after = False  # closed once the reply is out
        self.closed = False
        self.mask = 0  # what it is polled for
        self.after_before = None  # for the reply to the request being served (Agent._run_before)

    def idle(self):
        """A kept connection waiting for its next request, nothing of it in yet."""
        return self.kept and self.reading and not self.out and not self.reader.pending()


class Agent(RunnerPool):
    """The agent: one poll loop serving its socket's connections (frames, see framing.py) and the
    module runs in flight (see RunnerPool), until it is idle, told to quit, or its controller is
    gone."""

    def __init__(self, cfg, listener):
        self.cfg = cfg
        self.listener = listener
        self.idle = float(cfg.get("idle", 60))
        self.controller = cfg.get("controller_pid")
        self.controller_start = cfg.get("controller_start")
        self.allowed = set([os.getuid(), int(cfg.get("client_uid", os.getuid()))])
        # patient: a runner_start that gives up waiting would be sent late by the client
        self.sender = Sender(cfg.get("report"), patient=True)
        self.conns = {}  # fd -> Conn, every client connection open
        # a connection with part of a request in and no byte more for `frame_timeout` seconds, or
        # with part of a reply out that its client takes no byte of for `send_timeout`, is dropped
        self.frame_timeout = float(cfg.get("frame_timeout", 30))
        self.send_timeout = float(cfg.get("send_timeout", 60))
        self.last = time.monotonic()
        self.baseline = Baseline()
        self.stopping = False
        self.t_accept = None
        self.served = 0
        self.accepted = 0
        self._pool_init(cfg)

    def serve(self):
        self.sender.agent_start(self.cfg.get("host"), self.cfg.get("user"), self.cfg.get("become_user"), self.cfg.get("version"))
        rfd, wfd = self.wakeup = sigchld_wakeup()
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.listener.setblocking(False)
        poller = select.poll()
        self.poller = poller
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(rfd, select.POLLIN)
        while True:
            try:
                events = poller.poll(1000)
            except InterruptedError:
                events = []
            for fd, ev in events:
                if fd == self.listener.fileno():
                    self._accept()
                elif fd == rfd:
                    drain(rfd)
                    self._reap()
                elif fd in self.conns:
                    self._conn_event(fd, ev)
                elif fd in self.by_done:
                    self._done_readable(fd)
                elif self.zsock is not None and fd == self.zsock.fileno():
                    self._zreadable()
            self._reap()
            self._expire()
            if self._should_exit():
                break
        self._shutdown()

    def _on_term(self, *a):
        self.stopping = True

    def _should_exit(self):
        now = time.monotonic()
        busy = self.runners or any(not c.idle() for c in self.conns.values())
        if busy:
            self.last = now
        if self.stopping and not busy:
            return True
        if not alive(self.controller, self.controller_start):
            return not self.runners
        return not busy and now - self.last > self.idle

    def _shutdown(self):
        path = self.cfg["socket"]
        try:
            st = os.lstat(path)
            if (st.st_ino, st.st_dev) == tuple(self.cfg.get("_inode") or ()):
                os.unlink(path)
        except OSError:
            pass
        extra = []
        if self.controller and not alive(self.controller, self.controller_start):
            # nobody of this controller can want this agent any more
            lock = "%s-%s.start.lock" % (self.controller, self.cfg.get("key", "-"))
            extra = [path + ".lock", os.path.join(os.path.dirname(path), lock)]
        log = self.cfg.get("log")
        if log:
            try:
                if os.path.getsize(log) == 0:
                    extra.append(log)
            except OSError:
                pass
        for p in extra:
            try:
                os.unlink(p)
            except OSError:
                pass
        self.warm.cleanup()
        try:
            self.listener.close()
        except OSError:
            pass

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                if peer_uid(conn) not in self.allowed:
                    conn.close()
                    continue
            except OSError:
                conn.close()
                continue
            self.accepted += 1
            self._rearm(conn, kept=False)

    def _rearm(self, conn, kept=True):
        """Waits for a request on `conn` (a socket: a new connection) or a Conn (`kept`: its
        client asked to keep it after a reply). Kept connections that wait do not keep the agent
        alive."""
        if not isinstance(conn, Conn):
            try:
                conn.setblocking(False)
            except OSError:
                conn.close()
                return
            conn = Conn(conn)
            self.conns[conn.fd] = conn
            conn.t_read = time.monotonic()  # a new connection that sends nothing is dropped too
        else:
            conn.t_read = None
        conn.kept = kept
        conn.reading = True
        self._update(conn)
        self.last = time.monotonic()

    def _update(self, c):
        """Polls `c` for what it waits for: a request (POLLIN), room for its reply (POLLOUT)."""
        if c.closed:
            return
        mask = (select.POLLIN if c.reading else 0) | (select.POLLOUT if c.out else 0)
        if mask == c.mask:
            return
        if mask:
            self.poller.register(c.fd, mask)
        else:
            try:
                self.poller.unregister(c.fd)
            except (KeyError, ValueError):
                pass
        c.mask = mask

    def _close(self, c):
        if c.closed:
            return
        c.closed = True
        c.out.clear()
        if self.conns.get(c.fd) is c:
            del self.conns[c.fd]
            try:
                self.poller.unregister(c.fd)
            except (KeyError, ValueError):
                pass
        try:
            c.sock.close()
        except OSError:
            pass

    def _conn_event(self, fd, ev):
        c = self.conns[fd]
        if c.out:
            self._flush(c)
        if c.reading and not c.closed:
            self._readable(c)

    def _expire(self):
        """Drops connections whose client stalled mid-frame (see frame_timeout, send_timeout)."""
        now = time.monotonic()
        for c in list(self.conns.values()):
            if c.out and now - c.t_write > self.send_timeout:
                self._close(c)
            elif c.reading and c.t_read is not None and now - c.t_read > self.frame_timeout:
                self._close(c)

    def _readable(self, c):
        """Reads what has arrived of a request (never waiting for more: a client that stalls
        mid-frame holds up nobody, and is dropped after frame_timeout); handles it once whole."""
        for _ in range(64):  # at most 16 MiB, then the others' turn
            try:
                data = c.sock.recv(BIG)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(c)
                return
            if not data:
                self._close(c)
                return
            if c.kept and not c.reader.pending():
                c.t_accept = now()  # a kept connection: the request's arrival
            c.t_read = time.monotonic()
            c.reader.feed(data)
            try:
                frame = c.reader.frame()
                if frame is not None and c.reader.pending():
                    # clients wait for each reply: bytes past a request are not a request
                    raise ProtocolError("data after a request, before its reply")
            except ProtocolError as e:
                # answered instead of the hello: nothing was acted on
                c.reading = False
                c.close_after = True
                self._send(c, {"ok": False, "error": "malformed frame: %s" % (e,)})
                return
            if frame is not None:
                self._request(c, *frame)
                return

    def _request(self, c, req, blob):
        c.reading = False
        c.t_read = None
        self._update(c)
        self.t_accept = c.t_accept
        # the hello says: this request was read and will be answered (a client may resend a
        # request that got no hello on another connection: nothing acted on it)
        self._send(c, {"hello": PROTOCOL, "pid": os.getpid(), "version": self.cfg.get("version")})
        if c.closed:
            return  # the client is gone: nothing acted on
        try:
            held = self._dispatch(c, req, blob)
        except Exception as e:  # report, never die
            c.close_after = True
            self._send(c, {"ok": False, "error": "%s: %s" % (type(e).__name__, e)})
            return
        if not held:
            self._done_with(c, req)

    def _done_with(self, conn, req):
        """A request was answered: keep its connection for the next one if the client asked
        (else it is closed once the reply is out)."""
        if req.get("keep") and not self.stopping and not conn.close_after:
            self._rearm(conn)
        else:
            conn.close_after = True
            self._flush(conn)

    def _send(self, c, obj, blob=b""):
        """Queues a frame on `c` and sends what the socket takes now; the rest goes out as its
        client reads (POLLOUT), or the connection is dropped after send_timeout without progress.
        A frame over the limits is replaced by an error."""
        if c.closed:
            return
        if c.after_before and "hello" not in obj and not obj.get("started"):
            obj = dict(obj, **c.after_before)
            c.after_before = None
        try:
            head = encode_frame(obj, blob)
        except ProtocolError as e:
            head, blob = encode_frame({"ok": False, "error": "reply too large: %s" % (e,)}), b""
        if not c.out:
            c.t_write = time.monotonic()
        if len(blob) <= BIG:
            c.out.append(memoryview(head + bytes(blob)))
        else:
            c.out.append(memoryview(head))
            c.out.append(memoryview(blob))
        self._flush(c)

    def _flush(self, c):
        while c.out:
            try:
                n = c.sock.send(c.out[0])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(c)
                return
            c.t_write = time.monotonic()
            if n >= len(c.out[0]):
                c.out.popleft()
            else:
                c.out[0] = c.out[0][n:]
        if not c.out and c.close_after:
            self._close(c)
            return
        self._update(c)

    def _reply(self, conn, rc, out, err, **extra):
        resp = {"ok": True, "rc": rc, "out": len(out), "version": self.cfg.get("version")}
        resp.update(extra)
        self._send(conn, resp, out + err)

    def _run_before(self, before, blob):
        """Does the housekeeping and uploads a client deferred to this request (client.defer),
        in order: (the request's own blob, the first failure or None, warnings). At most
        MAX_DEFERRED entries, their blobs taken from the front of the request's (already bounded
        by framing.MAX_BLOB)."""
        if not isinstance(before, list) or len(before) > MAX_DEFERRED:
            return blob, {"op": None, "error": "malformed deferred housekeeping"}, []
        warnings = []
        view = memoryview(blob)
        for entry in before:
            size = entry.get("size", 0) if isinstance(entry, dict) else -1
            if not isinstance(size, int) or not 0 <= size <= len(view):
                return blob, {"op": None, "error": "malformed deferred housekeeping"}, warnings
            data, view = bytes(view[:size]), view[size:]
            op = entry.get("op")
            if op == "put":
                res = files.put(entry.get("path"), entry.get("mode", 0o666), data)
                if not res.get("ok"):
                    error = "failed to transfer file to %s: %s" % (entry.get("path"), res.get("error"))
                    return blob, {"op": op, "error": error}, warnings
                continue
            res = run_op(op, entry.get("args") or {}, self.baseline.env) if op in DEFERRABLE else None
            if res is None:
                return blob, {"op": op, "error": "deferred %s not supported" % (op,)}, warnings
            rc, _, err = res
            if rc != 0 and op == "rm":
                warnings.append(rm_warning(rc, err.decode("utf-8", "replace")))
            elif rc != 0:
                return blob, {"op": op, "error": "%s failed: %s" % (op, err.decode("utf-8", "replace").strip())}, warnings
        return bytes(view), None, warnings

    def _dispatch(self, conn, req, blob):
        op = req.get("op")
        self.served += 1
        if req.get("version") not in (None, self.cfg.get("version")):
            self._send(conn, {"ok": False, "unsupported": True, "error": "agent version %s" % self.cfg.get("version")})
            return False
        if req.get("before"):
            blob, failed, warnings = self._run_before(req["before"], blob)
            if failed:
                self._send(conn, {"ok": False, "before_failed": failed, "warnings": warnings, "error": failed["error"]})
                return False
            # with the request's reply (_send), whatever it is: the client must not send them again
            conn.after_before = {"before_done": True, "warnings": warnings}
        if op == "ping":
            self._send(
                conn,
                {
                    "ok": True,
                    "pid": os.getpid(),
                    "version": self.cfg.get("version"),
                    "reporting": self.sender.usable,
                    "served": self.served,
                    "accepted": self.accepted,
                    # where a client may put a file for an agent it starts through a become
                    # that prompts on a terminal (client.place_payload)
                    "dir": os.path.dirname(self.cfg["socket"]),
                    "uid": os.getuid(),
                },
            )
            return False
        if op == "quit":
            self.stopping = True
            self._send(conn, {"ok": True})
            return False
        if op == "run":
            return self._run(conn, req, blob)
        if op == "put":
            self._send(conn, files.put(req["path"], req.get("mode", 0o666), blob))
            return False
        if op == "fetch":
            self._send(conn, *files.fetch(req["path"]))
            return False
        env = self.baseline.env if req.get("env") is None else req["env"]
        res = run_op(op, req.get("args") or {}, env)
        if res is None:
            self._send(conn, {"ok": False, "unsupported": True})
        else:
            self._reply(conn, *res)
        return False
