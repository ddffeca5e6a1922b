# spawntrace `local` connection: ansible-core's local connection, with module runs handed to a
# persistent agent (a warm Python that forks one runner per module) and the shell
# housekeeping (echo ~, mkdtemp, chmod, rm) done in-process. Anything it does not recognise runs
# exactly as with ansible.builtin.local. See tracer/python/RUNNER.md.
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys


def _load(name, path):
    """Imports `path` as module `name` once per process, through agent/loader.py (compiled code
    cached in the user's own cache directory, only where nobody else can write; see there)."""
    loader = sys.modules.get("spawntrace_agent_loader")
    if loader is None:
        where = os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "agent", "loader.py")
        spec = importlib.util.spec_from_file_location("spawntrace_agent_loader", where)
        loader = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loader)
        sys.modules["spawntrace_agent_loader"] = loader
    return loader.load(name, path)


def _builtin(name):
    """ansible-core's own plugin module, under an alias: Ansible loads plugins found on a
    configured path under the builtin's module name (this file is `ansible.plugins.connection.local`
    while it loads)."""
    import ansible.plugins.connection as pkg

    return _load("ansible.plugins.connection._spawntrace_builtin_" + name, os.path.join(os.path.dirname(pkg.__file__), name + ".py"))


_c = _load("spawntrace_agent_client", os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "agent", "client.py"))



_builtin_local = _builtin("local")
_LocalConnection = _builtin_local.Connection

# Same options as the builtin (the loader reads this attribute from the imported module).
DOCUMENTATION = _builtin_local.DOCUMENTATION.replace(
    "short_description: execute on controller",
    "short_description: execute on controller (spawntrace persistent agent)",
    1,
)


class Connection(_c.AgentConnectionMixin, _LocalConnection):
    """Local connection through the spawntrace persistent agent."""

    def _st_cwd(self):
        cwd = _c._text(self.cwd) if self.cwd else None
        return cwd or os.getcwd()

    def _st_module_endpoint(self, args, become, retry=False):
        c = _c
        interp = args["interpreter"]
        assign = args["env"]
        uid = os.getuid()
        host = self._play_context.remote_addr
        user = self._play_context.remote_user or self.default_user
        ctl = list(c.controller())
        if not become:
            sens = c.startup_env({**os.environ, **assign})
            st = c._proc_state()
            fast = ("local", host, user, interp, tuple(sorted(sens.items())))
            ep = st.get("fast", {}).get(fast) if not retry else None
            if ep is not None:
                return ep, {"env": dict(os.environ), "cwd": self._st_cwd(), "umask": c.current_umask()}
            key = {"kind": "local", "host": host, "user": user, "become": None, "interp": interp, "env": sens,
                   "version": c.VERSION, "controller": ctl}

            def make(name):
                return c.Endpoint(os.path.join(c.agent_dir(), name + ".sock"), uid)

            def start(name, ep):
                cfg = c.base_config(key, ep.path, host, user)
                cfg.update(dir_owner=uid, client_uid=uid)
                env = dict(os.environ)
                env.update(sens)
                argv = [interp, "-c", c.AGENT_SOURCE.decode("utf-8"), c.json.dumps(cfg, separators=(",", ":"))]
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, close_fds=True)
                out, err = p.communicate(timeout=120)
                ready = c.parse_ready(out)
                c.check_ready(ready)
                if p.returncode != 0 or not ready or not ready.get("ok"):
                    raise c.AgentUnavailable("agent start failed: %r %r" % (out[-300:], err[-300:]))
                return self._st_ping(ep)

            ep = self._st_endpoint(key, make, start, retry)
            if ep is not None:
                st.setdefault("fast", {})[fast] = ep
            return ep, {"env": dict(os.environ), "cwd": self._st_cwd(), "umask": c.current_umask()}

        import pwd

        bkey = self._st_become_key()
        try:
            buid = pwd.getpwnam(bkey["user"]).pw_uid
        except KeyError:
            return None, None
        if buid == uid or uid == 0:
            owner = buid
        elif buid == 0:
            owner = uid
        else:
            return None, None  # unprivileged to another unprivileged user: classic
        sens = c.startup_env(assign)
        key = {"kind": "local", "host": host, "user": user, "become": bkey, "interp": interp, "env": sens,
               "version": c.VERSION, "controller": ctl}

        def make(name):
            return c.Endpoint(os.path.join(c.agent_dir(owner), name + ".sock"), buid, dir_owner=owner)

        def start(name, ep):
            cfg = c.base_config(key, ep.path, host, user)
            cfg.update(dir_owner=owner, client_uid=uid, become_user=bkey["user"], _interpreter=interp,
                       report=os.environ.get("SPAWNTRACE_SOCKET") or "")
            self._st_run_bootstrap_shell(cfg, sens, True)
            return self._st_ping(ep)

        ep = self._st_endpoint(key, make, start, retry)
        return ep, {"env": None, "cwd": self._st_cwd(), "umask": None}

    def _st_housekeeping(self, cmd, op, args):
        res = _c.agent.run_op(op, args, os.environ)
        if res is not None:
            _c.display.vvv("EXEC (spawntrace, in-process) %s" % cmd, host=self._play_context.remote_addr)
        return res
