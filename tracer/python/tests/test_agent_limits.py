"""The persistent agent against clients that misbehave (issue 9, item 4), with a real agent process
(runner_fixtures.start_local_agent, as in the protocol tests): a frame that stops mid-way,
lengths far over the limits, malformed JSON, a client that does not read its reply. None of them
may hold up another client or make the agent allocate what was only announced."""

from __future__ import annotations

import mmap
import os
import socket
import time

import pytest

from runner_fixtures import start_local_agent
from spawntrace_agent import client, framing

MiB = 1024 * 1024
OVER_BLOB = min(framing.MAX_BLOB + 1, 0xFFFFFFFF)  # (a u32 however the limit is set)


@pytest.fixture
def limited_agent(tmp_path):
    """An agent that drops a stalled connection after 2 s (cfg frame_timeout, send_timeout)."""
    cfg, pid = start_local_agent(tmp_path, "limits", frame_timeout=2, send_timeout=2)
    path = cfg["socket"]
    yield path, pid
    try:
        client.Endpoint(path, os.getuid()).request({"op": "quit"})
    except (client.AgentUnavailable, client.AgentFailed):
        os.kill(pid, 15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)


def connect(path, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def ping(path, timeout=3.0):
    """A ping on a new connection, every step bounded by `timeout`: (reply, seconds)."""
    t0 = time.monotonic()
    s = connect(path, timeout)
    try:
        framing.send_frame(s, {"op": "ping", "version": client.VERSION})
        hello, _ = framing.recv_frame(s)
        resp, _ = framing.recv_frame(s)
    finally:
        s.close()
    assert hello["hello"] == framing.PROTOCOL and resp["ok"], (hello, resp)
    return resp, time.monotonic() - t0


def closed_by_agent(s, within):
    """Reads `s` until EOF (True) or `within` seconds without it (False); returns (eof, bytes)."""
    s.settimeout(0.2)
    deadline = time.monotonic() + within
    n = 0
    while time.monotonic() < deadline:
        try:
            b = s.recv(1 << 20)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return True, n
        if not b:
            return True, n
        n += len(b)
    return False, n


def memory(pid):
    """(VmRSS, VmHWM) of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out["VmRSS"], out["VmHWM"]


def test_a_frame_that_stops_midway_holds_up_nobody(limited_agent):
    path, _ = limited_agent
    stalled = connect(path)
    # a header announcing a 100-byte frame (8 + 92 bytes of JSON), then 10 bytes of it in all
    stalled.sendall(framing.HEADER.pack(92, 0) + b'{"')
    time.sleep(0.3)  # the agent has read them
    resp, secs = ping(path)
    assert secs < 3, secs
    # ... answered while the stalled client is still connected
    stalled.setblocking(False)
    with pytest.raises(BlockingIOError):
        stalled.recv(1)
    # the stalled connection is dropped after frame_timeout (2 s, checked every second)
    eof, n = closed_by_agent(stalled, 6)
    assert eof and n == 0
    stalled.close()
    # a new connection that sends nothing at all is dropped too; the agent serves on
    silent = connect(path)
    eof, n = closed_by_agent(silent, 6)
    assert eof and n == 0
    silent.close()
    assert ping(path)[0]["ok"]


@pytest.mark.parametrize("jlen, blen", [(64 * MiB, 0xFFFFFFFF), (framing.MAX_JSON + 1, 0), (2, OVER_BLOB), (0xFFFFFFFF, 0xFFFFFFFF)])
def test_lengths_over_the_limits_are_refused_before_allocating(limited_agent, jlen, blen):
    path, pid = limited_agent
    ping(path)
    rss0, hwm0 = memory(pid)
    s = connect(path)
    s.sendall(framing.HEADER.pack(jlen, blen))
    t0 = time.monotonic()
    resp, blob = framing.recv_frame(s)  # instead of the hello
    assert time.monotonic() - t0 < 2
    assert resp["ok"] is False and resp["error"].startswith("malformed frame: ") and blob == b"", resp
    assert "hello" not in resp
    assert closed_by_agent(s, 2) == (True, 0)
    s.close()
    rss1, hwm1 = memory(pid)
    assert rss1 - rss0 < 50 * MiB and hwm1 - hwm0 < 50 * MiB, (rss0, rss1, hwm0, hwm1)
    assert ping(path)[0]["ok"]


@pytest.mark.parametrize(
    "data",
    [b"[1, 2]", b'"text"', b"42", b"null", b"{not json", b'{"op": "ping"', b'\xff\xfe{"op": "ping"}', b"[" * 200000],
    ids=["array", "string", "number", "null", "garbage", "truncated", "not-utf8", "deep"],
)
def test_malformed_frames_are_answered_and_closed(limited_agent, data):
    path, _ = limited_agent
    s = connect(path)
    s.sendall(framing.HEADER.pack(len(data), 3) + data + b"abc")
    resp, blob = framing.recv_frame(s)
    assert resp["ok"] is False and resp["error"].startswith("malformed frame: ") and blob == b"", resp
    assert closed_by_agent(s, 2) == (True, 0)
    s.close()
    assert ping(path)[0]["ok"]


def test_a_client_that_does_not_read_its_reply_holds_up_nobody(limited_agent, tmp_path):
    path, pid = limited_agent
    big = tmp_path / "big.bin"
    data = os.urandom(MiB) * 64
    big.write_bytes(data)
    lazy = connect(path)
    framing.send_frame(lazy, {"op": "fetch", "path": str(big), "version": client.VERSION})
    time.sleep(0.5)  # the agent has read the file and sent what the socket takes
    for _ in range(3):
        resp, secs = ping(path)
        assert secs < 3, secs
    # the reply makes no progress for send_timeout (2 s): the connection is dropped, its buffer
    # freed (only part of the reply ever left)
    time.sleep(4)
    eof, n = closed_by_agent(lazy, 6)
    assert eof and n < len(data)
    lazy.close()
    assert ping(path)[0]["ok"]
    # a client that reads gets the whole file, through the same queue
    resp, blob = client.Endpoint(path, os.getuid()).request({"op": "fetch", "path": str(big)})
    assert resp["ok"] and blob == data


def test_files_over_the_blob_limit_go_the_classic_way(limited_agent, tmp_path):
    path, _ = limited_agent
    ep = client.Endpoint(path, os.getuid())
    huge = tmp_path / "huge.sparse"
    with open(huge, "wb") as f:
        f.truncate(OVER_BLOB)  # sparse: nothing is written or read
    # fetch: `unsupported` (the ssh plugin then uses the classic fetch_file)
    with pytest.raises(client.AgentUnavailable):
        ep.request({"op": "fetch", "path": str(huge)})
    # put: refused before anything is sent (the ssh plugin checks the size before reading)
    blob = mmap.mmap(-1, OVER_BLOB)  # anonymous: no memory until written
    try:
        with pytest.raises(client.AgentUnavailable):
            ep.request({"op": "put", "path": str(tmp_path / "never")}, blob)
    finally:
        blob.close()
    assert not (tmp_path / "never").exists()
    assert ep.request({"op": "ping"})[0]["ok"]


def test_a_second_request_before_the_reply_is_refused(limited_agent):
    """Clients wait for each reply: a request sent behind another on one connection would sit
    unparsed in the agent's buffer, keeping the connection (and the agent) alive for ever."""
    path, _ = limited_agent
    s = connect(path)
    s.sendall(framing.encode_frame({"op": "ping", "version": client.VERSION}) * 2)
    resp, _ = framing.recv_frame(s)
    assert resp == {"ok": False, "error": "malformed frame: data after a request, before its reply"}, resp
    assert closed_by_agent(s, 3)[0]
    s.close()
    assert ping(path)[0]["ok"]


def test_a_fifo_or_device_at_a_transfer_path_holds_up_nobody(limited_agent, tmp_path):
    """Another user can plant a FIFO where a playbook copies to or fetches from: the agent must
    not block on opening it (the client then goes the classic way), nor read a device forever."""
    path, _ = limited_agent
    ep = client.Endpoint(path, os.getuid())
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for req, blob in (
        ({"op": "fetch", "path": str(fifo)}, b""),
        ({"op": "put", "path": str(fifo)}, b"data"),
        ({"op": "fetch", "path": "/dev/zero"}, b""),
    ):
        t0 = time.monotonic()
        with pytest.raises(client.AgentUnavailable):
            ep.request(dict(req), blob)
        assert time.monotonic() - t0 < 3, req
        assert ping(path)[1] < 3
    assert fifo.is_fifo()


def test_recv_frame_checks_the_limits_before_allocating():
    """The client's side: a lying header costs nothing, a non-object reply is an error."""
    rss0, hwm0 = memory(os.getpid())
    for head in (framing.HEADER.pack(0, 0xFFFFFFFF), framing.HEADER.pack(0xFFFFFFFF, 0), framing.HEADER.pack(2, OVER_BLOB)):
        a, b = socket.socketpair()
        a.sendall(head + b"{}")
        a.close()
        with pytest.raises(framing.ProtocolError):
            framing.recv_frame(b)
        b.close()
    for data in (b"[]", b"\xff", b"{"):
        a, b = socket.socketpair()
        a.sendall(framing.HEADER.pack(len(data), 0) + data)
        with pytest.raises(framing.ProtocolError):
            framing.recv_frame(b)
        a.close()
        b.close()
    # a blob within the limits but cut short: the buffer grows only with what arrived
    a, b = socket.socketpair()
    a.sendall(framing.HEADER.pack(2, framing.MAX_BLOB) + b"{}" + b"x" * 1000)
    a.close()
    with pytest.raises(framing.ProtocolError):
        framing.recv_frame(b)
    b.close()
    rss1, hwm1 = memory(os.getpid())
    assert rss1 - rss0 < 50 * MiB and hwm1 - hwm0 < 50 * MiB, (rss0, rss1, hwm0, hwm1)
