"""Inventory scale: 50 local "hosts" (connection local, distinct inventory names) and 20 hosts
over ssh (a real sshd each in its own network namespace), forks 10. The persistent runs give the
same results as classic ones, each host's module runs all go to one agent of that host (started
once), and every agent ends with the playbook."""

from __future__ import annotations

import collections
import os
import pwd
import sys
import time

import pytest

from playbook_runs import PYTHON_DIR
from runner_fixtures import cleanup_bases, run_both  # noqa: F401

sys.path.insert(0, str(PYTHON_DIR.parent.parent / "tests" / "lab"))
import sshlab  # noqa: E402

PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: a file per host
      copy: {content: "{{ inventory_hostname }}\\n", dest: "{{ base }}/{{ inventory_hostname }}.txt", mode: "0644"}
    - name: edits
      lineinfile: {path: "{{ base }}/{{ inventory_hostname }}.txt", line: "edit {{ item }}"}
      loop: [1, 2]
    - name: a command
      command: cat {{ base }}/{{ inventory_hostname }}.txt
      register: out
    - name: what the host has
      assert: {that: ["out.stdout_lines | length == 3"]}
"""


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_one_agent_per_host(run, hosts):
    """Every host's module runs went to a single agent, and each agent has ended (it watches the
    controller: within a few seconds of the playbook's end)."""
    agents = collections.defaultdict(set)
    for t in run.timing:
        agents[t["host"]].add(t["agent_pid"])
    assert sorted(agents) == sorted(hosts), agents
    multiple = {h: a for h, a in agents.items() if len(a) != 1}
    assert not multiple, f"a host's module runs went to several agents: {multiple}"
    pids = {a for s in agents.values() for a in s}
    assert len(pids) == len(hosts), "an agent per host"
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "agents outlived the playbook"


def test_fifty_local_hosts(tmp_path):
    hosts = ["h%02d" % i for i in range(1, 51)]
    inventory = "".join(f"{h} ansible_connection=local ansible_python_interpreter={sys.executable}\n" for h in hosts)
    pair = run_both(tmp_path, PLAYBOOK, inventory=inventory, args=["--forks", "10"], ordered=False)
    assert pair.persistent.returncode == 0, pair.persistent.stdout[-3000:]
    check_one_agent_per_host(pair.persistent, hosts)
    # copy (stat, copy), two lineinfile items, command: five module runs per host
    assert len(pair.persistent.timing) == 5 * len(hosts)


def test_twenty_ssh_hosts(tmp_path):
    why = sshlab.unavailable()
    if why:
        pytest.skip("sshd lab: " + why)
    with sshlab.Lab(20) as lab:
        inventory = "".join(lab.inventory_line(h) for h in lab.hosts)
        uid = pwd.getpwnam(lab.user).pw_uid
        # each mode its own directory on the (shared) file system, the login user's
        env = {"ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=60s"}
        pair = run_both(
            tmp_path,
            PLAYBOOK,
            inventory=inventory,
            args=["--forks", "10"],
            env=env,
            prepare=lambda base: os.chown(base, uid, -1),
            ordered=False,
        )
        assert pair.persistent.returncode == 0, pair.persistent.stdout[-3000:]
        check_one_agent_per_host(pair.persistent, [h.name for h in lab.hosts])
        assert len(pair.persistent.timing) == 5 * len(lab.hosts)
