# Native shell housekeeping: each op returns (rc, stdout, stderr) exactly as the /bin/sh command
# the shell plugin built would, or None when the case is not handled natively (the caller then
# runs the real command). Run by the agent for remote targets and in the worker itself for local
# ones (plugins/connection/local.py); client.Recorder recognises the commands.
from __future__ import absolute_import

import errno
import os
import stat


def _enc(text):
    return text.encode("utf-8", "surrogateescape")


def strerror(e):
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
            msg = "mkdir: cannot create directory '%s': %s\n" % (target, strerror(e))
            return 1, b"", _enc(msg)
    return 0, mkdtemp_output(basefile, basetmp), b""


def mkdtemp_output(basefile, basetmp):
    """What the mkdtemp subshell prints when it succeeds."""
    return _enc("%s=%s\n" % (basefile, basetmp))


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
            err.append("chmod: cannot access '%s': %s\n" % (p, strerror(e)))
            continue
        new = _apply_chmod(stat.S_IMODE(st.st_mode), clauses, stat.S_ISDIR(st.st_mode))
        if new != stat.S_IMODE(st.st_mode):
            try:
                os.chmod(p, new)  # safe: the `chmod` Ansible asked for, as the user its shell would run as
            except OSError as e:
                rc = 1
                err.append("chmod: changing permissions of '%s': %s\n" % (p, strerror(e)))
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


# Ops whose answer a client knows without asking (mkdtemp prints the path it was given, chmod and
# `rm -f … >/dev/null 2>&1` print nothing): it may answer them at once and send them, and file
# uploads (`put`), with its next request to the same agent, at most MAX_DEFERRED per request
# (client.defer, server.Agent._run_before).
DEFERRABLE = ("mkdtemp", "chmod", "rm")
MAX_DEFERRED = 64


def rm_warning(rc, stderr):
    """What a deferred rm that failed warns, as ActionBase._remove_tmp_path words it."""
    return "Error deleting remote temporary files (rc: %d, stderr: %s})" % (rc, stderr)


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
