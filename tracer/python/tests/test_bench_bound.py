"""The benchmark's lower bound (tracer/python/bench: connection plugins that answer each module at
once, nothing executed) must take ansible-core through the same path as a real run of
playbooks/bench.yml: same tasks, items, statuses and `changed`, with pipelining on and off, and
nothing done on the target. The bound's `ssh` runs against a host that does not exist."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from playbook_runs import PYTHON_DIR, run_playbook

BENCH = PYTHON_DIR.parents[1] / "playbooks" / "bench.yml"
BOUND = PYTHON_DIR / "bench" / "connection"


def shape(run):
    """Per (task, item or not): statuses, changed and failed, in order (hosts aside)."""
    return {
        (task, item): [(r["status"], r["result"].get("changed"), r["result"].get("failed")) for r in rs]
        for (task, _host, item), rs in run.by_task().items()
    }


@pytest.mark.parametrize("pipelining", [True, False])
def test_bound_takes_the_path_of_a_real_run(tmp_path: Path, pipelining):
    playbook = BENCH.read_text().replace("hosts: benchmark_targets", "hosts: all")
    before = set(glob.glob("/tmp/spawntrace-bench.*"))
    real = run_playbook(tmp_path / "classic", playbook, args=["-e", "bench_count=3"], pipelining=pipelining)
    assert real.returncode == 0, real.stdout + real.stderr
    ssh_inventory = tmp_path / "inventory.ini"
    ssh_inventory.write_text("nohost.invalid ansible_connection=ssh ansible_python_interpreter=/usr/bin/python3\n")
    for connection, inventory in (("local", None), ("ssh", ssh_inventory)):
        bound = run_playbook(
            tmp_path / ("bound-" + connection),
            playbook,
            args=["-e", "bench_count=3"],
            pipelining=pipelining,
            inventory=inventory,
            env={"ANSIBLE_CONNECTION_PLUGINS": str(BOUND)},
        )
        assert bound.returncode == 0, (connection, bound.stdout + bound.stderr)
        assert len(bound.results) == len(real.results) == 1 + (3 + 1) + (3 + 1) + 1  # a loop: its items, then the task
        assert shape(bound) == shape(real), connection
        # nothing was done: no temporary directory made, no file written
        assert set(glob.glob("/tmp/spawntrace-bench.*")) == before
        assert not any(
            r["result"].get("path", "").startswith("/tmp/spawntrace-bench.") and Path(r["result"]["path"]).exists() for r in bound.results
        )
