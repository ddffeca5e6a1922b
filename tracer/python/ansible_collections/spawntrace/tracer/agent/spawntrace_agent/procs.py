# Process and file-descriptor helpers shared by the agent's rooms (and by client.py, which
# checks that the controller it serves is still the same process).
from __future__ import absolute_import

import errno
import json
import os
import signal
import socket
import struct
import time


def now():
    return time.monotonic_ns() if hasattr(time, "monotonic_ns") else int(time.monotonic() * 1e9)


def proc_start(pid):
    """Start time of a process (clock ticks since boot), or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid, start):
    if not pid:
        return True
    if os.path.isdir("/proc/self"):
        return proc_start(pid) == start if start is not None else proc_start(pid) is not None
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def peer_uid(sock):
    so_peercred = getattr(socket, "SO_PEERCRED", 17)
    data = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    return struct.unpack("3i", data)[1]


def memfd(name):
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 1))
        except OSError:
            pass
    import tempfile

    fd, path = tempfile.mkstemp(prefix="spawntrace-")
    os.unlink(path)
    os.set_inheritable(fd, False)
    return fd


def rc_of(status):
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def recv_fds(sock, maxfds=8):
    """One SEQPACKET message: (JSON object or None at EOF, list of received fds)."""
    data, anc, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(maxfds * 4))
    fds = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds.extend(struct.unpack("%di" % n, payload[: n * 4]))
    for fd in fds:
        os.set_inheritable(fd, False)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data.decode("utf-8")), fds


def read_all(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


def open_fds():
    """This process's open file descriptors."""
    try:
        return [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 256))


def sigchld_wakeup():
    """(read fd, write fd) of a non-blocking pipe that becomes readable when a child ends
    (SIGCHLD through signal.set_wakeup_fd), for a poll loop; drain() its read end."""
    rfd, wfd = os.pipe()
    for fd in (rfd, wfd):
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.set_wakeup_fd(wfd)
    return rfd, wfd


def drain(fd):
    """Reads a non-blocking pipe empty."""
    try:
        while os.read(fd, 512):
            pass
    except OSError:
        pass


def reaped():
    """(pid, wait status) of each child that has ended, without waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        yield pid, status
