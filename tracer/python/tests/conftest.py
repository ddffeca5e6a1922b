"""Helpers for running real ansible-playbook (from the environment running pytest) with the
spawntrace callback and receiving its messages like spawntrace does."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CALLBACK_DIR = Path(__file__).resolve().parents[1] / "ansible_collections/spawntrace/tracer/plugins/callback"
# the agent's package (spawntrace_agent), importable by every test as the connection plugins import it
AGENT_PACKAGE_DIR = Path(__file__).resolve().parents[1] / "ansible_collections/spawntrace/tracer/agent"
if str(AGENT_PACKAGE_DIR) not in sys.path:
    sys.path.append(str(AGENT_PACKAGE_DIR))
BIN = Path(sys.executable).parent
UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclasses.dataclass
class Message:
    cred_pid: int  # the sender's pid as vouched for by the kernel (SCM_CREDENTIALS)
    body: dict

    def __getitem__(self, key):
        return self.body[key]


class Receiver:
    """A SOCK_DGRAM socket with SO_PASSCRED, read by a thread from `start_reading()` on."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[Message] = []
        self._stop = threading.Event()
        self._thread = None

    def start_reading(self):
        self._thread = threading.Thread(target=self._read_until_stopped, daemon=True)
        self._thread.start()

    def _read_until_stopped(self):
        while not self._stop.is_set():
            self._read_one()

    def _read_one(self) -> bool:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(UCRED.size))
        except (TimeoutError, BlockingIOError):
            return False
        pid = next(UCRED.unpack(d)[0] for level, kind, d in ancillary if kind == socket.SCM_CREDENTIALS)
        self.messages.append(Message(pid, json.loads(data)))
        return True

    def close(self) -> list[Message]:
        """Stops the reader, takes what is still queued, and returns every message."""
        if self.sock.fileno() < 0:
            return self.messages
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sock.settimeout(0)
        while self._read_one():
            pass
        self.sock.close()
        return self.messages


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def write_inventory(directory: Path) -> Path:
    path = directory / "inventory.ini"
    path.write_text("".join(f"{h} ansible_connection=local ansible_python_interpreter={sys.executable}\n" for h in ("h1", "h2")))
    return path


def run_playbook(directory: Path, playbook: str, *, callback: bool = True, socket_path: str | None = None, timeout: float = 300) -> Run:
    """Runs `playbook` (YAML text) against h1 and h2 (local connection), forks=2, without any
    ansible.cfg. With `callback`, the plugin is enabled; `socket_path` sets SPAWNTRACE_SOCKET."""
    pb = directory / "playbook.yml"
    pb.write_text(playbook)
    config = directory / "ansible.cfg"  # empty: no user or repository configuration applies
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "SPAWNTRACE_"))}
    env.update(
        ANSIBLE_CONFIG=str(config),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCAL_TEMP=str(directory / "tmp-local"),
        ANSIBLE_REMOTE_TEMP=str(directory / "tmp-remote"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    if callback:
        env.update(ANSIBLE_CALLBACK_PLUGINS=str(CALLBACK_DIR), ANSIBLE_CALLBACKS_ENABLED="spawntrace")
    if socket_path is not None:
        env["SPAWNTRACE_SOCKET"] = socket_path
    argv = [str(BIN / "ansible-playbook"), "-i", str(write_inventory(directory)), "-f", "2", str(pb)]
    start = time.monotonic()
    p = subprocess.run(argv, env=env, cwd=directory, capture_output=True, text=True, timeout=timeout)
    return Run(p.returncode, p.stdout, p.stderr, time.monotonic() - start)


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path / "events.sock")
    yield r
    r.close()
