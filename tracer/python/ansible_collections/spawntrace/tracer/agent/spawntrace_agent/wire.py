# The agent on the wire (controller side): the payload is built from this package's sources and
# sent on the interpreter's stdin; its command line carries only a first stage of a few hundred
# bytes (one argv string is capped at 128 KiB, MAX_ARG_STRLEN, and the whole command line,
# quoted again by `sudo sh -c` and ssh, at ARG_MAX).
#
#   <python> -c '<first stage>' '<config JSON>'    stdin: zlib(<payload>)
#
# (or, when stdin is the terminal a become password prompt was answered on, from a file the
# client put in its private agent directory). The first stage reads exactly the payload's
# length, checks its SHA-256, inflates it and runs it. The payload is importer.py's source, the
# package's sources as a dict, and the call of bootstrap.entry. The agent version is derived from the payload's hash: agents of another
# version are never reused (see client.VERSION).
from __future__ import absolute_import

import hashlib
import os
import zlib

from .framing import PROTOCOL

PACKAGE = __name__.rsplit(".", 1)[0]
HERE = os.path.dirname(os.path.abspath(__file__))
# modules of the controller only: not shipped
CONTROLLER_ONLY = ("client", "wire", "target_recording", "remote_watch")

# `python -c` puts the working directory first on sys.path: it goes before anything is imported
# (an agent started through sudo must not import a hashlib.py of the directory it starts in).
_FIRST_STAGE = (
    "import sys\n"
    "sys.path=[p for p in sys.path if p not in('','.')]\n"
    "import zlib,hashlib\n"
    "%(read)s\n"
    "if hashlib.sha256(b).hexdigest()!='%(sha)s':\n"
    ' sys.stdout.write(\'{"ok":false,"error":"spawntrace agent payload: %%d of %(n)d bytes, or corrupt"}\\n\'%%len(b));sys.exit(1)\n'
    "exec(compile(zlib.decompress(b),'<spawntrace agent %(version)s>','exec'))\n"
)


def package_sources(directory=HERE):
    """{module name: (is_package, source)} of the shipped modules."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".py") or name[:-3] in CONTROLLER_ONLY:
            continue
        with open(os.path.join(directory, name), "rb") as f:
            source = f.read().decode("utf-8")
        mod = name[:-3]
        out[PACKAGE if mod == "__init__" else PACKAGE + "." + mod] = (mod == "__init__", source)
    return out


class Payload(object):
    """The agent's payload for `sources` (default: this package's)."""

    def __init__(self, sources=None):
        sources = package_sources() if sources is None else sources
        importer = sources[PACKAGE + ".importer"][1]
        program = "%s\n\nload(%r)\nimport sys\nfrom %s.bootstrap import entry\nentry(sys.argv[1:])\n" % (importer, sources, PACKAGE)
        self.program = program.encode("utf-8")
        self.version = "%d-%s" % (PROTOCOL, hashlib.sha256(self.program).hexdigest()[:16])
        self._body = None

    @property
    def body(self):
        """What the interpreter reads on stdin (compressed once, on first use)."""
        if self._body is None:
            self._body = zlib.compress(self.program, 9)
        return self._body

    def first_stage(self, placed=None):
        body = self.body
        n = len(body)
        if placed is None:
            read = "b=sys.stdin.buffer.read(%d)" % n
        else:
            # (a become that answers a password prompt on a terminal: stdin is that terminal)
            # from a file (path, owner uid) in the directory of its owner, who may swap it: opened
            # O_PATH (no device is ever opened), read only as a regular file of that owner with
            # one link, through its descriptor; one byte more than the payload fails the check
            read = (
                "import os,stat\n"
                "d=os.open(%r,os.O_PATH|os.O_NOFOLLOW|os.O_CLOEXEC);s=os.fstat(d)\n"
                "b=open('/proc/self/fd/%%d'%%d,'rb').read(%d) if stat.S_ISREG(s.st_mode) and s.st_uid==%d and s.st_nlink==1 else b''"
            ) % (placed[0], n + 1, placed[1])
        return _FIRST_STAGE % {"n": n, "read": read, "sha": hashlib.sha256(body).hexdigest(), "version": self.version}

    def argv(self, python, config_json, placed=None):
        """The agent's command line: its stdin must be `body`, or `placed` = (path, uid): the
        file at path, a regular file of that uid, must hold it."""
        return [python, "-c", self.first_stage(placed), config_json]
