"""The persistent-agent runner over ssh, against a real sshd in a network namespace: same results
as ansible-core's ssh connection, the agent reached through the ControlMaster (no ssh exec per
task once it runs), housekeeping, transfers and become through agents on the target."""

from __future__ import annotations

import collections
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_runner_e2e import tree

from conftest import Receiver
from runner_fixtures import (  # noqa: F401
    BASE_PREFIX,
    BECOME_USER,
    BIN,
    CALLBACK_DIR,
    CONNECTION_DIR,
    SSH_USER,
    clean_env,
    ensure_user,
    results_equal,
    run_playbook,
    ssh_host,
)

PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: dir
      file: {path: "{{ base }}/d", state: directory, mode: "0750"}
    - name: copy content
      copy: {content: "hello\\n", dest: "{{ base }}/d/a.txt", mode: "0640"}
    - name: copy src with backup
      copy: {src: "{{ playbook_dir }}/src.txt", dest: "{{ base }}/d/a.txt", backup: true}
    - name: lineinfile
      lineinfile: {path: "{{ base }}/d/a.txt", line: "x=1", regexp: "^x="}
    - name: loop
      lineinfile: {path: "{{ base }}/loop-{{ item }}", line: "v", create: true}
      loop: [0, 1]
    - name: stat
      stat: {path: "{{ base }}/d/a.txt"}
    - name: template
      template: {src: "{{ playbook_dir }}/t.j2", dest: "{{ base }}/t.txt"}
    - name: command
      command: {cmd: pwd, chdir: "{{ base }}"}
    - name: shell env
      shell: echo "$FOO $HOME"; umask; id -un
      environment: {FOO: bar}
    - name: failing
      command: /bin/false
      ignore_errors: true
    - name: exception
      ping: {data: crash}
      ignore_errors: true
    - name: fetch
      fetch: {src: "{{ base }}/d/a.txt", dest: "{{ playbook_dir }}/fetched/", flat: true}
    - name: raw
      raw: echo raw
"""


def run_both_ssh(tmp_path, host, playbook, *, args=(), env=None, inventory_extra=""):
    runs, bases = {}, {}
    uid = pwd.getpwnam(SSH_USER).pw_uid
    for mode in ("classic", "persistent"):
        d = tmp_path / mode
        d.mkdir()
        (d / "src.txt").write_text("from the controller\n")
        (d / "t.j2").write_text("host={{ inventory_hostname }}\n")
        base = Path(tempfile.mkdtemp(prefix=f"{BASE_PREFIX}{mode[0]}-"))
        os.chown(base, uid, -1)
        os.chmod(base, 0o755)
        bases[mode] = base
        inv = d / "inventory.ini"
        inv.write_text(host.inventory(extra=inventory_extra))
        e = {"SPAWNTRACE_AGENT_TIMING": str(d / "timing.jsonl"), "ANSIBLE_SSH_CONTROL_PATH_DIR": str(d / "cp")}
        e.update(env or {})
        r = run_playbook(d, playbook, mode=mode, inventory=str(inv), args=["-e", f"base={base}", *args], env=e)
        r.timing = [json.loads(x) for x in (d / "timing.jsonl").read_text().splitlines()] if (d / "timing.jsonl").exists() else []
        r.dir = d
        runs[mode] = r
    c, p = runs["classic"], runs["persistent"]
    diffs = results_equal(c, p, tmp_paths=(str(bases["classic"]), str(bases["persistent"]), str(c.dir), str(p.dir)))
    try:
        assert diffs == [], "\n".join(repr(x) for x in diffs)
        assert c.returncode == p.returncode == 0 or c.returncode == p.returncode, (c.stdout[-2000:], p.stdout[-2000:])
        assert tree(bases["classic"]) == tree(bases["persistent"])
        if (c.dir / "fetched").exists():
            assert tree(c.dir / "fetched") == tree(p.dir / "fetched")
    finally:
        for b in bases.values():
            shutil.rmtree(b, ignore_errors=True)
    return c, p


def test_ssh_same_results(tmp_path, ssh_host):  # noqa: F811
    c, p = run_both_ssh(tmp_path, ssh_host, PLAYBOOK)
    assert p.returncode == 0, p.stdout[-3000:]
    assert not c.timing
    modules = collections.Counter(t["module"] for t in p.timing)
    for m in ("file", "copy", "lineinfile", "stat", "command", "ping"):
        assert modules[m], modules


def test_ssh_without_pipelining(tmp_path, ssh_host):  # noqa: F811
    c, p = run_both_ssh(tmp_path, ssh_host, PLAYBOOK, env={"ANSIBLE_PIPELINING": "False"})
    assert p.returncode == 0 and p.timing


def count_ssh_execs(tmp_path, host, n, mode):
    playbook = '- hosts: all\n  gather_facts: false\n  tasks:\n    - lineinfile: {path: "{{ base }}/w", line: w, create: true}\n'
    for i in range(n):
        playbook += f'    - copy: {{content: "{i}\\n", dest: "{{{{ base }}}}/c{i}"}}\n'
        playbook += f'    - lineinfile: {{path: "{{{{ base }}}}/c{i}", line: "x={i}"}}\n'
    d = tmp_path / f"{mode}-{n}"
    d.mkdir()
    base = Path(tempfile.mkdtemp(prefix=f"{BASE_PREFIX}ssh-"))
    os.chown(base, pwd.getpwnam(SSH_USER).pw_uid, -1)
    try:
        (d / "inventory.ini").write_text(host.inventory())
        (d / "pb.yml").write_text(playbook)
        (d / "ansible.cfg").write_text("")
        # a short ControlPersist: strace -f waits for the mux it traces to exit
        env = clean_env(
            {
                "ANSIBLE_CONFIG": str(d / "ansible.cfg"),
                "ANSIBLE_PIPELINING": "True",
                "ANSIBLE_SSH_CONTROL_PATH_DIR": str(d / "cp"),
                "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=3s",
            }
        )
        if mode == "persistent":
            env["ANSIBLE_CONNECTION_PLUGINS"] = str(CONNECTION_DIR)
        log = d / "strace.log"
        p = subprocess.run(
            [
                "strace",
                "-f",
                "--seccomp-bpf",
                "-qq",
                "-e",
                "trace=execve",
                "-e",
                "signal=none",
                "-o",
                str(log),
                str(BIN / "ansible-playbook"),
                "-i",
                str(d / "inventory.ini"),
                "-e",
                f"base={base}",
                str(d / "pb.yml"),
            ],
            env=env,
            cwd=d,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stdout[-2000:]
        return [x for x in log.read_text().splitlines() if "execve(" in x and "= 0" in x and '/ssh"' in x.split(",")[0]]
    finally:
        # the mux of this run
        subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={d / 'cp'}/%C", "x"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_no_ssh_exec_per_task(tmp_path, ssh_host):  # noqa: F811
    few, many = count_ssh_execs(tmp_path, ssh_host, 1, "persistent"), count_ssh_execs(tmp_path, ssh_host, 4, "persistent")
    # ssh execs only to start the agent: the bootstrap and `ssh -O forward`
    assert len(few) == len(many) <= 3, "\n".join(many)
    classic = count_ssh_execs(tmp_path, ssh_host, 1, "classic")
    assert len(classic) >= 6, classic


def test_ssh_runner_start_is_remote(tmp_path, ssh_host):  # noqa: F811
    rec = Receiver(tmp_path / "events.sock")
    rec.start_reading()
    d = tmp_path / "run"
    d.mkdir()
    base = Path(tempfile.mkdtemp(prefix=f"{BASE_PREFIX}ssh-"))
    os.chown(base, pwd.getpwnam(SSH_USER).pw_uid, -1)
    try:
        inv = d / "inventory.ini"
        inv.write_text(ssh_host.inventory())
        playbook = '- hosts: all\n  gather_facts: false\n  tasks:\n    - name: loop\n      lineinfile: {path: "{{ base }}/{{ item }}", line: x, create: true}\n      loop: [a, b]\n'
        run = run_playbook(
            d,
            playbook,
            mode="persistent",
            inventory=str(inv),
            args=["-e", f"base={base}"],
            env={
                "ANSIBLE_CALLBACK_PLUGINS": f"{d / 'callbacks'}:{CALLBACK_DIR}",
                "ANSIBLE_CALLBACKS_ENABLED": "results_dump,spawntrace",
                "SPAWNTRACE_SOCKET": str(tmp_path / "events.sock"),
                "ANSIBLE_SSH_CONTROL_PATH_DIR": str(d / "cp"),
            },
        )
    finally:
        time.sleep(0.3)
        msgs = rec.close()
        shutil.rmtree(base, ignore_errors=True)
    assert run.returncode == 0, run.stdout[-2000:]
    runners = [m for m in msgs if m["ev"] == "runner_start"]
    workers = {m["task_uuid"]: m for m in msgs if m["ev"] == "worker_start"}
    assert len(runners) == 2 and not [m for m in msgs if m["ev"] == "agent_start"]
    for m in runners:
        assert m["remote"] is True and m.cred_pid == m["worker_pid"] == workers[m["task_uuid"]].cred_pid
        assert m["host"] == "sshhost" and m["module"] == "lineinfile" and m["pid"] != m["agent_pid"]
    assert sorted(m["item"] for m in runners) == [0, 1]


@pytest.fixture
def remote_sudo():
    """Lets the ssh test user sudo (no password) to root and to the become user, for this test."""
    ensure_user(BECOME_USER)
    path = Path("/etc/sudoers.d/spawntrace-test-runner")
    path.write_text(f"{SSH_USER} ALL=(root,{BECOME_USER}) NOPASSWD: ALL\n")
    os.chmod(path, 0o440)
    try:
        yield
    finally:
        path.unlink()


def test_ssh_become(tmp_path, ssh_host, remote_sudo):  # noqa: F811
    playbook = (
        """
- hosts: all
  gather_facts: false
  tasks:
    - name: root
      command: id -un
      become: true
    - name: root copy
      copy: {content: "r\\n", dest: "{{ base }}/root.txt", mode: "0600"}
      become: true
    - name: root lineinfile
      lineinfile: {path: "{{ base }}/root.txt", line: "more"}
      become: true
    - name: unprivileged to unprivileged (classic path)
      command: id -un
      become: true
      become_user: %s
"""
        % BECOME_USER
    )
    c, p = run_both_ssh(tmp_path, ssh_host, playbook)
    assert p.returncode == 0, p.stdout[-3000:]
    assert [r["result"]["stdout"] for r in p.results if r["task"] == "root"] == ["root"]
    assert sum(1 for t in p.timing if t["module"] in ("command", "copy", "lineinfile")) >= 3
