# The attribution messages (tracer/python/PROTOCOL.md), Python side: one Sender per process, and
# one method per event, so that each message is built in exactly one place. Used by the callback
# plugin (plays, tasks, workers, items), the agent (agent_start, runner_start) and the connection
# plugins (runner_start for runners the agent could not report). The Rust side of the schema is
# tracer/src/ansible/messages.rs.
from __future__ import absolute_import

import errno
import json
import os
import socket

from .procs import now

PROTOCOL_VERSION = 1
# The environment variable naming spawntrace's socket; without it nothing is sent.
SOCKET_ENV = "SPAWNTRACE_SOCKET"
# Largest datagram sent; longer strings are clipped to stay below it.
MAX_DATAGRAM = 60 * 1024
# Longest string field, in characters, and the shorter limit used if a message is still too big.
MAX_FIELD = 4096
MAX_FIELD_RETRY = 256
MAX_LABEL = 200
# How long a send may wait for a receiver whose queue is full (Linux lets only
# net.unix.max_dgram_qlen datagrams wait, 10 by default) before the message is dropped. After one
# such timeout the process stops waiting until a send succeeds again, so a receiver that never
# reads costs each process at most one wait.
SEND_WAIT = 0.05


def clip(value, limit=MAX_FIELD):
    """`value` as text of at most `limit` characters (a clipped one ends in an ellipsis)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def encode(msg):
    data = json.dumps(msg, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8", "replace")
    if len(data) > MAX_DATAGRAM:
        short = dict((k, clip(v, MAX_FIELD_RETRY) if isinstance(v, str) else v) for k, v in msg.items())
        data = json.dumps(short, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8", "replace")
    return data


class Sender(object):
    """Sends one process's messages on a socket of its own: its `dropped` and `errors` are that
    process's (PROTOCOL.md), and the kernel vouches for each datagram's sender. Sending never
    raises and never blocks the run for long: a send waits up to SEND_WAIT for room, and after
    one such timeout a sender stops waiting until a send succeeds again, unless it is `patient`
    (the agent: its runner_start must precede what the runner starts)."""

    def __init__(self, path, patient=False):
        self.path = path
        self.patient = patient
        self.sock = None
        # Messages this process could not send, and exceptions it swallowed.
        self.dropped = 0
        self.errors = 0
        self.waiting = True
        # False without a socket, or once the socket refused us (an agent running as another,
        # become, user cannot write to the controller user's socket).
        self.usable = bool(path)

    def send(self, ev, **fields):
        """Sends one message; True when it went out."""
        if not self.usable:
            if self.path:
                self.dropped += 1
            return False
        try:
            msg = {"v": PROTOCOL_VERSION, "ev": ev, "ts": now(), "pid": os.getpid(), "dropped": self.dropped, "errors": self.errors}
            msg.update(fields)
            return self._send(encode(msg))
        except Exception:
            self.errors += 1
            return False

    def _send(self, data):
        try:
            if self.sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    # connected, so that a full receiver queue can be waited for (poll sees it)
                    sock.connect(self.path)
                except OSError as e:
                    sock.close()
                    if e.errno in (errno.EACCES, errno.EPERM):
                        self.usable = False
                    raise
                sock.settimeout(SEND_WAIT if self.waiting else 0.0)
                self.sock = sock
            self.sock.send(data)
            if not self.waiting:
                self.waiting = True
                self.sock.settimeout(SEND_WAIT)
            return True
        except socket.timeout:
            self.dropped += 1
            if not self.patient:
                self.waiting = False
                self.sock.settimeout(0.0)
        except OSError as e:
            self.dropped += 1
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS):
                # receiver gone or not there yet: reconnect on the next message
                self.close()
        return False

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    # -- the events (PROTOCOL.md "Events"), one method each ----------------------------------------

    def playbook_start(self, playbook, ansible_version, python, python_executable):
        return self.send(
            "playbook_start",
            playbook=clip(playbook),
            ansible_version=ansible_version,
            python=python,
            python_executable=clip(python_executable),
        )

    def play_start(self, uuid, name, strategy):
        return self.send("play_start", uuid=uuid, name=clip(name), strategy=clip(strategy))

    def task_start(self, uuid, name, action, role, play_uuid, handler, loop, path):
        return self.send(
            "task_start",
            uuid=uuid,
            name=clip(name),
            action=clip(action),
            role=clip(role),
            play_uuid=play_uuid,
            handler=bool(handler),
            loop=bool(loop),
            path=clip(path),
        )

    def worker_start(self, host, task_uuid, worker_id, ppid):
        return self.send("worker_start", host=clip(host), task_uuid=task_uuid, worker_id=worker_id, ppid=ppid)

    def item_start(self, host, task_uuid, index, label):
        return self.send("item_start", host=clip(host), task_uuid=task_uuid, index=index, label=clip(label, MAX_LABEL))

    def item_end(self, host, task_uuid, index, status):
        return self.send("item_end", host=clip(host), task_uuid=task_uuid, index=index, status=status)

    def runner_end(self, host, task_uuid, status, ignore_errors=None):
        fields = {} if ignore_errors is None else {"ignore_errors": bool(ignore_errors)}
        return self.send("runner_end", host=clip(host), task_uuid=task_uuid, status=status, **fields)

    def playbook_end(self):
        return self.send("playbook_end")

    def agent_start(self, host, user, become_user, version):
        return self.send("agent_start", host=clip(host), user=clip(user), become_user=clip(become_user), version=clip(version))

    def runner_start(self, runner_pid, agent_pid, request, remote=False):
        """`request`: the module run request the runner got (its task_uuid, host, worker_pid,
        item and module say whom the runner works for). Without a runner, nothing to say."""
        if runner_pid is None:
            return False
        return self.send(
            "runner_start",
            runner_pid=runner_pid,
            agent_pid=agent_pid,
            worker_pid=request.get("worker_pid"),
            host=clip(request.get("host")),
            task_uuid=request.get("task_uuid"),
            item=request.get("item"),
            module=clip(request.get("module")),
            remote=bool(remote),
        )


# This process's sender of the socket SOCKET_ENV names (see `sender`).
_process = {"pid": None, "sender": None}


def sender():
    """This process's one sender of the socket SOCKET_ENV names, shared by the callback and the
    connection plugins, so that its `dropped` counts every message the process lost. A forked
    child gets a sender of its own (closing only its copy of the parent's socket); whether to
    wait for room carries over."""
    pid = os.getpid()
    if _process["pid"] != pid:
        parent = _process["sender"]
        child = Sender(os.environ.get(SOCKET_ENV) if parent is None else parent.path)
        if parent is not None:
            parent.close()
            child.waiting, child.usable = parent.waiting, parent.usable
        _process.update(pid=pid, sender=child)
    return _process["sender"]
