# spawntrace persistent agent: one long-lived Python per (host, user, become user, interpreter,
# agent version, controller), serving the spawntrace `local` and `ssh` connection plugins.
#
# Self-contained (standard library only, Python 3.6+, Linux/POSIX): the same file is imported by
# the connection plugins (framing and the native shell-housekeeping ops) and shipped as the
# agent's source (`python -c <this source> <config json>`, locally, under sudo and over ssh).
# The protocol and the attribution messages are described in tracer/python/RUNNER.md.
from __future__ import absolute_import

import errno
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import time

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
# See tracer/python/RUNNER.md ("The agent socket").
HEADER = struct.Struct("!II")
MAX_JSON = 16 * 1024 * 1024
MAX_BLOB = 1024 * 1024 * 1024
BIG = 256 * 1024
PREALLOC = 16 * 1024 * 1024  # recv_exact allocates at most this much ahead of the data

# The agent is started as `python -c <this file's source> <config json>`.


class ProtocolError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# framing


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


# ---------------------------------------------------------------------------------------------
# native shell housekeeping: each returns (rc, stdout, stderr) exactly as the /bin/sh command
# the shell plugin built would, or None when the case is not handled natively (the caller then
# runs the real command).


def _enc(text):
    return text.encode("utf-8", "surrogateescape")


def _strerror(e):
    return os.strerror(e.errno) if e.errno else str(e)


def op_expand_user(word, env, literal=False):
    """`echo WORD` where WORD is `~` or `~user` (tilde-expanded), or a quoted path (literal)."""
    if literal:
        out = word
    elif word == "~":
        home = env.get("HOME")
        if home is None:
            return None
        out = home
    elif word.startswith("~"):
        try:
            import pwd

            out = pwd.getpwnam(word[1:]).pw_dir
        except KeyError:
            out = word
    else:
        out = word
    if "\\" in out:
        return None  # dash's echo would interpret escapes
    return 0, _enc(out) + b"\n", b""


def _makedirs(path, mode):
    """`mkdir -p`: every missing component with `mode` (the caller's umask 77 gives 0700)."""
    parts = []
    head = path.rstrip("/") or "/"
    while head and head != "/" and not os.path.isdir(head):
        parts.append(head)
        head = os.path.dirname(head)
    for p in reversed(parts):
        try:
            os.mkdir(p, mode)
        except OSError as e:
            if e.errno == errno.EEXIST and os.path.isdir(p):
                continue
            raise


def op_mkdtemp(basetmpdir, basetmp, basefile, mode):
    """`( umask U && mkdir -p BASETMPDIR && mkdir BASETMP && echo BASEFILE=BASETMP )`."""
    for target, fn in ((basetmpdir, _makedirs), (basetmp, os.mkdir)):
        try:
            fn(target, mode)
        except OSError as e:
            msg = "mkdir: cannot create directory '%s': %s\n" % (target, _strerror(e))
            return 1, b"", _enc(msg)
    return 0, _enc("%s=%s\n" % (basefile, basetmp)), b""


_WHO = {"u": 0o700, "g": 0o070, "o": 0o007}


def parse_chmod(mode):
    """Symbolic modes of the form [ugoa]+[-+=][rwxX]* (comma separated), else None."""
    clauses = []
    for clause in mode.split(","):
        i = 0
        while i < len(clause) and clause[i] in "ugoa":
            i += 1
        who, rest = clause[:i], clause[i:]
        if not who or len(rest) < 1 or rest[0] not in "+-=" or any(c not in "rwxX" for c in rest[1:]):
            return None
        mask = 0
        for c in who:
            mask |= 0o777 if c == "a" else _WHO[c]
        clauses.append((mask, rest[0], rest[1:]))
    return clauses


def _apply_chmod(cur, clauses, isdir):
    for mask, op, perms in clauses:
        bits = 0
        for c in perms:
            if c == "r":
                bits |= 0o444
            elif c == "w":
                bits |= 0o222
            elif c == "x":
                bits |= 0o111
            elif c == "X" and (isdir or cur & 0o111):
                bits |= 0o111
        bits &= mask
        if op == "+":
            cur |= bits
        elif op == "-":
            cur &= ~bits
        else:
            cur = (cur & ~mask) | bits
    return cur


def op_chmod(mode, paths):
    """`chmod MODE PATH...` for the symbolic modes parse_chmod accepts."""
    clauses = parse_chmod(mode)
    if clauses is None:
        return None
    rc, err = 0, []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            rc = 1
            err.append("chmod: cannot access '%s': %s\n" % (p, _strerror(e)))
            continue
        new = _apply_chmod(stat.S_IMODE(st.st_mode), clauses, stat.S_ISDIR(st.st_mode))
        if new != stat.S_IMODE(st.st_mode):
            try:
                os.chmod(p, new)  # safe: the `chmod` Ansible asked for, as the user its shell would run as
            except OSError as e:
                rc = 1
                err.append("chmod: changing permissions of '%s': %s\n" % (p, _strerror(e)))
    return rc, b"", _enc("".join(err))


def op_rm(path, recurse):
    """`rm -f [-r] PATH > /dev/null 2>&1`."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return (0 if e.errno == errno.ENOENT else 1), b"", b""
    if stat.S_ISDIR(st.st_mode):
        if not recurse:
            return 1, b"", b""
        import shutil

        failed = []
        shutil.rmtree(path, onerror=lambda *a: failed.append(a))
        return (1 if failed else 0), b"", b""
    try:
        os.unlink(path)
    except OSError as e:
        return (0 if e.errno == errno.ENOENT else 1), b"", b""
    return 0, b"", b""


def op_exists(path):
    """`test -e PATH`."""
    return (0 if os.path.exists(path) else 1), b"", b""


def run_op(op, args, env):
    if op == "expand_user":
        return op_expand_user(args["word"], env, args.get("literal", False))
    if op == "mkdtemp":
        return op_mkdtemp(args["basetmpdir"], args["basetmp"], args["basefile"], args["mode"])
    if op == "chmod":
        return op_chmod(args["mode"], args["paths"])
    if op == "rm":
        return op_rm(args["path"], args["recurse"])
    if op == "exists":
        return op_exists(args["path"])
    return None


# ---------------------------------------------------------------------------------------------
# attribution datagrams (see tracer/python/PROTOCOL.md)


class Reporter(object):
    def __init__(self, path):
        self.path = path
        self.sock = None
        self.dropped = 0
        self.errors = 0
        self.usable = bool(path)

    def send(self, ev, **fields):
        if not self.usable:
            return False
        try:
            msg = {"v": 1, "ev": ev, "ts": time.monotonic_ns() if hasattr(time, "monotonic_ns") else int(time.monotonic() * 1e9)}
            msg["pid"] = os.getpid()
            msg["dropped"] = self.dropped
            msg["errors"] = self.errors
            msg.update(fields)
            data = json.dumps(msg, separators=(",", ":"), default=str).encode("utf-8", "replace")
            if self.sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    s.connect(self.path)
                except OSError as e:
                    s.close()
                    if e.errno in (errno.EACCES, errno.EPERM):
                        self.usable = False  # e.g. an agent running as another (become) user
                    raise
                s.settimeout(0.05)
                self.sock = s
            self.sock.send(data)
            return True
        except socket.timeout:
            self.dropped += 1
        except OSError as e:
            self.dropped += 1
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS) and self.sock is not None:
                self.sock.close()
                self.sock = None
        except Exception:
            self.errors += 1
        return False


# ---------------------------------------------------------------------------------------------
# the agent


def _now():
    return time.monotonic_ns() if hasattr(time, "monotonic_ns") else int(time.monotonic() * 1e9)


def _proc_start(pid):
    """Start time of a process (clock ticks since boot), or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid, start):
    if not pid:
        return True
    if os.path.isdir("/proc/self"):
        return _proc_start(pid) == start if start is not None else _proc_start(pid) is not None
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def _peer_uid(sock):
    so_peercred = getattr(socket, "SO_PEERCRED", 17)
    data = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    return struct.unpack("3i", data)[1]


def _memfd(name):
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


def _rc_of(status):
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _recv_fds(sock, maxfds=8):
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


def _read_all(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


_MAIN_MARK = b'\nif __name__ == "__main__":\n'
_ZIP_MARK = b"zip_data='"


def split_payload(payload):
    """An AnsiballZ wrapper as (head source, tail source with the zip literal replaced by a name,
    the zip's base64 text, head line count), or None. The head (the wrapper's code, identical for
    every task of an ansible-core version) can then be compiled once, and the 100+ KB literal need
    not be tokenized per task."""
    i = payload.rfind(_MAIN_MARK)
    if i < 0:
        return None
    j = payload.find(_ZIP_MARK, i)
    if j < 0 or payload.find(_ZIP_MARK, j + 1) >= 0:
        return None
    k = payload.find(b"'", j + len(_ZIP_MARK))
    if k < 0:
        return None
    data = payload[j + len(_ZIP_MARK) : k]
    if b"\\" in data or b"\n" in data:
        return None
    head = payload[:i]
    tail = payload[i:j] + _ZIP_NAME + payload[k + 1 :]
    return head, tail, data, head.count(b"\n")


_ZIP_NAME = b"zip_data=__spawntrace_zip_data"


def strip_payload(payload):
    """(the payload without its zip literal, the zip's base64 text) or None: what a client sends
    when the agent may have that zip already (`zip_sha`), as every item of a loop carries the
    same one. `unstrip_payload` gives the payload back byte for byte."""
    parts = split_payload(payload)
    if parts is None or payload.count(_ZIP_NAME):
        return None
    head, tail, data, _ = parts
    return head + tail, data


def unstrip_payload(stripped, data):
    i = stripped.rfind(_ZIP_NAME)
    if i < 0 or stripped.count(_ZIP_NAME) != 1:
        raise ProtocolError("no zip place in a stripped payload")
    return b"".join((stripped[:i], _ZIP_MARK, data, b"'", stripped[i + len(_ZIP_NAME) :]))


# Compiled code shared with forked runners: ("head", sha1) -> an AnsiballZ wrapper's code;
# ("zip", path inside the zip, sha1 of the source) -> code of a module a payload's zip provides
# (zipimport compiles from source each time, twice per import on 3.11/3.12).
CODE_CACHE = {}


def _with_filename(code, filename):
    """`code` with co_filename set to `filename`, nested code objects included."""
    try:
        consts = tuple(_with_filename(c, filename) if hasattr(c, "co_filename") else c for c in code.co_consts)
        return code.replace(co_filename=filename, co_consts=consts)
    except Exception:
        return code


def _zip_inner(pathname):
    i = pathname.find(".zip/")
    return pathname[i + 5 :] if i >= 0 else None


def _install_code_cache():
    import hashlib
    import zipimport

    orig = getattr(zipimport, "_compile_source", None)
    if orig is None or getattr(zipimport, "_spawntrace_orig_compile_source", None) is not None:
        return

    def _compile_source(pathname, source):
        if CODE_CACHE:
            inner = _zip_inner(pathname)
            if inner is not None:
                code = CODE_CACHE.get(("zip", inner, hashlib.sha1(source).hexdigest()))
                if code is not None:
                    return _with_filename(code, pathname)
        return orig(pathname, source)

    zipimport._spawntrace_orig_compile_source = orig
    zipimport._compile_source = _compile_source


def _cache_zip_source(inner, source):
    import hashlib
    import zipimport

    key = ("zip", inner, hashlib.sha1(source).hexdigest())
    if key not in CODE_CACHE:
        compile_source = getattr(zipimport, "_spawntrace_orig_compile_source", None)
        if compile_source is not None:
            try:
                CODE_CACHE[key] = compile_source("<zip>/" + inner, source)
            except SyntaxError:
                pass


PAGE = 4096


def _heap_ranges():
    """The [heap] (brk) mappings of this process: [(start, end)]."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                out.append((lo, hi))
    return out


class HotPages(object):
    """The heap pages module runners write, learnt from the runners themselves: a bitmap (page
    offset from the heap's start) in memory shared by the agent's zygote and all its runners.
    A runner that ends marks the heap pages it holds privately (/proc/self/pagemap: present and
    mapped once: copied on write, or new); a new spare copies just those pages in advance. The
    heap holds the interpreter's large objects (dict tables, code): copying all of it per runner
    costs more than its faults, the few hundred pages a module writes cost less."""

    LEARN_RUNS = 64  # runners that report; later ones add little

    def __init__(self, pages=1 << 16):
        import mmap

        self.map = mmap.mmap(-1, 8 + pages // 8, flags=mmap.MAP_SHARED)
        self.pages = pages
        heap = _heap_ranges()
        self.base = heap[0][0] if heap else None

    def _count(self):
        return struct.unpack_from("!Q", self.map, 0)[0]

    def learn(self):
        """In a runner that is done: marks the heap pages it holds privately."""
        if self.base is None or self._count() >= self.LEARN_RUNS:
            return
        struct.pack_into("!Q", self.map, 0, self._count() + 1)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            for lo, hi in _heap_ranges():
                first = (lo - self.base) // PAGE
                n = min((hi - lo) // PAGE, self.pages - first)
                if first < 0 or n <= 0:
                    continue
                data = os.pread(fd, n * 8, (lo // PAGE) * 8)
                for i, (entry,) in enumerate(struct.iter_unpack("=Q", data)):
                    # bit 63: present, bit 56: mapped exclusively (Linux 4.2+)
                    if entry >> 63 and (entry >> 56) & 1:
                        k = first + i
                        b = 8 + k // 8
                        self.map[b] |= 1 << (k % 8)
        finally:
            os.close(fd)

    def ranges(self):
        """(start, length) of the runs of hot pages."""
        if self.base is None:
            return []
        bits = self.map[8:]
        out = []
        start = None
        for i, byte in enumerate(bits):
            if byte == 0 and start is None:
                continue
            for j in range(8):
                on = (byte >> j) & 1
                k = i * 8 + j
                if on and start is None:
                    start = k
                elif not on and start is not None:
                    out.append((self.base + start * PAGE, (k - start) * PAGE))
                    start = None
        if start is not None:
            out.append((self.base + start * PAGE, (len(bits) * 8 - start) * PAGE))
        return out


def prefault(hot=None):
    """Copies this (freshly forked) process's private writable memory now, with
    madvise(MADV_POPULATE_WRITE) (Linux 5.14+), so that the module run that follows does not take
    a copy-on-write fault per page it writes (about a thousand for a small module: milliseconds
    on some VMs); of the heap, only the pages runners were seen to write (`hot`, a HotPages).
    A spare runner does this while it waits for work."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        budget = 512 << 20
        ranges = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                perms = parts[1]
                if perms[1] != "w" or perms[3] != "p" or (len(parts) > 5 and parts[5].startswith("[")):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi - lo))
        heap = _heap_ranges()
        for lo, n in (hot.ranges() if hot is not None else []):
            # within the heap as it is now (it may have shrunk)
            for hlo, hhi in heap:
                a, b = max(lo, hlo), min(lo + n, hhi)
                if a < b:
                    ranges.append((a, b - a))
        for lo, n in ranges:
            if n > budget:
                break
            if madvise(lo, n, 23) != 0:  # MADV_POPULATE_WRITE
                if ctypes.get_errno() == errno.EINVAL:
                    return  # kernel without it
                continue
            budget -= n
    except Exception:
        pass


_WRAPPER_ARGS = ("zip_data", "ansible_module", "module_fqn", "params", "profile", "date_time", "extensions", "rlimit_nofile")


def _fast_ansiballz_main(ns, modlib_path):
    """Replaces the `_ansiballz_main` an AnsiballZ wrapper (ansible-core 2.19+) just defined in
    `ns` with one that runs the module from `modlib_path`, the same zip the payload carries
    already written out with the wrapper's sitecustomize (see Agent._keep_payload_zip), instead
    of decoding and writing it to a fresh temporary directory each time. Every other step is the
    wrapper's own: working directory check, RLIMIT_NOFILE, sys.path cleaning, then
    `_loader.run_module`. The wrapper's debug subcommands (explode/execute) and wrappers of any
    other shape keep the original."""
    orig = ns.get("_ansiballz_main")
    code = getattr(orig, "__code__", None)
    if code is None or code.co_varnames[: code.co_argcount] != _WRAPPER_ARGS or code.co_kwonlyargcount:
        return

    def _ansiballz_main(zip_data, ansible_module, module_fqn, params, profile, date_time, extensions, rlimit_nofile):
        if len(sys.argv) == 2:
            return orig(zip_data, ansible_module, module_fqn, params, profile, date_time, extensions, rlimit_nofile)
        try:
            os.getcwd()
        except OSError:
            try:
                os.chdir(os.path.expanduser("~"))
            except OSError:
                os.chdir("/")
        if rlimit_nofile:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = min(hard, rlimit_nofile)
            if want != soft:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                except ValueError:
                    pass
        scriptdir = None
        try:
            scriptdir = os.path.dirname(os.path.realpath(sys.modules["__main__"].__file__))
        except (AttributeError, OSError):
            pass
        excludes = {"", ".", scriptdir}
        sys.path = [p for p in sys.path if p not in excludes]
        sys.path.insert(0, modlib_path)
        from ansible.module_utils._internal._ansiballz import _loader

        _loader.run_module(json_params=params.encode(), profile=profile, module_fqn=module_fqn,
                           modlib_path=modlib_path, extensions=extensions)

    ns["_ansiballz_main"] = _ansiballz_main


class _DynPath(list):
    """__path__ of a warm `ansible.*` package: the module_utils zips the current payload put on
    sys.path first (so modules not yet imported come from this run's zip), then the warm zip."""

    def __init__(self, rel, fixed, warm_zips):
        list.__init__(self, fixed)
        self.rel = rel
        self.fixed = list(fixed)
        self.warm_zips = warm_zips

    def __iter__(self):
        extra = [p + "/" + self.rel for p in sys.path if isinstance(p, str) and p.endswith(".zip") and p not in self.warm_zips]
        return iter(extra + self.fixed)


class _Conn(object):
    """A client connection of the agent (non-blocking): the request being read, the reply being
    written (a queue of memoryviews), and when each last made progress."""

    def __init__(self, sock):
        import collections

        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader()
        self.t_accept = _now()
        self.t_read = None  # monotonic time of the last bytes of a partial request
        self.t_write = None  # monotonic time the reply last made progress
        self.out = collections.deque()
        self.kept = False  # kept between requests (`keep`)
        self.reading = False  # waiting for a request
        self.close_after = False  # closed once the reply is out
        self.closed = False
        self.mask = 0  # what it is polled for

    def idle(self):
        """A kept connection waiting for its next request, nothing of it in yet."""
        return self.kept and self.reading and not self.out and not self.reader.pending()


class Agent(object):
    def __init__(self, cfg, listener):
        self.cfg = cfg
        self.listener = listener
        self.idle = float(cfg.get("idle", 60))
        self.controller = cfg.get("controller_pid")
        self.controller_start = cfg.get("controller_start")
        self.allowed = set([os.getuid(), int(cfg.get("client_uid", os.getuid()))])
        self.reporter = Reporter(cfg.get("report"))
        self.conns = {}  # fd -> _Conn, every client connection open
        # a connection with part of a request in and no byte more for `frame_timeout` seconds, or
        # with part of a reply out that its client takes no byte of for `send_timeout`, is dropped
        self.frame_timeout = float(cfg.get("frame_timeout", 30))
        self.send_timeout = float(cfg.get("send_timeout", 60))
        self.runners = {}  # pid -> (socket, out fd, err fd, request)
        self.last = time.monotonic()
        self.warm_version = None
        self.warm_zips = set()
        self.payload_zips = set()  # see _keep_payload_zip (written by the zygote)
        self.base_env = dict(os.environ)
        self.base_cwd = os.getcwd()
        self.base_umask = os.umask(0o022)
        os.umask(self.base_umask)
        self.base_path = list(sys.path)
        self.stdio = [(s.encoding, s.errors) if s is not None else ("utf-8", "strict") for s in (sys.stdin, sys.stdout, sys.stderr)]
        self.stopping = False
        self.t_accept = None
        self.served = 0
        self.accepted = 0
        self.zips = {}  # sha1 -> base64 zip text of recent payloads (see strip_payload)
        self.hot = None  # HotPages, shared with the zygote and its runners
        self.learned = set()
        self.unwarmable = set()
        # spare runners, oldest first: a module run takes the oldest, whose memory copy
        # (prefault) has had the most time to finish; two cover a module run that follows
        # another at once (copy's stat then copy)
        self.spares = []
        self.spare_pending = 0  # asked of the zygote, not arrived yet
        self.spare_stale = 0  # of those, asked before a learn: discarded on arrival
        self.pool = max(1, int(cfg.get("spares", 2)))
        self.reuse = int(cfg.get("reuse", 0) or 0)  # modules per runner (opt-in; see _Reuse)
        self.zsock = None  # the zygote's socket (see _zygote_start)
        self.zpid = None
        self.epoch = 0
        self.by_done = {}  # done pipe fd -> runner pid
        self.exited = {}  # runner pid -> wait status (from the zygote)

    # -- main loop --------------------------------------------------------------------------

    def serve(self):
        self.reporter.send("agent_start", host=self.cfg.get("host"), user=self.cfg.get("user"),
                           become_user=self.cfg.get("become_user"), version=self.cfg.get("version"))
        rfd, wfd = os.pipe()
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self.wakeup = (rfd, wfd)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        signal.set_wakeup_fd(wfd)
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
                    try:
                        while os.read(rfd, 512):
                            pass
                    except OSError:
                        pass
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
        if not _alive(self.controller, self.controller_start):
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
        if self.controller and not _alive(self.controller, self.controller_start):
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
        for z in self.warm_zips:
            try:
                os.unlink(z)
            except OSError:
                pass
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
                if _peer_uid(conn) not in self.allowed:
                    conn.close()
                    continue
            except OSError:
                conn.close()
                continue
            self.accepted += 1
            self._rearm(conn, kept=False)

    def _rearm(self, conn, kept=True):
        """Waits for a request on `conn` (a socket: a new connection) or a _Conn (`kept`: its
        client asked to keep it after a reply). Kept connections that wait do not keep the agent
        alive."""
        if not isinstance(conn, _Conn):
            try:
                conn.setblocking(False)
            except OSError:
                conn.close()
                return
            conn = _Conn(conn)
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
                c.t_accept = _now()  # a kept connection: the request's arrival
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

    # -- requests ---------------------------------------------------------------------------

    def _reply(self, conn, rc, out, err, **extra):
        resp = {"ok": True, "rc": rc, "out": len(out), "version": self.cfg.get("version")}
        resp.update(extra)
        self._send(conn, resp, out + err)

    def _dispatch(self, conn, req, blob):
        op = req.get("op")
        self.served += 1
        if req.get("version") not in (None, self.cfg.get("version")):
            self._send(conn, {"ok": False, "unsupported": True, "error": "agent version %s" % self.cfg.get("version")})
            return False
        if op == "ping":
            self._send(conn, {"ok": True, "pid": os.getpid(), "version": self.cfg.get("version"),
                              "reporting": self.reporter.usable, "served": self.served,
                              "accepted": self.accepted})
            return False
        if op == "quit":
            self.stopping = True
            self._send(conn, {"ok": True})
            return False
        if op == "run":
            return self._run(conn, req, blob)
        if op == "put":
            return self._put(conn, req, blob)
        if op == "fetch":
            return self._fetch(conn, req)
        env = self.base_env if req.get("env") is None else req["env"]
        res = run_op(op, req.get("args") or {}, env)
        if res is None:
            self._send(conn, {"ok": False, "unsupported": True})
        else:
            self._reply(conn, *res)
        return False

    # Files are opened O_NONBLOCK and must be regular: a FIFO or device at the path (another
    # user may plant one where a playbook copies to or fetches from) would block the whole agent;
    # those go the classic way (`unsupported`), which handles them as it always did.
    _FILE_FLAGS = os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)

    def _unsupported_file(self, conn, path, what):
        self._send(conn, {"ok": False, "unsupported": True, "error": "%s: %s" % (path, what)})
        return False

    def _put(self, conn, req, blob):
        path = req["path"]
        try:
            # like sftp's put: a new file gets the controller file's permissions (umask applies)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | self._FILE_FLAGS, int(req.get("mode", 0o666)) & 0o777)
        except OSError as e:
            if e.errno == errno.ENXIO:  # a FIFO with no reader
                return self._unsupported_file(conn, path, "not a regular file")
            self._send(conn, {"ok": False, "errno": e.errno, "error": _strerror(e)})
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return self._unsupported_file(conn, path, "not a regular file")
            os.ftruncate(fd, 0)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
        except OSError as e:
            self._send(conn, {"ok": False, "errno": e.errno, "error": _strerror(e)})
            return False
        self._send(conn, {"ok": True})
        return False

    def _fetch(self, conn, req):
        path = req["path"]
        try:
            fd = os.open(path, os.O_RDONLY | self._FILE_FLAGS)
        except OSError as e:
            self._send(conn, {"ok": False, "errno": e.errno, "error": _strerror(e)})
            return False
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    return self._unsupported_file(conn, path, "not a regular file")
                mode = stat.S_IMODE(st.st_mode)
                # a file over MAX_BLOB is not read: the client fetches it the classic way
                data = f.read(MAX_BLOB + 1) if st.st_size <= MAX_BLOB else None
        except OSError as e:
            self._send(conn, {"ok": False, "errno": e.errno, "error": _strerror(e)})
            return False
        if data is None or len(data) > MAX_BLOB:
            return self._unsupported_file(conn, path, "larger than %d bytes" % MAX_BLOB)
        self._send(conn, {"ok": True, "mode": mode}, data)
        return False

    def _warm(self, req, payload):
        version = req.get("ansible_version")
        if self.warm_version is not None or not version or not req.get("warm", True):
            return
        self.warm_version = False  # one attempt
        i = payload.rfind(b"zip_data='")
        j = payload.find(b"'", i + 10) if i >= 0 else -1
        if i < 0 or j < 0:
            return
        import base64

        try:
            data = base64.b64decode(payload[i + 10 : j])
        except Exception:
            return
        d = self.cfg.get("dir") or os.path.dirname(self.cfg["socket"])
        path = os.path.join(d, "warm-%d.zip" % os.getpid())
        fd = create_file(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.warm_zips.add(path)
        before = set(sys.modules)
        sys.path.insert(0, path)
        try:
            import importlib

            # what every AnsiballZ wrapper imports from the standard library (zipfile decodes
            # member names with cp437), then ansible's own entry points
            for name in ("base64", "shutil", "tempfile", "zipfile", "runpy", "encodings.cp437", "resource"):
                try:
                    importlib.import_module(name)
                except ImportError:
                    pass
            for name in ("ansible.module_utils.basic", "ansible.module_utils._internal._ansiballz._loader"):
                try:
                    importlib.import_module(name)
                except ImportError:
                    pass
        except Exception:
            # a half-imported ansible is worse than none
            for name in set(sys.modules) - before:
                if name == "ansible" or name.startswith("ansible."):
                    del sys.modules[name]
            return
        finally:
            try:
                sys.path.remove(path)
            except ValueError:
                pass
        self._dynamic_paths()
        _install_code_cache()
        # tempfile finds its directory by creating a test file, once per process: do it here for
        # runners whose environment names the same candidates (see _runner_main)
        import tempfile

        try:
            tempfile.gettempdir()
        except Exception:
            pass
        self.warm_version = version
        self.epoch += 1
        import gc

        gc.collect()
        if hasattr(gc, "freeze"):
            gc.freeze()

    def _learn(self, req, payload):
        """After a reply (off the critical path): compile this payload's wrapper and module once,
        and import the module_utils its zip carries that are not warm yet, so that the next
        runners fork with them."""
        if not self.warm_version or req.get("ansible_version") != self.warm_version:
            return
        module = req.get("module")
        if not module or module in self.learned:
            return
        self.learned.add(module)
        parts = split_payload(payload)
        if parts is None:
            return
        import base64
        import hashlib
        import io
        import zipfile

        head, _, data, _ = parts
        key = ("head", hashlib.sha1(head).hexdigest())
        if key not in CODE_CACHE:
            CODE_CACHE[key] = compile(head, "<stdin>", "exec", dont_inherit=True)
        raw = base64.b64decode(data)
        zf = zipfile.ZipFile(io.BytesIO(raw))
        utils = []
        for name in zf.namelist():
            if not name.endswith(".py"):
                continue
            mod = name[:-3].replace("/", ".")
            if mod.endswith(".__init__"):
                mod = mod[: -len(".__init__")]
            if mod.startswith("ansible.module_utils.") or mod == "ansible.module_utils":
                if mod not in sys.modules and mod not in self.unwarmable:
                    utils.append(mod)
            elif mod == "ansible.modules" or mod.startswith("ansible.modules.") or mod.startswith("ansible_collections."):
                _cache_zip_source(name, zf.read(name))
        if utils:
            self._import_from_zip(raw, sorted(utils))
        self._keep_payload_zip(module, data, raw)
        self.epoch += 1
        import gc

        if hasattr(gc, "freeze"):
            gc.freeze()

    def _keep_payload_zip(self, module, data, raw):
        """Writes this payload's zip once, as the AnsiballZ wrapper would (with its sitecustomize),
        at a path that lasts as long as the agent, and reads its directory now: runners of later
        payloads carrying the same zip run from it (see _fast_ansiballz_main)."""
        import hashlib
        import zipfile
        import zipimport

        d = self.cfg.get("dir") or os.path.dirname(self.cfg["socket"])
        sha = hashlib.sha1(data).hexdigest()
        short = "".join(c if c.isalnum() or c == "_" else "_" for c in module.rsplit(".", 1)[-1])[:40]
        path = os.path.join(d, "ansible_%s_payload-%d-%s.zip" % (short, os.getpid(), sha[:16]))
        try:
            fd = create_file(path, os.O_RDWR)
            self.payload_zips.add(path)
            with os.fdopen(fd, "r+b") as f:
                f.write(raw)
                f.seek(0)
                with zipfile.ZipFile(f, mode="a") as z:
                    zinfo = zipfile.ZipInfo()
                    zinfo.filename = "sitecustomize.py"
                    zinfo.date_time = time.gmtime()[:6]
                    z.writestr(zinfo, ('import sys\nsys.path.insert(0, "%s")\n' % path).encode("utf-8"))
            sys.path_importer_cache[path] = zipimport.zipimporter(path)
        except Exception:
            return
        CODE_CACHE[("payload", sha)] = path

    def _import_from_zip(self, raw, names):
        d = self.cfg.get("dir") or os.path.dirname(self.cfg["socket"])
        path = os.path.join(d, "warm-%d-%d.zip" % (os.getpid(), len(self.warm_zips)))
        fd = create_file(path)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        self.warm_zips.add(path)
        import importlib

        sys.path.insert(0, path)
        try:
            for name in names:
                if name in sys.modules:
                    continue
                before = set(sys.modules)
                try:
                    importlib.import_module(name)
                except BaseException:
                    self.unwarmable.add(name)
                    for n in set(sys.modules) - before:
                        del sys.modules[n]
        finally:
            try:
                sys.path.remove(path)
            except ValueError:
                pass
        self._dynamic_paths()

    def _dynamic_paths(self):
        for name, mod in list(sys.modules.items()):
            if (name == "ansible" or name.startswith("ansible.")) and type(getattr(mod, "__path__", None)) is list:
                mod.__path__ = _DynPath(name.replace(".", "/"), mod.__path__, self.warm_zips)

    # -- module runs ----------------------------------------------------------------------
    #
    # The agent itself stays small and never forks runners: a "zygote" (forked once, at the first
    # module run) holds the warm state (module_utils imported, code compiled) and forks runners on
    # request, ahead of time. A spare runner copies its memory (prefault) and waits for a request
    # on a pipe; it runs the AnsiballZ payload in-process with stdout/stderr on memfds, reports its
    # exit code on a second pipe once its output is complete, then exits. The agent replies as soon
    # as that code arrives, or, if the runner dies without one, when the zygote reports its status.
    # Forking, copying memory and reaping thus happen between tasks, not during them (fork costs
    # milliseconds on some VMs, and so do the copy-on-write faults of a fresh fork).

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
            msg, fds = _recv_fds(self.zsock)
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
                    self._finish(pid, _rc_of(msg["status"]))
        elif kind == "warmed":
            self.warm_version = msg.get("version") or False
        return msg

    def _zwait(self, kind):
        while True:
            msg = self._zreadable(block=True)
            if msg is not None and msg.get("ev") == kind:
                return msg

    def _with_payload_fd(self, payload):
        fd = _memfd("spawntrace-payload")
        view = memoryview(payload)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _want_spare(self, needed=False):
        """Asks the zygote for spares up to the pool size (`needed`: one for a run at hand, even
        while stopping)."""
        while self.zsock is not None and (needed or not self.stopping) and len(self.spares) + self.spare_pending - self.spare_stale < (self.pool if not self.stopping else 1):
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
        t_recv = _now()
        sha = req.get("zip_sha")
        if sha and req.get("stripped"):
            data = self.zips.get(sha)
            if data is None:
                self._send(conn, {"ok": False, "need_zip": True})
                return False
            payload = unstrip_payload(payload, data)
        elif sha and payload:
            import hashlib

            parts = split_payload(payload)
            if parts is not None and hashlib.sha1(parts[2]).hexdigest() == sha:
                if len(self.zips) >= 32:
                    self.zips.pop(next(iter(self.zips)))
                self.zips[sha] = parts[2]
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
        while not self.spares:
            self._want_spare(needed=True)
            self._zwait("spare")
        runner = self.spares.pop(0)
        data = json.dumps(req, separators=(",", ":")).encode("utf-8")
        reusable = self.reuse > 1
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
            reported = False
            if self.reporter.usable:
                reported = self.reporter.send(
                    "runner_start", pid=runner["pid"], agent_pid=os.getpid(), task_uuid=req.get("task_uuid"),
                    host=req.get("host"), worker_pid=req.get("worker_pid"), item=req.get("item"),
                    module=req.get("module"))
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
            runner["times"] = [int(x) for x in fields[1:3]]
            runner["again"] = len(fields) > 3 and fields[3] == b"1" and runner.get("req_w") is not None
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
                self._finish(pid, _rc_of(self.exited[pid]))

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
            out, err = _read_all(runner["out"]), _read_all(runner["err"])
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
        times = runner.get("times") or [None, None]
        req = runner.pop("req")
        # queued (see _send): a client that does not read its reply holds up nobody
        self._reply(conn, rc, out, err, t=[runner["t_recv"]] + times + [_now(), runner["t_accept"]])
        self._done_with(conn, req)
        if again:
            # in-process reuse (opt-in): this runner is warm and has its memory; it goes first
            for k in ("payload", "done", "times", "t_recv", "t_accept", "eof"):
                runner.pop(k, None)
            if len(self.spares) >= self.pool:
                self._discard(self.spares.pop())
            self.spares.insert(0, runner)
        module = req.get("module")
        if module and module not in self.learned and self.warm_version and req.get("ansible_version") == self.warm_version:
            # new to the zygote: let it compile and import what this payload brings, and replace
            # the spare made before that
            self.learned.add(module)
            fd = self._with_payload_fd(payload)
            try:
                self._zsend({"op": "learn", "req": req}, [fd])
            finally:
                os.close(fd)
            self._discard_spares()
            self.spare_stale = self.spare_pending
        self._want_spare()
        self.last = time.monotonic()

    # -- the runner (forked child) ----------------------------------------------------------

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            if pid == self.zpid:
                # the zygote died: runners in flight report through their done pipes; start anew
                try:
                    self.poller.unregister(self.zsock.fileno())
                except (KeyError, ValueError):
                    pass
                self.zsock.close()
                self.zsock = self.zpid = None
                self.warm_version = None
                self.spare_pending = self.spare_stale = 0
                self.learned = set()
                self._discard_spares()
                for pid2, runner in list(self.runners.items()):
                    if runner.get("eof"):
                        self._finish(pid2, 1)

    def _runner_main(self, req_r, done_w, out_fd, err_fd, in_fd):
        """A spare runner: waits for a request, runs it, reports "rc t_start t_end reuse" on the
        done pipe. It then exits, unless the agent runs modules in-process (cfg "reuse": opt-in)
        and the run left nothing behind that could leak into the next one (see _Reuse)."""
        import atexit

        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        atexit._clear()
        keep = (req_r, done_w, out_fd, err_fd, in_fd)
        for fd in self._open_fds():
            if fd > 2 and fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.cfg.get("prefault", True):
            prefault(self.hot)
        reuse = _Reuse(int(self.cfg.get("reuse", 0) or 0))
        while True:
            # wait for the request: one byte on the pipe (EOF: this spare was discarded), the
            # request itself in the memfd
            if not os.read(req_r, 1):
                os._exit(0)
            t_start = _now()
            buf = _read_all(in_fd)
            head = HEADER.unpack(buf[: HEADER.size])
            req = json.loads(bytes(buf[HEADER.size : HEADER.size + head[0]]).decode("utf-8"))
            payload = bytes(buf[HEADER.size + head[0] :])
            del buf
            reuse.before()
            rc = self._run_one(req, payload, out_fd, err_fd, reuse)
            again = reuse.after()
            try:
                os.write(done_w, b"%d %d %d %d\n" % (rc, t_start, _now(), 1 if again else 0))
            except OSError:
                again = False
            if not again:
                if self.hot is not None:
                    try:
                        self.hot.learn()
                    except Exception:
                        pass
                os._exit(rc)

    def _run_one(self, req, payload, out_fd, err_fd, reuse):
        """Runs one module request in this process; returns its exit code (0-255)."""
        import atexit

        # process state the classic command would have had
        env = dict(self.base_env if req.get("env") is None else req["env"])
        env.update(req.get("assign") or {})
        os.environ.clear()
        os.environ.update(env)
        if "tempfile" in sys.modules and (reuse.runs or any(env.get(k) != self.base_env.get(k) for k in ("TMPDIR", "TEMP", "TMP"))):
            sys.modules["tempfile"].tempdir = None  # computed for another environment
        if "TZ" in env or "TZ" in self.base_env:
            try:
                time.tzset()
            except AttributeError:
                pass
        cwd = req.get("cwd")
        try:
            os.chdir(cwd if cwd else self.base_cwd)
        except OSError:
            try:
                os.chdir(self.base_cwd)
            except OSError:
                pass
        umask = req.get("umask")
        os.umask(self.base_umask if umask is None else umask)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        import io

        def stream(fd, mode, enc_err):
            enc, errs = enc_err
            f = io.open(fd, mode + "b", closefd=False)
            return io.TextIOWrapper(f, encoding=enc, errors=errs, line_buffering=False)

        sys.stdin = sys.__stdin__ = stream(0, "r", self.stdio[0])
        sys.stdout = sys.__stdout__ = stream(1, "w", self.stdio[1])
        sys.stderr = sys.__stderr__ = stream(2, "w", ("utf-8" if self.stdio[2][0] is None else self.stdio[2][0], "backslashreplace"))
        if req.get("ansible_version") != self.warm_version:
            reuse.dirty = True
            for name in list(sys.modules):
                if name == "ansible" or name.startswith("ansible."):
                    del sys.modules[name]
        path = req.get("path")
        rc = 0
        try:
            import types

            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = __builtins__
            if path:
                main.__file__ = path
                sys.argv = [path]
                sys.path = [os.path.dirname(path)] + self.base_path
            else:
                sys.argv = [""]
                sys.path = [""] + self.base_path
            sys.modules["__main__"] = main
            prof = self.cfg.get("profile")
            if prof:  # diagnostics: a cProfile of each runner, written to that directory
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
                n = reuse.runs
                atexit.register(lambda: (profiler.disable(), profiler.dump_stats(os.path.join(prof, "runner-%d-%d.prof" % (os.getpid(), n)))))
            # pipelined payloads run as "<stdin>", file-based ones (no pipelining) as their file
            filename = path or "<stdin>"
            parts = split_payload(payload)
            if parts is None:
                exec(compile(payload, filename, "exec", dont_inherit=True), main.__dict__)
            else:
                import hashlib

                head_src, tail, data, lines = parts
                head_code = CODE_CACHE.get(("head", hashlib.sha1(head_src).hexdigest()))
                if head_code is None:
                    head_code = compile(head_src, filename, "exec", dont_inherit=True)
                elif path:
                    head_code = _with_filename(head_code, filename)
                exec(head_code, main.__dict__)
                kept = CODE_CACHE.get(("payload", hashlib.sha1(data).hexdigest())) if CODE_CACHE else None
                if kept and os.path.exists(kept):
                    _fast_ansiballz_main(main.__dict__, kept)
                else:
                    reuse.dirty = True  # imports from a zip that is removed after the run
                main.__dict__["__spawntrace_zip_data"] = data.decode("ascii")
                del payload, parts, data
                exec(compile(b"\n" * lines + tail, filename, "exec", dont_inherit=True), main.__dict__)
        except SystemExit as e:
            rc = e.code
            if rc is None:
                rc = 0
            elif not isinstance(rc, int):
                try:
                    sys.stderr.write("%s\n" % (rc,))
                except Exception:
                    pass
                rc = 1
        except BaseException:
            import traceback

            try:
                traceback.print_exc()
            except Exception:
                pass
            rc = 1
            reuse.dirty = True
        try:
            import threading

            if threading.active_count() > 1 or not reuse.enabled:
                reuse.dirty = True
                threading._shutdown()
        except Exception:
            reuse.dirty = True
        try:
            atexit._run_exitfuncs()
        except Exception:
            pass
        atexit._clear()
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        return rc & 0xFF

    @staticmethod
    def _open_fds():
        try:
            return [int(x) for x in os.listdir("/proc/self/fd")]
        except OSError:
            return list(range(3, 256))


class _Reuse(object):
    """In-process runs (cfg "reuse" = how many modules one runner may run; 0, the default: one,
    then exit). Before each run it notes the process state a module may change; after it, it puts
    back what can be put back (signal handlers, alarms, RLIMIT_NOFILE, sys.meta_path/path_hooks,
    excepthook, the module_utils warning registries, `ansible*` modules the run imported) and says
    whether the runner may take another request: not after an exception, a fork, a thread left
    running, a payload whose zip is not kept, or `limit` runs."""

    SIGNALS = [s for s in (getattr(signal, n, None) for n in ("SIGALRM", "SIGCHLD", "SIGTERM", "SIGHUP", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGQUIT")) if s]

    def __init__(self, limit):
        self.limit = limit
        self.enabled = limit > 1
        self.runs = 0
        self.dirty = False
        self.forked = False
        if self.enabled:
            self._orig_fork = os.fork
            reuse = self

            def fork():
                reuse.forked = True
                return reuse._orig_fork()

            os.fork = fork

    def before(self):
        self.dirty = False
        self.forked = False
        if not self.enabled:
            return
        self.modules = set(sys.modules)
        self.handlers = dict((s, signal.getsignal(s)) for s in self.SIGNALS)
        self.meta_path = list(sys.meta_path)
        self.importers = set(sys.path_importer_cache)
        self.path_hooks = list(sys.path_hooks)
        self.excepthook = sys.excepthook
        try:
            import resource

            self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        except Exception:
            self.nofile = None
        w = sys.modules.get("ansible.module_utils.common.warnings")
        for name in ("_global_warnings", "_global_deprecations"):
            reg = getattr(w, name, None)
            if hasattr(reg, "clear"):
                reg.clear()

    def after(self):
        self.runs += 1
        if not self.enabled or self.dirty or self.forked or self.runs >= self.limit:
            return False
        try:
            signal.alarm(0)
            signal.setitimer(signal.ITIMER_REAL, 0)
            for s, h in self.handlers.items():
                if signal.getsignal(s) is not h and h is not None:
                    signal.signal(s, h)
            sys.meta_path[:] = self.meta_path
            sys.path_hooks[:] = self.path_hooks
            for key in set(sys.path_importer_cache) - self.importers:
                del sys.path_importer_cache[key]
            sys.excepthook = self.excepthook
            if self.nofile is not None:
                import resource

                if resource.getrlimit(resource.RLIMIT_NOFILE) != self.nofile:
                    resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)
            for name in set(sys.modules) - self.modules:
                if name == "__main__":
                    continue
                if name.split(".", 1)[0] in ("ansible", "ansible_collections"):
                    del sys.modules[name]
            w = sys.modules.get("ansible.module_utils.common.warnings")
            for name in ("_global_warnings", "_global_deprecations"):
                reg = getattr(w, name, None)
                if hasattr(reg, "clear"):
                    reg.clear()
        except Exception:
            return False
        return True


class Zygote(object):
    """The agent's fork that keeps the warm state and forks runners (see Agent._zygote_start).
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
        for fd in a._open_fds():
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        rfd, wfd = os.pipe()
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)
        signal.signal(signal.SIGCHLD, lambda *x: None)
        signal.set_wakeup_fd(wfd)
        self.wakeup = (rfd, wfd)
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(rfd, select.POLLIN)
        try:
            while True:
                try:
                    events = poller.poll(5000)
                except InterruptedError:
                    events = []
                for fd, ev in events:
                    if fd == self.sock.fileno():
                        try:
                            msg, fds = _recv_fds(self.sock)
                        except (BlockingIOError, InterruptedError):
                            continue
                        if msg is None:
                            return  # the agent is gone
                        self._handle(msg, fds)
                    elif fd == rfd:
                        try:
                            while os.read(rfd, 512):
                                pass
                        except OSError:
                            pass
                self._reap()
        finally:
            for z in a.warm_zips | a.payload_zips:
                try:
                    os.unlink(z)
                except OSError:
                    pass

    def _handle(self, msg, fds):
        a = self.agent
        op = msg.get("op")
        payload = b""
        if fds:
            try:
                payload = _read_all(fds[0])
            finally:
                for fd in fds:
                    os.close(fd)
        if op == "warm":
            try:
                a._warm(msg["req"], payload)
            except Exception:
                import traceback

                traceback.print_exc()
                a.warm_version = False
            self._send({"ev": "warmed", "version": a.warm_version or None})
        elif op == "learn":
            try:
                a._learn(msg["req"], payload)
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
        out_fd, err_fd, in_fd = _memfd("spawntrace-out"), _memfd("spawntrace-err"), _memfd("spawntrace-in")
        req_r, req_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                self.agent._runner_main(req_r, done_w, out_fd, err_fd, in_fd)
            finally:
                os._exit(1)
        os.close(req_r)
        os.close(done_w)
        return pid, [req_w, done_r, out_fd, err_fd, in_fd]

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            try:
                self._send({"ev": "exit", "pid": pid, "status": status})
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# bootstrap: bind, daemonize, report READY on stdout


# Agent directories live in shared places (/tmp, or a user's directory while we are root): every
# path there is hostile until checked (see private_dir). Files are created O_EXCL|O_NOFOLLOW
# (create_file), existing ones opened O_NOFOLLOW and fstat-checked (open_checked); nothing is
# chowned or chmodded by path.

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_HINT = "remove it or set SPAWNTRACE_AGENT_DIR to a private directory"


class UnsafePath(RuntimeError):
    """A path in a shared place failed its ownership or mode check (a one-line message)."""


def _describe(st):
    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else (
        "a socket" if stat.S_ISSOCK(st.st_mode) else "a file" if stat.S_ISREG(st.st_mode) else "not a directory")
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
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, owner)
                or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX)):
            raise UnsafePath("spawntrace: unsafe agent directory %s: its parent %s is %s (must be owned by root or uid %d "
                             "and not writable by others unless sticky); set SPAWNTRACE_AGENT_DIR to a private directory"
                             % (path, cur, _describe(st), owner))
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
        raise UnsafePath("spawntrace: unsafe agent directory %s: %s (must be a directory of uid %d, mode 0700); %s"
                         % (real, _describe(os.lstat(real)), owner, _HINT))
    try:
        st = os.fstat(fd)
        if created and st.st_uid == os.getuid() != owner:
            os.fchown(fd, owner, -1)
            st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or stat.S_IMODE(st.st_mode) & 0o077:
            raise UnsafePath("spawntrace: unsafe agent directory %s: %s (must be a directory of uid %d, mode 0700); %s"
                             % (real, _describe(st), owner, _HINT))
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
        raise UnsafePath("spawntrace: %s is a symlink; %s" % (path, _HINT))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners or st.st_mode & 0o022 or st.st_nlink != 1:
        os.close(fd)
        raise UnsafePath("spawntrace: unsafe file %s: %s, %d links (must be a file of uid %s); %s"
                         % (path, _describe(st), st.st_nlink, "/".join(str(u) for u in sorted(set(owners))), _HINT))
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


def _uid_of(spec):
    """'self' -> our uid; 'sudo' -> the uid that ran sudo (SUDO_UID) or ours; an int."""
    if spec is None or spec == "self":
        return os.getuid()
    if spec == "sudo":
        v = os.environ.get("SUDO_UID")
        return int(v) if v and v.isdigit() else os.getuid()
    return int(spec)


def _ping(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        if _peer_uid(s) != os.getuid():
            raise ProtocolError("%s is served by another uid" % path)
        send_frame(s, {"op": "ping"})
        recv_frame(s)  # hello
        return recv_frame(s)[0]
    finally:
        s.close()


def bootstrap(cfg):
    """Runs in the freshly started interpreter (as the agent's user). Prints one JSON line."""
    import fcntl

    owner = _uid_of(cfg.get("dir_owner"))
    cfg["client_uid"] = _uid_of(cfg.get("client_uid"))
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
                raise UnsafePath("spawntrace: unsafe agent socket %s: %s (must be a socket of uid %d); %s"
                                 % (path, _describe(st), os.getuid(), _HINT))
            try:
                info = _ping(path)
                if info.get("ok") and info.get("version") == cfg.get("version"):
                    sys.stdout.write(json.dumps({"ok": True, "pid": info["pid"], "reused": True, "socket": path, "reporting": info.get("reporting")}) + "\n")
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
            raise UnsafePath("spawntrace: agent socket %s replaced after bind (%s)" % (path, _describe(st)))
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


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[0] == "-c":
    _rc = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(_rc)
