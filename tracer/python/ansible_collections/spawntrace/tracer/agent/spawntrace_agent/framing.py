# The agent socket's frames (tracer/python/RUNNER.md, "The agent socket"): used by the agent's
# server loop and by the connection plugins' client alike.
from __future__ import absolute_import

import json
import struct

PROTOCOL = 2
# Frame: u32 JSON length, u32 blob length (big-endian), the JSON (UTF-8, an object), the blob.
# Both lengths are checked against these limits as soon as the header is in, before anything is
# allocated for them; buffers then grow only as bytes arrive. A frame over a limit, JSON that is
# not valid UTF-8 or not an object, is a malformed frame: the agent answers it with
# {"ok": false, "error": "malformed frame: ..."} (instead of the hello: nothing was acted on) and
# closes the connection; the client's recv_frame raises ProtocolError.
# MAX_JSON: a request's JSON carries only small fields and, for local module runs, the worker's
# environment (`env`, at most ARG_MAX: 2 MiB with the usual 8 MiB stack; json.dumps escapes
# non-ASCII text up to 6 times): 16 MiB is plenty. Module arguments are in the payload (the blob).
# MAX_BLOB: module payloads, module output (stdout + stderr of a reply) and `put`/`fetch` file
# contents, which are held in memory: 1 GiB. Larger files go the classic way (the ssh plugin's
# put_file checks the size first; `fetch` of a larger file is answered `unsupported`).
HEADER = struct.Struct("!II")
MAX_JSON = 16 * 1024 * 1024
MAX_BLOB = 1024 * 1024 * 1024
BIG = 256 * 1024
PREALLOC = 16 * 1024 * 1024  # recv_exact allocates at most this much ahead of the data


class ProtocolError(Exception):
    pass


def check_lengths(jlen, blen):
    """A frame header's lengths, or ProtocolError if over the limits (see MAX_JSON)."""
    if jlen > MAX_JSON:
        raise ProtocolError("JSON of %d bytes (at most %d)" % (jlen, MAX_JSON))
    if blen > MAX_BLOB:
        raise ProtocolError("blob of %d bytes (at most %d)" % (blen, MAX_BLOB))
    return jlen, blen


def decode_json(data):
    """A frame's JSON object ({} when empty), or ProtocolError."""
    if not data:
        return {}
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ProtocolError("invalid JSON: %s" % e)
    if not isinstance(obj, dict):
        raise ProtocolError("the JSON is a %s, not an object" % type(obj).__name__)
    return obj


def encode_frame(obj, blob=b""):
    """A frame's header and JSON (ProtocolError if over the limits)."""
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    check_lengths(len(data), len(blob))
    return HEADER.pack(len(data), len(blob)) + data


def send_frame(sock, obj, blob=b""):
    head = encode_frame(obj, blob)
    if len(blob) <= BIG:
        sock.sendall(head + bytes(blob))
    else:
        sock.sendall(head)
        sock.sendall(blob)


def recv_exact(sock, n):
    """`n` bytes from a blocking socket; the buffer grows as they arrive (never more than
    PREALLOC, or as much as has arrived, ahead of the data)."""
    buf = bytearray(min(n, PREALLOC))
    view = memoryview(buf)
    got = 0
    while got < n:
        if got == len(buf):
            view.release()
            buf += bytes(min(len(buf), n - got))
            view = memoryview(buf)
        k = sock.recv_into(view[got:], len(buf) - got)
        if k == 0:
            view.release()
            raise ProtocolError("connection closed after %d of %d bytes" % (got, n))
        got += k
    view.release()
    return bytes(buf)


def recv_frame(sock):
    """One frame from a blocking socket: (JSON object, blob). ProtocolError if it is malformed
    (checked before anything is allocated for it) or the connection closes."""
    jlen, blen = check_lengths(*HEADER.unpack(recv_exact(sock, HEADER.size)))
    obj = decode_json(recv_exact(sock, jlen)) if jlen else {}
    blob = recv_exact(sock, blen) if blen else b""
    return obj, blob


class FrameReader(object):
    """Incremental frame parser for a non-blocking socket: feed() what arrives; frame() gives
    (JSON object, blob) once a whole frame is in, else None. The lengths are checked as soon as
    the header is in, the JSON as soon as it is in (ProtocolError), before any of the blob."""

    def __init__(self):
        self.buf = bytearray()
        self.need = None  # (jlen, blen) once the header is in
        self.obj = None  # the JSON object once it is in (buf then holds only blob bytes)

    def feed(self, data):
        self.buf += data

    def pending(self):
        """Whether part of a frame is in."""
        return bool(self.buf) or self.need is not None

    def frame(self):
        if self.need is None:
            if len(self.buf) < HEADER.size:
                return None
            self.need = check_lengths(*HEADER.unpack_from(self.buf))
            del self.buf[: HEADER.size]
        jlen, blen = self.need
        if self.obj is None:
            if len(self.buf) < jlen:
                return None
            self.obj = decode_json(self.buf[:jlen])
            del self.buf[:jlen]
        if len(self.buf) < blen:
            return None
        if len(self.buf) == blen:
            blob = bytes(self.buf)
            self.buf = bytearray()
        else:
            view = memoryview(self.buf)
            blob = view[:blen].tobytes()
            view.release()
            del self.buf[:blen]
        obj = self.obj
        self.need = self.obj = None
        return obj, blob
