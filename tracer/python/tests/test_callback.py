"""The spawntrace callback against real ansible-playbook runs (no mocks)."""

from __future__ import annotations

import collections
import os
import re
import threading
import time
from pathlib import Path

import pytest

from conftest import Receiver
from playbook_runs import local_inventory, run_playbook

PLAYBOOK = """
- name: attribution
  hosts: all
  gather_facts: false
  strategy: {strategy}
  tasks:
    - name: loop
      command: echo TAG {{{{ inventory_hostname }}}} {{{{ item }}}}
      loop: [a, b, c]
      notify: handler
    - name: secret loop
      command: echo {{{{ item }}}}
      loop: [s3cret]
      no_log: true
    - name: single
      command: echo single {{{{ inventory_hostname }}}}
    - name: failing
      command: "false"
      ignore_errors: true
  handlers:
    - name: handler
      command: echo handler {{{{ inventory_hostname }}}}
"""
HOSTS = ("h1", "h2")
TASKS = ("loop", "secret loop", "single", "failing", "handler")


def run_traced(directory: Path, playbook: str, *, callback: bool = True, socket_path: str | None = None):
    """Runs `playbook` against h1 and h2 (local connection, two forks, ansible's default of no
    pipelining), with the spawntrace callback enabled or not; `socket_path` is SPAWNTRACE_SOCKET."""
    return run_playbook(
        directory,
        playbook,
        inventory=local_inventory(directory, HOSTS),
        args=["-f", "2"],
        env={"ANSIBLE_REMOTE_TEMP": str(directory / "tmp-remote")},
        callbacks=("spawntrace",) if callback else (),
        socket_path=socket_path,
        pipelining=False,
        timeout=300,
    )


class Traced:
    """One traced run, indexed for the assertions."""

    def __init__(self, run, messages):
        self.run = run
        self.messages = messages
        self.by_ev = collections.defaultdict(list)
        for m in messages:
            self.by_ev[m["ev"]].append(m)
        self.main_pid = self.by_ev["playbook_start"][0]["pid"]
        self.tasks = {m["name"]: m.body for m in self.by_ev["task_start"]}
        self.task_names = {t["uuid"]: name for name, t in self.tasks.items()}
        self.workers = {(m["host"], self.task_names[m["task_uuid"]]): m for m in self.by_ev["worker_start"]}
        self.runner_end = {(m["host"], self.task_names[m["task_uuid"]]): m for m in self.by_ev["runner_end"]}


@pytest.fixture(scope="module", params=["linear", "free"])
def traced(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    receiver = Receiver(tmp / "events.sock")
    receiver.start_reading()
    run = run_traced(tmp, PLAYBOOK.format(strategy=request.param), socket_path=str(receiver.path))
    messages = receiver.close()
    assert run.returncode == 0, run.stdout + run.stderr
    return Traced(run, messages)


def test_common_fields(traced):
    for m in traced.messages:
        assert m["v"] == 1
        assert m["pid"] == m.cred_pid, m.body
        assert m["dropped"] == 0 and m["errors"] == 0, m.body
        assert isinstance(m["ts"], int)
    evs = [m["ev"] for m in traced.messages if m.cred_pid == traced.main_pid]
    assert evs[:2] == ["playbook_start", "play_start"]
    assert evs[-1] == "playbook_end"
    start = traced.by_ev["playbook_start"][0]
    assert os.path.isabs(start["playbook"]) and start["playbook"].endswith("playbook.yml")
    assert re.match(r"2\.\d+\.\d+", start["ansible_version"])


def test_tasks(traced):
    play = traced.by_ev["play_start"][0]
    assert play["name"] == "attribution"
    assert play["strategy"] in ("linear", "free")
    assert len(traced.by_ev["task_start"]) == len(TASKS), "one task_start per task, also under free"
    for name, t in traced.tasks.items():
        assert t["play_uuid"] == play["uuid"]
        assert t["handler"] == (name == "handler")
        assert t["loop"] == (name in ("loop", "secret loop"))
        assert t["action"] == "command"
        assert t["role"] is None


def test_one_worker_per_host_and_task(traced):
    assert sorted(traced.workers) == sorted((h, t) for h in HOSTS for t in TASKS)
    assert len(traced.by_ev["worker_start"]) == len(traced.workers), "no duplicate worker_start"
    pids = [m.cred_pid for m in traced.workers.values()]
    assert len(set(pids)) == len(pids)
    for m in traced.workers.values():
        assert m["pid"] == m.cred_pid != traced.main_pid
        assert m["ppid"] == traced.main_pid
        assert m["worker_id"] in (0, 1)


def test_item_windows(traced):
    for (host, task), worker in traced.workers.items():
        items = [m for m in traced.messages if m["ev"] in ("item_start", "item_end") and m.cred_pid == worker.cred_pid]
        assert all(m["host"] == host and m["task_uuid"] == worker["task_uuid"] for m in items)
        if task == "loop":
            assert [(m["ev"], m["index"]) for m in items] == [(ev, i) for i in range(3) for ev in ("item_start", "item_end")]
            assert [m["label"] for m in items if m["ev"] == "item_start"] == ["a", "b", "c"]
            assert all(m["status"] == "changed" for m in items if m["ev"] == "item_end")
        elif task == "secret loop":
            assert [m["label"] for m in items if m["ev"] == "item_start"] == ["(censored due to no_log)"]
        else:
            assert items == []
        # Windows are ordered, and nested in the worker's life (from its start to the result the
        # controller received after the worker sent its last item).
        times = [worker["ts"]] + [m["ts"] for m in items] + [traced.runner_end[host, task]["ts"]]
        assert times == sorted(times) and len(set(times)) == len(times)
    assert not any("s3cret" in str(m.body) for m in traced.messages)


def test_runner_end(traced):
    assert sorted(traced.runner_end) == sorted(traced.workers)
    assert len(traced.by_ev["runner_end"]) == len(traced.runner_end)
    for (_host, task), m in traced.runner_end.items():
        assert m.cred_pid == traced.main_pid
        assert m["status"] == ("failed" if task == "failing" else "changed"), m.body
    assert all(traced.runner_end[h, "failing"]["ignore_errors"] for h in HOSTS)


def _shape(text):
    """Output lines without the command module's timestamps, sorted: with two forks, hosts' lines
    interleave in any order."""
    return sorted(re.sub(r'"(delta|start|end)": "[^"]*"', r'"\1": ""', line) for line in text.splitlines())


@pytest.mark.parametrize(
    "mode", [pytest.param("no socket", marks=pytest.mark.once), "socket", pytest.param("missing socket", marks=pytest.mark.once)]
)
def test_user_output_unchanged_and_silent(mode, tmp_path, receiver):
    baseline = run_traced(tmp_path, PLAYBOOK.format(strategy="linear"), callback=False)
    socket_path = {"no socket": None, "socket": str(receiver.path), "missing socket": str(tmp_path / "nothing")}[mode]
    receiver.start_reading()
    run = run_traced(tmp_path, PLAYBOOK.format(strategy="linear"), socket_path=socket_path)
    messages = receiver.close()
    assert (run.returncode, _shape(run.stdout), run.stderr) == (baseline.returncode, _shape(baseline.stdout), baseline.stderr)
    assert "PLAY RECAP" in run.stdout
    assert bool(messages) == (mode == "socket")


# Enough loop items (4 messages each) to fill a receive queue of net.unix.max_dgram_qlen.
STALL_ITEMS = max(12, int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text()) // 4 + 4)
STALL_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - command: echo {{{{ item }}}}
      loop: "{{{{ range({items}) | list }}}}"
    - file:
        path: {marker}
        state: touch
      run_once: true
    - command: echo after
"""


@pytest.mark.once
def test_receiver_that_never_reads(tmp_path, receiver):
    """The receive queue fills soon; the run goes on (how long a send may wait is measured by
    test_messages.py: once per process; here, on a shared machine, only that nothing blocks)."""
    playbook = STALL_PLAYBOOK.format(items=STALL_ITEMS, marker=tmp_path / "marker")
    baseline = run_traced(tmp_path, playbook, callback=False)
    run = run_traced(tmp_path, playbook, socket_path=str(receiver.path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.seconds < baseline.seconds * 3 + 10, (run.seconds, baseline.seconds)
    queued = receiver.close()
    assert queued and queued[0]["ev"] == "playbook_start"


@pytest.mark.once
def test_drops_are_counted(tmp_path, receiver):
    """A receiver that stalls, then reads again, learns how many messages were dropped."""
    marker = tmp_path / "marker"
    run_started = time.monotonic()

    def stall_until_marker():
        while not marker.exists() and time.monotonic() - run_started < 120:
            time.sleep(0.01)
        receiver.start_reading()

    staller = threading.Thread(target=stall_until_marker, daemon=True)
    staller.start()
    run = run_traced(tmp_path, STALL_PLAYBOOK.format(items=STALL_ITEMS, marker=marker), socket_path=str(receiver.path))
    staller.join()
    messages = receiver.close()
    assert run.returncode == 0, run.stdout + run.stderr
    main_pid = messages[0]["pid"]
    end = [m for m in messages if m["ev"] == "playbook_end"]
    assert end and end[0].cred_pid == main_pid and end[0]["dropped"] > 0
    assert all(m["errors"] == 0 for m in messages)
