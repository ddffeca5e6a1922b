"""Fixtures and helpers for the persistent-agent runner tests (test_runner_*.py and the agent's
security and limits tests): running a playbook classic and persistent and comparing the two,
counting execs, starting agents directly, and the sshd test host."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import sshlab
from playbook_runs import Run, run_playbook
from spawntrace_agent import client
from sshlab import USER as SSH_USER
from sshlab import Lab, ensure_user

# Per-test base directories live in /tmp (outside pytest's 0700 tree, for become); this session's
# carry its pid, so that its clean-up never touches another pytest session's.
BASE_PREFIX = "st-%d-" % os.getpid()

BECOME_USER = "spawntrace-become"

# the interpreter of targets and agents: the system's, as on a real host
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
LOCALHOST = f"localhost ansible_connection=local ansible_python_interpreter={SYSTEM_PYTHON}\n"


# Keys whose values legitimately differ between two runs (times, temp paths, job ids, and the
# number of `until` attempts a background job needed, which depends on scheduling).
VOLATILE = {
    "attempts",
    "start",
    "end",
    "delta",
    "invocation",
    "src",
    "backup_file",
    "ansible_job_id",
    "results_file",
    "started",
    "finished",
    "_ansible_no_log",
    "pid",
    "uid",
    "gid",
    "atime",
    "mtime",
    "ctime",
    "inode",
    "dev",
    "version",
    "erased",
    "tmpdir",
    "path_tmp",
    "ansible_facts",
    "deprecations",
    "warnings",
    "_ansible_verbose_always",
}


def normalize(value, tmp_paths=()):
    if isinstance(value, dict):
        return {k: normalize(v, tmp_paths) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [normalize(v, tmp_paths) for v in value]
    if isinstance(value, str):
        for t in tmp_paths:
            value = value.replace(t, "<TMP>")
        # controller and target temporary names
        value = re.sub(r"ansible-local-[^/\s]+/tmp[^/\s]+", "ansible-local-X/tmpX", value)
        value = re.sub(r"ansible-tmp-[\d.]+-\d+-\d+", "ansible-tmp-X", value)
        # the directory an AnsiballZ wrapper before 2.19 unpacks its module into (mkdtemp)
        value = re.sub(r"(ansible_\w+?_payload_)[A-Za-z0-9_]{8}/", r"\1X/", value)
        # what the tempfile module makes (mkstemp/mkdtemp, prefix "ansible.")
        value = re.sub(r"/ansible\.[a-z0-9_]{8}(?=[./]|$)", "/ansible.X", value)
        return value
    return value


def results_equal(a: Run, b: Run, tmp_paths=(), ordered=True):
    """Compares two runs' results task by task; returns a list of differences. `ordered`: the
    (task, host, item) results must also come in the same order (not with forks > 1 and several
    hosts, where hosts finish in any order)."""
    diffs = []
    ta, tb = a.by_task(), b.by_task()
    if (list(ta) != list(tb)) if ordered else (sorted(ta, key=repr) != sorted(tb, key=repr)):
        diffs.append(("task list", list(ta), list(tb)))
    for k in ta:
        if k not in tb:
            continue
        ra = [(r["status"], normalize(r["result"], tmp_paths)) for r in ta[k]]
        rb = [(r["status"], normalize(r["result"], tmp_paths)) for r in tb[k]]
        if ra != rb:
            diffs.append((k, ra, rb))
    return diffs


def agent_pids(uid=None):
    """Pids of running spawntrace agents (recognised by their command line: the agent's source),
    optionally only those of one uid."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            if uid is not None and os.stat(f"/proc/{d}").st_uid != uid:
                continue
        except OSError:
            continue
        if b"# spawntrace persistent agent" in cmd:
            pids.append(int(d))
    return pids


def stop_agents(uid=None):
    for pid in agent_pids(uid):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


def tree(root: Path):
    """Relative path -> (kind, mode, content or link target), backup names normalised."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = re.sub(r"\.\d+\.\d{4}-\d\d-\d\d@\d\d:\d\d:\d\d~$", ".BACKUP~", str(p.relative_to(root)))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p).replace(str(root), "<BASE>"))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)))
            else:
                out[rel] = ("file", oct(stat.S_IMODE(st.st_mode)), p.read_bytes())
    return out


def new_base(tag: str) -> Path:
    """A directory for a run's {{ base }}, 0755 in /tmp (outside pytest's 0700 tree: become and
    ssh users reach it); cleanup_bases removes it."""
    base = Path(tempfile.mkdtemp(prefix=f"{BASE_PREFIX}{tag}-"))
    os.chmod(base, 0o755)
    return base


@pytest.fixture(autouse=True)
def cleanup_bases():
    """Removes the bases a test made (autouse where imported)."""
    before = set(Path(tempfile.gettempdir()).glob(BASE_PREFIX + "*"))
    yield
    for p in set(Path(tempfile.gettempdir()).glob(BASE_PREFIX + "*")) - before:
        shutil.rmtree(p, ignore_errors=True)


@dataclasses.dataclass
class Pair:
    classic: Run
    persistent: Run
    base: dict  # mode -> its {{ base }}


def run_both(
    tmp_path: Path,
    playbook: str,
    *,
    inventory=LOCALHOST,
    files=None,
    args=(),
    env=None,
    prepare=None,
    expect_agent=True,
    pipelining=True,
    ordered=True,
) -> Pair:
    """Runs `playbook` classic then persistent, each from tmp_path/<mode> holding `files` (relative
    path -> text or bytes); {{ base }} is a per-mode new_base, given to `prepare(base)` first.
    Both runs must have the same results, return code and files in base (and in <mode>/fetched),
    and only the persistent one may reach the agent."""
    runs, bases = {}, {}
    for mode in ("classic", "persistent"):
        d = tmp_path / mode
        d.mkdir()
        base = bases[mode] = new_base(mode[0])
        for rel, content in (files or {}).items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content if isinstance(content, bytes) else content.encode())
            if rel.endswith(".sh"):
                os.chmod(p, 0o755)
        if prepare:
            prepare(base)
        inv = d / "inventory.ini"
        inv.write_text(inventory)
        # (ssh: each mode its own ControlMaster)
        e = {"ANSIBLE_SSH_CONTROL_PATH_DIR": str(d / "cp"), **(env or {})}
        runs[mode] = run_playbook(
            d, playbook, mode=mode, inventory=inv, args=["-e", f"base={base}", *args], env=e, agent_timing=True, pipelining=pipelining
        )
    c, p = runs["classic"], runs["persistent"]
    assert not c.timing, "classic runs must not reach the agent"
    if expect_agent:
        assert p.timing, "no module ran through the agent:\n" + p.stdout[-3000:] + p.stderr[-3000:]
    diffs = results_equal(
        c, p, tmp_paths=(str(bases["classic"]), str(bases["persistent"]), str(c.directory), str(p.directory)), ordered=ordered
    )
    assert diffs == [], "\n".join(repr(d) for d in diffs)
    assert c.returncode == p.returncode, (c.stdout[-2000:], p.stdout[-2000:])
    assert tree(bases["classic"]) == tree(bases["persistent"])
    if (c.directory / "fetched").exists():
        assert tree(c.directory / "fetched") == tree(p.directory / "fetched")
    return Pair(c, p, bases)


def traced_execs(directory: Path, mode: str, n: int, *, inventory: str, base: Path, env=None) -> list:
    """The successful execve lines (strace -f) of a playbook of one lineinfile then `n` copy +
    lineinfile pairs in `base`: two `n` compared show whether a run execs per task."""
    playbook = (
        '- hosts: all\n  gather_facts: false\n  tasks:\n    - name: warm\n      lineinfile: {path: "{{ base }}/w", line: w, create: true}\n'
    )
    for i in range(n):
        playbook += f'    - copy: {{content: "{i}\\n", dest: "{{{{ base }}}}/c{i}"}}\n'
        playbook += f'    - lineinfile: {{path: "{{{{ base }}}}/c{i}", line: "x={i}"}}\n'
    directory.mkdir()
    (directory / "inventory.ini").write_text(inventory)
    log = directory / "strace.log"
    run = run_playbook(
        directory,
        playbook,
        mode=mode,
        inventory=directory / "inventory.ini",
        args=["-e", f"base={base}"],
        env=env,
        callbacks=(),
        wrapper=["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=execve", "-e", "signal=none", "-o", str(log)],
    )
    assert run.returncode == 0, run.stdout[-2000:]
    return [line for line in log.read_text().splitlines() if "execve(" in line and "= 0" in line]


@pytest.fixture(scope="session")
def become_user():
    if os.getuid() != 0 or not shutil.which("sudo"):
        pytest.skip("needs root and sudo")
    return ensure_user(BECOME_USER)


@dataclasses.dataclass
class SshHost:
    """The lab's host under the name the ssh tests give it in their inventories."""

    lab: Lab
    name: str = "sshhost"

    def inventory(self) -> str:
        return self.lab.inventory_line(dataclasses.replace(self.lab.hosts[0], name=self.name))


@pytest.fixture(scope="module")
def ssh_host():
    why = sshlab.unavailable()
    if why:
        pytest.skip("sshd lab: " + why)
    with Lab(1) as lab:
        yield SshHost(lab)
    # the test user's agents (they also end on their own after the idle timeout)
    stop_agents(pwd.getpwnam(SSH_USER).pw_uid)


# passwords of root and of the login user on the lab host of ssh_host_with_passwords only (its
# own /etc/shadow, see sshlab.Lab)
ROOT_PASSWORD = "st-root-" + secrets.token_hex(8)
SSH_USER_PASSWORD = "st-user-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def ssh_host_with_passwords():
    """ssh_host where root and the login user have passwords (ROOT_PASSWORD, SSH_USER_PASSWORD):
    for su and doas that prompt."""
    why = sshlab.unavailable()
    if why:
        pytest.skip("sshd lab: " + why)
    with Lab(1, passwords={"root": ROOT_PASSWORD, SSH_USER: SSH_USER_PASSWORD}) as lab:
        yield SshHost(lab)
    stop_agents(pwd.getpwnam(SSH_USER).pw_uid)


def start_agent(cfg: dict, *, python: str = SYSTEM_PYTHON, payload=None, body: bytes | None = None):
    """Bootstraps an agent as the connection plugins do (`python -c <first stage>`, the payload's
    body on stdin, or `body`); returns the ended bootstrap process and the READY line it printed."""
    payload = payload or client.PAYLOAD
    p = subprocess.run(payload.argv(python, json.dumps(cfg)), input=payload.body if body is None else body, capture_output=True, timeout=60)
    return p, client.parse_ready(p.stdout)


def start_local_agent(directory: Path, key: str, **extra):
    """An agent of ours with its socket and log in directory/agents (made 0700), config `extra`
    added; returns its config and pid."""
    d = directory / "agents"
    d.mkdir(mode=0o700)
    cfg = {
        "socket": str(d / "a.sock"),
        "version": client.VERSION,
        "idle": 30,
        "key": key,
        "dir_owner": os.getuid(),
        "host": "h",
        "user": "u",
        "log": str(d / "agent.log"),
        **extra,
    }
    p, ready = start_agent(cfg)
    assert p.returncode == 0 and ready["ok"], (p.stdout, p.stderr)
    return cfg, ready["pid"]


def run_request(**fields) -> dict:
    """A module run request as the local connection sends one: this process's environment, no
    assignments, cwd /, umask 022, the module piped (path None); `fields` added or replacing."""
    return {"op": "run", "env": dict(os.environ), "assign": {}, "cwd": "/", "umask": 0o022, "path": None, **fields}


@contextlib.contextmanager
def doas_rule(rule: str):
    """/etc/doas.conf holding `rule` (opendoas, which `cargo xtask setup` installs) while the block
    runs; an existing file is put back after it. Skips without doas or community.general's doas
    become plugin."""
    if not shutil.which("doas"):
        pytest.skip("needs doas (apt install opendoas; cargo xtask setup does)")
    try:
        import ansible_collections.community.general.plugins.become.doas  # noqa: F401
    except ImportError:
        pytest.skip("the doas become plugin is community.general's, not in this environment")
    conf = Path("/etc/doas.conf")
    saved = conf.read_bytes() if conf.exists() else None
    new = Path(str(conf) + ".spawntrace-test")
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(rule + "\n")
    new.rename(conf)
    try:
        yield
    finally:
        if saved is None:
            conf.unlink()
        else:
            conf.write_bytes(saved)
