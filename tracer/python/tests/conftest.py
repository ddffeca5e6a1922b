"""What every test shares: the import paths (the agent's package, as the connection plugins import
it; the sshd lab, shared with the Rust tests) and receiving the spawntrace callback's messages
like spawntrace does."""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest

from playbook_runs import AGENT_DIR

SSHLAB_DIR = Path(__file__).resolve().parents[3] / "tests/lab"
for path in (AGENT_DIR, SSHLAB_DIR):
    if str(path) not in sys.path:
        sys.path.append(str(path))

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


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path / "events.sock")
    yield r
    r.close()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "once: what no ansible-core version changes (the callback's transport, how a wrong become "
        "password fails): run on the default environment only (cargo xtask test passes -m 'not once' "
        "to the others)",
    )
