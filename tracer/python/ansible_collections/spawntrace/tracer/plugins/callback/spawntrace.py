# spawntrace: reports Ansible's plays, tasks, workers and loop items to the spawntrace tracer.
# The wire protocol is described in tracer/python/PROTOCOL.md.
from __future__ import annotations

DOCUMENTATION = """
name: spawntrace
type: aggregate
short_description: Reports play, task, worker and loop-item boundaries to spawntrace
description:
  - Sends one JSON datagram per event to the Unix socket named by C(SPAWNTRACE_SOCKET), so that
    spawntrace can attribute every process to the play, task, host and loop item that caused it.
  - Silent, and does nothing when C(SPAWNTRACE_SOCKET) is unset.
requirements:
  - enabled in callbacks_enabled (spawntrace does this itself)
"""

import errno
import functools
import json
import os
import socket
import sys
import time

from ansible.plugins.callback import CallbackBase

try:
    from ansible.release import __version__ as _ANSIBLE_VERSION
except Exception:  # pragma: no cover - every supported ansible-core has it
    _ANSIBLE_VERSION = None

PROTOCOL_VERSION = 1
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

_SOCKET_ENV = "SPAWNTRACE_SOCKET"


def _clip(value, limit=MAX_FIELD):
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class _Sender:
    """Sends protocol messages from one process, on a socket of its own."""

    def __init__(self, path, waiting=True):
        self.path = path
        self.pid = os.getpid()
        self.sock = None
        # Messages this process could not send, and exceptions it swallowed.
        self.dropped = 0
        self.errors = 0
        self.waiting = waiting

    def send(self, ev, **fields):
        try:
            msg = {
                "v": PROTOCOL_VERSION,
                "ev": ev,
                "ts": time.monotonic_ns(),
                "pid": self.pid,
                "dropped": self.dropped,
                "errors": self.errors,
            }
            msg.update(fields)
            self._send(_encode(msg))
        except Exception:
            self.errors += 1

    def _send(self, data):
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Connected, so that a full receiver queue can be waited for (poll sees it).
                self.sock.connect(self.path)
                self.sock.settimeout(SEND_WAIT if self.waiting else 0.0)
            self.sock.send(data)
            if not self.waiting:
                self.waiting = True
                self.sock.settimeout(SEND_WAIT)
        except TimeoutError:
            self.dropped += 1
            self.waiting = False
            self.sock.settimeout(0.0)
        except OSError as e:
            self.dropped += 1
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS):
                # Receiver gone or not there yet: reconnect on the next message.
                self.close()

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def _encode(msg):
    data = json.dumps(msg, ensure_ascii=False, separators=(",", ":"), default=str)
    data = data.encode("utf-8", "replace")
    if len(data) > MAX_DATAGRAM:
        short = {k: _clip(v, MAX_FIELD_RETRY) if isinstance(v, str) else v for k, v in msg.items()}
        data = json.dumps(short, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8", "replace")
    return data


# This process's sender; replaced in every forked worker.
_sender = None


def _label(item, no_log):
    """A short text for a loop item (hidden for no_log tasks, as Ansible's own output does)."""
    if no_log:
        return "(censored due to no_log)"
    try:
        return _clip(item if isinstance(item, str) else repr(item), MAX_LABEL)
    except Exception:
        return "<%s>" % type(item).__name__


def _status(result):
    """ok|changed|failed|skipped|unreachable of a TaskExecutor result (a dict before 2.21, a
    UnifiedTaskResult from 2.21)."""
    get = result.get if isinstance(result, dict) else (lambda k: getattr(result, k, None))
    for key in ("unreachable", "failed", "skipped", "changed"):
        if get(key):
            return key
    return "ok"


def _after_fork_in_child():
    """os.register_at_fork hook: in a freshly forked WorkerProcess, announce it and bracket its
    loop items. Never uses Ansible's display (its lock may be held across the fork)."""
    global _sender
    parent = _sender
    if parent is None:
        return
    try:
        # The frame that called os.fork(): multiprocessing.popen_fork.Popen._launch, whose
        # process_obj is the WorkerProcess. Any other fork (including ones made later inside a
        # worker, whose stack still holds _launch further up) is not a worker start.
        frame = sys._getframe(1)
        if frame.f_code.co_name != "_launch":
            return
        proc = frame.f_locals.get("process_obj")
        worker_mod = sys.modules.get("ansible.executor.process.worker")
        if worker_mod is None or not isinstance(proc, worker_mod.WorkerProcess):
            return
    except Exception:
        return
    # The parent's socket is left alone (only this child's copy of its descriptor is closed).
    parent.close()
    _sender = sender = _Sender(parent.path, parent.waiting)
    try:
        host = proc._host.get_name()
        task_uuid = proc._task._uuid
        sender.send("worker_start", host=_clip(host), task_uuid=task_uuid, worker_id=proc.worker_id, ppid=os.getppid())
        _bracket_loop_items(sender, host, task_uuid)
    except Exception:
        sender.errors += 1


def _bracket_loop_items(sender, host, task_uuid):
    """Wraps TaskExecutor._run_loop and _execute (in this worker only) so that every loop item's
    _execute call is bracketed by item_start/item_end. Both versions run items strictly in order,
    one _execute per item, so the n-th call inside _run_loop(items) is items[n]."""
    te_cls = sys.modules["ansible.executor.task_executor"].TaskExecutor
    run_loop, execute = te_cls._run_loop, te_cls._execute
    loop = {}  # the running loop: its items and the next item's index

    @functools.wraps(run_loop)
    def _run_loop(self, items, *args, **kwargs):
        loop.update(items=items, next=0)
        try:
            return run_loop(self, items, *args, **kwargs)
        finally:
            loop.clear()

    @functools.wraps(execute)
    def _execute(self, *args, **kwargs):
        if not loop:
            return execute(self, *args, **kwargs)
        index = loop["next"]
        loop["next"] = index + 1
        try:
            label = _label(loop["items"][index], getattr(self._task, "no_log", False))
        except Exception:
            sender.errors += 1
            label = None
        sender.send("item_start", host=host, task_uuid=task_uuid, index=index, label=label)
        status = None
        try:
            result = execute(self, *args, **kwargs)
            try:
                status = _status(result)
            except Exception:
                sender.errors += 1
            return result
        finally:
            sender.send("item_end", host=host, task_uuid=task_uuid, index=index, status=status)

    te_cls._run_loop = _run_loop
    te_cls._execute = _execute


def _safe(method):
    """Callback methods never raise and do nothing without a socket."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if _sender is None:
            return
        try:
            method(self, *args, **kwargs)
        except Exception:
            _sender.errors += 1

    return wrapper


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "spawntrace"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        global _sender
        self._play_uuid = None
        self._tasks_sent = set()
        path = os.environ.get(_SOCKET_ENV)
        if path and _sender is None:
            _sender = _Sender(path)
            os.register_at_fork(after_in_child=_after_fork_in_child)

    @_safe
    def v2_playbook_on_start(self, playbook):
        path = playbook._file_name  # None for ad hoc commands
        _sender.send(
            "playbook_start",
            playbook=_clip(os.path.abspath(path)) if path else None,
            ansible_version=_ANSIBLE_VERSION,
            python=sys.version.split()[0],
            python_executable=_clip(sys.executable),
        )

    @_safe
    def v2_playbook_on_play_start(self, play):
        self._play_uuid = play._uuid
        _sender.send("play_start", uuid=play._uuid, name=_clip(play.get_name()), strategy=_clip(play.strategy))

    @_safe
    def v2_playbook_on_task_start(self, task, is_conditional):
        self._task_start(task, handler=False)

    @_safe
    def v2_playbook_on_handler_task_start(self, task):
        self._task_start(task, handler=True)

    def _task_start(self, task, handler):
        # The free strategy announces a task once per host: report it once.
        if task._uuid in self._tasks_sent:
            return
        self._tasks_sent.add(task._uuid)
        _sender.send(
            "task_start",
            uuid=task._uuid,
            name=_clip(task.get_name()),
            action=_clip(task.action),
            role=_clip(task._role.get_name()) if task._role else None,
            play_uuid=self._play_uuid,
            handler=handler,
            loop=task.loop is not None or bool(task.loop_with),
            path=_clip(task.get_path()),
        )

    def _runner_end(self, result, status, **fields):
        _sender.send("runner_end", host=_clip(result.host.get_name()), task_uuid=result.task._uuid, status=status, **fields)

    @_safe
    def v2_runner_on_ok(self, result):
        self._runner_end(result, "changed" if result.result.get("changed") else "ok")

    @_safe
    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._runner_end(result, "failed", ignore_errors=bool(ignore_errors))

    @_safe
    def v2_runner_on_skipped(self, result):
        self._runner_end(result, "skipped")

    @_safe
    def v2_runner_on_unreachable(self, result):
        self._runner_end(result, "unreachable")

    @_safe
    def v2_playbook_on_stats(self, stats):
        _sender.send("playbook_end")
