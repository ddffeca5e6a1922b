"""The Mitogen side of target recording: which user ssh arguments leave connection sharing on,
and the ssh command spawntrace runs for a Mitogen target (the end-to-end runs are in the Rust
tests, tests/targets.rs)."""

from __future__ import annotations

import pytest

from spawntrace_agent import target_recording

SHARING = ["-o", "ControlMaster=auto", "-o", "ControlPersist=60s", "-o", "ControlPath=/home/u/.ansible/cp/st-%C"]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-C", "-o", "ControlMaster=auto", "-o", "ControlPersist=60s"],
        ["-oControlMaster=yes", "-S", "/run/user/1000/cm"],
        ["-o", "MACs=hmac-sha2-256", "-i", "key"],
        ["-oMACs=hmac-sha2-256"],
        # ssh takes an option's first value (Ansible's default ssh_args come before extra args)
        ["-o", "ControlMaster=auto", "-o", "ControlMaster=no"],
    ],
)
def test_arguments_that_leave_sharing_on(args):
    assert target_recording.shares(args)


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "ControlMaster=no"],
        ["-o", "controlmaster = No"],
        ["-oControlMaster false"],
        ["-o", "ControlPath=none"],
        ["-S", "none"],
        ["-Snone"],
        ["-M"],
        ["-CM", "-o", "ControlMaster=auto"],
    ],
)
def test_arguments_that_turn_sharing_off(args):
    assert not target_recording.shares(args)


def test_mitogen_argv_puts_sharing_before_the_users_options_and_the_host_last():
    kw = {
        "hostname": "-oProxyCommand=evil",
        "username": "deploy",
        "port": 2222,
        "identity_file": "/home/u/.ssh/id",
        "check_host_keys": "ignore",
        "compression": True,
        "keepalive_interval": 30,
        "keepalive_count": 10,
        "ssh_path": "/usr/bin/ssh",
    }
    user = ["-o", "ControlMaster=no", "-o", "ServerAliveInterval=5"]
    argv = target_recording.mitogen_argv(kw, user, SHARING)
    assert argv[0] == "/usr/bin/ssh"
    # ssh takes an option's first value: spawntrace's sharing wins over the user's own
    assert argv.index("ControlMaster=auto") < argv.index("ControlMaster=no")
    # Mitogen's own options come first, as mitogen.ssh puts them
    assert argv.index("ServerAliveInterval 30") < argv.index("ServerAliveInterval=5")
    assert argv[argv.index("-l") + 1] == "deploy" and argv[argv.index("-p") + 1] == "2222"
    assert "StrictHostKeyChecking no" in argv and "Compression yes" in argv
    # the host is never taken for an option
    assert argv[-2:] == ["--", "-oProxyCommand=evil"]


def test_mitogen_argv_without_optional_settings():
    argv = target_recording.mitogen_argv(
        {"hostname": "h1", "compression": False, "keepalive_enabled": False, "check_host_keys": "enforce"}, [], []
    )
    assert argv == ["ssh", "-o", "LogLevel ERROR", "-o", "BatchMode yes", "-o", "StrictHostKeyChecking yes", "--", "h1"]
