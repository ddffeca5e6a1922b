"""In-process runs (SPAWNTRACE_AGENT_IN_PROCESS=N, opt-in): one runner process runs up to N modules in
a row. What one module leaves in the process (warnings, working directory, environment, a
failure) must not show in the next one's result, and results must equal classic ones."""

from __future__ import annotations

import collections

from runner_fixtures import cleanup_bases, run_both  # noqa: F401

PLAYBOOK = """
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
    pair = run_both(tmp_path, PLAYBOOK, env={"SPAWNTRACE_AGENT_IN_PROCESS": "50"})
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


def test_not_in_process_by_default(tmp_path):
    pair = run_both(tmp_path, PLAYBOOK)
    pids = [t["runner_pid"] for t in pair.persistent.timing]
    assert len(set(pids)) == len(pids), "without SPAWNTRACE_AGENT_IN_PROCESS every module run has its own process"
