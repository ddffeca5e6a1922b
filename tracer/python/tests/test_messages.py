"""The one sender of the attribution protocol (spawntrace_agent.messages), against a real
SO_PASSCRED socket: one sender per process, what it counts, and how long it waits."""

from __future__ import annotations

import os
import socket
import time

from conftest import Receiver
from spawntrace_agent import messages


def test_one_sender_per_process_and_its_own_in_a_child(tmp_path, monkeypatch):
    receiver = Receiver(tmp_path / "events.sock")
    monkeypatch.setenv(messages.SOCKET_ENV, str(receiver.path))
    monkeypatch.setattr(messages, "_process", {"pid": None, "sender": None})
    parent = messages.sender()
    assert messages.sender() is parent, "the callback and the connection plugins share it"
    parent.dropped = 3
    parent.playbook_end()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a sender of its own, its counts from zero, the parent's socket kept
        child = messages.sender()
        ok = child is not parent and child.dropped == 0 and child.sock is None
        child.playbook_end()
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    parent.playbook_end()
    got = receiver.close()
    assert [(m.cred_pid, m["pid"], m["dropped"]) for m in got] == [
        (os.getpid(), os.getpid(), 3),
        (pid, pid, 0),
        (os.getpid(), os.getpid(), 3),
    ]


def fill(path):
    """A sender whose receiver's queue is full: every further send has to wait or drop."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.connect(str(path))
    filler.setblocking(False)
    try:
        while True:
            filler.send(b"{}")
    except BlockingIOError:
        return filler


def test_a_full_receiver_costs_one_wait_but_the_patient_agent_waits_each_time(tmp_path):
    path = tmp_path / "events.sock"
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stalled.bind(str(path))  # never read
    filler = fill(path)
    for patient, want_waits in ((False, 1), (True, 4)):
        sender = messages.Sender(str(path), patient=patient)
        start = time.monotonic()
        sent = [sender.playbook_end() for _ in range(4)]
        elapsed = time.monotonic() - start
        assert sent == [False] * 4 and sender.dropped == 4
        # it waited (at least) that many times; after its first timeout a sender that is not
        # patient stops waiting (its socket no longer blocks), a patient one goes on
        assert elapsed >= want_waits * messages.SEND_WAIT, (patient, elapsed)
        assert sender.waiting == patient and sender.sock.gettimeout() == (messages.SEND_WAIT if patient else 0.0)
    filler.close()
    stalled.close()


def test_a_refused_socket_counts_what_it_could_not_send(tmp_path):
    sender = messages.Sender(str(tmp_path / "nobody-listens.sock"))
    assert not sender.task_start("u", "n", "copy", None, None, False, False, None)
    sender.usable = False  # as after EACCES: an agent of another (become) user
    assert not sender.playbook_end()
    assert sender.dropped == 2
    assert not messages.Sender(None).playbook_end() and messages.Sender(None).dropped == 0
