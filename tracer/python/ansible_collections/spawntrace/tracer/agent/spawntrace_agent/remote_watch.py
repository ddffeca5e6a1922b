# (controller) Remote agents end with the playbook. An agent on an ssh target cannot watch
# ansible-playbook (another machine's process), so one watcher per controller run does it for
# them: a small process started with the run's first remote agent, holding
# `<agent dir>/<pid>-watch.lock`, that waits for ansible-playbook to end and then asks every
# agent the run reached through a forwarded socket (`f-<pid>-*.sock`, through the ssh
# ControlMaster, which ControlPersist keeps a while) to quit, and removes the run's forwarded
# sockets and host pointers. An agent it cannot reach still ends after its idle time.
from __future__ import absolute_import

import fcntl
import os
import select
import socket
import stat
import subprocess
import sys
import time

from . import framing, safe_paths
from .procs import alive, peer_uid, proc_start

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_watcher(directory, ctl_pid, ctl_start):
    """Starts this run's watcher unless it is up (its lock is held). `directory`: the checked
    agent directory of this uid."""
    path = os.path.join(directory, "%d-watch.lock" % ctl_pid)
    fd = safe_paths.open_checked(path, os.O_RDWR | os.O_CREAT, (os.getuid(),))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # up already
        code = "import sys; sys.path.insert(0, sys.argv[1]); from spawntrace_agent.remote_watch import main; main(sys.argv[2:])"
        # isolated (-I: no cwd or user site on sys.path, no PYTHON* variables) in "/": nothing of
        # the directory the playbook runs in is imported; its own session: a ^C to the
        # playbook's process group must not stop it first
        subprocess.Popen(
            [sys.executable, "-I", "-c", code, HERE, directory, str(ctl_pid), str(ctl_start), str(fd)],
            cwd="/",
            pass_fds=(fd,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return True
    finally:
        os.close(fd)  # the watcher holds the lock (the same open file) from here on


def main(argv):
    directory, ctl_pid, ctl_start, _lock_fd = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    wait_for(ctl_pid, ctl_start)
    quit_agents(directory, ctl_pid)
    try:
        os.unlink(os.path.join(directory, "%d-watch.lock" % ctl_pid))
    except OSError:
        pass


def wait_for(pid, start):
    """Returns when process `pid` (started at `start`) has ended."""
    try:
        pfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pfd = None
    if pfd is not None:
        try:
            if proc_start(pid) == start:
                select.select([pfd], [], [])
            return
        finally:
            os.close(pfd)
    while alive(pid, start):
        time.sleep(0.5)


def _ask_to_quit(path, uid, seconds=3.0):
    """Sends `quit` to the agent behind the forwarded socket `path` and waits at most `seconds`
    for its answer to start (a few bytes, never a frame's worth): an agent that does not answer
    holds up the others no longer than that, and ends after its idle time anyway."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        s.connect(path)
        if peer_uid(s) != uid:  # the ssh ControlMaster's listener: ours
            return
        framing.send_frame(s, {"op": "quit"})
        got = 0
        while got < 4096 and time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            b = s.recv(4096 - got)
            if not b:
                break
            got += len(b)
    except (OSError, framing.ProtocolError, ValueError):
        pass
    finally:
        s.close()


def quit_agents(directory, ctl_pid):
    """Asks the agents behind this run's forwarded sockets to quit; removes those sockets and the
    run's host pointers. Only sockets and files of our own uid, never followed through a symlink."""
    uid = os.getuid()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith("f-%d-" % ctl_pid) and name.endswith(".sock"):
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
                continue
            _ask_to_quit(path, uid)
        elif not name.startswith("d-%d-" % ctl_pid):
            continue
        try:
            st = os.lstat(path)
            if st.st_uid == uid and (stat.S_ISSOCK(st.st_mode) or stat.S_ISREG(st.st_mode)):
                os.unlink(path)
        except OSError:
            pass
