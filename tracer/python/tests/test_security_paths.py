"""Shared-path security of the persistent agent (issue 9, item 1), written as the attacker: a real
unprivileged local user (made and removed here) plants files, directories, symlinks and sockets
in a shared base made like /tmp (root-owned, 01777, passed as SPAWNTRACE_AGENT_DIR) before root
runs; nothing of theirs may be executed, followed, written to or connected to, and a hostile agent
directory fails the task with a one-line message instead of being skipped."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.util
import io
import json
import marshal
import os
import pwd
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from playbook_runs import AGENT_DIR, CONNECTION_DIR, run_playbook
from runner_fixtures import SYSTEM_PYTHON as ATTACKER_PYTHON
from runner_fixtures import become_user, new_base, run_request, start_agent  # noqa: F401

PYTHON = sys.executable
PLAYBOOK = "- hosts: all\n  gather_facts: false\n  tasks:\n    - command: echo hi\n"


from spawntrace_agent import client, safe_paths  # noqa: E402


@pytest.fixture(scope="module")
def attacker():
    if os.getuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("needs root, useradd and runuser")
    name = "st-attacker-%d" % (os.getpid() % 100000)
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def as_attacker(user, *argv, check=True):
    p = subprocess.run(["runuser", "-u", user.pw_name, "--", *argv], cwd="/", capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError("as %s: %r failed: %s" % (user.pw_name, argv, p.stderr))
    return p


@dataclasses.dataclass
class Shared:
    base: Path  # root-owned 0755 (the test's own files: payloads, victims, markers)
    shared: Path  # root-owned 01777, like /tmp: SPAWNTRACE_AGENT_DIR


@pytest.fixture
def place():
    base = new_base("sec")
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    try:
        yield Shared(base, shared)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# An attacker's process that listens on a Unix socket and watches a directory it owns: whether
# anybody connected to it, and which names appeared there, until the stop file exists.
WATCHER = r"""
import json, os, socket, sys, time
d, sockpath, stop = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX)
s.bind(sockpath)
os.chmod(sockpath, 0o777)
s.listen(16)
s.setblocking(False)
before = set(os.listdir(d))
conns, seen = 0, set()
print("ready", flush=True)
while not os.path.exists(stop):
    try:
        c, _ = s.accept()
        conns += 1
        c.close()
    except BlockingIOError:
        pass
    seen |= set(os.listdir(d)) - before
    time.sleep(0.005)
print(json.dumps({"conns": conns, "new": sorted(seen)}), flush=True)
"""


class Watcher:
    def __init__(self, user, place, directory, sockpath):
        self.stop = place.base / ("stop-%d" % time.monotonic_ns())
        self.p = subprocess.Popen(
            ["runuser", "-u", user.pw_name, "--", ATTACKER_PYTHON, "-c", WATCHER, str(directory), str(sockpath), str(self.stop)],
            cwd="/",
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.p.stdout.readline().strip() == "ready"

    def result(self):
        self.stop.touch()
        try:
            out, _ = self.p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()  # (this test's own process, by its pid)
            raise
        return json.loads(out.strip().splitlines()[-1])


def persistent_run(tmp_path, place, playbook=PLAYBOOK, env=None, inventory=None):
    e = {"SPAWNTRACE_AGENT_DIR": str(place.shared)}
    e.update(env or {})
    return run_playbook(tmp_path / "run", playbook, mode="persistent", env=e, inventory=inventory)


def failed_msg(run):
    failed = [r for r in run.results if r["status"] == "failed"]
    assert run.returncode != 0 and len(failed) == 1, (run.returncode, run.results, run.stdout[-2000:], run.stderr[-2000:])
    return failed[0]["result"].get("msg", "")


# ---------------------------------------------------------------------------------------------
# 1. compiled code planted where the plugins' former loader looked for its cache (it is gone: the
# plugins import the agent's package from the run's private plugin directory)


def _loaded_files():
    """(module name, path) of the files the connection plugins import."""
    import ansible.plugins.connection as pkg

    package = os.path.join(os.path.dirname(os.path.realpath(CONNECTION_DIR / "local.py")), "..", "..", "agent", "spawntrace_agent")
    return [
        ("spawntrace_agent.client", os.path.join(package, "client.py")),
        ("spawntrace_agent.framing", os.path.join(package, "framing.py")),
        ("ansible.plugins.connection._spawntrace_builtin_local", os.path.join(os.path.dirname(pkg.__file__), "local.py")),
    ]


def test_planted_code_cache_is_never_run(tmp_path, place, attacker):
    marker = place.base / "markers" / "pwned"
    marker.parent.mkdir()
    payloads = place.base / "payloads"
    payloads.mkdir(mode=0o755)
    os.chmod(payloads, 0o755)
    planted = []
    for name, path in _loaded_files():
        with open(path, "rb") as f:
            source = f.read()
        evil = compile(source + b"\nopen(%r, 'a').write(%r)\n" % (str(marker), name), path, "exec", dont_inherit=True)
        # the cache file name the loader computes for this source and path
        tag = hashlib.sha1(source + importlib.util.MAGIC_NUMBER + path.encode("utf-8", "surrogateescape")).hexdigest()
        p = payloads / ("%s-%s.bin" % (name, tag))
        p.write_bytes(marshal.dumps(evil))
        os.chmod(p, 0o644)
        planted.append(p)
    # where the loader used to cache (the agent directory) and an attacker's XDG_CACHE_HOME
    targets = [place.shared / "spawntrace-0" / "code", place.shared / "cache" / "spawntrace" / "code"]
    for t in targets:
        as_attacker(attacker, "mkdir", "-p", "-m", "0777", str(t))
        as_attacker(attacker, "cp", *map(str, planted), str(t))
    run = persistent_run(tmp_path, place, env={"XDG_CACHE_HOME": str(place.shared / "cache")})
    assert not marker.exists(), "root ran the attacker's code: %s" % marker.read_text()
    # (the run itself fails: the attacker owns the agent directory, see below)
    assert "unsafe agent directory" in failed_msg(run)


# ---------------------------------------------------------------------------------------------
# 2. an agent directory the attacker made first


@pytest.mark.parametrize("mode", [0o777, 0o700])
def test_hostile_agent_dir_fails_the_task(tmp_path, place, attacker, mode):
    d = place.shared / "spawntrace-0"
    as_attacker(attacker, "mkdir", "-m", "%o" % mode, str(d))
    w = Watcher(attacker, place, d, d / "listen.sock")
    try:
        run = persistent_run(tmp_path, place)
    finally:
        seen = w.result()
    msg = failed_msg(run)
    assert ("spawntrace: unsafe agent directory %s: " % d) in msg and "\n" not in msg, msg
    assert "owner uid %d, mode %04o" % (attacker.pw_uid, mode) in msg and "SPAWNTRACE_AGENT_DIR" in msg, msg
    # nothing was created in it, nothing connected to the attacker's socket
    assert seen == {"conns": 0, "new": []}, seen


def test_hostile_become_agent_dir_fails_the_task(tmp_path, place, attacker, become_user):  # noqa: F811
    d = place.shared / ("spawntrace-%d" % become_user.pw_uid)
    as_attacker(attacker, "mkdir", "-m", "0700", str(d))
    playbook = (
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - command: id -u\n      become: true\n      become_user: %s\n"
        % become_user.pw_name
    )
    run = persistent_run(tmp_path, place, playbook=playbook)
    msg = failed_msg(run)
    assert ("spawntrace: unsafe agent directory %s: " % d) in msg and "owner uid %d" % attacker.pw_uid in msg, msg


def test_parent_not_sticky_fails_the_task(tmp_path, place, attacker):
    loose = place.base / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)  # world-writable, no sticky bit: anyone may rename our directory away
    run = persistent_run(tmp_path, place, env={"SPAWNTRACE_AGENT_DIR": str(loose)})
    msg = failed_msg(run)
    assert "its parent %s is a directory, owner uid 0, mode 0777" % loose in msg and "\n" not in msg, msg
    assert not (loose / "spawntrace-0").exists()


# ---------------------------------------------------------------------------------------------
# 3. symlinks at the names a root agent creates in another user's (valid) directory (the
#    directory of an unprivileged controller whose become user is root)


def _victim(place, name):
    v = place.base / "victims" / name
    v.parent.mkdir(exist_ok=True)
    os.chmod(v.parent, 0o755)
    v.write_bytes(b"orig\n")
    os.chmod(v, 0o644)
    return v


def _unchanged(v):
    st = os.lstat(v)
    return v.read_bytes() == b"orig\n" and st.st_uid == 0 and (st.st_mode & 0o7777) == 0o644


def _bootstrap(place, attacker, key, **extra):
    d = place.shared / ("spawntrace-%d" % attacker.pw_uid)
    cfg = {
        "socket": str(d / (key + ".sock")),
        "version": client.VERSION,
        "idle": 30,
        "key": key,
        "dir_owner": attacker.pw_uid,
        "client_uid": 0,
        "controller_pid": os.getpid(),
        "controller_start": client.proc_start(os.getpid()),
    }
    cfg.update(extra)
    return start_agent(cfg, python=PYTHON)[1], cfg


def _quit(cfg):
    try:
        client.Endpoint(cfg["socket"], 0).request({"op": "quit"})
    except (client.AgentUnavailable, client.AgentFailed):
        pass


@pytest.fixture
def user_dir(place, attacker):
    d = place.shared / ("spawntrace-%d" % attacker.pw_uid)
    as_attacker(attacker, "mkdir", "-m", "0700", str(d))
    return d


def test_symlinked_lock_is_not_followed(place, attacker, user_dir):
    victim = _victim(place, "lock")
    as_attacker(attacker, "ln", "-s", str(victim), str(user_dir / "k1.sock.lock"))
    ready, cfg = _bootstrap(place, attacker, "k1")
    try:
        assert (
            not ready["ok"]
            and ready["unsafe"]
            and ready["error"]
            == ("spawntrace: %s is a symlink; remove it or set SPAWNTRACE_AGENT_DIR to a private directory" % (user_dir / "k1.sock.lock"))
        ), ready
    finally:
        if ready.get("ok"):
            _quit(cfg)
    assert _unchanged(victim)


def test_symlinked_socket_is_not_connected_to(place, attacker, user_dir):
    theirs = place.shared / "theirs"
    as_attacker(attacker, "mkdir", "-m", "0755", str(theirs))
    w = Watcher(attacker, place, theirs, theirs / "l.sock")
    try:
        as_attacker(attacker, "ln", "-s", str(theirs / "l.sock"), str(user_dir / "k2.sock"))
        ready, cfg = _bootstrap(place, attacker, "k2")
    finally:
        seen = w.result()
    if ready.get("ok"):
        _quit(cfg)
    assert seen["conns"] == 0, "the agent's bootstrap connected to the attacker's socket"
    assert not ready["ok"] and ready["unsafe"] and "unsafe agent socket %s: a symlink" % (user_dir / "k2.sock") in ready["error"], ready


def test_symlinked_zips_and_log_are_not_written(place, attacker, user_dir):
    zip_victim, log_victim = _victim(place, "zip"), _victim(place, "log")
    as_attacker(attacker, "ln", "-s", str(log_victim), str(user_dir / "k3.sock.log"))
    ready, cfg = _bootstrap(place, attacker, "k3", log=True)
    assert ready["ok"], ready
    try:
        # the zygote (forked at the first module run) names its warm zip after its pid: the
        # attacker points every name of the pids likely next at the victim
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        names = " ".join("warm-%d.zip" % ((ready["pid"] + i) % pid_max) for i in range(1, 1500))
        as_attacker(
            attacker,
            ATTACKER_PYTHON,
            "-c",
            "import os,sys\nfor n in sys.argv[2].split(): os.symlink(sys.argv[1], os.path.join(sys.argv[3], n))",
            str(zip_victim),
            names,
            str(user_dir),
        )
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("spawntrace_sec_probe.py", "X = 1\n")
        payload = (
            "#!%s\n_ANSIBALLZ_WRAPPER = True\nZ = \"zip_data='%s'\"\nprint('ran')\n" % (PYTHON, base64.b64encode(buf.getvalue()).decode())
        ).encode()
        req = run_request(ansible_version="probe", warm=True, module="probe")
        resp, blob = client.Endpoint(cfg["socket"], 0).request(req, payload)
        assert resp["ok"] and blob[: resp["out"]] == b"ran\n", (resp, blob)
        children = Path("/proc/%d/task/%d/children" % (ready["pid"], ready["pid"])).read_text().split()
        assert children and all(0 < (int(c) - ready["pid"]) % pid_max < 1500 for c in children), children  # (the test's premise)
    finally:
        _quit(cfg)
    assert _unchanged(zip_victim) and _unchanged(log_victim)


def test_target_bootstrap_reports_one_line(place, attacker):
    """As on an ssh target (the socket's place computed there, dir_owner "self"): the READY line
    carries the refusal, which the plugin turns into the task's error (check_ready), not classic."""
    d = place.shared / "spawntrace-0"
    as_attacker(attacker, "mkdir", "-m", "0700", str(d))
    cfg = {
        "socket": None,
        "version": client.VERSION,
        "idle": 30,
        "key": "remote",
        "dir_owner": "self",
        "client_uid": "login",
        "become_method": "sudo",
        "dir_base": str(place.shared),
    }
    p, ready = start_agent(cfg, python=PYTHON)
    assert p.returncode == 1 and p.stdout.decode().count("\n") == 1 and ready["unsafe"], (p.stdout, p.stderr)
    assert ready["error"].startswith("spawntrace: unsafe agent directory %s: a directory, owner uid %d" % (d, attacker.pw_uid))
    with pytest.raises(client.UnsafeAgentDir) as e:
        client.check_ready(ready)
    assert str(e.value) == ready["error"] and isinstance(e.value, client.AnsibleError)
    assert os.listdir(d) == []


# ---------------------------------------------------------------------------------------------
# 4. private_dir itself


def test_private_dir_accepts_a_good_chain_and_makes_it_for_its_owner(place, attacker):
    fd, real = safe_paths.private_dir(str(place.shared / "mine"), 0)
    os.close(fd)
    st = os.lstat(real)
    assert real == str(place.shared / "mine") and st.st_uid == 0 and (st.st_mode & 0o777) == 0o700
    fd, _ = safe_paths.private_dir(real, 0)  # an existing one is fine
    os.close(fd)
    # root making one for another user: created 0700 and handed over by fd
    fd, real = safe_paths.private_dir(str(place.shared / "theirs"), attacker.pw_uid)
    os.close(fd)
    st = os.lstat(real)
    assert st.st_uid == attacker.pw_uid and (st.st_mode & 0o777) == 0o700


def _refused(path, owner):
    with pytest.raises(safe_paths.UnsafePath) as e:
        safe_paths.private_dir(str(path), owner)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("spawntrace: unsafe agent directory ") and "SPAWNTRACE_AGENT_DIR" in msg, msg
    return msg


def test_private_dir_refusals(place, attacker):
    real = place.shared / "real"
    real.mkdir(mode=0o700)
    link = place.shared / "link"
    link.symlink_to(real)
    assert "%s: a symlink, owner uid 0" % link in _refused(link, 0)
    as_attacker(attacker, "mkdir", "-m", "0700", str(place.shared / "planted"))
    assert "a directory, owner uid %d, mode 0700 (must be a directory of uid 0, mode 0700)" % attacker.pw_uid in _refused(
        place.shared / "planted", 0
    )
    for mode in (0o770, 0o755, 0o701, 0o1777):
        d = place.shared / ("mode-%o" % mode)
        d.mkdir()
        os.chmod(d, mode)
        assert "owner uid 0, mode %04o" % mode in _refused(d, 0)
        assert os.lstat(d).st_mode & 0o7777 == mode  # never repaired
    f = place.shared / "file"
    f.write_text("")
    assert "a file" in _refused(f, 0)
    loose = place.base / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    assert "its parent %s is a directory, owner uid 0, mode 0777" % loose in _refused(loose / "x", 0)
    assert not (loose / "x").exists()
    theirs = place.shared / "theirs"
    as_attacker(attacker, "mkdir", "-m", "0755", str(theirs))
    assert "its parent %s is a directory, owner uid %d" % (theirs, attacker.pw_uid) in _refused(theirs / "x", 0)
    # a parent reached through a symlink is checked where it leads
    as_attacker(attacker, "ln", "-s", str(theirs), str(place.shared / "via"))
    assert "its parent %s" % theirs in _refused(place.shared / "via" / "x", 0)


def test_persistent_run_still_works_in_a_shared_base(tmp_path, place):
    run = persistent_run(tmp_path, place)
    assert run.returncode == 0 and [r["status"] for r in run.results] == ["ok"], (run.stdout, run.stderr)
    d = place.shared / "spawntrace-0"
    st = os.lstat(d)
    assert st.st_uid == 0 and (st.st_mode & 0o777) == 0o700
    socks = [p for p in d.iterdir() if p.name.endswith(".sock")]
    assert socks and all((os.lstat(p).st_mode & 0o777) == 0o600 for p in socks)
    # the agent ends with the playbook
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(p.exists() for p in socks):
        time.sleep(0.1)
    assert not any(p.exists() for p in socks)


def test_an_agent_imports_nothing_from_the_directory_it_starts_in(tmp_path, place, attacker):
    """Root runs a playbook (become root, an agent through sudo) from a directory the attacker can
    write to: the hashlib.py and zlib.py the attacker left there are never imported by the
    agent's first stage (`python -c` puts the working directory first on sys.path)."""
    run_dir = place.base / "attackers-project"
    run_dir.mkdir()
    os.chown(run_dir, attacker.pw_uid, -1)
    marker = place.shared / "imported-by"
    for name in ("hashlib", "zlib"):
        code = f"import os\nopen({str(marker)!r}, 'a').write('%d {name}\\n' % os.getuid())\n"
        p = subprocess.run(
            ["runuser", "-u", attacker.pw_name, "--", "sh", "-c", f"cat > {run_dir}/{name}.py"], input=code, text=True, cwd="/"
        )
        assert p.returncode == 0
    playbook = "- hosts: all\n  gather_facts: false\n  tasks:\n    - command: id -un\n      become: true\n"
    run = run_playbook(run_dir, playbook, mode="persistent", env={"SPAWNTRACE_AGENT_DIR": str(place.shared)}, agent_timing=True)
    assert run.returncode == 0, run.stdout[-2000:]
    assert run.timing, "the module ran through an agent"
    assert not marker.exists(), marker.read_text()


def test_a_become_agent_serves_only_the_user_the_become_tool_names(become_user):  # noqa: F811
    """Which uid a become agent hands its socket to (bootstrap._uid_of "login"): what sudo or doas
    itself sets, su's calling process, never a variable the environment merely carries; a named
    remote user that disagrees fails closed (the agent's own uid)."""
    import spawntrace_agent.bootstrap as b

    me = os.getuid()
    other = become_user.pw_uid
    env = dict(os.environ)
    try:
        os.environ["SUDO_UID"] = str(other)
        os.environ["DOAS_USER"] = become_user.pw_name
        assert b._uid_of("login", {"become_method": "sudo"}) == other
        assert b._uid_of("login", {"become_method": "doas"}) == other
        assert b._uid_of("login", {"become_method": "sudo", "login_user": become_user.pw_name}) == other
        assert b._uid_of("login", {"become_method": "sudo", "login_user": "root"}) == me, "a remote user that disagrees"
        # su sets neither variable: inherited ones do not count (this process's ancestors are ours)
        assert b._uid_of("login", {"become_method": "su"}) == me
        assert b._uid_of("login", {"become_method": "pbrun"}) == me
    finally:
        os.environ.clear()
        os.environ.update(env)
    # su's caller: the nearest ancestor of another real uid (root, for a process run as the user)
    import tempfile

    code = "import sys; sys.path.insert(0, sys.argv[1]); import spawntrace_agent.bootstrap as b; print(b._caller_uid())"
    readable = tempfile.mkdtemp(dir="/var/tmp")  # the package where the user can read it
    try:
        os.chmod(readable, 0o755)
        shutil.copytree(AGENT_DIR / "spawntrace_agent", Path(readable) / "spawntrace_agent", ignore=shutil.ignore_patterns("__pycache__"))
        p = subprocess.run(
            ["runuser", "-u", become_user.pw_name, "--", ATTACKER_PYTHON, "-B", "-c", code, readable],
            capture_output=True,
            text=True,
            cwd="/",
        )
    finally:
        shutil.rmtree(readable)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(me)


def test_root_reads_a_placed_payload_only_as_a_regular_file_of_its_owner(place, attacker):
    """The first stage root runs for su or doas that prompt (client.place_payload) reads the
    payload from a file in the login user's directory, which that user may swap before root
    reads it: a FIFO (root would block), a symlink to a file of root's, a file of another owner
    or with a second link are refused at once, nothing read (nor opened but by O_PATH); the
    login user's own file passes the check."""
    home = place.base / "login-user-dir"
    home.mkdir()
    os.chown(home, attacker.pw_uid, -1)
    os.chmod(home, 0o700)
    payload = client.PAYLOAD
    n = len(payload.body)
    path = home / "payload-test"

    def first_stage():
        argv = payload.argv(ATTACKER_PYTHON, "{}", (str(path), attacker.pw_uid))
        return subprocess.run(argv, capture_output=True, timeout=30, cwd="/", stdin=subprocess.DEVNULL)

    cases = {
        "fifo": ["mkfifo", str(path)],
        "symlink": ["ln", "-s", "/etc/hostname", str(path)],
        "hard link": ["sh", "-c", f"cat > {home}/real && ln {home}/real {path}"],  # the payload on stdin
    }
    for what, argv in cases.items():
        for f in home.iterdir():
            f.unlink()
        subprocess.run(["runuser", "-u", attacker.pw_name, "--", *argv], input=payload.body, cwd="/", check=True)
        p = first_stage()
        assert p.returncode != 0, what
        # nothing read (O_PATH|O_NOFOLLOW gives the symlink itself: not a regular file)
        assert b"0 of %d bytes, or corrupt" % n in p.stdout, (what, p.stdout, p.stderr)
    # a regular file of root's (not the login user's), then the login user's own
    for f in home.iterdir():
        f.unlink()
    path.write_bytes(payload.body)
    p = first_stage()
    assert b"0 of %d bytes, or corrupt" % n in p.stdout, p.stdout
    os.chown(path, attacker.pw_uid, -1)
    p = first_stage()
    assert b"or corrupt" not in p.stdout, p.stdout
