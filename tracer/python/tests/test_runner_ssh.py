"""The persistent-agent runner over ssh, against a real sshd in a network namespace: same results
as ansible-core's ssh connection, the agent reached through the ControlMaster (no ssh exec per
task once it runs), housekeeping, transfers and become through agents on the target."""

from __future__ import annotations

import collections
import contextlib
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Receiver
from playbook_runs import run_playbook
from runner_fixtures import (  # noqa: F401
    BECOME_USER,
    ROOT_PASSWORD,
    SSH_USER,
    SSH_USER_PASSWORD,
    cleanup_bases,
    doas_rule,
    ensure_user,
    new_base,
    run_both,
    ssh_host,
    ssh_host_with_passwords,
    traced_execs,
)
from spawntrace_agent import client

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


FILES = {"src.txt": "from the controller\n", "t.j2": "host={{ inventory_hostname }}\n"}


def run_both_ssh(tmp_path, host, playbook, *, env=None, expect_agent=True, args=()):
    """run_both against the ssh host, {{ base }} owned by its login user."""
    uid = pwd.getpwnam(SSH_USER).pw_uid
    return run_both(
        tmp_path,
        playbook,
        inventory=host.inventory(),
        files=FILES,
        env=env,
        prepare=lambda base: os.chown(base, uid, -1),
        expect_agent=expect_agent,
        args=args,
    )


def test_ssh_same_results(tmp_path, ssh_host):  # noqa: F811
    p = run_both_ssh(tmp_path, ssh_host, PLAYBOOK).persistent
    assert p.returncode == 0, p.stdout[-3000:]
    modules = collections.Counter(t["module"] for t in p.timing)
    for m in ("file", "copy", "lineinfile", "stat", "command", "ping"):
        assert modules[m], modules


def test_ssh_without_pipelining(tmp_path, ssh_host):  # noqa: F811
    p = run_both_ssh(tmp_path, ssh_host, PLAYBOOK, env={"ANSIBLE_PIPELINING": "False"}).persistent
    assert p.returncode == 0 and p.timing


def count_ssh_execs(tmp_path, host, n, mode):
    d = tmp_path / f"{mode}-{n}"
    base = new_base("ssh")
    os.chown(base, pwd.getpwnam(SSH_USER).pw_uid, -1)
    # a short ControlPersist: strace -f waits for the mux it traces to exit
    env = {"ANSIBLE_SSH_CONTROL_PATH_DIR": str(d / "cp"), "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=3s"}
    try:
        execs = traced_execs(d, mode, n, inventory=host.inventory(), base=base, env=env)
        return [x for x in execs if '/ssh"' in x.split(",")[0]]
    finally:
        # the mux of this run
        subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={d / 'cp'}/%C", "x"], capture_output=True)


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
    base = new_base("ssh")
    os.chown(base, pwd.getpwnam(SSH_USER).pw_uid, -1)
    try:
        inv = d / "inventory.ini"
        inv.write_text(ssh_host.inventory())
        playbook = '- hosts: all\n  gather_facts: false\n  tasks:\n    - name: loop\n      lineinfile: {path: "{{ base }}/{{ item }}", line: x, create: true}\n      loop: [a, b]\n'
        run = run_playbook(
            d,
            playbook,
            mode="persistent",
            inventory=inv,
            args=["-e", f"base={base}"],
            env={"ANSIBLE_SSH_CONTROL_PATH_DIR": str(d / "cp")},
            callbacks=("results_dump", "spawntrace"),
            socket_path=str(tmp_path / "events.sock"),
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
        assert m["host"] == "sshhost" and m["module"] == "lineinfile" and m["pid"] == m.cred_pid
        assert m["runner_pid"] != m["agent_pid"]
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


# module tasks as root from the unprivileged login user
ROOT_TASKS = """\
    - name: root
      command: id -un
      become: true
    - name: root copy
      copy: {content: "r\\n", dest: "{{ base }}/root.txt", mode: "0600"}
      become: true
    - name: root lineinfile
      lineinfile: {path: "{{ base }}/root.txt", line: "more"}
      become: true
"""


def test_ssh_become(tmp_path, ssh_host, remote_sudo):  # noqa: F811
    playbook = (
        """
- hosts: all
  gather_facts: false
  tasks:
"""
        + ROOT_TASKS
        + """\
    - name: unprivileged to unprivileged (classic path)
      command: id -un
      become: true
      become_user: %s
"""
        % BECOME_USER
    )
    p = run_both_ssh(tmp_path, ssh_host, playbook).persistent
    assert p.returncode == 0, p.stdout[-3000:]
    assert [r["result"]["stdout"] for r in p.results if r["task"] == "root"] == ["root"]
    assert sum(1 for t in p.timing if t["module"] in ("command", "copy", "lineinfile")) >= 3


def test_ssh_become_doas(tmp_path, ssh_host):  # noqa: F811
    """doas from the unprivileged login user to root: the root agent, started through doas,
    hands its socket to the login user (DOAS_USER / the remote user), and every module runs
    through it."""
    playbook = "- hosts: all\n  gather_facts: false\n  vars: {ansible_become_method: community.general.doas}\n  tasks:\n" + ROOT_TASKS
    with doas_rule(f"permit nopass {SSH_USER} as root"):
        p = run_both_ssh(tmp_path, ssh_host, playbook).persistent
    assert p.returncode == 0, p.stdout[-3000:]
    assert [r["result"]["stdout"] for r in p.results if r["task"] == "root"] == ["root"]
    assert [t["module"] for t in p.timing] == ["command", "stat", "copy", "lineinfile"]


def become_playbook(method: str, password: str | None = None) -> str:
    """ROOT_TASKS through become `method` (with `password`)."""
    pw = f"\n    ansible_become_password: {password}" if password else ""
    return f"- hosts: all\n  gather_facts: false\n  vars:\n    ansible_become_method: {method}{pw}\n  tasks:\n" + ROOT_TASKS


@pytest.mark.parametrize("method", ["su", "doas"])
def test_ssh_become_password_prompt(tmp_path, ssh_host_with_passwords, method):  # noqa: F811
    """su (root's password) and doas (the login user's) prompt on a terminal: the root agent
    starts as any prompting become command does (`ssh -tt`, the password answered by the become
    plugin), its payload read from a file in the login user's agent directory, removed once the
    agent is up. Every module runs through it."""
    if method == "su":
        rule, playbook = contextlib.nullcontext(), become_playbook("su", ROOT_PASSWORD)
    else:
        rule, playbook = doas_rule(f"permit {SSH_USER} as root"), become_playbook("community.general.doas", SSH_USER_PASSWORD)
    with rule:
        p = run_both_ssh(tmp_path, ssh_host_with_passwords, playbook).persistent
    assert p.returncode == 0, p.stdout[-3000:]
    assert [r["result"]["stdout"] for r in p.results if r["task"] == "root"] == ["root"]
    assert [t["module"] for t in p.timing] == ["command", "stat", "copy", "lineinfile"]
    assert len({t["agent_pid"] for t in p.timing}) == 1
    leftovers = list(Path(client.agent_dir(pwd.getpwnam(SSH_USER).pw_uid)).glob("payload-*"))
    assert not leftovers, leftovers


@pytest.mark.once
@pytest.mark.parametrize("method", ["su", "doas"])
def test_ssh_become_wrong_password(tmp_path, ssh_host_with_passwords, method):  # noqa: F811
    """A wrong password fails the task as classic does (the same result), without waiting past
    the become plugin's own timeout, and no module runs through an agent."""
    if method == "su":
        rule, playbook = contextlib.nullcontext(), become_playbook("su", "wrong")
    else:
        rule, playbook = doas_rule(f"permit {SSH_USER} as root"), become_playbook("community.general.doas", "wrong")
    with rule:
        pair = run_both_ssh(tmp_path, ssh_host_with_passwords, playbook, expect_agent=False)
    assert pair.persistent.returncode != 0
    assert "password" in pair.persistent.stdout, pair.persistent.stdout[-2000:]


def copy_loop(items, extra=""):
    """A playbook: one copy task with content over `items` (`extra`: more lines of the task)."""
    return (
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - name: copies\n"
        '      copy: {content: "item {{ item }}\\n", dest: "{{ base }}/c-{{ item }}.txt", mode: "0600"}\n'
        f"      loop: {items}\n" + extra
    )


def test_housekeeping_goes_with_the_next_request(tmp_path, ssh_host):  # noqa: F811
    """A copy loop's remote_tmp is expanded once per worker and agent, and each item's mkdtemp,
    upload, chmod and clean-up go with its next request to the agent: two requests per item (stat,
    copy) instead of seven, with the same results and files as classic."""
    playbook = copy_loop([1, 2, 3])
    p = run_both_ssh(tmp_path, ssh_host, playbook, args=["-vvv"]).persistent
    assert p.returncode == 0, p.stdout[-3000:]
    lines = p.stdout.splitlines()

    def count(text):
        return sum(1 for line in lines if text in line)

    # per item, but the first's mkdtemp and home (the agent starts with its first module run)
    assert count("PUT (spawntrace agent, with the next request)") == 3
    assert count("with the next request) /bin/sh -c '( umask 77 && mkdir") == 2
    assert count("with the next request) /bin/sh -c 'rm -f -r") == 3
    assert count(f", known) /bin/sh -c 'echo ~{SSH_USER}") == 1
    assert [t["module"] for t in p.timing] == ["stat", "copy"] * 3


def test_deferred_housekeeping_that_fails_fails_its_task(tmp_path, ssh_host):  # noqa: F811
    """A temporary directory that cannot be made, known only when the next request reaches the
    agent, leaves the host unreachable as classic does; the module it was for is not run."""
    playbook = """
- hosts: all
  gather_facts: false
  tasks:
    - name: agent up
      ping:
    - name: copy
      copy: {content: "x\\n", dest: "{{ base }}/never.txt"}
      vars: {ansible_remote_tmp: /proc/spawntrace-none/tmp}
"""
    runs = {}
    for mode in ("classic", "persistent"):
        base = new_base(mode[0])
        os.chown(base, pwd.getpwnam(SSH_USER).pw_uid, -1)
        inventory = tmp_path / f"inventory-{mode}.ini"
        inventory.write_text(ssh_host.inventory())
        runs[mode] = run_playbook(tmp_path / mode, playbook, mode=mode, inventory=inventory, args=["-e", f"base={base}"], agent_timing=True)
        assert not (base / "never.txt").exists()
    c, p = runs["classic"], runs["persistent"]
    assert (
        [(r["task"], r["status"]) for r in p.results]
        == [(r["task"], r["status"]) for r in c.results]
        == [
            ("agent up", "ok"),
            ("copy", "unreachable"),
        ]
    )
    assert "Failed to create temporary directory (spawntrace agent): mkdtemp failed" in p.stdout, p.stdout[-2000:]
    assert [t["module"] for t in p.timing] == ["ping"]


def test_housekeeping_left_for_an_agent_that_ended_is_done_all_the_same(tmp_path, ssh_host):  # noqa: F811
    """An agent that ends between two loop items (its idle time, 1 s, is shorter than the loop's
    pause) had the first item's clean-up and the second's mkdtemp waiting for it: nothing was
    acted on, so they are done the classic way before a new agent starts, and the results, files
    and the target's temporary directories are classic's."""
    playbook = copy_loop([1, 2], "      loop_control: {pause: 3}\n")
    tmp = Path(pwd.getpwnam(SSH_USER).pw_dir) / ".ansible" / "tmp"
    before = set(tmp.glob("ansible-tmp-*"))
    p = run_both_ssh(tmp_path, ssh_host, playbook, env={"SPAWNTRACE_AGENT_IDLE": "1"}, args=["-vvv"]).persistent
    assert p.returncode == 0, p.stdout[-3000:]
    lines = p.stdout.splitlines()
    gone = next(i for i, line in enumerate(lines) if "spawntrace agent unavailable" in line)
    # item 1's clean-up and item 2's mkdtemp, deferred to the agent that ended, went over ssh
    replayed = [line for line in lines[gone:] if "SSH: EXEC" in line and ("rm -f -r" in line or "umask 77 && mkdir" in line)]
    assert len(replayed) >= 2, "\n".join(lines[gone:])[-3000:]
    assert set(tmp.glob("ansible-tmp-*")) <= before
