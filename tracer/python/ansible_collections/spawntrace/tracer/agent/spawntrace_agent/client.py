# The connection-plugin side of the spawntrace persistent agent: recognising the commands Ansible's
# action plugins build, finding (or starting) the agent for a target, and talking to it.
# Imported by plugins/connection/{local,ssh}.py (controller only: not shipped to targets).
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import secrets
import shlex
import socket
import struct
import sys
import time

from . import framing, messages, procs, remote_watch, safe_paths, shell_ops
from .ansiballz import strip_payload
from .wire import Payload

PAYLOAD = Payload()
# Agents of another version are never reused: the version is part of the socket's name, and the
# agent refuses requests that name another version.
VERSION = PAYLOAD.version

try:
    from ansible.release import __version__ as ANSIBLE_VERSION
except Exception:  # pragma: no cover
    ANSIBLE_VERSION = None


def enabled():
    return os.environ.get("SPAWNTRACE_AGENT", "1").lower() not in ("0", "false", "no", "off")


def idle_timeout():
    try:
        return float(os.environ.get("SPAWNTRACE_AGENT_IDLE", "60"))
    except ValueError:
        return 60.0


def agent_dir(uid=None):
    """The 0700 directory holding a user's agent sockets (under its base's real path; checked
    by ensure_private_dir before anything in it is used)."""
    base = os.path.realpath(os.environ.get("SPAWNTRACE_AGENT_DIR") or "/tmp")
    return os.path.join(base, "spawntrace-%d" % (os.getuid() if uid is None else uid))


def ensure_private_dir(path, owner=None):
    """Checks (creating it if missing) `path` as uid `owner`'s (default: ours) private agent
    directory, once per process (safe_paths.private_dir). Raises UnsafeAgentDir (an AnsibleError:
    the task fails with its one-line message, it never falls back to the classic path)."""
    owner = os.getuid() if owner is None else owner
    done = _proc_state()["dirs"]
    if (path, owner) in done:
        return
    try:
        fd, _ = safe_paths.private_dir(path, owner)
    except safe_paths.UnsafePath as e:
        raise UnsafeAgentDir(str(e))
    os.close(fd)
    done.add((path, owner))


def check_ready(ready):
    """An agent's READY line that reports an unsafe path becomes that error (UnsafeAgentDir)."""
    if ready and ready.get("unsafe"):
        raise UnsafeAgentDir(ready.get("error") or "spawntrace: unsafe agent directory")


def key_name(key):
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


# Files a controller run leaves in the agent directory, named after its pid: start locks, and for
# remote agents the forwarded sockets (f-) and host pointers (d-); ssh does not remove a forwarded
# socket when its ControlMaster exits.
_RUN_FILE = re.compile(r"^(?:[fd]-)?(\d+)-(?:[0-9a-f]{24}(?:\.sock|\.start\.lock)?|watch\.lock)(?:\.\d+)?$")


def start_lock(name):
    return os.path.join(agent_dir(), "%d-%s.start.lock" % (controller()[0], name))


def sweep_stale(directory):
    """Removes the run files (see _RUN_FILE) of controllers that are gone."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    mine = controller()[0]
    for entry in entries:
        m = _RUN_FILE.match(entry)
        if not m or int(m.group(1)) == mine:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive (or another user's: not ours to judge)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.unlink(os.path.join(directory, entry))
        except OSError:
            pass


def watch_remote_agents():
    """Makes sure this controller run's remote agents end with it (remote_watch.py); if the
    watcher cannot start, they end after their idle time."""
    st = _proc_state()
    if st.get("watching"):
        return
    st["watching"] = True
    ctl, ctl_start = controller()
    try:
        remote_watch.ensure_watcher(agent_dir(), ctl, ctl_start)
    except (OSError, safe_paths.UnsafePath) as e:
        display.vvv("spawntrace: no watcher for the remote agents (%s): they end after %ss idle" % (e, idle_timeout()))


class AgentUnavailable(Exception):
    """Nothing was run: the caller may safely fall back to the classic path."""


class AgentFailed(Exception):
    """The agent took the request but did not answer: the outcome is unknown."""


class Unsupported(AgentUnavailable):
    """The agent read the request and did not run it (`unsupported`); `resp` says whether it did
    the housekeeping sent with it (`before_done`)."""

    def __init__(self, resp):
        AgentUnavailable.__init__(self, "unsupported by the agent: %s" % resp.get("error"))
        self.resp = resp


# ---------------------------------------------------------------------------------------------
# process-wide state (each WorkerProcess is a fresh fork: nothing leaks between tasks)

_state = {"pid": None}


def _proc_state():
    if _state["pid"] != os.getpid():
        _state.clear()
        _state.update(pid=os.getpid(), endpoints={}, failed=set(), umask=None, socks={}, dirs=set(), deferred={}, deferred_to={})
    return _state


# Deferred housekeeping (shell_ops.DEFERRABLE) and uploads: answered at once and sent with the
# worker's next request to the same agent (over ssh each request is a round trip through the
# ControlMaster; a loop item of `copy` makes seven). The agent does them first, in order; one that
# fails (but rm, which ansible only warns about) fails that request (DeferredFailed) and the
# request itself is not run. Before anything reaches the target another way, they are sent on
# their own (AgentConnectionMixin._st_flush).


DEFER_BYTES = 16 << 20  # uploads waiting for one agent: the rest of a frame is the request's own


def defer(endpoint, entry, data=b"", cmd=None):
    """Queues `entry` (a request without version/keep, `data` its blob; `cmd`: the shell command
    it stands for) for `endpoint`'s agent; False (nothing queued) when shell_ops.MAX_DEFERRED are
    waiting or they would not fit in one frame with a large request: the caller asks at once."""
    st = _proc_state()
    queue = st["deferred"].setdefault(endpoint.path, [])
    if len(queue) >= shell_ops.MAX_DEFERRED or sum(len(d) for _, d, _ in queue) + len(data) > DEFER_BYTES:
        return False
    queue.append((entry, data, cmd))
    st["deferred_to"][endpoint.path] = endpoint
    return True


def deferred_answer(op, args):
    """(rc, stdout, stderr) the command of a DEFERRABLE op prints when it succeeds."""
    if op == "mkdtemp":
        return 0, shell_ops.mkdtemp_output(args["basefile"], args["basetmp"]), b""
    return 0, b"", b""


def current_umask():
    st = _proc_state()
    if st["umask"] is None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("Umask:"):
                        st["umask"] = int(line.split()[1], 8)
                        break
        except OSError:
            pass
        if st["umask"] is None:
            old = os.umask(0o022)
            os.umask(old)
            st["umask"] = old
    return st["umask"]


def proc_start(pid):
    return procs.proc_start(pid)


# ---------------------------------------------------------------------------------------------
# attribution context of the current worker


def worker_info():
    """(task uuid, host name) of the WorkerProcess this code runs in, if any."""
    proc = multiprocessing.current_process()
    task = getattr(proc, "_task", None)
    host = getattr(proc, "_host", None)
    try:
        return (getattr(task, "_uuid", None), host.get_name() if host is not None else None)
    except Exception:
        return (getattr(task, "_uuid", None), None)


def current_item():
    """Index of the loop item being executed in this worker (TaskExecutor._run_loop's local
    `item_index` on 2.19, `_item_index` on 2.21), or None outside loops."""
    f = sys._getframe(1)
    while f is not None:
        co = f.f_code
        if co.co_name == "_run_loop" and co.co_filename.endswith("task_executor.py"):
            loc = f.f_locals
            for k in ("item_index", "_item_index"):
                v = loc.get(k)
                if isinstance(v, int):
                    return v
            return None
        f = f.f_back
    return None


def module_name(payload, path):
    if path:
        base = os.path.basename(path)
        if base.startswith("AnsiballZ_") and base.endswith(".py"):
            return base[len("AnsiballZ_") : -3]
    if not payload:
        return None
    m = None
    i = payload.rfind(b"_ansiballz_main(")
    if i >= 0:  # 2.19+: the wrapper ends calling _ansiballz_main(..., ansible_module='copy', ...)
        m = re.search(rb"ansible_module='([^']*)'", payload[i : i + 4096])
    if m is None:  # before 2.19: tempfile.mkdtemp(prefix='ansible_' + 'copy' + '_payload_')
        i = payload.find(b" + '_payload_')")
        if i >= 0:
            m = re.search(rb"prefix='ansible_' \+ '([^']*)'$", payload[max(0, i - 300) : i])
    if m is None:
        return None
    name = m.group(1).decode("utf-8", "replace")
    for prefix in ("ansible.legacy.", "ansible.builtin."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


# ---------------------------------------------------------------------------------------------
# recognising commands

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_.,:@%+=/-]*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USER_HOME = re.compile(r"^~[_.A-Za-z0-9][-_.A-Za-z0-9]*$")
_MKDTEMP = re.compile(r'^\( umask ([0-7]+) && mkdir -p "` echo (\S+) `"&& mkdir "` echo (\S+) `" && echo (\S+?)="` echo (\S+) `" \)$')
# Variables read when the interpreter starts: a different value needs a different agent.
_STARTUP_ENV = re.compile(r"^(PYTHON\w*|LD_\w+|LC_\w+|LANG|LANGUAGE)$")


def zip_sha(data):
    """The sha1 of a payload's zip text: the last one's, when it is the same bytes again (a
    loop's items; comparing is ~20x cheaper than hashing 100+ KB)."""
    st = _proc_state()
    last = st.get("zip")
    if last is None or last[0] != data:
        last = st["zip"] = (data, hashlib.sha1(data).hexdigest())
    return last[1]


def startup_env(env):
    return {k: v for k, v in env.items() if _STARTUP_ENV.match(k)}


class Recorder:
    """Wraps a POSIX shell plugin instance's command builders so that each command string it
    returns is remembered with its meaning. exec_command then looks its command up: strings
    nobody recorded (raw, script, discovery, anything unusual) go the classic way."""

    LIMIT = 512

    def __init__(self):
        self.ops = {}
        self.env = {"": {}}
        self.become = {}

    def _put(self, table, k, v):
        if len(table) > self.LIMIT:
            table.clear()
            if table is self.env:
                table[""] = {}
        table[k] = v

    def wrap_shell(self, shell):
        try:
            from ansible.plugins.shell.sh import ShellModule
        except Exception:
            return shell
        if shell is None or not isinstance(shell, ShellModule) or getattr(shell, "_spawntrace_recorder", None) is self:
            return shell
        shell._spawntrace_recorder = self
        rec = self
        orig = {n: getattr(shell, n) for n in ("expand_user", "mkdtemp", "chmod", "remove", "exists", "env_prefix", "build_module_command")}

        def expand_user(user_home_path, username=""):
            cmd = orig["expand_user"](user_home_path, username=username)
            word = user_home_path + username if user_home_path == "~" else user_home_path
            if cmd == "echo " + word and (word == "~" or _USER_HOME.match(word)):
                rec._put(rec.ops, cmd, ("expand_user", {"word": word}))
            elif cmd == "echo " + shlex.quote(word) and word.startswith("/"):
                rec._put(rec.ops, cmd, ("expand_user", {"word": word, "literal": True}))
            return cmd

        def mkdtemp(*args, **kwargs):
            cmd = orig["mkdtemp"](*args, **kwargs)
            m = _MKDTEMP.match(cmd)
            if m:
                umask, tmpdir, tmp, basefile, tmp2 = m.groups()
                if tmp == tmp2 and _SAFE_PATH.match(tmpdir) and _SAFE_PATH.match(tmp) and re.match(r"^[\w.-]+$", basefile):
                    args_ = {"basetmpdir": tmpdir, "basetmp": tmp, "basefile": basefile, "mode": 0o777 & ~int(umask, 8)}
                    rec._put(rec.ops, cmd, ("mkdtemp", args_))
            return cmd

        def chmod(paths, mode):
            cmd = orig["chmod"](paths, mode)
            paths = list(paths)
            if shell_ops.parse_chmod(mode) is not None and paths and all(p.startswith("/") for p in paths):
                rec._put(rec.ops, cmd, ("chmod", {"mode": mode, "paths": paths}))
            return cmd

        def remove(path, recurse=False):
            cmd = orig["remove"](path, recurse=recurse)
            if path.startswith("/"):
                rec._put(rec.ops, cmd, ("rm", {"path": path, "recurse": bool(recurse)}))
            return cmd

        def exists(path):
            cmd = orig["exists"](path)
            if path.startswith("/"):
                rec._put(rec.ops, cmd, ("exists", {"path": path}))
            return cmd

        def env_prefix(**kwargs):
            cmd = orig["env_prefix"](**kwargs)
            if all(_NAME.match(k) for k in kwargs):
                rec._put(rec.env, cmd.strip(), {k: str(v) for k, v in kwargs.items()})
            return cmd

        def build_module_command(env_string, shebang, cmd, arg_path=None):
            res = orig["build_module_command"](env_string, shebang, cmd, arg_path=arg_path)
            env = rec.env.get((env_string or "").strip())
            interp = (shebang or "").strip()
            interp = interp[2:].strip() if interp.startswith("#!") else None
            path = (cmd or "").strip()
            if env is not None and interp and _SAFE_PATH.match(interp) and arg_path is None and (not path or _SAFE_PATH.match(path)):
                # as the action plugin runs it: stripped (2.16's shell plugin builds
                # ` /usr/bin/python3 `; later ones strip it themselves)
                rec._put(rec.ops, res.strip(), ("module", {"env": env, "interpreter": interp, "path": path or None}))
            return res

        shell.expand_user = expand_user
        shell.mkdtemp = mkdtemp
        shell.chmod = chmod
        shell.remove = remove
        shell.exists = exists
        shell.env_prefix = env_prefix
        shell.build_module_command = build_module_command
        return shell

    def wrap_become(self, plugin):
        if plugin is None or getattr(plugin, "_spawntrace_recorder", None) is self:
            return plugin
        plugin._spawntrace_recorder = self
        orig = plugin.build_become_command
        rec = self

        def build_become_command(cmd, shell):
            res = orig(cmd, shell)
            if res and res != cmd:
                rec._put(rec.become, res, cmd)
            return res

        plugin.build_become_command = build_become_command
        return plugin

    def plan(self, cmd, executable, sudoable):
        """(op, args, become) for a command exec_command received, or None."""
        if not isinstance(cmd, str):
            return None
        inner = cmd
        if executable:
            prefix = executable + " -c "
            if not cmd.startswith(prefix):
                return None
            rest = cmd[len(prefix) :]
            try:
                parts = shlex.split(rest)
            except ValueError:
                return None
            if len(parts) != 1 or shlex.quote(parts[0]) != rest:
                return None
            inner = parts[0]
        if inner.endswith(" && sleep 0"):  # ansible-core < 2.20 appends it to every command
            inner = inner[: -len(" && sleep 0")]
        become = False
        if inner in self.become:
            if not sudoable:
                return None
            inner = self.become[inner]
            become = True
        op = self.ops.get(inner)
        if op is None:
            return None
        return op[0], op[1], become


# ---------------------------------------------------------------------------------------------
# talking to an agent


def key_name_of(endpoint):
    return getattr(endpoint, "name", None)


class Endpoint:
    """An agent's socket as seen from this worker."""

    def __init__(self, path, peer_uid, remote=False, dir_owner=None):
        self.name = None
        self.path = path
        self.peer_uid = peer_uid
        self.remote = remote
        # the uid whose private directory holds the socket (checked before it is used)
        self.dir_owner = os.getuid() if dir_owner is None else dir_owner
        self.reporting = None

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise AgentUnavailable("connect %s: %s" % (self.path, e))
        if self.peer_uid is not None:
            data = s.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERCRED", 17), struct.calcsize("3i"))
            uid = struct.unpack("3i", data)[1]
            if uid != self.peer_uid:
                s.close()
                raise AgentUnavailable("agent socket %s belongs to uid %d, expected %d" % (self.path, uid, self.peer_uid))
        return s

    def request(self, req, blob=b"", on_started=None, carry=True):
        """Sends one request; returns (response, blob). Raises AgentUnavailable when the agent
        certainly did not act on it, AgentFailed when it may have.

        The connection is kept for this process's next request to the same socket (each one
        through an ssh forward is a new channel otherwise); a kept connection the agent closed
        meanwhile (idle timeout) is replaced once: no hello means nothing was acted on.
        `carry`: the housekeeping deferred to this agent goes first (see defer); when nothing
        was acted on, it waits for the next request again."""
        req["version"] = VERSION
        req["keep"] = True
        queue = _proc_state()["deferred"]
        deferred = queue.pop(self.path, None) if carry else None
        if deferred:
            # housekeeping answered at once (defer): done by the agent first, in order
            req["before"] = [dict(entry, size=len(data)) for entry, data, _ in deferred]
            blob = b"".join([data for _, data, _ in deferred] + [blob])
        try:
            resp, rblob = self._send_request(req, blob, on_started)
        except Unsupported as e:
            if deferred and not e.resp.get("before_done"):
                queue[self.path] = deferred + queue.get(self.path, [])
            raise
        except AgentUnavailable:
            if deferred:
                queue[self.path] = deferred + queue.get(self.path, [])
            raise
        for warning in resp.get("warnings") or ():
            display.warning(warning)
        failed = resp.get("before_failed")
        if failed:
            raise deferred_failure(failed.get("op"), failed.get("error") or "deferred %s failed" % failed.get("op"))
        return resp, rblob

    def _send_request(self, req, blob, on_started):
        socks = _proc_state()["socks"]
        s = socks.pop(self.path, None)
        if s is not None:
            try:
                return self._exchange(s, req, blob, on_started, socks)
            except AgentUnavailable:
                pass
        return self._exchange(self.connect(), req, blob, on_started, socks)

    def _exchange(self, s, req, blob, on_started, socks):
        kept = False
        try:
            try:
                framing.send_frame(s, req, blob)
            except (OSError, framing.ProtocolError) as e:  # over the limits (framing.MAX_BLOB): classic
                raise AgentUnavailable("send: %s" % e)
            try:
                hello, _ = framing.recv_frame(s)
            except (OSError, framing.ProtocolError, ValueError) as e:
                raise AgentUnavailable("no agent behind %s: %s" % (self.path, e))
            if hello.get("version") != VERSION:
                raise AgentUnavailable("agent version %s, expected %s" % (hello.get("version"), VERSION))
            try:
                resp, rblob = framing.recv_frame(s)
                if resp.get("started"):
                    if on_started is not None:
                        on_started(resp)
                    resp, rblob = framing.recv_frame(s)
            except (OSError, framing.ProtocolError, ValueError) as e:
                raise AgentFailed("agent at %s did not answer: %s" % (self.path, e))
            if resp.get("unsupported"):
                raise Unsupported(resp)
            kept = True
            return resp, rblob
        finally:
            if kept and self.path not in socks:
                socks[self.path] = s
            else:
                s.close()


def place_payload(endpoint):
    """(path, owner uid, remove): the agent's payload written where a first stage reads it when
    its stdin is a terminal (see AgentConnectionMixin._st_needs_terminal): a new file with a
    random name in the private directory of the agent behind `endpoint` (on a target: its login
    user's agent), owned by that agent's uid. `remove()` deletes it."""
    name = "payload-%s" % secrets.token_hex(16)
    resp, _ = endpoint.request({"op": "ping"})
    if not resp.get("dir") or not isinstance(resp.get("uid"), int):
        raise AgentUnavailable("the agent did not give its directory and uid")
    path, uid = resp["dir"].rstrip("/") + "/" + name, resp["uid"]
    resp, _ = endpoint.request({"op": "put", "path": path, "mode": 0o600}, PAYLOAD.body)
    if not resp.get("ok"):
        raise AgentUnavailable("payload not placed: %s" % resp.get("error"))

    def remove():
        try:
            endpoint.request({"op": "rm", "args": {"path": path, "recurse": False}, "env": None})
        except (AgentUnavailable, AgentFailed):
            pass

    return path, uid, remove


def locked(path, timeout=120.0):
    """An exclusive flock on `path` (a context manager)."""

    class _Lock:
        def __enter__(self):
            try:
                self.fd = safe_paths.open_checked(path, os.O_RDWR | os.O_CREAT, (os.getuid(),))
            except safe_paths.UnsafePath as e:
                raise UnsafeAgentDir(str(e))
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return self
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(self.fd)
                        raise AgentUnavailable("timed out waiting for %s" % path)
                    time.sleep(0.01)

        def __exit__(self, *a):
            os.close(self.fd)

    return _Lock()


def parse_ready(out):
    text = out.decode("utf-8", "replace") if isinstance(out, bytes) else out
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def controller():
    """(pid, start time) of ansible-playbook: the parent of this worker."""
    st = _proc_state()
    ctl = st.get("controller")
    if ctl is None:
        pid = os.getppid()
        ctl = st["controller"] = (pid, proc_start(pid))
    return ctl


def base_config(key, socket_path, host, user):
    ctl, ctl_start = controller()
    cfg = {
        "socket": socket_path,
        "version": VERSION,
        "idle": idle_timeout(),
        "controller_pid": ctl,
        "controller_start": ctl_start,
        "host": host,
        "user": user,
        "key": key_name(key),
    }
    if os.environ.get("SPAWNTRACE_AGENT_LOG"):
        cfg["log"] = socket_path + ".log" if socket_path else True
    runs = os.environ.get("SPAWNTRACE_AGENT_RUNS_PER_RUNNER")
    if runs:  # module runs one runner may serve in a row (runner.InProcess; default 100)
        try:
            cfg["runs_per_runner"] = max(1, int(runs))
        except ValueError:
            raise AnsibleError("SPAWNTRACE_AGENT_RUNS_PER_RUNNER must be a number of module runs, not %r" % runs)
    if os.environ.get("SPAWNTRACE_AGENT_PREFAULT"):  # diagnostics: 0 turns the spares' memory copy off
        cfg["prefault"] = os.environ["SPAWNTRACE_AGENT_PREFAULT"] != "0"
    if os.environ.get("SPAWNTRACE_AGENT_SPARES"):  # diagnostics: spare runners kept ready
        cfg["spares"] = int(os.environ["SPAWNTRACE_AGENT_SPARES"])
    if os.environ.get("SPAWNTRACE_AGENT_PROFILE"):  # diagnostics: a cProfile per runner, there
        cfg["profile"] = os.environ["SPAWNTRACE_AGENT_PROFILE"]
    return cfg


# ---------------------------------------------------------------------------------------------
# the connection mixin shared by plugins/connection/local.py and ssh.py

from ansible.errors import AnsibleConnectionFailure, AnsibleError  # noqa: E402
from ansible.utils.display import Display  # noqa: E402

display = Display()


class DeferredFailed(AnsibleError):
    """Housekeeping or an upload sent with a request (see defer) failed on the target: the
    request was not run, the task fails with the target's error."""


def deferred_failure(op, error):
    """The exception a deferred `op` that failed with `error` raises: mkdtemp's leaves the host
    unreachable, as ActionBase._make_tmp_path does; the others fail the task."""
    if op == "mkdtemp":
        return AnsibleConnectionFailure("Failed to create temporary directory (spawntrace agent): %s" % error)
    return DeferredFailed(error)


class UnsafeAgentDir(AnsibleError):
    """An agent directory, or a file in it, failed its check (see safe_paths.private_dir): the task
    fails with this one-line message; nothing is sent to, or read from, that place."""


def builtin_connection(name):
    """ansible-core's own connection plugin module `name`, imported under an alias: Ansible loads
    plugins found on a configured path under the builtin's module name (plugins/connection/local.py
    is `ansible.plugins.connection.local` while it loads), so the builtin is imported from its file."""
    import importlib.util

    import ansible.plugins.connection as pkg

    alias = "ansible.plugins.connection._spawntrace_builtin_" + name
    mod = sys.modules.get(alias)
    if mod is None:
        spec = importlib.util.spec_from_file_location(alias, os.path.join(os.path.dirname(pkg.__file__), name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[alias] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[alias]
            raise
    return mod


_ISOLATION_OPTION = {
    "description": [
        "Whether a module run shares its runner process with other runs (in-process) or gets a"
        " fresh one (fork). C(auto): the builtin modules the agent knows to be safe in-process run"
        " in-process, any other module forks. A runner that a module left changed (working"
        " directory, environment, umask, signal handlers, imports, open files, threads) is"
        " retired whatever this says. See RUNNER.md (spawntrace).",
    ],
    "type": "str",
    "default": "auto",
    "choices": ["auto", "in-process", "fork"],
    "vars": [{"name": "spawntrace_isolation"}],
    "env": [{"name": "SPAWNTRACE_ISOLATION"}],
}


def documentation(builtin_doc, description):
    """The builtin plugin's DOCUMENTATION with spawntrace's short description and its
    `spawntrace_isolation` option (task and host variables can set it, as every option)."""
    import yaml

    doc = yaml.safe_load(builtin_doc)
    doc["short_description"] = "%s (%s)" % (doc.get("short_description", ""), description)
    doc.setdefault("options", {})["spawntrace_isolation"] = _ISOLATION_OPTION
    return yaml.safe_dump(doc, sort_keys=False)


def _option(plugin, name):
    """The plugin's option `name`, or None when it has none (or it cannot be read yet)."""
    try:
        return plugin.get_option(name)
    except Exception:  # KeyError, AnsibleError: not an option of this plugin (version)
        return None


def _text(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    return v


# become plugins an agent can be started through (see _st_become_method)
_BECOME_METHODS = {
    "sudo": "sudo",
    "ansible.builtin.sudo": "sudo",
    "su": "su",
    "ansible.builtin.su": "su",
    "community.general.doas": "doas",
}


class AgentConnectionMixin:
    """Routes module runs, shell housekeeping and file transfers to a persistent agent; every
    command it does not recognise goes to the parent plugin's classic path."""

    # -- recording ------------------------------------------------------------------------------

    @property
    def _shell(self):
        return self.__dict__.get("_st_shell")

    @_shell.setter
    def _shell(self, shell):
        rec = self.__dict__.get("_st_rec")
        if rec is None:
            rec = self.__dict__["_st_rec"] = Recorder()
        self.__dict__["_st_shell"] = rec.wrap_shell(shell) if enabled() else shell

    def set_become_plugin(self, plugin):
        rec = self.__dict__.get("_st_rec")
        if rec is None:
            rec = self.__dict__["_st_rec"] = Recorder()
        if enabled():
            rec.wrap_become(plugin)
        super().set_become_plugin(plugin)

    # -- pipelining -----------------------------------------------------------------------------

    def is_pipelining_enabled(self, wrap_async=False):
        """Pipelined unless configured otherwise: the agent receives a module's payload in its
        request either way, so the classic file-based path (temporary directory, payload upload,
        chmod, clean-up: four more operations per module) buys nothing here. An explicit
        `pipelining` setting (config, environment, variable) is obeyed; async tasks, kept remote
        files and become methods without pipelining keep ansible-core's rules
        (ConnectionBase.is_pipelining_enabled, ansible-core 2.19+)."""
        if super().is_pipelining_enabled(wrap_async):
            return True
        if not enabled() or wrap_async or not self.has_pipelining or (self.become and not self.become.pipelining):
            return False
        from ansible import constants as C

        if C.DEFAULT_KEEP_REMOTE_FILES:
            return False
        try:
            value, origin = self.get_option_and_origin("pipelining")
        except (KeyError, AttributeError):
            return False
        return not value and origin == "default"

    # -- dispatch -------------------------------------------------------------------------------

    def exec_command(self, cmd, in_data=None, sudoable=True):
        if enabled():
            try:
                res = self._st_exec(cmd, in_data, sudoable)
            except AgentFailed as e:
                raise AnsibleConnectionFailure("spawntrace agent: %s" % e)
            if res is not None:
                return res
            self._st_flush()
        return super().exec_command(cmd, in_data=in_data, sudoable=sudoable)

    def _st_flush(self, but=None):
        """Sends the housekeeping this worker deferred (see defer) to each agent but the one at
        socket `but`, on its own: before anything reaches the target another way. An agent that
        is gone (nothing was acted on) has it done the classic way, as it was asked."""
        st = _proc_state()
        for path in [p for p, q in st["deferred"].items() if q and p != but]:
            try:
                st["deferred_to"][path].request({"op": "ping"})
            except AgentFailed as e:
                raise AnsibleConnectionFailure("spawntrace agent: %s" % e)
            except AgentUnavailable:
                self._st_replay(st["deferred"].pop(path, []))

    def _st_replay(self, deferred):
        """Does deferred housekeeping through the parent plugin, with the outcome ActionBase
        would have had from it."""
        parent = super(AgentConnectionMixin, self)
        for entry, data, cmd in deferred:
            op = entry["op"]
            if op == "put":
                import tempfile

                with tempfile.NamedTemporaryFile(prefix="spawntrace-put-") as f:
                    f.write(data)
                    f.flush()
                    os.fchmod(f.fileno(), entry.get("mode", 0o600) & 0o777)  # the local file's, as put_file sees it
                    parent.put_file(f.name, entry["path"])
                continue
            rc, _, err = parent.exec_command(cmd, sudoable=False)
            if rc == 0:
                continue
            if op == "rm":
                display.warning(shell_ops.rm_warning(rc, _text(err)))
                continue
            raise deferred_failure(op, "%s failed (rc %d): %s" % (op, rc, _text(err).strip()))

    def close(self):
        try:
            self._st_flush()
        except Exception as e:  # the task is over: what is left undone is only said
            display.warning("spawntrace agent: %s" % (e,))
        super().close()

    def reset(self):
        self._st_flush()
        super().reset()

    def _st_exec(self, cmd, in_data, sudoable):
        rec = self.__dict__.get("_st_rec")
        if rec is None:
            return None
        executable = self._play_context.executable if self.allow_executable else None
        plan = rec.plan(cmd, executable, sudoable)
        if plan is None:
            return None
        op, args, become = plan
        if become and not self._st_become_ok():
            return None
        if not self._connected:
            self._connect()
        if op == "module":
            return self._st_module(cmd, args, in_data, become)
        if become or in_data:
            return None
        return self._st_housekeeping(cmd, op, args)

    def _st_become_ok(self):
        return self._st_become_method() is not None

    def _st_become_method(self):
        """The become method an agent can be started through (sudo, su, doas), or None: its
        modules run classic. sudo reads a password from the agent's stdin pipe (-S); su and doas
        read one only from a terminal (see _st_needs_terminal)."""
        b = self.become
        method = _BECOME_METHODS.get(getattr(b, "name", None)) if b is not None else None
        if method is None:
            return None
        try:
            if method == "sudo" and b.get_option("sudo_chdir"):
                return None
        except KeyError:
            pass
        except Exception:
            return None
        return method

    def _st_needs_terminal(self, login_uid_is_root):
        """Whether the agent's become start answers a password prompt on a terminal: su and
        doas with a password, from a user other than root (root is never asked). Its stdin is
        then that terminal, and the first stage reads the payload from a file in the login
        user's agent directory instead (place_payload), which the become user (root, or the
        login user itself) can read."""
        if login_uid_is_root or self._st_become_method() not in ("su", "doas"):
            return False
        try:
            return bool(self.become.get_option("become_pass"))
        except Exception:
            return False

    def _st_become_key(self):
        b = self.become
        opt = {}
        for name in ("become_user", "become_exe", "become_flags"):
            try:
                opt[name] = b.get_option(name)
            except Exception:
                opt[name] = None
        return {
            "method": self._st_become_method(),
            "user": opt["become_user"] or "root",
            "exe": opt["become_exe"],
            "flags": opt["become_flags"],
        }

    def _st_attribution(self):
        task_uuid, host = worker_info()
        if task_uuid is None:
            task_uuid = self.__dict__.get("_st_task_uuid")
        return {
            "task_uuid": task_uuid,
            "host": host or self._play_context.remote_addr,
            "worker_pid": os.getpid(),
            "item": current_item(),
        }

    def _st_module(self, cmd, args, in_data, become):
        path = args["path"]
        if path:
            if in_data or not os.path.basename(path).startswith("AnsiballZ_"):
                return None
        elif not in_data or b"_ANSIBALLZ_WRAPPER = True" not in in_data[:4096]:
            return None
        for retry in (False, True):
            endpoint, base = self._st_module_endpoint(args, become, retry)
            if endpoint is None:
                return None
            try:
                return self._st_module_request(cmd, args, in_data, path, endpoint, base)
            except AgentUnavailable as e:
                # a stale socket, an agent that just timed out: start one (once)
                _proc_state()["endpoints"].pop(key_name_of(endpoint), None)
                _proc_state().pop("fast", None)
                display.vvv("spawntrace agent unavailable (%s)" % e, host=self._play_context.remote_addr)
        return None

    def _st_module_request(self, cmd, args, in_data, path, endpoint, base):
        req = dict(base)
        req.update(self._st_attribution())
        req.update(
            op="run",
            assign=args["env"],
            path=path,
            module=module_name(in_data, path),
            ansible_version=ANSIBLE_VERSION,
            warm=os.environ.get("SPAWNTRACE_AGENT_WARM", "1") != "0",
            isolation=_option(self, "spawntrace_isolation") or "auto",
        )
        display.vvv("EXEC (spawntrace agent %s) %s" % (endpoint.path, cmd), host=self._play_context.remote_addr)
        self._st_flush(but=endpoint.path)  # those for this agent go with the request
        notify = self._st_on_started(endpoint, req)
        started = {}

        def on_started(resp):
            started.update(resp)
            notify(resp)

        t0 = time.monotonic_ns()
        # every item of a loop carries the same module zip: sent once per agent (`need_zip`
        # when the agent does not have it)
        parts = strip_payload(in_data) if in_data and len(in_data) > 16384 else None
        resp = {}
        if parts is not None:
            req["zip_sha"] = zip_sha(parts[1])
            resp, blob = endpoint.request(dict(req, stripped=True), parts[0], on_started=on_started)
        if parts is None or resp.get("need_zip"):
            resp, blob = endpoint.request(req, in_data or b"", on_started=on_started)
        timing = os.environ.get("SPAWNTRACE_AGENT_TIMING")
        if timing and resp.get("timing"):
            # diagnostics: where a module run's time went (monotonic ns): request sent, agent
            # accepted, request read, runner started, runner done, reply sent, reply received
            rec = dict(resp["timing"], module=req["module"], host=req.get("host"), runner_pid=started.get("pid"))
            rec.update(agent_pid=started.get("agent_pid"), sent=t0, received=time.monotonic_ns())
            with open(timing, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if not resp.get("ok"):
            raise AnsibleConnectionFailure("spawntrace agent: %s" % resp.get("error"))
        n = resp["out"]
        return resp["rc"], blob[:n], blob[n:]

    def _st_on_started(self, endpoint, req):
        def started(resp):
            if endpoint.remote or not resp.get("reported"):
                messages.sender().runner_start(resp.get("pid"), resp.get("agent_pid"), req, remote=endpoint.remote)

        return started

    # -- endpoints ------------------------------------------------------------------------------

    def _st_endpoint(self, key, make_endpoint, start, retry=False):
        """The agent for `key`: cached in this worker, else its socket if it exists (its
        directory checked first, see ensure_private_dir; the socket's peer uid is checked on
        connect, its answer tells the rest), else started (`retry`: the socket did not answer).
        A failure to start makes this worker use the classic path for that key; an unsafe agent
        directory fails the task (UnsafeAgentDir)."""
        st = _proc_state()
        name = key_name(key)
        ep = st["endpoints"].get(name)
        if ep is not None and not retry:
            return ep
        if name in st["failed"]:
            return None
        ep = make_endpoint(name)
        ep.name = name
        try:
            # before anything at that path is connected to (UnsafeAgentDir is not caught)
            ensure_private_dir(os.path.dirname(ep.path), ep.dir_owner)
        except OSError as e:  # e.g. no such SPAWNTRACE_AGENT_DIR: nothing unsafe used, classic
            display.vvv("spawntrace agent directory for %s unusable: %s" % (key.get("host"), e), host=self._play_context.remote_addr)
            st["failed"].add(name)
            return None
        if not retry and os.path.exists(ep.path):
            st["endpoints"][name] = ep
            return ep
        try:
            alive = self._st_ping(ep)
            if not alive:
                ensure_private_dir(agent_dir())
                sweep_stale(agent_dir())
                with locked(start_lock(name)):
                    alive = self._st_ping(ep) or start(name, ep)
        except UnsafeAgentDir:
            raise
        except (AgentUnavailable, AnsibleError, OSError) as e:
            display.vvv("spawntrace agent for %s could not start: %s" % (key.get("host"), e), host=self._play_context.remote_addr)
            alive = False
        if not alive:
            st["failed"].add(name)
            return None
        st["endpoints"][name] = ep
        return ep

    @staticmethod
    def _st_ping(ep):
        try:
            resp, _ = ep.request({"op": "ping"}, carry=False)
        except (AgentUnavailable, AgentFailed):
            return False
        ep.reporting = resp.get("reporting")
        return bool(resp.get("ok"))

    def _st_bootstrap_command(self, cfg, assign, placed=None):
        """`K=V... <python> -c <first stage> <cfg>` for a shell (the payload goes on its stdin,
        or is read from the file `placed` = (path, owner uid))."""
        argv = PAYLOAD.argv(cfg.pop("_interpreter"), json.dumps(cfg, separators=(",", ":")), placed)
        prefix = " ".join("%s=%s" % (k, shlex.quote(v)) for k, v in sorted(assign.items()))
        return (prefix + " " if prefix else "") + shlex.join(argv)

    def _st_run_bootstrap_shell(self, cfg, assign, become, placed=None):
        """Starts an agent with a shell command through the parent plugin (so that become
        prompts, ssh and its ControlMaster are handled as for any command). Returns the READY
        object. `placed`: (path, owner uid, remove) of the payload put where the first stage
        reads it (a become that answers its password prompt on a terminal, see
        _st_needs_terminal), removed once the command ends."""
        saved = None
        try:
            self._st_flush()
            cmd = self._st_bootstrap_command(cfg, assign, placed[:2] if placed else None)
            if become:
                # build_become_command draws a new success marker (and prompt): the command this
                # start interrupts was built with the old ones, which must be back for its own run
                saved = {k: getattr(self.become, k) for k in ("_id", "success", "prompt") if hasattr(self.become, k)}
                cmd = self.become.build_become_command(cmd, self._shell)
            executable = self._play_context.executable if self.allow_executable else None
            if executable:
                cmd = executable + " -c " + shlex.quote(cmd)
            # The payload goes on stdin. local gives a command that expects a become password a
            # pty for stdin unless pipelining is on, and then drops in_data: the first stage
            # would wait on the terminal forever. With pipelining, the password and then the
            # payload go down one pipe (sudo -S, in the default become_flags, reads its line,
            # the rest is the agent's), as for a pipelined module. su and doas read a password
            # only from a terminal: the command then runs as the parent plugin runs any become
            # command that prompts (a pty locally, `ssh -tt`), with the payload in a file.
            forced = become and placed is None and _option(self, "pipelining") is False
            try:
                if forced:
                    self.set_option("pipelining", True)
                if placed is not None:
                    rc, out, err = super().exec_command(cmd, in_data=None, sudoable=True)
                else:
                    rc, out, err = super().exec_command(cmd, in_data=PAYLOAD.body, sudoable=become)
            finally:
                if forced:
                    self.set_option("pipelining", False)
        finally:
            for k, v in (saved or {}).items():
                setattr(self.become, k, v)
            if placed is not None:
                placed[2]()
        ready = parse_ready(out)
        check_ready(ready)
        if rc != 0 or not ready or not ready.get("ok"):
            raise AgentUnavailable("agent bootstrap failed (rc=%s): %s %s" % (rc, _text(out)[-500:], _text(err)[-500:]))
        return ready


def preload_in_controller():
    """Imports, once in ansible-playbook itself (connection plugins are loaded there before the
    workers fork), the module_utils every worker imports to encode module arguments and decode
    results, so that each forked worker does not import (and compile) them again. These are
    ansible-core internals, not plugins: importing them early cannot shadow anything."""
    if multiprocessing.current_process().name != "MainProcess":
        return
    import importlib

    for name in (
        "ansible.module_utils._internal._json._profiles._module_legacy_m2c",
        "ansible.module_utils._internal._json._profiles._module_legacy_c2m",
        "ansible.module_utils._internal._json._profiles._module_modern_m2c",
        "ansible.module_utils._internal._json._profiles._module_modern_c2m",
    ):
        try:
            importlib.import_module(name)
        except Exception:
            pass


if enabled():
    preload_in_controller()
