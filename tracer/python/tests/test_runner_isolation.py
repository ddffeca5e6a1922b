"""The isolation policy (agent isolation.py, runner.InProcess): which module runs share a runner
process. By default (auto) the curated builtin modules share one and every other module gets a
fresh runner; `spawntrace_isolation` (a variable, or SPAWNTRACE_ISOLATION) says in-process or
fork instead. Whatever the policy, a runner that a module left changed is retired: a test module
here makes each change the runner must see, and the run after it must be in another process."""

from __future__ import annotations

import collections
import sys

import pytest

from playbook_runs import AGENT_DIR, core_version, run_playbook
from runner_fixtures import cleanup_bases, run_both  # noqa: F401

sys.path.insert(0, str(AGENT_DIR))
from spawntrace_agent.isolation import IN_PROCESS_SAFE  # noqa: E402

pytestmark = pytest.mark.skipif(core_version() < (2, 19), reason="runners are shared from ansible-core 2.19 (RUNNER.md)")

# A module that changes one piece of process state (`change`) and reports its pid.
STATE_MODULE = r"""
from ansible.module_utils.basic import AnsibleModule
import os, signal, sys, threading, time

def main():
    m = AnsibleModule(argument_spec=dict(change=dict(type="str", required=True), scratch=dict(type="str")))
    c = m.params["change"]
    if c == "cwd":
        os.chdir("/")
    elif c == "environment":
        os.environ["ST_ISOLATION_LEFT"] = "1"
    elif c == "umask":
        os.umask(0o077)
    elif c == "signal handler":
        signal.signal(signal.SIGUSR1, lambda *a: None)
    elif c == "alarm or timer":
        signal.setitimer(signal.ITIMER_REAL, 600)
    elif c == "file descriptor":
        os.open("/dev/null", os.O_RDONLY)
    elif c == "thread":
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    elif c == "module st_foreign_lib":
        d = m.params["scratch"]
        with open(os.path.join(d, "st_foreign_lib.py"), "w") as f:
            f.write("STATE = {}\n")
        sys.path.insert(0, d)
        import st_foreign_lib  # noqa: F401
    elif c == "fork":
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    elif c == "exception":
        raise KeyboardInterrupt("past the module's own handler (it takes Exception)")
    m.exit_json(changed=False, pid=os.getpid())

main()
"""

CHANGES = [
    "cwd",
    "environment",
    "umask",
    "signal handler",
    "alarm or timer",
    "file descriptor",
    "thread",
    "module st_foreign_lib",
    "fork",
    "exception",
]


def test_a_runner_a_module_changed_is_retired(tmp_path):
    """For each change: a clean run, the changing run (in the same runner: in-process), then a
    clean run, which must be in a fresh runner; the agent says why it retired the runner."""
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "st_state.py").write_text(STATE_MODULE)
    (tmp_path / "scratch").mkdir()
    # the first run teaches the zygote the module (its runner retires: the zip was not kept yet)
    sequence = ["none", "none"]
    for c in CHANGES:
        sequence += [c, "none"]
    playbook = """
- hosts: all
  gather_facts: false
  vars: {spawntrace_isolation: in-process}
  tasks:
    - st_state: {change: "{{ item }}", scratch: "%s"}
      loop: %r
      ignore_errors: true
""" % (tmp_path / "scratch", sequence)
    run = run_playbook(tmp_path, playbook, mode="persistent", agent_timing=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    timing = run.timing
    assert [t["module"] for t in timing] == ["st_state"] * len(sequence), timing
    pids = [t["runner_pid"] for t in timing]
    assert pids[1] == pids[2], "a clean run leaves its runner to the next run"
    for i, change in enumerate(sequence):
        if change == "none":
            continue
        assert pids[i - 1] == pids[i], f"{change}: ran in the runner of the clean run before it"
        assert timing[i - 1]["retired"] is None, timing[i - 1]
        assert timing[i]["retired"] == change, (change, timing[i])
        assert pids[i + 1] != pids[i], f"{change}: the next run must get a fresh runner"


def test_auto_shares_the_curated_modules_and_forks_the_rest(tmp_path):
    """Every curated module (isolation.IN_PROCESS_SAFE) runs twice with the same results as
    classic and leaves its runner fit to share; command and shell get runners of their own."""
    tasks = {
        "copy": 'copy: {content: "a\\nb\\nc\\n", dest: "{{ base }}/f.txt", mode: "0640"}',
        "file": 'file: {path: "{{ base }}/d", state: directory, mode: "0750"}',
        "lineinfile": 'lineinfile: {path: "{{ base }}/f.txt", line: "line {{ n }}"}',
        "blockinfile": 'blockinfile: {path: "{{ base }}/f.txt", block: "block {{ n }}", marker: "# {mark} B{{ n }}"}',
        "replace": 'replace: {path: "{{ base }}/f.txt", regexp: "^b$", replace: "B"}',
        "stat": 'stat: {path: "{{ base }}/f.txt", get_checksum: true}',
        "slurp": 'slurp: {src: "{{ base }}/f.txt"}',
        "find": 'find: {paths: "{{ base }}", patterns: "*.txt"}',
        "ping": "ping: {}",
        "tempfile": 'tempfile: {path: "{{ base }}", suffix: ".st"}',
        "assemble": 'assemble: {src: "{{ base }}/d", dest: "{{ base }}/assembled.txt", remote_src: true}',
        "command": "command: echo command {{ n }}",
        "shell": "shell: echo shell {{ n }}",
    }
    assert {"ansible.modules." + m for m in tasks} >= IN_PROCESS_SAFE, "every curated module is run here"
    body = "".join(f"    - name: {name} {{{{ n }}}}\n      {task}\n      register: r_{name}\n" for name, task in tasks.items())
    # (tempfile's random names are masked in the comparison) what it made is removed
    body += '    - file: {path: "{{ r_tempfile.path }}", state: absent}\n'
    playbook = "".join(
        f"""
- hosts: all
  gather_facts: false
  vars: {{n: {n}}}
  tasks:
{body}"""
        for n in (1, 2)
    )
    pair = run_both(tmp_path, playbook)
    timing = pair.persistent.timing
    runs = collections.Counter(t["runner_pid"] for t in timing)
    for name in tasks:
        module = {"shell": "command"}.get(name, name)  # shell runs the command module
        mine = [t for t in timing if t["module"] == module]
        assert mine, name
        if "ansible.modules." + module in IN_PROCESS_SAFE:
            # its first run teaches the zygote (`zip not kept`); later ones keep their runner
            assert any(t["retired"] is None for t in mine), (name, mine)
            assert all(t["retired"] in (None, "zip not kept") for t in mine), (name, mine)
        else:
            assert all(t["retired"] == "not shared" and runs[t["runner_pid"]] == 1 for t in mine), (name, mine)
    assert max(runs.values()) > 2, f"runners were shared: {runs}"


def test_the_isolation_variable_overrides_the_policy(tmp_path):
    playbook = """
- hosts: all
  gather_facts: false
  tasks:
    - copy: {content: "x\\n", dest: "{{ base }}/a.txt"}
    - copy: {content: "y\\n", dest: "{{ base }}/b.txt"}
      vars: {spawntrace_isolation: fork}
    - command: echo one
      vars: {spawntrace_isolation: in-process}
    - command: echo two
      vars: {spawntrace_isolation: in-process}
    - lineinfile: {path: "{{ base }}/a.txt", line: z}
"""
    pair = run_both(tmp_path, playbook)
    t = pair.persistent.timing
    # copy runs stat then copy; a module's first run teaches the zygote
    assert [r["module"] for r in t] == ["stat", "copy", "stat", "copy", "command", "command", "lineinfile"], t
    assert [r["retired"] for r in t[2:4]] == ["not shared", "not shared"], "fork, whatever the module"
    assert t[4]["retired"] == "zip not kept" and t[5]["retired"] is None, "in-process, whatever the module"
    assert t[5]["runner_pid"] == t[6]["runner_pid"], "the in-process command left its runner to the next run"


def test_fork_gives_every_module_run_its_own_process(tmp_path):
    playbook = """
- hosts: all
  gather_facts: false
  tasks:
    - lineinfile: {path: "{{ base }}/a.txt", line: "{{ item }}", create: true}
      loop: [a, b, c, d]
"""
    pair = run_both(tmp_path, playbook, env={"SPAWNTRACE_ISOLATION": "fork"})
    pids = [t["runner_pid"] for t in pair.persistent.timing]
    assert len(pids) == 4 and len(set(pids)) == 4, pids


def test_an_unknown_isolation_is_refused(tmp_path):
    playbook = """
- hosts: all
  gather_facts: false
  tasks:
    - ping: {}
      vars: {spawntrace_isolation: sometimes}
"""
    run = run_playbook(tmp_path, playbook, mode="persistent", agent_timing=True)
    assert run.returncode != 0 and not run.timing
    assert "spawntrace_isolation" in run.stdout + run.stderr and "sometimes" in run.stdout + run.stderr, run.stdout[-2000:]


LEAKS_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: warns
      command: echo one
      args: {executable: /bin/sh}
      register: warned
    - name: no warning
      command: echo two
      register: clean
    - name: chdir
      command: pwd
      args: {chdir: /tmp}
    - name: cwd back
      command: pwd
    - name: environment
      shell: echo "[$ST_IN_PROCESS_VAR]"
      environment: {ST_IN_PROCESS_VAR: set}
    - name: environment gone
      shell: echo "[${ST_IN_PROCESS_VAR:-}]"
    - name: fails
      command: /bin/false
      ignore_errors: true
    - name: bad arguments
      stat: {path: /tmp, bogus_option: 1}
      ignore_errors: true
    - name: after failures
      copy: {content: "x\\n", dest: "{{ base }}/after.txt", mode: "0600"}
    - name: loop
      lineinfile: {path: "{{ base }}/after.txt", line: "{{ item }}"}
      loop: [a, b, c, d]
"""


def warnings_by_task(run):
    return [(r["task"], r["item"], r["result"].get("warnings") or []) for r in run.results]


def test_in_process_same_results_no_leaks(tmp_path):
    """Every module in-process: what one module leaves in the process (warnings, working
    directory, environment, a failure) does not show in the next one's result."""
    pair = run_both(tmp_path, LEAKS_PLAYBOOK, env={"SPAWNTRACE_ISOLATION": "in-process"})
    c, p = pair.classic, pair.persistent
    # warnings are left out of the generic comparison: compare them here
    assert warnings_by_task(c) == warnings_by_task(p)
    byname = {r["task"]: r["result"] for r in p.results}
    assert byname["warns"].get("warnings"), "the executable warning is expected"
    assert not byname["no warning"].get("warnings"), byname["no warning"]
    assert byname["chdir"]["stdout"] == "/tmp" and byname["cwd back"]["stdout"] != "/tmp"
    assert byname["environment gone"]["stdout"] == "[]"
    # runners were reused: fewer runner processes than module runs
    pids = [t["runner_pid"] for t in p.timing]
    assert len(pids) == len(p.timing) and all(pids)
    counts = collections.Counter(pids)
    assert len(counts) < len(pids), counts
