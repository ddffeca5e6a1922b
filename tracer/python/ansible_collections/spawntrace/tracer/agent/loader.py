# Imports a source file as a module once per process, with its compiled code cached in the
# user's own cache directory. Loaded (with plain importlib) by plugins/connection/{local,ssh}.py
# for agent/client.py, agent/agent.py and ansible-core's builtin connection plugins: Ansible's
# workers are fresh forks, and without a cache each would compile them again
# (PYTHONDONTWRITEBYTECODE or not).
#
# Compiled code is executed as is, so the cache must be writable by nobody but this user:
# `$XDG_CACHE_HOME/spawntrace/code` (or `~/.cache/...`, home from the password database) is used
# only when every component of its real path from / down is a directory (not a symlink) owned by
# root or this uid and not writable by group or others; a cache file is read only when it is a
# regular file of this uid, not group/other-writable (opened O_NOFOLLOW, checked with fstat). It
# is written under a new temporary name (O_EXCL|O_NOFOLLOW, 0600), then renamed. When the
# location fails a check, the code is compiled without any cache.
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import marshal
import os
import stat
import sys

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_state = {"pid": None, "dir": None}


def _safe_dir(st, uid):
    return stat.S_ISDIR(st.st_mode) and st.st_uid in (0, uid) and not st.st_mode & 0o022


def cache_dir():
    """The verified code cache directory of this uid (created if missing), or None."""
    if _state["pid"] == os.getpid():
        return _state["dir"]
    _state.update(pid=os.getpid(), dir=None)
    uid = os.getuid()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        try:
            import pwd

            base = os.path.join(pwd.getpwuid(uid).pw_dir, ".cache")
        except (KeyError, ImportError):
            return None
    path = os.path.join(os.path.realpath(base), "spawntrace", "code")
    parts = path.split("/")[1:]
    cur = "/"
    try:
        for i, part in enumerate([""] + parts):
            cur = os.path.join(cur, part) if part else "/"
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                if i < len(parts) - 2:  # only the cache base, spawntrace/ and code/ are made here
                    return None
                try:
                    os.mkdir(cur, 0o700)
                except FileExistsError:
                    pass
                st = os.lstat(cur)
            if not _safe_dir(st, uid):
                return None
    except OSError:
        return None
    _state["dir"] = path
    return path


def _read(cache):
    try:
        fd = os.open(cache, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return marshal.loads(b"".join(chunks))
    except (OSError, ValueError, EOFError, TypeError):
        return None
    finally:
        os.close(fd)


def _write(cache, data):
    tmp = "%s.%d.tmp" % (cache, os.getpid())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
    try:
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:  # left by a process of the same pid that died meanwhile
            os.unlink(tmp)
            fd = os.open(tmp, flags, 0o600)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, cache)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


class _Loader(importlib.machinery.SourceFileLoader):
    # (client.py's _load_agent recognises this loader by its class name and uses it for agent.py)
    def get_code(self, fullname):
        source = self.get_data(self.path)
        d = cache_dir()
        if d is None:
            return compile(source, self.path, "exec", dont_inherit=True)
        tag = hashlib.sha1(source + importlib.util.MAGIC_NUMBER + self.path.encode("utf-8", "surrogateescape")).hexdigest()
        cache = os.path.join(d, "%s-%s.bin" % (fullname, tag))
        code = _read(cache)
        if code is None:
            code = compile(source, self.path, "exec", dont_inherit=True)
            _write(cache, marshal.dumps(code))
        return code


def load(name, path):
    """Imports `path` as module `name` once per process (with the cache above)."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location(name, path, loader=_Loader(name, path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod
