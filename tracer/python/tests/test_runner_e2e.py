"""The persistent-agent runner against real ansible-playbook (no mocks): every playbook runs
classic (ansible-core's connection plugins) and persistent (spawntrace's on
ANSIBLE_CONNECTION_PLUGINS), each in its own directory, and the results (changed, failed, msg,
rc, stdout, diff, ...), file contents and modes must be the same."""

from __future__ import annotations

import collections
import json
import os
import shutil
import time

import pytest

from conftest import Receiver
from playbook_runs import core_version, local_inventory, run_playbook
from runner_fixtures import (  # noqa: F401
    BECOME_USER,
    LOCALHOST,
    SYSTEM_PYTHON,
    agent_pids,
    become_user,
    cleanup_bases,
    doas_rule,
    new_base,
    run_both,
    traced_execs,
)


def statuses(run):
    return [(r["task"], r["status"], r["item"]) for r in run.results]


FILES_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: dir
      file: {path: "{{ base }}/d", state: directory, mode: "0750"}
    - name: copy content
      copy: {content: "hello\\n", dest: "{{ base }}/d/a.txt", mode: "0640"}
    - name: copy again (unchanged)
      copy: {content: "hello\\n", dest: "{{ base }}/d/a.txt", mode: "0640"}
    - name: copy with backup
      copy: {content: "hello2\\n", dest: "{{ base }}/d/a.txt", backup: true}
    - name: copy src
      copy: {src: "{{ playbook_dir }}/files/src.txt", dest: "{{ base }}/d/b.txt", mode: "u=rw,g=r,o="}
    - name: copy a tree
      copy: {src: "{{ playbook_dir }}/files/tree/", dest: "{{ base }}/tree/"}
    - name: lineinfile add
      lineinfile: {path: "{{ base }}/d/a.txt", line: "x=1", regexp: "^x="}
    - name: lineinfile change
      lineinfile: {path: "{{ base }}/d/a.txt", line: "x=2", regexp: "^x="}
    - name: lineinfile same
      lineinfile: {path: "{{ base }}/d/a.txt", line: "x=2", regexp: "^x="}
    - name: lineinfile create with backup
      lineinfile: {path: "{{ base }}/d/c.txt", line: "only", create: true, mode: "0604"}
    - name: stat existing
      stat: {path: "{{ base }}/d/a.txt", get_checksum: true}
      register: st
    - name: stat missing
      stat: {path: "{{ base }}/nope"}
    - name: template
      template: {src: "{{ playbook_dir }}/t.j2", dest: "{{ base }}/t.txt", mode: "0600"}
    - name: link
      file: {path: "{{ base }}/d/link", src: "{{ base }}/d/a.txt", state: link}
    - name: touch
      file: {path: "{{ base }}/d/touched", state: touch, mode: "0611", modification_time: preserve, access_time: preserve}
    - name: remove
      file: {path: "{{ base }}/d/b.txt", state: absent}
    - name: loop
      lineinfile: {path: "{{ base }}/loop-{{ item }}.txt", line: "v={{ item }}", create: true}
      loop: [1, 2, 3]
    - name: slurp
      slurp: {src: "{{ base }}/d/a.txt"}
    - name: fetch
      fetch: {src: "{{ base }}/d/a.txt", dest: "{{ base }}/fetched/", flat: true}
"""

FILES = {
    "files/src.txt": "source file\n",
    "files/tree/one.txt": "1\n",
    "files/tree/sub/two.txt": "2\n",
    "t.j2": "host={{ inventory_hostname }} sum={{ 1 + 2 }}\n",
}


def test_files(tmp_path):
    pair = run_both(tmp_path, FILES_PLAYBOOK, files=FILES)
    assert pair.persistent.returncode == 0, pair.persistent.stdout[-3000:]
    modules = collections.Counter(t["module"] for t in pair.persistent.timing)
    for m in ("file", "copy", "lineinfile", "stat", "slurp"):
        assert modules[m], modules


def test_files_without_pipelining(tmp_path):
    """File-based module runs: AnsiballZ_*.py transferred to a temp dir, then run from there."""
    pair = run_both(tmp_path, FILES_PLAYBOOK, files=FILES, env={"ANSIBLE_PIPELINING": "False"})
    assert pair.persistent.returncode == 0
    assert all(t["module"] for t in pair.persistent.timing)


COMMANDS_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: command
      command: echo hello
    - name: chdir
      command: {cmd: pwd, chdir: "{{ base }}"}
    - name: creates
      command: {cmd: "touch {{ base }}/made", creates: "{{ base }}/made"}
    - name: creates again
      command: {cmd: "touch {{ base }}/made", creates: "{{ base }}/made"}
    - name: shell rc stdout stderr
      shell: echo "$FOO" "$BAR"; echo err >&2; exit 3
      environment: {FOO: "a b", BAR: "c'd"}
      ignore_errors: true
    - name: environment seen by the module
      shell: env | grep -E '^(FOO|HOME|PATH|PWD|LANG|LC_ALL|SHLVL)=' | sort; umask; pwd; ls /proc/self/fd | wc -l
      environment: {FOO: bar}
    - name: no stdin
      command: cat
    - name: exits 1
      command: /bin/false
      ignore_errors: true
    - name: missing binary
      command: /nonexistent/binary
      ignore_errors: true
    - name: raw
      raw: echo raw-out; echo raw-err >&2
    - name: script
      script: "{{ playbook_dir }}/files/script.sh arg1 'two words'"
    - name: script chdir
      script: {cmd: "{{ playbook_dir }}/files/script.sh", chdir: "{{ base }}"}
    - name: module exception
      ping: {data: crash}
      ignore_errors: true
    - name: module argument error
      stat: {nonsense_argument: 1}
      ignore_errors: true
    - name: module failure
      file: {path: "{{ base }}/no/such/dir/file", state: touch}
      ignore_errors: true
    - name: missing required argument
      lineinfile: {line: x}
      ignore_errors: true
    - name: no_log
      command: echo secret
      no_log: true
    - name: startup-sensitive environment (own agent)
      shell: echo "$LANG" "$PYTHONDONTWRITEBYTECODE"
      environment: {LANG: C, PYTHONDONTWRITEBYTECODE: "1"}
    - name: ping
      ping:
"""


def test_commands(tmp_path):
    files = {"files/script.sh": '#!/bin/sh\necho script "$@" $(pwd)\necho to-err >&2\n'}
    pair = run_both(tmp_path, COMMANDS_PLAYBOOK, files=files)
    st = dict(((t, s) for t, s, _ in statuses(pair.persistent)))
    assert st["exits 1"] == "failed" and st["module exception"] == "failed" and st["command"] == "ok"
    results = {r["task"]: r["result"] for r in pair.persistent.results}
    assert results["shell rc stdout stderr"]["rc"] == 3 and results["shell rc stdout stderr"]["stderr"] == "err"
    assert "boom" in json.dumps(results["module exception"]) or results["module exception"].get("exception")


def test_check_and_diff(tmp_path):
    def prepare(base):
        (base / "d").mkdir()
        (base / "d/a.txt").write_text("one\nx=1\n")
        (base / "t.txt").write_text("old\n")

    playbook = """
- hosts: all
  gather_facts: false
  tasks:
    - copy: {content: "new\\n", dest: "{{ base }}/d/a.txt"}
    - copy: {content: "new\\n", dest: "{{ base }}/d/new.txt"}
    - lineinfile: {path: "{{ base }}/d/a.txt", line: "x=2", regexp: "^x="}
    - file: {path: "{{ base }}/d/sub", state: directory}
    - file: {path: "{{ base }}/d/a.txt", mode: "0600"}
    - template: {src: "{{ playbook_dir }}/t.j2", dest: "{{ base }}/t.txt"}
    - command: echo not run in check mode
    - command: echo runs anyway
      check_mode: false
"""
    pair = run_both(tmp_path, playbook, files={"t.j2": "v={{ 40 + 2 }}\n"}, args=["--check", "--diff"], prepare=prepare)
    assert any(r["result"].get("diff") for r in pair.persistent.results)
    assert (pair.base["persistent"] / "d/a.txt").read_text() == "one\nx=1\n"


def test_async(tmp_path):
    playbook = """
- hosts: all
  gather_facts: false
  tasks:
    - name: fire and forget
      command: sleep 1
      async: 20
      poll: 0
      register: job
    - name: wait
      async_status: {jid: "{{ job.ansible_job_id }}"}
      register: st
      until: st.finished
      retries: 30
      delay: 1
    - name: polled
      shell: echo polled; exit 0
      async: 20
      poll: 1
    - name: cleanup
      async_status: {jid: "{{ job.ansible_job_id }}", mode: cleanup}
"""
    pair = run_both(tmp_path, playbook)
    assert [s for _, s, _ in statuses(pair.persistent)] == ["ok"] * 4
    assert any(t["module"] == "async_status" for t in pair.persistent.timing)


@pytest.mark.parametrize(("password", "pipelining"), [(None, True), ("not-asked-for-by-root", False)])
def test_become(tmp_path, become_user, password, pipelining):  # noqa: F811
    """Module runs as another user go to an agent of that user's. With a become password and
    pipelining off (ansible-core's integration targets' setup_test_user), local gives a command
    that may be prompted a terminal for stdin: the agent still gets its payload."""
    become_both_ways(tmp_path, become_user, "sudo", password, pipelining)


@pytest.mark.parametrize(("method", "password"), [("su", None), ("su", "not-asked-for-by-root"), ("doas", None)])
def test_become_su_doas(tmp_path, become_user, method, password):  # noqa: F811
    """su and doas start the agent of the become user through the become plugin as sudo does
    (root to another user: su asks nothing, with a become password or without; doas with a
    nopass rule). Those that prompt (an unprivileged login user's) are test_runner_ssh's."""
    if method == "su":
        become_both_ways(tmp_path, become_user, "su", password, True)
        return
    with doas_rule("permit nopass root"):
        become_both_ways(tmp_path, become_user, "community.general.doas", None, True)


def become_both_ways(tmp_path, become_user, method, password, pipelining):  # noqa: F811
    """Classic and persistent runs of module tasks become `become_user` (and root) through
    `method`: same results, files owned by that user, every module run through an agent."""

    def prepare(base):
        os.chmod(base, 0o1777)

    playbook = """
- hosts: all
  gather_facts: false
  vars: {{ansible_become_method: {method}}}
  tasks:
    - name: who
      command: id -un
      become: true
      become_user: {user}
    - name: home and cwd
      shell: echo "$HOME $USER $LOGNAME"; umask
      become: true
      become_user: {user}
    - name: copy as become user
      copy: {{content: "mine\\n", dest: "{{{{ base }}}}/by-become.txt", mode: "0640"}}
      become: true
      become_user: {user}
    - name: lineinfile as become user
      lineinfile: {{path: "{{{{ base }}}}/by-become.txt", line: "more"}}
      become: true
      become_user: {user}
    - name: stat
      stat: {{path: "{{{{ base }}}}/by-become.txt"}}
      become: true
      become_user: {user}
    - name: become root (same user)
      command: id -un
      become: true
    - name: failing as become user
      file: {{path: /root/forbidden, state: touch}}
      become: true
      become_user: {user}
      ignore_errors: true
""".format(user=BECOME_USER, method=method)
    args = ["-e", "ansible_become_password=" + password] if password else []
    pair = run_both(tmp_path, playbook, prepare=prepare, args=args, pipelining=pipelining)
    assert pair.persistent.returncode == 0
    res = {r["task"]: r["result"] for r in pair.persistent.results}
    assert res["who"]["stdout"] == BECOME_USER
    assert (pair.base["persistent"] / "by-become.txt").stat().st_uid == become_user.pw_uid
    # who, home and cwd, copy (stat, copy), lineinfile, stat, become root, failing: all of them
    assert [t["module"] for t in pair.persistent.timing] == ["command", "command", "stat", "copy", "lineinfile", "stat", "command", "file"]


def test_disabled_by_env(tmp_path):
    pair = run_both(
        tmp_path,
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - command: echo hi\n",
        env={"SPAWNTRACE_AGENT": "0"},
        expect_agent=False,
    )
    assert not pair.persistent.timing


def test_fqcn_builtin_local_is_shadowed_too(tmp_path):
    """From 2.19, ansible-playbook loads every connection plugin at start (PlaybookExecutor.run:
    connection_loader.all()), configured paths first, under the builtin's module name
    (ansible.plugins.connection.local); `ansible.builtin.local` then resolves to that module: the
    FQCN gets the agent as well (SPAWNTRACE_AGENT=0 turns it off). Before 2.19 the FQCN always
    names the builtin plugin, so it runs classic (RUNNER.md says so)."""
    shadowed = core_version() >= (2, 19)
    inv = f"localhost ansible_connection=ansible.builtin.local ansible_python_interpreter={SYSTEM_PYTHON}\n"
    playbook = "- hosts: all\n  gather_facts: false\n  tasks:\n    - command: echo hi\n"
    pair = run_both(tmp_path, playbook, inventory=inv, expect_agent=shadowed)
    assert pair.persistent.returncode == 0
    assert bool(pair.persistent.timing) == shadowed


def test_attribution_messages(tmp_path):
    """agent_start from the agent, one runner_start per module run with the worker's task, host,
    pid and loop item (the format spawntrace's Rust side reads)."""
    playbook = """
- hosts: h1,h2
  gather_facts: false
  tasks:
    - name: single
      command: echo one
    - name: loop
      lineinfile: {path: "{{ base }}/{{ inventory_hostname }}-{{ item }}", line: x, create: true}
      loop: [a, b, c]
"""
    base = new_base("attr")
    rec = Receiver(tmp_path / "events.sock")
    rec.start_reading()
    try:
        run = run_playbook(
            tmp_path / "run",
            playbook,
            mode="persistent",
            inventory=local_inventory(tmp_path, ("h1", "h2"), SYSTEM_PYTHON),
            args=["-f", "2", "-e", f"base={base}"],
            callbacks=("results_dump", "spawntrace"),
            socket_path=str(tmp_path / "events.sock"),
        )
    finally:
        time.sleep(0.3)
        msgs = rec.close()
        shutil.rmtree(base, ignore_errors=True)
    assert run.returncode == 0, run.stdout[-2000:]
    by = collections.defaultdict(list)
    for m in msgs:
        by[m["ev"]].append(m)
    tasks = {m["name"]: m["uuid"] for m in by["task_start"]}
    workers = {(m["host"], m["task_uuid"]): m for m in by["worker_start"]}
    agents = {m["pid"]: m for m in by["agent_start"]}
    assert agents and all(m.cred_pid == pid for pid, m in agents.items())
    assert {m["host"] for m in agents.values()} == {"h1", "h2"}
    assert all(set(m.body) >= {"v", "ev", "ts", "pid", "host", "user"} for m in agents.values())
    runners = by["runner_start"]
    assert len(runners) == 2 * (1 + 3)
    for m in runners:
        assert set(m.body) >= {"v", "ev", "ts", "pid", "runner_pid", "agent_pid", "task_uuid", "host", "worker_pid", "item", "module"}
        # sent by the agent: the sender is the agent, the runner another process
        assert m.cred_pid == m["pid"] == m["agent_pid"] and m["agent_pid"] in agents and m["runner_pid"] != m["agent_pid"]
        assert m["remote"] is False
        w = workers[(m["host"], m["task_uuid"])]
        assert w.cred_pid == m["worker_pid"]
        assert agents[m["agent_pid"]]["host"] == m["host"]
    items = sorted((m["host"], m["item"]) for m in runners if m["task_uuid"] == tasks["loop"])
    assert items == [(h, i) for h in ("h1", "h2") for i in (0, 1, 2)]
    assert all(m["item"] is None and m["module"] == "command" for m in runners if m["task_uuid"] == tasks["single"])
    assert all(m["module"] == "lineinfile" for m in runners if m["task_uuid"] == tasks["loop"])
    # each runner started inside its item's window
    windows = {(m["host"], m["task_uuid"], m["index"]): m["ts"] for m in by["item_start"]}
    ends = {(m["host"], m["task_uuid"], m["index"]): m["ts"] for m in by["item_end"]}
    for m in runners:
        if m["item"] is not None:
            k = (m["host"], m["task_uuid"], m["item"])
            assert windows[k] <= m["ts"] <= ends[k]


def count_execs(tmp_path, mode, n):
    return traced_execs(tmp_path / f"{mode}-{n}", mode, n, inventory=LOCALHOST, base=new_base("execs"))


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_no_exec_per_module_task(tmp_path):
    """Once the agent runs, copy and lineinfile tasks exec nothing on the controller: the
    exec count does not grow with the number of tasks (classic: several per task)."""
    few, many = count_execs(tmp_path, "persistent", 2), count_execs(tmp_path, "persistent", 6)
    assert len(many) == len(few), "\n".join(many)
    assert len(few) <= 3, "\n".join(few)  # ansible-playbook, and the agent's start (python -c)
    classic_few, classic_many = count_execs(tmp_path, "classic", 2), count_execs(tmp_path, "classic", 6)
    assert len(classic_many) - len(classic_few) >= 4 * 4


def test_agents_end_with_the_playbook(tmp_path):
    before = set(agent_pids(os.getuid()))
    run_both(tmp_path, "- hosts: all\n  gather_facts: false\n  tasks:\n    - command: echo hi\n")
    deadline = time.monotonic() + 10
    while set(agent_pids(os.getuid())) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(agent_pids(os.getuid())) - before
