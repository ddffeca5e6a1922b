# Recording SSH targets (controller only): before a worker's first command to a target, its ssh
# connection plugin tells spawntrace which target it reaches and the ssh command Ansible itself
# would run there (the run's own options, ControlPath and credentials). spawntrace starts its
# recorder on the target through that ssh, so through the ControlMaster every later command of
# the run shares, and answers once the recorder records (or why it cannot): the worker's first
# command to the host runs only then, so nothing it starts there is missed. PROTOCOL.md,
# "Recording the targets".
from __future__ import absolute_import

import json
import os
import socket

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


def _display():
    from ansible.utils.display import Display

    return Display()
