"""The persistent agent's protocol and ops, against a real agent process (no mocks): framing,
native shell housekeeping compared with /bin/sh running the very commands ansible-core's shell
plugin builds, command recognition, module runs, security checks and the agent's lifecycle."""

from __future__ import annotations

import base64
import errno
import json
import os
import pwd
import shlex
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from ansible.errors import AnsibleConnectionFailure

from runner_fixtures import BECOME_USER, become_user, ensure_user, run_request, start_agent, start_local_agent  # noqa: F401
from runner_fixtures import SYSTEM_PYTHON as PYTHON
from spawntrace_agent import ansiballz, client, framing, memory, safe_paths, shell_ops, wire  # noqa: E402,F401


def sh(cmd, env=None):
    """Runs a command the way the local connection does: /bin/sh -c."""
    p = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, env=env)
    return p.returncode, p.stdout, p.stderr


def shell_plugin():
    from ansible.plugins.loader import shell_loader

    shell = shell_loader.get("sh")
    shell.set_options()
    return shell


# ---------------------------------------------------------------------------------------------
# framing


def test_frames_round_trip():
    import threading

    a, b = socket.socketpair()
    big = os.urandom(3 * framing.BIG + 7)

    def writer():
        framing.send_frame(a, {"op": "x", "n": 1, "s": "é"}, big)
        framing.send_frame(a, {"op": "y"})

    t = threading.Thread(target=writer)
    t.start()
    assert framing.recv_frame(b) == ({"op": "x", "n": 1, "s": "é"}, big)
    assert framing.recv_frame(b) == ({"op": "y"}, b"")
    t.join()
    a.close()
    with pytest.raises(framing.ProtocolError):
        framing.recv_frame(b)


def test_incremental_reader():
    a, b = socket.socketpair()
    framing.send_frame(a, {"k": "v"}, b"blob")
    data = b.recv(1000)
    r = framing.FrameReader()
    for i in range(len(data)):
        assert r.frame() is None
        r.feed(data[i : i + 1])
    assert r.frame() == ({"k": "v"}, b"blob")


# ---------------------------------------------------------------------------------------------
# native ops == the shell commands they replace


def same_as_shell(cmd, res):
    rc, out, err = sh(cmd)
    assert res is not None, cmd
    assert (res[0], res[1]) == (rc, out), (cmd, res, (rc, out, err))
    assert bool(res[2]) == bool(err), (cmd, res[2], err)


def test_expand_user_matches_shell(tmp_path):
    shell = shell_plugin()
    rec = client.Recorder()
    rec.wrap_shell(shell)
    me = pwd.getpwuid(os.getuid()).pw_name
    for word, username in (("~", ""), ("~", me), ("~root", ""), ("~nosuchuser-xyz", ""), ("/abs/path", "")):
        cmd = shell.expand_user(word, username=username)
        op, args, become = rec.plan(cmd, None, False)
        assert op == "expand_user" and not become
        same_as_shell(cmd, shell_ops.run_op(op, args, os.environ))


def test_mkdtemp_matches_shell(tmp_path):
    shell = shell_plugin()
    rec = client.Recorder()
    rec.wrap_shell(shell)
    for i, tmpdir in enumerate((str(tmp_path / "a/b/c"), str(tmp_path / "a/b/c"), str(tmp_path / "file/x"))):
        if i == 2:
            (tmp_path / "file").write_text("")  # a file in the way: mkdir -p fails
        base = "ansible-tmp-%d" % i
        cmd = shell.mkdtemp(basefile=base, tmpdir=tmpdir)
        op, args, _ = rec.plan(cmd, None, False)
        assert op == "mkdtemp"
        res = shell_ops.run_op(op, args, os.environ)
        created = Path(tmpdir, base)
        if res[0] == 0:
            assert res[1] == ("%s=%s\n" % (base, created)).encode()
            assert stat.S_IMODE(created.stat().st_mode) == 0o700
            mode_ours = stat.S_IMODE(Path(tmpdir).stat().st_mode)
            created.rmdir()
            # the shell gives the same output and modes
            same_as_shell(cmd, (0, res[1], b""))
            assert stat.S_IMODE(created.stat().st_mode) == 0o700
            assert stat.S_IMODE(Path(tmpdir).stat().st_mode) == mode_ours
            created.rmdir()
        else:
            rc, out, err = sh(cmd)
            assert (res[0], res[1]) == (rc, out) and rc != 0 and err and res[2]


@pytest.mark.parametrize("mode", ["u+rwx", "u+x", "a+rX", "a+rx", "g+rwx", "g+rw", "go-rwx", "u=rw,go=r", "a+X", "o-r"])
def test_chmod_matches_shell(tmp_path, mode):
    shell = shell_plugin()
    rec = client.Recorder()
    rec.wrap_shell(shell)
    for kind in ("file", "exe", "dir"):
        for which in ("ours", "shell"):
            p = tmp_path / which / kind
            p.parent.mkdir(exist_ok=True)
            if kind == "dir":
                p.mkdir()
                os.chmod(p, 0o700)
            else:
                p.write_text("x")
                os.chmod(p, 0o744 if kind == "exe" else 0o640)
        cmd = shell.chmod([str(tmp_path / "ours" / kind), str(tmp_path / "ours" / "missing")], mode)
        op, args, _ = rec.plan(cmd, None, False)
        assert op == "chmod"
        res = shell_ops.run_op(op, args, os.environ)
        rc, out, err = sh(shell.chmod([str(tmp_path / "shell" / kind), str(tmp_path / "shell" / "missing")], mode))
        assert (res[0], res[1]) == (rc, out) == (1, b"")
        assert res[2] and err
        assert stat.S_IMODE((tmp_path / "ours" / kind).stat().st_mode) == stat.S_IMODE((tmp_path / "shell" / kind).stat().st_mode), (
            kind,
            mode,
        )


def test_unhandled_chmod_modes_are_not_recorded():
    shell = shell_plugin()
    rec = client.Recorder()
    rec.wrap_shell(shell)
    for mode in ("+a", "A+user:x:rx:allow", "u+s", "0755", "g=u"):
        assert rec.plan(shell.chmod(["/tmp/x"], mode), None, False) is None


def test_rm_and_exists_match_shell(tmp_path):
    shell = shell_plugin()
    rec = client.Recorder()
    rec.wrap_shell(shell)
    for which in ("ours", "shell"):
        d = tmp_path / which
        (d / "sub/deeper").mkdir(parents=True)
        (d / "sub/deeper/f").write_text("x")
        (d / "file").write_text("x")
    for name, recurse in (("sub", True), ("file", False), ("missing", True)):
        for which in ("ours", "shell"):
            path = str(tmp_path / which / name)
            e_cmd = shell.exists(path)
            op, args, _ = rec.plan(e_cmd, None, False)
            assert op == "exists"
            if which == "ours":
                exists = shell_ops.run_op(op, args, os.environ)
            else:
                same_as_shell(e_cmd, exists)
            cmd = shell.remove(path, recurse=recurse)
            op, args, _ = rec.plan(cmd, None, False)
            assert op == "rm"
            if which == "ours":
                res = shell_ops.run_op(op, args, os.environ)
            else:
                same_as_shell(cmd, res)
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "shell")) == []


def test_plan_unwraps_executable_sleep_and_become():
    from ansible.plugins.loader import become_loader

    shell = shell_plugin()
    rec = client.Recorder()
    rec.wrap_shell(shell)
    sudo = become_loader.get("sudo")
    sudo.set_options(direct={"become_user": "someone"})
    rec.wrap_become(sudo)
    env = shell.env_prefix(FOO="a b", BAR="x'y")
    mod = shell.build_module_command(env, "#!/usr/bin/python3", "")
    assert rec.plan(mod, None, True) == (
        "module",
        {"env": {"FOO": "a b", "BAR": "x'y"}, "interpreter": "/usr/bin/python3", "path": None},
        False,
    )
    wrapped = "/bin/sh -c " + shlex.quote(mod)
    assert rec.plan(wrapped, "/bin/sh", True)[0] == "module"
    assert rec.plan("/bin/sh -c " + shlex.quote(mod + " && sleep 0"), "/bin/sh", True)[0] == "module"
    become = sudo.build_become_command(mod, shell)
    op, args, b = rec.plan("/bin/sh -c " + shlex.quote(become), "/bin/sh", True)
    assert (op, b) == ("module", True)
    assert rec.plan("/bin/sh -c " + shlex.quote(become), "/bin/sh", False) is None  # not sudoable
    # not recognised: classic path
    for cmd in ("/bin/sh -c 'echo hi'", "/bin/sh -c " + shlex.quote(mod) + " ; true", mod, "/bin/bash -c " + shlex.quote(mod)):
        assert rec.plan(cmd, "/bin/sh", True) is None, cmd
    # file-based runs, old-style modules (args file), odd interpreters
    assert (
        rec.plan(shell.build_module_command("", "#!/usr/bin/python3", "/tmp/t/AnsiballZ_x.py"), None, True)[1]["path"]
        == "/tmp/t/AnsiballZ_x.py"
    )
    assert rec.plan(shell.build_module_command("", "#!/usr/bin/python3", "/tmp/t/x", arg_path="/tmp/t/args"), None, True) is None
    assert rec.plan(shell.build_module_command("", "#!/usr/bin/env python3", ""), None, True) is None
    unknown_env = shell.build_module_command("X=1", "#!/usr/bin/python3", "")
    assert rec.plan(unknown_env, None, True) is None


def test_split_payload():
    head = b"#!/usr/bin/python3\nX = 1\ndef _ansiballz_main(zip_data, **kw):\n    print(len(zip_data))\n"
    tail = b"\nif __name__ == \"__main__\":\n    _ansiballz_main(\nzip_data='QUJD',\nparams='x',\n)\n"
    parts = ansiballz.split_payload(head + tail)
    assert parts[0] == head and parts[2] == b"QUJD" and b"__spawntrace_zip_data" in parts[1]
    assert ansiballz.split_payload(head) is None
    assert ansiballz.split_payload(head + tail.replace(b"QUJD", b"QU\\nJD")) is None
    stripped, data = ansiballz.strip_payload(head + tail)
    assert data == b"QUJD" and b"QUJD" not in stripped and ansiballz.unstrip_payload(stripped, data) == head + tail
    assert ansiballz.strip_payload(stripped) is None


# ---------------------------------------------------------------------------------------------
# a real agent


def payload_for(src: str) -> bytes:
    """A minimal payload shaped like an AnsiballZ wrapper (no zip: not warmed)."""
    return ("#!%s\n_ANSIBALLZ_WRAPPER = True\n%s\n" % (PYTHON, src)).encode()


@pytest.fixture
def running_agent(tmp_path):
    cfg, pid = start_local_agent(tmp_path, "test")
    ep = client.Endpoint(cfg["socket"], os.getuid())
    yield ep, pid, cfg
    try:
        ep.request({"op": "quit"})
    except (client.AgentUnavailable, client.AgentFailed):
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)


def test_payload_over_128_kib_goes_on_stdin(tmp_path):
    """The agent's payload travels on stdin behind a first stage of a few hundred bytes: one of
    over 128 KiB (MAX_ARG_STRLEN, the most a single argument may hold) starts an agent, whereas
    as one argument, as `python -c <source>` used to pass it, it cannot even be executed."""
    sources = wire.package_sources()
    # incompressible: the compressed body is over the limit too
    sources["spawntrace_agent.padding"] = (False, "PADDING = %r\n" % base64.b64encode(os.urandom(192 * 1024)).decode())
    payload = wire.Payload(sources)
    assert len(payload.body) > 128 * 1024 and payload.version != client.VERSION
    with pytest.raises(OSError) as e:
        subprocess.run([PYTHON, "-c", payload.program.decode()], capture_output=True)
    assert e.value.errno == errno.E2BIG
    d = tmp_path / "agents"
    d.mkdir(mode=0o700)
    cfg = {"socket": str(d / "big.sock"), "version": payload.version, "idle": 5, "key": "big", "dir_owner": os.getuid()}
    argv = payload.argv(PYTHON, json.dumps(cfg))
    assert len(argv[2]) < 1024, argv[2]
    p, ready = start_agent(cfg, payload=payload)
    assert p.returncode == 0 and ready["ok"], (p.stdout, p.stderr)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(cfg["socket"])
        framing.send_frame(s, {"op": "exists", "args": {"path": str(d)}, "env": None})
        hello, _ = framing.recv_frame(s)
        resp, _ = framing.recv_frame(s)
        assert hello["version"] == payload.version and resp["ok"] and resp["rc"] == 0, (hello, resp)
        s.close()
    finally:
        os.kill(ready["pid"], signal.SIGTERM)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_payload_is_refused_with_one_line(tmp_path, damage):
    d = tmp_path / "agents"
    d.mkdir(mode=0o700)
    cfg = {"socket": str(d / "x.sock"), "version": client.VERSION, "idle": 5, "key": "x", "dir_owner": os.getuid()}
    body = client.PAYLOAD.body
    body = body[:-100] if damage == "truncated" else body[:-100] + bytes(100)
    p, ready = start_agent(cfg, body=body)
    assert p.returncode == 1 and not ready["ok"] and "spawntrace agent payload" in ready["error"], (p.stdout, p.stderr)
    assert not (d / "x.sock").exists()


def run(ep, src, **req):
    resp, blob = ep.request(run_request(**req), payload_for(src))
    assert resp["ok"], resp
    return resp["rc"], blob[: resp["out"]], blob[resp["out"] :]


def test_agent_ping_and_bootstrap_reuse(running_agent):
    ep, pid, cfg = running_agent
    resp, _ = ep.request({"op": "ping"})
    assert resp["ok"] and resp["pid"] == pid and resp["version"] == client.VERSION
    _, again = start_agent(cfg)
    assert again == {"ok": True, "pid": pid, "reused": True, "socket": cfg["socket"], "reporting": False}
    st = os.stat(cfg["socket"])
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_ISSOCK(st.st_mode)


def test_runs_output_rc_env_cwd_umask(running_agent, tmp_path):
    ep, pid, _ = running_agent
    rc, out, err = run(ep, "import os,sys; print('out'); print('err', file=sys.stderr); sys.exit(3)")
    assert (rc, out, err) == (3, b"out\n", b"err\n")
    rc, out, _ = run(
        ep,
        "import os; print(os.environ['FOO'], os.environ['BAR'], os.getcwd(), oct(os.umask(0)))",
        env={"PATH": "/usr/bin:/bin", "BAR": "base"},
        assign={"FOO": "a b"},
        cwd=str(tmp_path),
        umask=0o027,
    )
    assert out.decode().split() == ["a", "b", "base", str(tmp_path), "0o27"]
    rc, out, _ = run(ep, "import os; print(sorted(os.environ))", env={"ONLY": "1"}, assign={})
    assert eval(out) == ["ONLY"]
    # an exception: traceback on stderr, rc 1
    rc, out, err = run(ep, "raise ValueError('boom')")
    assert rc == 1 and b"ValueError: boom" in err
    # stdin is empty, argv like `python` reading a script from stdin
    rc, out, _ = run(ep, "import sys; print(repr(sys.stdin.read()), sys.argv)")
    assert out == b"'' ['']\n"
    # a runner is a child of the agent's zygote, not the agent
    rc, out, _ = run(ep, "import os; print(os.getpid(), os.getppid())")
    rpid, ppid = map(int, out.split())
    assert rpid != pid and ppid != pid
    # killed by a signal: 128 + signal number, like sh
    rc, out, err = run(ep, "import os, signal; print('x', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    assert rc == 128 + signal.SIGKILL and out == b"x\n"
    # os._exit without flushing: rc kept
    rc, out, err = run(ep, "import os; os._exit(7)")
    assert rc == 7
    # atexit handlers of the module run, and their output is kept
    rc, out, _ = run(ep, "import atexit; atexit.register(print, 'bye'); print('hi')")
    assert (rc, out) == (0, b"hi\nbye\n")
    # modules are isolated: nothing stays behind in the agent
    run(ep, "import os; os.environ['LEAK'] = '1'; import sys; sys.modules['leak'] = sys")
    rc, out, _ = run(ep, "import os, sys; print('LEAK' in os.environ, 'leak' in sys.modules)")
    assert out == b"False False\n"


def test_file_based_run(running_agent, tmp_path):
    ep, _, _ = running_agent
    script = tmp_path / "AnsiballZ_t.py"
    script.write_bytes(payload_for("import sys; print(sys.argv, __file__)"))
    resp, blob = ep.request(run_request(path=str(script)))
    assert resp["rc"] == 0 and blob[: resp["out"]] == ("%r %s\n" % ([str(script)], script)).encode()


def test_concurrent_runs(running_agent):
    import threading

    ep, _, _ = running_agent
    results = []

    def one(i):
        results.append((i, run(ep, "import time; time.sleep(0.5); print(%d)" % i)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(i, (0, b"%d\n" % i, b"")) for i in range(4)]
    assert time.monotonic() - start < 1.9  # ran side by side


def test_ops_and_files_through_agent(running_agent, tmp_path):
    ep, _, _ = running_agent
    target = tmp_path / "put.bin"
    data = os.urandom(300_000)
    resp, _ = ep.request({"op": "put", "path": str(target)}, data)
    assert resp["ok"] and target.read_bytes() == data
    resp, blob = ep.request({"op": "fetch", "path": str(target)})
    assert resp["ok"] and blob == data
    resp, _ = ep.request({"op": "fetch", "path": str(tmp_path / "missing")})
    assert not resp["ok"] and resp["errno"] == 2
    resp, blob = ep.request({"op": "exists", "args": {"path": str(target)}, "env": None})
    assert resp["rc"] == 0
    with pytest.raises(client.AgentUnavailable):
        ep.request({"op": "chmod", "args": {"mode": "+a", "paths": ["/x"]}, "env": None})


def test_a_loops_zip_is_sent_once(running_agent):
    import base64
    import hashlib

    ep, _, _ = running_agent
    zip_text = base64.b64encode(os.urandom(30000))
    payload = (
        "#!%s\n_ANSIBALLZ_WRAPPER = True\ndef _ansiballz_main(zip_data, params):\n"
        "    import base64, hashlib\n"
        "    print(hashlib.sha1(base64.b64decode(zip_data)).hexdigest(), params)\n" % PYTHON
    ).encode()
    payload += b'\nif __name__ == "__main__":\n    _ansiballz_main(\nzip_data=\'' + zip_text + b"',\nparams='p',\n)\n"
    stripped, data = ansiballz.strip_payload(payload)
    req = run_request(zip_sha=hashlib.sha1(data).hexdigest())
    want = ("%s p\n" % hashlib.sha1(base64.b64decode(zip_text)).hexdigest()).encode()
    resp, _ = ep.request(dict(req, stripped=True), stripped)
    assert resp == {"ok": False, "need_zip": True}
    resp, blob = ep.request(dict(req), payload)
    assert resp["ok"] and blob[: resp["out"]] == want
    resp, blob = ep.request(dict(req, stripped=True), stripped)
    assert resp["ok"] and blob[: resp["out"]] == want
    # a zip sent under another zip's name is not kept under it
    resp, _ = ep.request(dict(req, zip_sha="0" * 40), payload)
    assert resp["ok"]
    resp, _ = ep.request(dict(req, zip_sha="0" * 40, stripped=True), stripped)
    assert resp == {"ok": False, "need_zip": True}


def test_version_mismatch_refused(running_agent):
    ep, _, _ = running_agent
    s = ep.connect()
    framing.send_frame(s, {"op": "run", "version": "0-other", "env": {}, "assign": {}}, payload_for("print(1)"))
    hello, _ = framing.recv_frame(s)
    resp, _ = framing.recv_frame(s)
    assert hello["version"] == client.VERSION and resp == {"ok": False, "unsupported": True, "error": "agent version %s" % client.VERSION}


def test_peer_uid_checked(become_user):  # noqa: F811
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="spawntrace-peer-"))
    os.chmod(base, 0o755)
    try:
        d = base / "agents"
        d.mkdir(mode=0o700)
        path = str(d / "a.sock")
        cfg = {"socket": path, "version": client.VERSION, "idle": 30, "key": "peer", "dir_owner": os.getuid()}
        assert start_agent(cfg)[1]["ok"]
        code = (
            "import socket,sys\ns=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "try:\n    s.sendall(b'x'*8); print(repr(s.recv(100)))\nexcept OSError:\n    print('closed')"
        )

        def as_other():
            return subprocess.run(["sudo", "-u", BECOME_USER, PYTHON, "-c", code, path], capture_output=True, timeout=30)

        # another user cannot reach the socket (0700 directory, 0600 socket) ...
        p = as_other()
        assert b"PermissionError" in p.stderr, (p.stdout, p.stderr)
        # ... and even with access to it, the agent drops peers of another uid (SO_PEERCRED)
        os.chmod(d, 0o755)
        os.chmod(path, 0o666)
        p = as_other()
        assert p.stdout.strip() in (b"b''", b"closed"), (p.stdout, p.stderr)
        # the client refuses an agent whose socket belongs to someone else
        with pytest.raises(client.AgentUnavailable):
            client.Endpoint(path, become_user.pw_uid).request({"op": "ping"})
        client.Endpoint(path, os.getuid()).request({"op": "quit"})
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_idle_timeout_and_controller_liveness(tmp_path):
    d = tmp_path / "agents"
    d.mkdir(mode=0o700)
    controller = subprocess.Popen(["sleep", "60"])
    try:
        agents = {}
        for name, idle, ctl in (("idle", 1, None), ("ctl", 60, controller.pid)):
            cfg = {
                "socket": str(d / (name + ".sock")),
                "version": client.VERSION,
                "idle": idle,
                "key": name,
                "dir_owner": os.getuid(),
                "controller_pid": ctl,
                "controller_start": client.proc_start(ctl) if ctl else None,
            }
            agents[name] = (start_agent(cfg)[1]["pid"], cfg["socket"])
        time.sleep(3)
        assert not os.path.exists("/proc/%d" % agents["idle"][0]) and not os.path.exists(agents["idle"][1])
        assert os.path.exists("/proc/%d" % agents["ctl"][0])
        controller.kill()
        controller.wait()
        deadline = time.monotonic() + 5
        while os.path.exists("/proc/%d" % agents["ctl"][0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists("/proc/%d" % agents["ctl"][0]) and not os.path.exists(agents["ctl"][1])
    finally:
        controller.kill()


def test_connections_are_kept_and_replaced_when_the_agent_is_gone(tmp_path):
    d = tmp_path / "agents"
    d.mkdir(mode=0o700)
    cfg = {"socket": str(d / "k.sock"), "version": client.VERSION, "idle": 1, "key": "k", "dir_owner": os.getuid()}

    def start():
        return start_agent(cfg)[1]["pid"]

    pid = start()
    ep = client.Endpoint(cfg["socket"], os.getuid())
    first = ep.request({"op": "ping"})[0]
    assert run(ep, "print('kept')")[1] == b"kept\n"
    again = ep.request({"op": "ping"})[0]
    # one connection for all three requests of this process
    assert (first["pid"], first["accepted"]) == (pid, 1) and (again["accepted"], again["served"]) == (1, 3)
    # a connection kept between requests does not keep an idle agent alive
    deadline = time.monotonic() + 10
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists("/proc/%d" % pid)
    with pytest.raises(client.AgentUnavailable):
        ep.request({"op": "ping"})
    # the next agent on that socket is reached through a new connection
    pid2 = start()
    assert pid2 != pid
    ep.request({"op": "ping"})
    s = client._proc_state()["socks"][cfg["socket"]]
    s.shutdown(socket.SHUT_RDWR)  # the kept connection broken: replaced, the request runs once
    resp = ep.request({"op": "ping"})[0]
    assert (resp["pid"], resp["accepted"], resp["served"]) == (pid2, 2, 2)
    ep.request({"op": "quit"})


def test_stale_socket_replaced(tmp_path):
    d = tmp_path / "agents"
    d.mkdir(mode=0o700)
    path = d / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on
    cfg = {"socket": str(path), "version": client.VERSION, "idle": 2, "key": "s", "dir_owner": os.getuid()}
    _, ready = start_agent(cfg)
    assert ready["ok"] and not ready["reused"]
    assert client.Endpoint(str(path), os.getuid()).request({"op": "ping"})[0]["pid"] == ready["pid"]


def test_private_directory_checks(tmp_path):
    d = tmp_path / "notmine"
    d.mkdir(mode=0o755)
    ensure_user(BECOME_USER)
    os.chown(d, pwd.getpwnam(BECOME_USER).pw_uid, -1)
    cfg = {"socket": str(d / "x.sock"), "version": client.VERSION, "key": "x", "dir_owner": os.getuid()}
    p, ready = start_agent(cfg)
    assert p.returncode == 1 and not ready["ok"] and ready["unsafe"] and "must be a directory of uid %d" % os.getuid() in ready["error"]
    # a directory of ours with loose permissions is refused too, never repaired
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    cfg.update(socket=str(loose / "x.sock"))
    p, ready = start_agent(cfg)
    assert p.returncode == 1 and ready["unsafe"] and "mode 0777" in ready["error"], ready
    assert stat.S_IMODE(loose.stat().st_mode) == 0o777 and not (loose / "x.sock").exists()


def test_sweep_removes_only_dead_controllers_run_files(tmp_path, monkeypatch):
    p = subprocess.Popen(["true"])  # a pid that has surely exited
    p.wait()
    gone, alive = p.pid, os.getpid()
    h = "0123456789abcdef01234567"
    names = {
        f"f-{gone}-{h}.sock": False,
        f"d-{gone}-{h}": False,
        f"d-{gone}-{h}.4242": False,
        f"{gone}-{h}.start.lock": False,
        f"f-{alive}-{h}.sock": True,
        f"{alive}-{h}.start.lock": True,
        f"{h}.sock": True,  # a local agent's socket: the agent removes it itself
        "unrelated": True,
    }
    for n in names:
        (tmp_path / n).write_text("")
    client.sweep_stale(str(tmp_path))
    assert {n for n in names if (tmp_path / n).exists()} == {n for n, keep in names.items() if keep}


def test_hot_heap_pages_are_learnt_from_runners():
    import ctypes

    buf = bytearray(64 * 1024)  # malloc'd: on the heap (below the mmap threshold)
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    heap = memory._heap_ranges()
    if not any(lo <= addr < hi for lo, hi in heap):
        pytest.skip("the test buffer is not on the [heap] here")
    hot = memory.HotPages()
    assert hot.ranges() == []
    pid = os.fork()
    if pid == 0:
        try:
            for i in range(0, len(buf), 4096):
                buf[i] = 1  # copy on write: these pages are now this process's own
            hot.learn()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    ranges = hot.ranges()
    first, last = (addr + 4095) // 4096 * 4096, (addr + len(buf)) // 4096 * 4096 - 4096
    for page in (first, last):
        assert any(lo <= page < lo + n for lo, n in ranges), (hex(page), [(hex(lo), n) for lo, n in ranges])
    # a later runner copies them before it runs (and the process is not harmed by it)
    memory.prefault(hot)


def test_deferred_housekeeping_is_done_first_in_order_or_waits_again(tmp_path):
    """Housekeeping a client deferred (client.defer) goes ahead of its next request to that agent,
    in order (an upload, then a chmod of it, then the request sees both); a request that reached
    no agent (nothing acted on) leaves it queued for the next, never lost nor done twice; one that
    fails fails the request without running it; more than MAX_DEFERRED are refused unread."""
    cfg, _ = start_local_agent(tmp_path, "deferred")
    ep = client.Endpoint(cfg["socket"], os.getuid())
    gone = client.Endpoint(str(tmp_path / "agents" / "gone.sock"), os.getuid())
    target = tmp_path / "work"
    target.mkdir()
    f = target / "up.txt"
    assert client.defer(gone, {"op": "put", "path": str(f), "mode": 0o600}, b"data")
    with pytest.raises(client.AgentUnavailable):
        gone.request({"op": "ping"})
    assert [e["op"] for e, _, _ in client._proc_state()["deferred"][gone.path]] == ["put"]
    client._proc_state()["deferred"].pop(gone.path)
    # in order, then the request itself (exists: sees the file)
    assert client.defer(ep, {"op": "put", "path": str(f), "mode": 0o600}, b"data")
    assert client.defer(ep, {"op": "chmod", "args": {"mode": "u+x", "paths": [str(f)]}, "env": None})
    resp, _ = ep.request({"op": "exists", "args": {"path": str(f)}, "env": None})
    assert resp["ok"] and resp["rc"] == 0 and resp.get("before_done")
    assert f.read_bytes() == b"data" and stat.S_IMODE(f.stat().st_mode) == 0o700
    assert not client._proc_state()["deferred"].get(ep.path)
    # a failed one: the request is not run; rm only warns
    assert client.defer(ep, {"op": "rm", "args": {"path": str(target), "recurse": False}, "env": None})
    assert client.defer(
        ep, {"op": "mkdtemp", "args": {"basetmpdir": str(f), "basetmp": str(f / "x"), "basefile": "x", "mode": 0o700}, "env": None}
    )
    assert client.defer(ep, {"op": "put", "path": str(target / "never.txt"), "mode": 0o600}, b"never")
    with pytest.raises(AnsibleConnectionFailure, match="Failed to create temporary directory"):
        ep.request({"op": "put", "path": str(target / "never2.txt"), "mode": 0o600}, b"x")
    assert not (target / "never.txt").exists() and not (target / "never2.txt").exists()
    # a client that sends more than the agent takes
    many = [{"op": "rm", "args": {"path": str(target / "none"), "recurse": False}, "size": 0}] * (shell_ops.MAX_DEFERRED + 1)
    with pytest.raises(client.DeferredFailed, match="malformed deferred housekeeping"):
        ep.request({"op": "ping", "before": many}, carry=False)
    client.Endpoint(cfg["socket"], os.getuid()).request({"op": "quit"})
