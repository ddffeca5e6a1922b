"""Fixtures and helpers for the persistent-agent runner tests (test_runner_*.py): running real
ansible-playbook classic and through the spawntrace connection plugins, capturing every task
result with a small callback, and an sshd test host in its own network namespace."""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PYTHON_DIR = TESTS.parent
COLLECTION = PYTHON_DIR / "ansible_collections/spawntrace/tracer"
CONNECTION_DIR = COLLECTION / "plugins/connection"
CALLBACK_DIR = COLLECTION / "plugins/callback"
AGENT_DIR = COLLECTION / "agent"
BIN = Path(sys.executable).parent
ENVS = PYTHON_DIR / "envs"

# Per-test base directories live in /tmp (outside pytest's 0700 tree, for become); this session's
# carry its pid, so that its clean-up never touches another pytest session's.
BASE_PREFIX = "st-%d-" % os.getpid()

BECOME_USER = "spawntrace-become"
SSH_USER = "spawntrace-test"

# A callback that writes every result (per item too) as JSON lines to $RESULTS_FILE.
RESULTS_CALLBACK = r"""
from __future__ import annotations
import json, os
from ansible.plugins.callback import CallbackBase

def _plain(v):
    try:
        return json.loads(json.dumps(v, default=str))
    except Exception:
        return str(v)

class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "results_dump"
    CALLBACK_NEEDS_ENABLED = True

    def _w(self, status, result, item=False):
        r = result._result if hasattr(result, "_result") else result.result
        rec = {"task": result.task_name if hasattr(result, "task_name") else result._task.get_name(),
               "host": result._host.get_name() if hasattr(result, "_host") else result.host.get_name(),
               "status": status, "item": item, "result": _plain(dict(r))}
        with open(os.environ["RESULTS_FILE"], "a") as f:
            f.write(json.dumps(rec) + "\n")

    def v2_runner_on_ok(self, result): self._w("ok", result)
    def v2_runner_on_failed(self, result, ignore_errors=False): self._w("failed", result)
    def v2_runner_on_skipped(self, result): self._w("skipped", result)
    def v2_runner_on_unreachable(self, result): self._w("unreachable", result)
    def v2_runner_item_on_ok(self, result): self._w("ok", result, True)
    def v2_runner_item_on_failed(self, result): self._w("failed", result, True)
    def v2_runner_item_on_skipped(self, result): self._w("skipped", result, True)
"""


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    results: list

    def by_task(self):
        out = {}
        for r in self.results:
            out.setdefault((r["task"], r["host"], r["item"]), []).append(r)
        return out


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "SPAWNTRACE_"))}
    env.update(extra or {})
    return env


def run_playbook(
    directory: Path,
    playbook: str,
    *,
    mode: str = "classic",
    inventory: str | None = None,
    args: list | None = None,
    env: dict | None = None,
    pipelining: bool = True,
    timeout: float = 600,
    name: str = "playbook.yml",
) -> Run:
    """Runs `playbook` (YAML text) in `directory` with no ansible.cfg. mode: classic (builtin
    connection plugins) or persistent (spawntrace's on ANSIBLE_CONNECTION_PLUGINS)."""
    directory.mkdir(parents=True, exist_ok=True)
    pb = directory / name
    pb.write_text(playbook)
    cb = directory / "callbacks"
    cb.mkdir(exist_ok=True)
    (cb / "results_dump.py").write_text(RESULTS_CALLBACK)
    config = directory / "ansible.cfg"
    config.write_text("")
    results = directory / f"results-{mode}.jsonl"
    if results.exists():
        results.unlink()
    if inventory is None:
        inventory = directory / "inventory.ini"
        inventory.write_text(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    e = clean_env(
        {
            "ANSIBLE_CONFIG": str(config),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_CALLBACK_PLUGINS": str(cb),
            "ANSIBLE_CALLBACKS_ENABLED": "results_dump",
            "ANSIBLE_PIPELINING": "True" if pipelining else "False",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_LOCAL_TEMP": str(directory / "tmp-local"),
            "RESULTS_FILE": str(results),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    if mode == "persistent":
        e["ANSIBLE_CONNECTION_PLUGINS"] = str(CONNECTION_DIR)
        if os.environ.get("SPAWNTRACE_TEST_AGENT_IN_PROCESS"):
            # the whole suite again with in-process runs (opt-in mode): same results expected
            e["SPAWNTRACE_AGENT_IN_PROCESS"] = os.environ["SPAWNTRACE_TEST_AGENT_IN_PROCESS"]
    elif mode != "classic":
        raise ValueError(mode)
    e.update(env or {})
    argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), *(args or []), str(pb)]
    start = time.monotonic()
    p = subprocess.run(argv, env=e, cwd=directory, capture_output=True, text=True, timeout=timeout)
    secs = time.monotonic() - start
    recs = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return Run(p.returncode, p.stdout, p.stderr, secs, recs)


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
        return value
    return value


def results_equal(a: Run, b: Run, tmp_paths=()):
    """Compares two runs' results task by task; returns a list of differences."""
    diffs = []
    ta, tb = a.by_task(), b.by_task()
    if list(ta) != list(tb):
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


# ---------------------------------------------------------------------------------------------
# users


def ensure_user(name: str, shell: str = "/bin/sh"):
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", shell, name], check=True)
    # not locked (sshd refuses locked accounts even for keys), but no password
    subprocess.run(["usermod", "-p", "*", name], check=True)
    return pwd.getpwnam(name)


@pytest.fixture(scope="session")
def become_user():
    if os.getuid() != 0 or not shutil.which("sudo"):
        pytest.skip("needs root and sudo")
    return ensure_user(BECOME_USER)


# ---------------------------------------------------------------------------------------------
# an sshd in a network namespace (like tests/common/lab.rs)


@dataclasses.dataclass
class SshHost:
    name: str
    addr: str
    key: Path
    directory: Path

    def inventory(self, python="/usr/bin/python3", extra=""):
        args = "-F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes"
        return (
            f"{self.name} ansible_host={self.addr} ansible_user={SSH_USER} ansible_connection=ssh "
            f"ansible_python_interpreter={python} ansible_ssh_private_key_file={self.key} "
            f"ansible_ssh_common_args='{args}' {extra}\n"
        )


def _sh(cmd):
    p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"`{cmd}` failed: {p.stderr}")


@pytest.fixture(scope="module")
def ssh_host():
    if os.getuid() != 0 or not Path("/usr/sbin/sshd").exists() or not shutil.which("ip"):
        pytest.skip("needs root, sshd and iproute2")
    ensure_user(SSH_USER)
    import tempfile

    # sshd (as the test user) must read authorized_keys: not under pytest's private tmp dirs
    d = Path(tempfile.mkdtemp(prefix="spawntrace-sshlab-"))
    os.chmod(d, 0o755)
    _sh(f"ssh-keygen -q -t ed25519 -N '' -f {d}/client_key")
    _sh(f"ssh-keygen -q -t ed25519 -N '' -f {d}/host_key")
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    _sh("mkdir -p /run/sshd && chmod 0755 /run/sshd")
    tag = os.getpid() % 100000
    netns, veth, peer = f"rt{tag}n", f"rt{tag}v", f"rt{tag}p"
    net = f"10.214.{tag % 250}"
    addr = f"{net}.2"
    created = []
    sshd = None
    try:
        _sh(f"ip netns add {netns}")
        created.append(f"ip netns del {netns}")
        _sh(f"ip link add {veth} type veth peer name {peer} netns {netns}")
        created.insert(0, f"ip link del {veth}")
        _sh(f"ip addr add {net}.1/24 dev {veth} && ip link set {veth} up")
        _sh(f"ip -n {netns} addr add {addr}/24 dev {peer} && ip -n {netns} link set {peer} up && ip -n {netns} link set lo up")
        conf = d / "sshd.conf"
        conf.write_text(
            f"ListenAddress {addr}\nPort 22\nHostKey {d}/host_key\nPidFile none\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"AllowUsers {SSH_USER}\nSubsystem sftp internal-sftp\nMaxSessions 64\nMaxStartups 64\n"
            f"AllowStreamLocalForwarding yes\n"
        )
        log = open(d / "sshd.log", "wb")
        sshd = subprocess.Popen(
            ["ip", "netns", "exec", netns, "/usr/sbin/sshd", "-D", "-e", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=log
        )
        deadline = time.monotonic() + 15
        while True:
            ok = (
                subprocess.run(
                    [
                        "ssh",
                        "-F",
                        "/dev/null",
                        "-o",
                        "StrictHostKeyChecking=no",
                        "-o",
                        "UserKnownHostsFile=/dev/null",
                        "-o",
                        "IdentitiesOnly=yes",
                        "-i",
                        str(d / "client_key"),
                        "-o",
                        "BatchMode=yes",
                        "-o",
                        "ConnectTimeout=2",
                        f"{SSH_USER}@{addr}",
                        "true",
                    ],
                    capture_output=True,
                ).returncode
                == 0
            )
            if ok:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("sshd never accepted a login: " + (d / "sshd.log").read_text())
            time.sleep(0.1)
        yield SshHost("sshhost", addr, d / "client_key", d)
    finally:
        if sshd is not None:
            sshd.send_signal(signal.SIGTERM)
            try:
                sshd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                sshd.kill()
        # the per-connection sshd sessions (a ControlMaster's, an agent's) live on in the
        # namespace after the listener: end everything in it before deleting it
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for cmd in created:
            subprocess.run(["sh", "-c", cmd], capture_output=True)
        # the test user's agents (they also end on their own after the idle timeout)
        stop_agents(pwd.getpwnam(SSH_USER).pw_uid)
        shutil.rmtree(d, ignore_errors=True)
