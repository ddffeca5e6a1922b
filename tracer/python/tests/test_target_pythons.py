"""The agent on every target Python the running ansible-core supports that this machine has (pyenv's
and the system's): modules run through it and end exactly as classic; Python 2 targets (which the
agent does not run on) go the classic way with the same results."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from playbook_runs import core_version
from runner_fixtures import run_both

# Target (module) Pythons per ansible-core line, from its support matrix.
TARGET_PYTHONS = {
    (2, 16): ["2.7", "3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12"],
    (2, 17): ["3.7", "3.8", "3.9", "3.10", "3.11", "3.12"],
    (2, 18): ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"],
    (2, 19): ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"],
    (2, 20): ["3.9", "3.10", "3.11", "3.12", "3.13", "3.14"],
    (2, 21): ["3.9", "3.10", "3.11", "3.12", "3.13", "3.14"],
}

PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - command: echo hi
    - copy: {content: "a\\n", dest: "{{ base }}/f.txt", mode: "0640"}
    - lineinfile: {path: "{{ base }}/f.txt", line: b}
    - stat: {path: "{{ base }}/f.txt"}
    - file: {path: "{{ base }}/d", state: directory}
"""


def _interpreters():
    """(X.Y, path) of every Python this machine has, the system's first for its version."""
    found = {}
    for path in ["/usr/bin/python3", *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/*/bin/python[23].*[0-9]")))]:
        if not os.access(path, os.X_OK):
            continue
        try:
            out = subprocess.run(
                [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True, timeout=30
            )
        except OSError:
            continue
        if out.returncode == 0:
            found.setdefault(out.stdout.strip(), path)
    return found


MACHINE = _interpreters()


@pytest.mark.parametrize("version", sorted({v for vs in TARGET_PYTHONS.values() for v in vs}, key=lambda v: tuple(map(int, v.split(".")))))
def test_target_python(tmp_path, version):
    supported = TARGET_PYTHONS.get(core_version())
    if supported is None:
        pytest.fail("no target Python list for ansible-core %d.%d" % core_version())
    if version not in supported:
        pytest.skip("ansible-core %d.%d does not support Python %s targets" % (core_version() + (version,)))
    if version not in MACHINE:
        pytest.skip("this machine has no Python %s" % version)
    agent = not version.startswith("2.")
    inv = f"localhost ansible_connection=local ansible_python_interpreter={MACHINE[version]}\n"
    pair = run_both(tmp_path, PLAYBOOK, inventory=inv, expect_agent=agent)
    assert pair.persistent.returncode == 0, pair.persistent.stdout[-2000:]
    if agent:
        assert sorted({t["module"] for t in pair.persistent.timing}) == ["command", "copy", "file", "lineinfile", "stat"]
    else:
        assert not pair.persistent.timing
