# Agent directories live in shared places (/tmp, or a user's directory while we are root): every
# path there is hostile until checked (see private_dir). Files are created O_EXCL|O_NOFOLLOW
# (create_file), existing ones opened O_NOFOLLOW and fstat-checked (open_checked); nothing is
# chowned or chmodded by path. Used by the agent's bootstrap (on every target) and by the
# connection plugins before they use anything in an agent directory (client.py).
from __future__ import absolute_import

import errno
import os
import stat

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
HINT = "remove it or set SPAWNTRACE_AGENT_DIR to a private directory"


class UnsafePath(RuntimeError):
    """A path in a shared place failed its ownership or mode check (a one-line message)."""


def describe(st):
    kind = (
        "a symlink"
        if stat.S_ISLNK(st.st_mode)
        else "a directory"
        if stat.S_ISDIR(st.st_mode)
        else ("a socket" if stat.S_ISSOCK(st.st_mode) else "a file" if stat.S_ISREG(st.st_mode) else "not a directory")
    )
    return "%s, owner uid %d, mode %04o" % (kind, st.st_uid, stat.S_IMODE(st.st_mode))


def check_parents(path, owner):
    """The real path of directory `path`, after checking every component of it from / down: a
    directory owned by root or `owner`, not writable by group or others unless sticky (like
    /tmp: others may add entries there, not rename or remove ours)."""
    real = os.path.realpath(path)
    cur = "/"
    for part in [""] + [p for p in real.split("/") if p]:
        cur = os.path.join(cur, part) if part else "/"
        st = os.lstat(cur)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, owner) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise UnsafePath(
                "spawntrace: unsafe agent directory %s: its parent %s is %s (must be owned by root or uid %d "
                "and not writable by others unless sticky); set SPAWNTRACE_AGENT_DIR to a private directory"
                % (path, cur, describe(st), owner)
            )
    return real


def private_dir(path, owner):
    """Checks (creating it if missing) `path` as the private directory of uid `owner`: its
    parents pass check_parents; it is a real directory (not a symlink) owned by `owner` with no
    group or other permission. One made by root for another owner is fchowned through its fd.
    An existing directory is never repaired (no chmod): anything else raises UnsafePath.
    Returns (an O_DIRECTORY fd of it, close-on-exec, for the caller to close; its real path)."""
    parent = check_parents(os.path.dirname(os.path.abspath(path)), owner)
    real = os.path.join(parent, os.path.basename(os.path.abspath(path)))
    created = False
    try:
        os.mkdir(real, 0o700)
        created = True
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise UnsafePath(
            "spawntrace: unsafe agent directory %s: %s (must be a directory of uid %d, mode 0700); %s"
            % (real, describe(os.lstat(real)), owner, HINT)
        )
    try:
        st = os.fstat(fd)
        if created and st.st_uid == os.getuid() != owner:
            os.fchown(fd, owner, -1)
            st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or stat.S_IMODE(st.st_mode) & 0o077:
            raise UnsafePath(
                "spawntrace: unsafe agent directory %s: %s (must be a directory of uid %d, mode 0700); %s"
                % (real, describe(st), owner, HINT)
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, real


def open_checked(path, flags, owners, mode=0o600, dir_fd=None):
    """os.open of a file in a checked directory, never through a symlink (O_NOFOLLOW), and only
    a regular file of one of the uids `owners`, not writable by group or others, one link."""
    try:
        # O_NONBLOCK: a FIFO planted at the name must not block the open (it is then refused)
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise UnsafePath("spawntrace: %s is a symlink; %s" % (path, HINT))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners or st.st_mode & 0o022 or st.st_nlink != 1:
        os.close(fd)
        raise UnsafePath(
            "spawntrace: unsafe file %s: %s, %d links (must be a file of uid %s); %s"
            % (path, describe(st), st.st_nlink, "/".join(str(u) for u in sorted(set(owners))), HINT)
        )
    return fd


def create_file(path, flags=os.O_WRONLY, mode=0o600):
    """A new file at `path` (O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file, never through a
    symlink); whatever was left at that name in our checked directory is removed first."""
    flags |= os.O_CREAT | os.O_EXCL | _NOFOLLOW
    try:
        return os.open(path, flags, mode)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
    os.unlink(path)  # (unlink removes a symlink itself, never its target)
    return os.open(path, flags, mode)
