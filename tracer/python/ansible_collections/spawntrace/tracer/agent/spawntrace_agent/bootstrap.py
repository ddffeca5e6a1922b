# Bootstrap: in the freshly started interpreter (as the agent's user), find or bind the agent's
# socket in its checked directory, daemonize the agent, and report one READY line (JSON) on
# stdout. The interpreter got here through the first stage (wire.py) with the package's modules.
from __future__ import absolute_import

import json
import os
import socket
import stat
import sys

from .framing import ProtocolError, recv_frame, send_frame
from .procs import peer_uid
from .safe_paths import HINT, UnsafePath, describe, open_checked, private_dir
from .server import Agent


def _uid_of(spec, cfg=None):
    """'self' -> our uid; 'login' -> the user who became us through the become method
    cfg["become_method"] (the client an agent started by sudo, su or doas serves); an int.

    One source per method, each written by the become tool itself, not inherited: sudo's
    SUDO_UID, doas's DOAS_USER, and for su (which sets neither and keeps the caller's environment)
    the first ancestor process of another real uid. When the connection names its remote user
    (cfg["login_user"]), it must be that user. Anything else fails closed: our own uid (the
    client then cannot connect, and its modules run classic)."""
    if spec is None or spec == "self":
        return os.getuid()
    if spec != "login":
        return int(spec)
    cfg = cfg or {}
    method = cfg.get("become_method")
    uid = None
    if method == "sudo":
        v = os.environ.get("SUDO_UID")
        uid = int(v) if v and v.isdigit() else None
    elif method == "doas":
        uid = _uid_named(os.environ.get("DOAS_USER"))
    elif method == "su":
        uid = _caller_uid()
    login_user = cfg.get("login_user")
    if uid is None or (login_user and _uid_named(login_user) != uid):
        return os.getuid()
    return uid


def _uid_named(name):
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid if name else None
    except KeyError:
        return None


def _caller_uid():
    """The real uid of the nearest ancestor process whose real uid is not ours (su's caller), or
    None."""
    me = os.getuid()
    pid = os.getppid()
    for _ in range(32):
        if pid <= 1:
            return None
        try:
            with open("/proc/%d/status" % pid) as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            uid = int(fields["Uid"].split()[0])
            ppid = int(fields["PPid"].strip())
        except (OSError, ValueError, KeyError, IndexError):
            return None
        if uid != me:
            return uid
        pid = ppid
    return None


def _ping(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        if peer_uid(s) != os.getuid():
            raise ProtocolError("%s is served by another uid" % path)
        send_frame(s, {"op": "ping"})
        recv_frame(s)  # hello
        return recv_frame(s)[0]
    finally:
        s.close()


def bootstrap(cfg):
    """Runs in the freshly started interpreter (as the agent's user). Prints one JSON line."""
    import fcntl

    owner = _uid_of(cfg.get("dir_owner"), cfg)
    cfg["client_uid"] = _uid_of(cfg.get("client_uid"), cfg)
    if owner != os.getuid() and os.getuid() != 0:
        raise RuntimeError("cannot place a socket in uid %d's directory as uid %d" % (owner, os.getuid()))
    path = cfg.get("socket")
    if not path:
        path = os.path.join(cfg.get("dir_base") or "/tmp", "spawntrace-%d" % owner, cfg["key"] + ".sock")
    # the directory checked (see private_dir), then every name in it used relative to its fd or
    # under its real path (whose components nobody else may rename)
    dfd, d = private_dir(os.path.dirname(path), owner)
    name = os.path.basename(path)
    path = cfg["socket"] = os.path.join(d, name)
    cfg["dir"] = d
    if cfg.get("log") is True:
        cfg["log"] = path + ".log"
    lock = open_checked(path + ".lock", os.O_RDWR | os.O_CREAT, (os.getuid(), owner))
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            # an agent's socket (chowned to its client when we are root), never anything else
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in (os.getuid(), cfg["client_uid"]):
                raise UnsafePath(
                    "spawntrace: unsafe agent socket %s: %s (must be a socket of uid %d); %s" % (path, describe(st), os.getuid(), HINT)
                )
            try:
                info = _ping(path)
                if info.get("ok") and info.get("version") == cfg.get("version"):
                    sys.stdout.write(
                        json.dumps({"ok": True, "pid": info["pid"], "reused": True, "socket": path, "reporting": info.get("reporting")})
                        + "\n"
                    )
                    return 0
            except (OSError, ProtocolError, ValueError):
                pass
            os.unlink(name, dir_fd=dfd)
        old = os.umask(0o177)  # the socket is made 0600 (no chmod by path afterwards)
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
        finally:
            os.umask(old)
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            raise UnsafePath("spawntrace: agent socket %s replaced after bind (%s)" % (path, describe(st)))
        if os.getuid() == 0 and cfg["client_uid"] != 0:
            os.chown(name, cfg["client_uid"], -1, dir_fd=dfd, follow_symlinks=False)  # safe: fchownat in the checked dir, no link followed
        os.close(dfd)
        listener.listen(128)
        cfg["_inode"] = (st.st_ino, st.st_dev)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            try:
                os.setsid()
                if os.fork():
                    os._exit(0)
                os.write(wfd, str(os.getpid()).encode())
                os.close(wfd)
                _daemon_main(cfg, listener, lock)
            finally:
                os._exit(0)
        os.close(wfd)
        os.waitpid(pid, 0)
        agent_pid = b""
        while True:
            b = os.read(rfd, 64)
            if not b:
                break
            agent_pid += b
        listener.close()
        if not agent_pid:
            sys.stdout.write(json.dumps({"ok": False, "error": "agent did not start"}) + "\n")
            return 1
        sys.stdout.write(json.dumps({"ok": True, "pid": int(agent_pid), "reused": False, "socket": path}) + "\n")
        return 0
    finally:
        os.close(lock)


def _daemon_main(cfg, listener, lock):
    os.close(lock)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    log = cfg.get("log")
    if log:
        try:
            fd = open_checked(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, (os.getuid(),))
            os.dup2(fd, 2)
            os.close(fd)
        except (OSError, UnsafePath):
            os.dup2(devnull, 2)
    else:
        os.dup2(devnull, 2)
    os.close(devnull)
    try:
        os.chdir(cfg.get("cwd") or os.getcwd())
    except OSError:
        pass
    # the interpreter's own sys.path, without the '' of `python -c`
    if sys.path and sys.path[0] == "":
        del sys.path[0]
    for k in cfg.get("unset_env") or ():
        os.environ.pop(k, None)
    agent = Agent(cfg, listener)
    try:
        agent.serve()
    except Exception:
        import traceback

        traceback.print_exc()


def main(argv):
    cfg = json.loads(argv[0])
    if cfg.get("report") is None:
        cfg["report"] = os.environ.get("SPAWNTRACE_SOCKET")
    try:
        return bootstrap(cfg)
    except UnsafePath as e:
        # a shared path failed its check: the client reports this line, never falls back
        sys.stdout.write(json.dumps({"ok": False, "unsafe": True, "error": str(e)}) + "\n")
        return 1
    except Exception as e:
        sys.stdout.write(json.dumps({"ok": False, "error": "%s: %s" % (type(e).__name__, e)}) + "\n")
        return 1


def entry(argv):
    """The agent's process entry point (the payload's last statement): bootstrap, then exit
    without running interpreter teardown."""
    rc = main(argv)
    sys.stdout.flush()
    os._exit(rc)
