"""The benchmark's lower bound: connection plugins (`local`, `ssh`) that answer every module run
of playbooks/bench.yml at once with the result the module would have given, and the shell
housekeeping (echo ~, mkdtemp, chmod, rm) and file transfers without doing anything. What a
playbook then costs is ansible-core's own work around each module (templating, the action
plugin, building the AnsiballZ payload, result processing): the least any runner behind a
connection plugin can take. `cargo xtask bench runner` reports it as `bound`.

A measuring instrument, not a runner: nothing reaches the target, and only the modules the
benchmark uses get a faithful result (tests/test_bench_bound.py compares it with classic runs)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import sys

_MODULE = re.compile(rb"\nansible_module='([^']+)',\n")
_PARAMS = re.compile(rb"\nparams=(.*),\n")
_MKDTEMP = re.compile(r'echo (ansible-tmp-[^=\s]+)="` echo (\S+) `"')
_ECHO_HOME = re.compile(r"^echo (~\S*)$")


def builtin(name):
    """ansible-core's own connection plugin module (this file's plugin is loaded under its name)."""
    import ansible.plugins.connection as pkg

    alias = "ansible.plugins.connection._bound_builtin_" + name
    mod = sys.modules.get(alias)
    if mod is None:
        spec = importlib.util.spec_from_file_location(alias, os.path.join(os.path.dirname(pkg.__file__), name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[alias] = mod
        spec.loader.exec_module(mod)
    return mod


def result(module, args):
    """What `module` returns for `args` in playbooks/bench.yml (a fresh file each time)."""
    out = {"changed": True, "invocation": {"module_args": args}}
    if module == "stat":
        out.update(changed=False, stat={"exists": False})
    elif module == "copy":
        out.update(
            dest=args.get("dest"),
            src=args.get("src"),
            checksum=args.get("checksum"),
            md5sum=None,
            mode=args.get("mode"),
            state="file",
            size=0,
            uid=os.getuid(),
            gid=os.getgid(),
        )
    elif module == "lineinfile":
        out.update(msg="line replaced", backup="")
    elif module == "tempfile":
        out.update(path=os.path.join("/tmp", (args.get("prefix") or "ansible.") + "bound"), state="directory")
    elif module == "file":
        out.update(path=args.get("path"), state=args.get("state"))
    else:
        out.update(changed=False)
    return out


def _shell_words(cmd):
    """The command under `/bin/sh -c '...'`, without ansible-core's trailing `&& sleep 0`."""
    words = shlex.split(cmd) if cmd.startswith("/") else [cmd]
    inner = words[-1] if len(words) >= 3 and words[1] == "-c" else cmd
    if inner.endswith(" && sleep 0"):
        inner = inner[: -len(" && sleep 0")]
    return inner


class BoundMixin:
    """exec_command / put_file / fetch_file answered in this process."""

    def _connect(self):
        self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=True):
        payload = in_data
        inner = _shell_words(cmd)
        if payload is None:
            # a file-based run (no pipelining): `<python> <path to AnsiballZ_x.py>`
            parts = inner.split()
            if len(parts) == 2 and os.path.basename(parts[1]).startswith("AnsiballZ_"):
                payload = self._bound_files.get(parts[1])
        if payload:
            m, p = _MODULE.search(payload), _PARAMS.search(payload)
            if m and p:
                args = json.loads(ast.literal_eval(p.group(1).decode("utf-8")))["ANSIBLE_MODULE_ARGS"]
                return 0, json.dumps(result(m.group(1).decode().rsplit(".", 1)[-1], args)).encode(), b""
        m = _MKDTEMP.search(inner)
        if m:
            return 0, ("%s=%s\n" % (m.group(1), os.path.expanduser(m.group(2)))).encode(), b""
        m = _ECHO_HOME.match(inner)
        if m:
            return 0, (os.path.expanduser(m.group(1)) + "\n").encode(), b""
        if inner.startswith(("rm -f -r ", "chmod ")):
            return 0, b"", b""
        raise NotImplementedError("bench bound: unexpected command %r" % cmd)

    def put_file(self, in_path, out_path):
        if os.path.basename(out_path).startswith("AnsiballZ_"):
            with open(in_path, "rb") as f:
                self._bound_files[out_path] = f.read()

    def fetch_file(self, in_path, out_path):
        raise NotImplementedError("bench bound: fetch_file")

    def close(self):
        self._connected = False

    def reset(self):
        pass


def plugin(name):
    """(DOCUMENTATION, Connection) of the bound's `name` connection: the builtin's options, its
    class with BoundMixin in front."""
    base = builtin(name)

    class Connection(BoundMixin, base.Connection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._bound_files = {}  # AnsiballZ files put for file-based (non-pipelined) runs

    return base.DOCUMENTATION, Connection
