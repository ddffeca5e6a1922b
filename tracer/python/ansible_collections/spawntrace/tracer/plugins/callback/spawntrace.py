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

import functools
import os
import sys

from ansible.plugins.callback import CallbackBase

# the agent's package, agent/spawntrace_agent in this collection: its `messages` is the one
# sender of the attribution protocol
_AGENT = os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "agent"))
if _AGENT not in sys.path:
    sys.path.append(_AGENT)

from spawntrace_agent import messages, target_recording  # noqa: E402

try:
    from ansible.release import __version__ as _ANSIBLE_VERSION
except Exception:  # pragma: no cover - every supported ansible-core has it
    _ANSIBLE_VERSION = None


# Whether this run reports at all (SPAWNTRACE_SOCKET is set); the sender is the process's own,
# messages.sender().
_enabled = False


def _label(item, no_log):
    """A short text for a loop item (hidden for no_log tasks, as Ansible's own output does)."""
    if no_log:
        return "(censored due to no_log)"
    try:
        return messages.clip(item if isinstance(item, str) else repr(item), messages.MAX_LABEL)
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
    if not _enabled:
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
    sender = messages.sender()
    try:
        host = proc._host.get_name()
        task_uuid = proc._task._uuid
        sender.worker_start(host, task_uuid, proc.worker_id, os.getppid())
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
        sender.item_start(host, task_uuid, index, label)
        status = None
        try:
            result = execute(self, *args, **kwargs)
            try:
                status = _status(result)
            except Exception:
                sender.errors += 1
            return result
        finally:
            sender.item_end(host, task_uuid, index, status)

    te_cls._run_loop = _run_loop
    te_cls._execute = _execute


def _safe(method):
    """Callback methods never raise and do nothing without a socket."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not _enabled:
            return
        try:
            method(self, *args, **kwargs)
        except Exception:
            messages.sender().errors += 1

    return wrapper


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "spawntrace"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        global _enabled
        self._play_uuid = None
        self._tasks_sent = set()
        if os.environ.get(messages.SOCKET_ENV) and not _enabled:
            _enabled = True
            os.register_at_fork(after_in_child=_after_fork_in_child)

    @_safe
    def v2_playbook_on_start(self, playbook):
        path = playbook._file_name  # None for ad hoc commands
        messages.sender().playbook_start(os.path.abspath(path) if path else None, _ANSIBLE_VERSION, sys.version.split()[0], sys.executable)

    @_safe
    def v2_playbook_on_play_start(self, play):
        self._play_uuid = play._uuid
        messages.sender().play_start(play._uuid, play.get_name(), play.strategy)

    @_safe
    def v2_playbook_on_task_start(self, task, is_conditional):
        self._task_start(task, handler=False)

    @_safe
    def v2_playbook_on_handler_task_start(self, task):
        self._task_start(task, handler=True)

    def _task_start(self, task, handler):
        # before this task's workers fork: Mitogen's connections recorded too (its strategy is
        # loaded by now)
        target_recording.record_mitogen()
        # The free strategy announces a task once per host: report it once.
        if task._uuid in self._tasks_sent:
            return
        self._tasks_sent.add(task._uuid)
        messages.sender().task_start(
            uuid=task._uuid,
            name=task.get_name(),
            action=task.action,
            role=task._role.get_name() if task._role else None,
            play_uuid=self._play_uuid,
            handler=handler,
            loop=task.loop is not None or bool(task.loop_with),
            path=task.get_path(),
        )

    def _runner_end(self, result, status, ignore_errors=None):
        # host/task are public from 2.19; before, only _host/_task
        host = getattr(result, "host", None) or result._host
        task = getattr(result, "task", None) or result._task
        messages.sender().runner_end(host.get_name(), task._uuid, status, ignore_errors)

    @_safe
    def v2_runner_on_ok(self, result):
        self._runner_end(result, "changed" if result.is_changed() else "ok")

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
        messages.sender().playbook_end()
