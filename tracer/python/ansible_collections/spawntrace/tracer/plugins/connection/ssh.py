# spawntrace `ssh` connection: ansible-core's ssh connection, with module runs, shell
# housekeeping and file transfers handed to a persistent agent on the target, reached through the
# ControlMaster (`ssh -O forward -L local.sock:remote.sock`): no ssh exec per task once the agent
# runs. Anything it does not recognise runs exactly as with ansible.builtin.ssh.
# See tracer/python/RUNNER.md.
from __future__ import annotations

import getpass
import os
import subprocess
import sys

# the agent's package, agent/spawntrace_agent in this collection
_AGENT = os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "agent"))
if _AGENT not in sys.path:
    sys.path.append(_AGENT)

from ansible.errors import AnsibleError, AnsibleFileNotFound

from spawntrace_agent import client, target_recording  # noqa: E402

_builtin_ssh = client.builtin_connection("ssh")
_SSHConnection = _builtin_ssh.Connection

DOCUMENTATION = client.documentation(_builtin_ssh.DOCUMENTATION, "spawntrace persistent agent")


# uploads up to this size go with the worker's next request to the agent (client.defer)
DEFER_PUT_MAX = 1 << 20


class Connection(client.AgentConnectionMixin, target_recording.RecordTargetMixin, _SSHConnection):
    """ssh connection through a spawntrace persistent agent on the target (the target recorded
    when spawntrace traces the run)."""

    def _st_target(self):
        self.host = self.get_option("host") or self._play_context.remote_addr
        port = self.get_option("port")
        user = self.get_option("remote_user")
        return self.host, port, user

    def _st_forwardable(self):
        """Whether the ssh arguments give a ControlMaster (ControlPersist) to forward through."""
        if getattr(self._shell, "_IS_WINDOWS", False):
            return False
        if self.__dict__.get("_st_fwd_ok") is None:
            self._build_command(self.get_option("ssh_executable"), "ssh", self.host)
            self.__dict__["_st_fwd_ok"] = bool(getattr(self, "_persistent", False))
        return self.__dict__["_st_fwd_ok"]

    def _st_pointer(self, host, port, user):
        controller = list(client.controller())
        return os.path.join(
            client.agent_dir(),
            "d-%d-%s" % (controller[0], client.key_name({"host": host, "port": port, "user": user, "controller": controller})),
        )

    def _st_module_endpoint(self, args, become, retry=False):
        host, port, user = self._st_target()
        if not self._st_forwardable():
            return None, None
        interp = args["interpreter"]
        startup_env = client.startup_env(args["env"])
        become_key = self._st_become_key() if become else None
        if become and user != "root" and become_key["user"] not in ("root", user):
            # an agent of one unprivileged user cannot hand its socket to another: classic
            return None, None
        key = {
            "kind": "ssh",
            "host": host,
            "port": port,
            "user": user,
            "become": become_key,
            "interp": interp,
            "env": startup_env,
            "version": client.VERSION,
            "controller": list(client.controller()),
        }

        def make(name):
            return client.Endpoint(
                os.path.join(client.agent_dir(), "f-%d-%s.sock" % (client.controller()[0], name)), os.getuid(), remote=True
            )

        def start(name, ep):
            cfg = client.base_config(key, None, host, user)
            cfg.update(
                socket=None, key=name, controller_pid=None, controller_start=None, report="", _interpreter=interp, log=bool(cfg.get("log"))
            )
            if become:
                # the client is the login user (its agent socket goes to that user's directory)
                cfg.update(
                    become_user=become_key["user"],
                    become_method=become_key["method"],
                    client_uid="login",
                    dir_owner="self" if user == "root" else "login",
                    login_user=user,
                )
            placed = None
            if become and self._st_needs_terminal((user or getpass.getuser()) == "root"):
                # a password prompt on a terminal (su, doas to root): the payload in the login
                # user's agent directory, through that user's own agent
                plain, _ = self._st_module_endpoint(args, False)
                if plain is None:
                    raise client.AgentUnavailable("no agent of the login user to place the payload with")
                placed = client.place_payload(plain)
            ready = self._st_run_bootstrap_shell(cfg, startup_env, become, placed)
            self._st_forward(ep.path, ready["socket"])
            client.watch_remote_agents()
            return self._st_ping(ep)

        ep = self._st_endpoint(key, make, start, retry)
        if ep is not None and not become:
            self._st_set_default(ep, host, port, user)
        return ep, {"env": None, "cwd": None, "umask": None}

    def _st_forward(self, local, remote):
        try:
            os.unlink(local)
        except FileNotFoundError:
            pass
        cmd = self._build_command(self.get_option("ssh_executable"), "ssh", "-O", "forward", "-L", "%s:%s" % (local, remote), self.host)
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, check=False)
        if p.returncode != 0:
            raise client.AgentUnavailable("ssh -O forward failed: %s" % p.stderr.decode("utf-8", "replace")[-500:])

    def _st_set_default(self, ep, host, port, user):
        st = client._proc_state()
        st.setdefault("default", {})[(host, port, user)] = ep
        pointer = self._st_pointer(host, port, user)  # in the agent directory _st_endpoint checked
        if not os.path.exists(pointer):
            tmp = "%s.%d" % (pointer, os.getpid())
            with os.fdopen(client.safe_paths.create_file(tmp), "w") as f:
                f.write(ep.path)
            os.replace(tmp, pointer)

    def _st_default_endpoint(self):
        """The plain (no become) agent of this host and user, for housekeeping and transfers, if
        one was started already in this run."""
        host, port, user = self._st_target()
        st = client._proc_state()
        ep = st.setdefault("default", {}).get((host, port, user))
        if ep is None:
            pointer = self._st_pointer(host, port, user)
            try:
                client.ensure_private_dir(os.path.dirname(pointer))  # UnsafeAgentDir is not caught
                fd = client.safe_paths.open_checked(pointer, os.O_RDONLY, (os.getuid(),))
            except client.safe_paths.UnsafePath as e:
                raise client.UnsafeAgentDir(str(e))
            except OSError:
                return None
            with os.fdopen(fd) as f:
                path = f.read().strip()
            ep = client.Endpoint(path, os.getuid(), remote=True)
            st["default"][(host, port, user)] = ep
        return ep

    def _st_housekeeping(self, cmd, op, args):
        ep = self._st_default_endpoint()
        if ep is None:
            return None
        # `echo ~` or `echo ~LOGIN_USER/…` (every action's remote_tmp, per loop item) says this
        # agent's own home: asked once per worker and agent
        word = args.get("word", "") if op == "expand_user" and not args.get("literal") else None
        known = client._proc_state().setdefault("homes", {})
        own = ("~", "~" + (self._st_target()[2] or getpass.getuser()))
        key = (ep.path, word) if word is not None and word.split("/", 1)[0] in own else None
        if key is not None and key in known:
            client.display.vvv("EXEC (spawntrace agent %s, known) %s" % (ep.path, cmd), host=self.host)
            return known[key]
        if op in client.shell_ops.DEFERRABLE and client.defer(ep, {"op": op, "args": args, "env": None}, cmd=cmd):
            client.display.vvv("EXEC (spawntrace agent %s, with the next request) %s" % (ep.path, cmd), host=self.host)
            return client.deferred_answer(op, args)
        try:
            resp, blob = ep.request({"op": op, "args": args, "env": None})
        except client.AgentUnavailable:
            return None
        if not resp.get("ok"):
            return None
        client.display.vvv("EXEC (spawntrace agent %s) %s" % (ep.path, cmd), host=self.host)
        n = resp["out"]
        res = resp["rc"], blob[:n], blob[n:]
        if key is not None and res[0] == 0 and not res[1].startswith(b"~"):
            known[key] = res
        return res

    def put_file(self, in_path, out_path):
        ep = self._st_default_endpoint() if client.enabled() else None
        if ep is None:
            return super().put_file(in_path, out_path)
        if not self._connected:
            self._connect()
        if not os.path.exists(in_path):
            raise AnsibleFileNotFound("file or module does not exist: %s" % in_path)
        if os.path.getsize(in_path) > client.framing.MAX_BLOB:  # held in memory by the agent: classic
            self._st_flush()
            return super().put_file(in_path, out_path)
        with open(in_path, "rb") as f:
            data = f.read()
            mode = os.fstat(f.fileno()).st_mode & 0o777
        # a small file goes with the next request (the module run it is for)
        if len(data) <= DEFER_PUT_MAX and client.defer(ep, {"op": "put", "path": out_path, "mode": mode}, data):
            client.display.vvv("PUT (spawntrace agent, with the next request) %s TO %s" % (in_path, out_path), host=self.host)
            return 0, b"", b""
        try:
            resp, _ = ep.request({"op": "put", "path": out_path, "mode": mode}, data)
        except client.AgentUnavailable:
            self._st_flush()
            return super().put_file(in_path, out_path)
        except client.AgentFailed as e:
            raise AnsibleError("failed to transfer file to %s: %s" % (out_path, e))
        if not resp.get("ok"):
            raise AnsibleError("failed to transfer file to %s: %s" % (out_path, resp.get("error")))
        client.display.vvv("PUT (spawntrace agent) %s TO %s" % (in_path, out_path), host=self.host)
        return 0, b"", b""

    def fetch_file(self, in_path, out_path):
        ep = self._st_default_endpoint() if client.enabled() else None
        if ep is None:
            return super().fetch_file(in_path, out_path)
        if not self._connected:
            self._connect()
        try:
            resp, data = ep.request({"op": "fetch", "path": in_path})
        except client.AgentUnavailable:
            self._st_flush()
            return super().fetch_file(in_path, out_path)
        except client.AgentFailed as e:
            raise AnsibleError("failed to transfer file from %s: %s" % (in_path, e))
        if not resp.get("ok"):
            raise AnsibleError("failed to transfer file from %s: %s" % (in_path, resp.get("error")))
        # like sftp's get: a new local file gets the remote file's permissions (umask applies)
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, (resp.get("mode", 0o644) & 0o777) | 0o200)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        client.display.vvv("FETCH (spawntrace agent) %s TO %s" % (in_path, out_path), host=self.host)
        return 0, b"", b""
