# Recording SSH targets (controller only): before a worker's first command to a target, its ssh
# connection plugin tells spawntrace which target it reaches and the ssh command Ansible itself
# would run there (the run's own options, ControlPath and credentials). spawntrace starts its
# recorder on the target through that ssh, so through the ControlMaster every later command of
# the run shares, and answers once the recorder records (or why it cannot): the worker's first
# command to the host runs only then, so nothing it starts there is missed. PROTOCOL.md,
# "Recording the targets".
#
# Mitogen's connections (ansible_mitogen's strategies) bypass Ansible's ssh plugin: its mux
# process runs one ssh per target. With ansible_mitogen loaded, record_mitogen() wraps its ssh
# connection arguments in the controller before the workers fork: a worker asks spawntrace to
# record the target through an ssh command made of the same settings, and both that ssh and
# Mitogen's share a ControlPath of the user's own (~/.ansible/cp/st-%C, ~ from the password
# database), so Mitogen's session on
# the target is the one the recorder records.
from __future__ import absolute_import

import json
import os
import pwd
import socket
import stat
import sys

SOCKET_ENV = "SPAWNTRACE_TARGET_SOCKET"
# The first recorder on a machine may have to receive spawntrace's binary first.
ANSWER_TIMEOUT = 120
# Longest answer read.
MAX_ANSWER = 64 * 1024

# targets this process has asked about: a worker asks once per target
_asked = {"pid": None, "targets": {}}


def asked(target):
    """This process's answer for `target`, if it asked already."""
    if _asked["pid"] != os.getpid():
        _asked.update(pid=os.getpid(), targets={})
    return _asked["targets"].get(target)


def request(target, argv, control_master):
    """Asks spawntrace to record `target` (`user@host:port`) through `argv` (the ssh command
    without its remote command, as text; None when there is none spawntrace could run); returns
    its answer (a dict), or None without spawntrace."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    known = asked(target)
    if known is not None:
        return known
    # the worker's environment: what its ssh needs (an ssh agent, a Kerberos cache, PATH…);
    # spawntrace runs the command as this user
    req = {"target": target, "argv": argv, "control_master": bool(control_master), "env": dict(os.environ)}
    answer = {"recording": False, "reason": "spawntrace did not answer"}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(ANSWER_TIMEOUT)
        s.connect(path)
        s.sendall(json.dumps(req).encode("utf-8") + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_ANSWER:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        if data.endswith(b"\n"):
            decoded = json.loads(data.decode("utf-8"))
            if isinstance(decoded, dict):
                answer = decoded
    except (OSError, ValueError) as e:
        answer = {"recording": False, "reason": "asking spawntrace: %s" % e}
    finally:
        s.close()
    _asked["targets"][target] = answer
    return answer


class RecordTargetMixin:
    """For ansible-core's ssh connection plugin: asks spawntrace to record the target before the
    connection's first command (see the module's comment). Never fails the task."""

    def _connect(self):
        self._st_record_target()
        return super()._connect()

    def _st_record_target(self):
        if not os.environ.get(SOCKET_ENV):
            return
        host = None
        try:
            host = self.get_option("host") or self._play_context.remote_addr
            target = "%s@%s:%s" % (self.get_option("remote_user") or "", host, self.get_option("port") or 22)
            if asked(target) is not None:
                return  # (ansible-core's ssh calls _connect before every command)
            if self.get_option("password") or self._play_context.password:
                # sshpass feeds the password through a pipe of this process: not a command
                # spawntrace could run
                answer = request(target, None, False)
            else:
                argv = self._build_command(self.get_option("ssh_executable"), "ssh", host)
                text = [a.decode("utf-8") if isinstance(a, bytes) else a for a in argv]
                answer = request(target, text, getattr(self, "_persistent", False))
            if answer is not None and not answer.get("recording"):
                _display().vvv("spawntrace: not recording %s: %s" % (host, answer.get("reason")), host=host)
        except Exception as e:  # recording is never worth a failed task
            try:
                _display().vvv("spawntrace: not recording %s: %s" % (host, e), host=host)
            except Exception:
                pass


def record_mitogen():
    """Wraps ansible_mitogen's ssh connection arguments (once; a no-op without Mitogen or without
    spawntrace). Called in the controller at each task start, before that task's workers fork."""
    module = sys.modules.get("ansible_mitogen.connection")
    methods = getattr(module, "CONNECTION_METHOD", None)
    if not isinstance(methods, dict) or not os.environ.get(SOCKET_ENV):
        return
    for name in ("ssh", "smart"):
        connect = methods.get(name)
        if connect is not None and not getattr(connect, "_spawntrace_recorded", False):
            methods[name] = _recorded(connect)


def _recorded(connect):
    def connect_ssh(spec):
        args = connect(spec)
        try:
            # a hop past a `mitogen_via` host: its ssh runs there, not here (a ControlPath of
            # this machine means nothing there, and spawntrace could not reach the host itself)
            if not spec.mitogen_via():
                _record_mitogen_target(args["kwargs"])
        except Exception as e:  # recording is never worth a failed task
            try:
                _display().vvv("spawntrace: not recording through Mitogen: %s" % e)
            except Exception:
                pass
        return args

    connect_ssh._spawntrace_recorded = True
    return connect_ssh


def _record_mitogen_target(kw):
    """Asks spawntrace to record the target of Mitogen's ssh `kw` (mitogen.ssh.Options' arguments)
    and, when it records, makes Mitogen's ssh share the recorder's ControlPath (in place)."""
    host, user, port = kw.get("hostname"), kw.get("username") or "", kw.get("port") or 22
    target = "%s@%s:%s" % (user, host, port)
    user_args = [str(a) for a in kw.get("ssh_args") or []]
    answer = asked(target)
    if answer is None:
        if kw.get("password"):
            # Mitogen types it on a terminal: not a command spawntrace could run
            answer = request(target, None, False)
        elif not shares(user_args):
            answer = request(target, ["ssh"], False)
        else:
            answer = request(target, mitogen_argv(kw, user_args, _sharing()), True)
    if answer is not None and answer.get("recording"):
        kw["ssh_args"] = _sharing() + user_args
    elif answer is not None:
        _display().vvv("spawntrace: not recording %s: %s" % (host, answer.get("reason")), host=host)


def shares(ssh_args):
    """Whether the user's ssh arguments leave connection sharing on: not when they say (first)
    ControlMaster no, ControlPath none (`-o` or `-S`), or master mode (`-M`: each ssh its own)."""
    options = []
    for i, a in enumerate(ssh_args):
        if _has_flag(a, "M"):
            return False
        if a == "-S" and i + 1 < len(ssh_args):
            options.append("controlpath " + ssh_args[i + 1])
        elif a.startswith("-S") and len(a) > 2:
            options.append("controlpath " + a[2:])
        elif a == "-o" and i + 1 < len(ssh_args):
            options.append(ssh_args[i + 1])
        elif a.startswith("-o") and len(a) > 2:
            options.append(a[2:])
    first = {}  # ssh takes an option's first value
    for option in options:
        key, _, value = option.strip().replace("=", " ", 1).partition(" ")
        first.setdefault(key.lower(), value.strip().lower())
    return first.get("controlmaster") not in ("no", "false") and first.get("controlpath") != "none"


# ssh's options that take a value (the rest of their argument, or the next one)
_VALUED = "BbcDEeFIiJLlmOopQRSWw"


def _has_flag(arg, flag):
    """Whether the ssh argument `arg` (`-CM`, `-o…`) sets the value-less option `flag`."""
    if not arg.startswith("-") or arg.startswith("--"):
        return False
    for c in arg[1:]:
        if c == flag:
            return True
        if c in _VALUED:
            return False
    return False


def mitogen_argv(kw, ssh_args, sharing):
    """The ssh command (without a remote command) that Mitogen's settings `kw` make, as
    mitogen.ssh builds it, with the `sharing` options before the user's `ssh_args` (ssh takes an
    option's first value)."""
    argv = [kw.get("ssh_path") or "ssh", "-o", "LogLevel ERROR", "-o", "BatchMode yes"]
    if kw.get("username"):
        argv += ["-l", kw["username"]]
    if kw.get("port") is not None:
        argv += ["-p", str(kw["port"])]
    if kw.get("identity_file"):
        argv += ["-i", kw["identity_file"]]
    if kw.get("compression", True):
        argv += ["-o", "Compression yes"]
    if kw.get("keepalive_enabled", True):
        # the connection Mitogen's ssh will share is this one: its hang detection too
        argv += ["-o", "ServerAliveInterval %s" % kw.get("keepalive_interval", 15)]
        argv += ["-o", "ServerAliveCountMax %s" % kw.get("keepalive_count", 3)]
    check = kw.get("check_host_keys")
    if check == "ignore":
        argv += ["-o", "StrictHostKeyChecking no", "-o", "UserKnownHostsFile /dev/null", "-o", "GlobalKnownHostsFile /dev/null"]
    elif check == "enforce":
        argv += ["-o", "StrictHostKeyChecking yes"]
    return argv + sharing + ssh_args + ["--", kw["hostname"]]


def _sharing():
    """ssh options for a ControlMaster in the user's ~/.ansible/cp (made theirs alone if new)."""
    cp = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".ansible", "cp")
    os.makedirs(cp, mode=0o700, exist_ok=True)
    st = os.lstat(cp)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError("%s is not a directory of this user's alone" % cp)
    return ["-o", "ControlMaster=auto", "-o", "ControlPersist=60s", "-o", "ControlPath=%s/st-%%C" % cp]


def _display():
    from ansible.utils.display import Display

    return Display()
