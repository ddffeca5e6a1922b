# File transfers through the agent (`put`, `fetch`): the replies to send, file contents held in
# memory (at most framing.MAX_BLOB).
#
# Files are opened O_NONBLOCK and must be regular: a FIFO or device at the path (another user may
# plant one where a playbook copies to or fetches from) would block the whole agent; those go the
# classic way (`unsupported`), which handles them as it always did.
from __future__ import absolute_import

import errno
import os
import stat

from .framing import MAX_BLOB
from .shell_ops import strerror

_FILE_FLAGS = os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def _unsupported(path, what):
    return {"ok": False, "unsupported": True, "error": "%s: %s" % (path, what)}


def _failed(e):
    return {"ok": False, "errno": e.errno, "error": strerror(e)}


def put(path, mode, blob):
    """Writes `blob` to `path`; the reply. Like sftp's put, a new file gets the controller file's
    permissions `mode` (the umask applies)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | _FILE_FLAGS, int(mode) & 0o777)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO with no reader
            return _unsupported(path, "not a regular file")
        return _failed(e)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return _unsupported(path, "not a regular file")
        os.ftruncate(fd, 0)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
    except OSError as e:
        return _failed(e)
    return {"ok": True}


def fetch(path):
    """(the reply, the contents of `path`). A file over MAX_BLOB is not read: the client fetches
    it the classic way."""
    try:
        fd = os.open(path, os.O_RDONLY | _FILE_FLAGS)
    except OSError as e:
        return _failed(e), b""
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return _unsupported(path, "not a regular file"), b""
            mode = stat.S_IMODE(st.st_mode)
            data = f.read(MAX_BLOB + 1) if st.st_size <= MAX_BLOB else None
    except OSError as e:
        return _failed(e), b""
    if data is None or len(data) > MAX_BLOB:
        return _unsupported(path, "larger than %d bytes" % MAX_BLOB), b""
    return {"ok": True, "mode": mode}, data
