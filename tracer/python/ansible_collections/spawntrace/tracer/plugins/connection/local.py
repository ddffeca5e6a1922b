# spawntrace `local` connection: ansible-core's local connection, with module runs handed to a
# persistent agent (a warm Python that forks one runner per module) and the shell
# housekeeping (echo ~, mkdtemp, chmod, rm) done in-process. Anything it does not recognise runs
# exactly as with ansible.builtin.local. See tracer/python/RUNNER.md.
from __future__ import annotations

import os
import subprocess
import sys

# the agent's package, agent/spawntrace_agent in this collection
_AGENT = os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "agent"))
if _AGENT not in sys.path:
    sys.path.append(_AGENT)

from spawntrace_agent import client  # noqa: E402

_builtin_local = client.builtin_connection("local")
_LocalConnection = _builtin_local.Connection

# The builtin's options and spawntrace_isolation (the loader reads this attribute from the imported
# module).
DOCUMENTATION = client.documentation(_builtin_local.DOCUMENTATION, "spawntrace persistent agent")


class Connection(client.AgentConnectionMixin, _LocalConnection):
    """Local connection through the spawntrace persistent agent."""

    def _st_cwd(self):
        cwd = client._text(self.cwd) if self.cwd else None
        return cwd or os.getcwd()

    def _st_module_endpoint(self, args, become, retry=False):
        interp = args["interpreter"]
        assign = args["env"]
        uid = os.getuid()
        host = self._play_context.remote_addr
        user = self._play_context.remote_user or self.default_user
        controller = list(client.controller())
        if not become:
            startup_env = client.startup_env({**os.environ, **assign})
            st = client._proc_state()
            fast = ("local", host, user, interp, tuple(sorted(startup_env.items())))
            ep = st.get("fast", {}).get(fast) if not retry else None
            if ep is not None:
                return ep, {"env": dict(os.environ), "cwd": self._st_cwd(), "umask": client.current_umask()}
            key = {
                "kind": "local",
                "host": host,
                "user": user,
                "become": None,
                "interp": interp,
                "env": startup_env,
                "version": client.VERSION,
                "controller": controller,
            }

            def make(name):
                return client.Endpoint(os.path.join(client.agent_dir(), name + ".sock"), uid)

            def start(name, ep):
                cfg = client.base_config(key, ep.path, host, user)
                cfg.update(dir_owner=uid, client_uid=uid)
                env = dict(os.environ)
                env.update(startup_env)
                argv = client.PAYLOAD.argv(interp, client.json.dumps(cfg, separators=(",", ":")))
                p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, close_fds=True)
                out, err = p.communicate(client.PAYLOAD.body, timeout=120)
                ready = client.parse_ready(out)
                client.check_ready(ready)
                if p.returncode != 0 or not ready or not ready.get("ok"):
                    raise client.AgentUnavailable("agent start failed: %r %r" % (out[-300:], err[-300:]))
                return self._st_ping(ep)

            ep = self._st_endpoint(key, make, start, retry)
            if ep is not None:
                st.setdefault("fast", {})[fast] = ep
            return ep, {"env": dict(os.environ), "cwd": self._st_cwd(), "umask": client.current_umask()}

        import pwd

        become_key = self._st_become_key()
        try:
            become_uid = pwd.getpwnam(become_key["user"]).pw_uid
        except KeyError:
            return None, None
        if self._st_needs_terminal(uid == 0):
            # su or doas with a password, from an unprivileged controller: classic (over ssh
            # such agents start through a terminal, see the ssh plugin)
            return None, None
        if become_uid == uid or uid == 0:
            owner = become_uid
        elif become_uid == 0:
            owner = uid
        else:
            return None, None  # unprivileged to another unprivileged user: classic
        startup_env = client.startup_env(assign)
        key = {
            "kind": "local",
            "host": host,
            "user": user,
            "become": become_key,
            "interp": interp,
            "env": startup_env,
            "version": client.VERSION,
            "controller": controller,
        }

        def make(name):
            return client.Endpoint(os.path.join(client.agent_dir(owner), name + ".sock"), become_uid, dir_owner=owner)

        def start(name, ep):
            cfg = client.base_config(key, ep.path, host, user)
            cfg.update(
                dir_owner=owner,
                client_uid=uid,
                become_user=become_key["user"],
                _interpreter=interp,
                report=os.environ.get("SPAWNTRACE_SOCKET") or "",
            )
            self._st_run_bootstrap_shell(cfg, startup_env, True)
            return self._st_ping(ep)

        ep = self._st_endpoint(key, make, start, retry)
        return ep, {"env": None, "cwd": self._st_cwd(), "umask": None}

    def _st_housekeeping(self, cmd, op, args):
        res = client.shell_ops.run_op(op, args, os.environ)
        if res is not None:
            client.display.vvv("EXEC (spawntrace, in-process) %s" % cmd, host=self._play_context.remote_addr)
        return res
