"""Test hosts for the Rust and the Python tests: a real sshd per host, each in its own network
namespace reached over a veth pair, with one client key. One implementation for both languages
(stdlib only, Python 3.9+): Python imports `Lab`; other languages run the `serve` command.

Logins go to USER, whose shell is /bin/sh (which reads no dotfiles for ssh commands), so that
what a test measures is Ansible, not a login shell's start-up (root's .bashrc here runs
`pyenv init`). It needs root, /usr/sbin/sshd, ssh, ssh-keygen and iproute2.

Python:

    with Lab(2) as lab:
        inventory = lab.write_inventory("targets")  # h1, h2 over ssh as lab.user
        ...

CLI (the contract other languages rely on):

    python3 tests/lab/sshlab.py serve --hosts N [--group GROUP] [--sudo]

sets N hosts up (with --sudo, the login user may sudo to root without a password while the lab
lives), writes an INI inventory of them as GROUP (default `targets`; `write_inventory`), then
writes exactly one line to stdout and flushes it:

    {"dir": "/tmp/spawntrace-sshlab-…", "key": "/tmp/spawntrace-sshlab-…/client_key",
     "user": "spawntrace-test", "ssh_options": ["-F", "/dev/null", "-o", …],
     "hosts": [{"name": "h1", "addr": "10.213.K.2", "netns": "…"}, …],
     "inventory": "/tmp/spawntrace-sshlab-…/inventory.ini"}

(one JSON object on one line; ssh_options go before `-i key user@addr`). It then blocks until its
stdin reaches EOF (keep a pipe open for the lab's lifetime, close it to end the lab) or it gets
SIGTERM, SIGINT or SIGHUP; it tears everything down and exits 0. When setup fails (or is
interrupted), it writes one line `sshlab: <why>` to stderr, leaves nothing behind and exits 1;
nothing is written to stdout then.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USER = "spawntrace-test"
SSHD = "/usr/sbin/sshd"
# keep the user's ssh configuration and known_hosts out of the tests
SSH_OPTIONS = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes"]
# Held while a lab picks its subnets and puts them on its interfaces, so that concurrent labs (Rust
# tests and pytest at once) never pick the same one.
SUBNET_LOCK = "/run/spawntrace-sshlab.lock"
SUBNET_PREFIX = "10.213"
READY_SECONDS = 15
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class LabError(Exception):
    """A lab could not be set up; the message says why."""


@dataclasses.dataclass(frozen=True)
class Host:
    name: str  # inventory name: h1..hN
    addr: str  # where its sshd listens (port 22)
    netns: str


def unavailable() -> str | None:
    """Why no lab can be set up on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [p for p in (SSHD, "ssh", "ssh-keygen", "ip", "useradd", "usermod") if not shutil.which(p)]
    return "missing " + ", ".join(missing) if missing else None


def ensure_user(name: str) -> pwd.struct_passwd:
    """A login user with /bin/sh, and a usable password-less account: `*`, not locked (sshd
    refuses locked accounts even for key logins)."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        _run("useradd", "--create-home", "--shell", "/bin/sh", name)
    _run("usermod", "-p", "*", name)
    return pwd.getpwnam(name)


def _run(*argv: str) -> None:
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError("`%s` failed: %s" % (" ".join(argv), p.stderr.strip()))


class Lab:
    """`hosts` test hosts h1..hN, up when the constructor returns; `close()` (or leaving a `with`
    block) tears them down. A failed setup tears down what it made before raising."""

    def __init__(self, hosts: int = 1, sudo: bool = False, passwords: dict[str, str] | None = None):
        self.user = USER
        # users' passwords on the lab's hosts only: an /etc/shadow of the hosts' own (a copy with
        # these set), which `ip netns exec` mounts over /etc/shadow for sshd and its sessions
        self._passwords = dict(passwords or {})
        # with `sudo`, USER may run anything as root without a password while the lab lives (a
        # sudoers.d file of this lab: USER is shared by every lab on the machine)
        self._sudoers = Path(f"/etc/sudoers.d/spawntrace-sshlab-{os.getpid()}") if sudo else None
        self.ssh_options = list(SSH_OPTIONS)
        self.hosts: list[Host] = []
        self._veths: list[str] = []
        self._netns: list[str] = []
        self._sshds: list[subprocess.Popen] = []
        self.dir = Path(tempfile.mkdtemp(prefix="spawntrace-sshlab-"))
        self.key = self.dir / "client_key"
        try:
            self._set_up(hosts)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _set_up(self, count: int) -> None:
        why = unavailable()
        if why:
            raise LabError(why)
        ensure_user(USER)
        # sshd reads the keys as the user: the directory must be readable beyond root
        os.chmod(self.dir, 0o755)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "host_key"))
        shutil.copy(self.dir / "client_key.pub", self.dir / "authorized_keys")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        os.chmod("/run/sshd", 0o755)
        if self._sudoers is not None:
            _remove_stale_sudoers()
            fd = os.open(self._sudoers, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o440)
            with os.fdopen(fd, "w") as f:
                f.write(f"{USER} ALL=(root) NOPASSWD: ALL\n")
        with _subnet_lock():
            for i in range(1, count + 1):
                self.hosts.append(self._add_network(f"h{i}", _free_subnet()))
        if self._passwords:
            shadow = _shadow_with(self._passwords)
            etc = _netns_etc()
            for host in self.hosts:
                d = etc / host.netns
                d.mkdir(mode=0o755)
                fd = os.open(d / "shadow", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
                with os.fdopen(fd, "w") as f:
                    f.write(shadow)
        for host in self.hosts:
            self._start_sshd(host)
        for host, sshd in zip(self.hosts, self._sshds):
            self._wait_ready(host, sshd)

    def _add_network(self, name: str, subnet: int) -> Host:
        """A namespace with 10.213.K.2 on its end of a veth pair, 10.213.K.1 on ours."""
        tag = f"sl{os.getpid()}k{subnet}"  # unique while the subnet is ours; ≤ 15 with a suffix
        netns, veth, peer = tag + "n", tag + "v", tag + "p"
        net = f"{SUBNET_PREFIX}.{subnet}"
        # recorded before they exist: a setup interrupted half-way still removes them
        self._netns.append(netns)
        _run("ip", "netns", "add", netns)
        self._veths.append(veth)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", netns)
        _run("ip", "addr", "add", f"{net}.1/24", "dev", veth)
        _run("ip", "link", "set", veth, "up")
        _run("ip", "-n", netns, "addr", "add", f"{net}.2/24", "dev", peer)
        _run("ip", "-n", netns, "link", "set", peer, "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        return Host(name, f"{net}.2", netns)

    def _start_sshd(self, host: Host) -> None:
        config = self.dir / f"sshd_{host.name}.conf"
        config.write_text(
            f"ListenAddress {host.addr}\nPort 22\nHostKey {self.dir}/host_key\nPidFile none\n"
            f"AuthorizedKeysFile {self.dir}/authorized_keys\nStrictModes no\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"AllowUsers {USER}\nSubsystem sftp internal-sftp\nMaxSessions 64\nMaxStartups 64\n"
            "AllowStreamLocalForwarding yes\n"
        )
        with open(self.dir / f"sshd_{host.name}.log", "wb") as log:
            self._sshds.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", host.netns, SSHD, "-D", "-e", "-f", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )

    def _wait_ready(self, host: Host, sshd: subprocess.Popen) -> None:
        """Until a login runs `true`: sshd listening is not enough (keys, user, sftp)."""
        probe = ["ssh", *self.ssh_options, "-i", str(self.key), "-o", "BatchMode=yes", "-o", "ConnectTimeout=2"]
        deadline = time.monotonic() + READY_SECONDS
        while True:
            p = subprocess.run([*probe, f"{USER}@{host.addr}", "true"], stdin=subprocess.DEVNULL, capture_output=True)
            if p.returncode == 0:
                return
            if sshd.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / f"sshd_{host.name}.log").read_text(errors="replace").strip()
                state = f"still running after {READY_SECONDS} s" if sshd.returncode is None else f"exited with {sshd.returncode}"
                raise LabError(
                    f"sshd of {host.name} on {host.addr} accepted no login (sshd {state}; "
                    f"ssh: {p.stderr.decode(errors='replace').strip()}; sshd log: {log})".replace("\n", " | ")
                )
            time.sleep(0.1)

    def inventory_line(self, host: Host, *, python: str = "/usr/bin/python3", extra: str = "") -> str:
        """An INI inventory line: `host` over ssh as the lab's user with its key."""
        return (
            f"{host.name} ansible_host={host.addr} ansible_user={USER} ansible_connection=ssh "
            f"ansible_python_interpreter={python} ansible_ssh_private_key_file={self.key} "
            f"ansible_ssh_common_args='{' '.join(self.ssh_options)}' {extra}".rstrip()
            + "\n"
        )

    def write_inventory(self, group: str, path: Path | None = None) -> Path:
        """An INI inventory of every host in `group` (by default lab.dir/inventory.ini)."""
        path = path or self.dir / "inventory.ini"
        path.write_text(f"[{group}]\n" + "".join(self.inventory_line(h) for h in self.hosts))
        return path

    def describe(self) -> dict:
        """What `serve` prints."""
        return {
            "dir": str(self.dir),
            "key": str(self.key),
            "user": self.user,
            "ssh_options": self.ssh_options,
            "hosts": [dataclasses.asdict(h) for h in self.hosts],
        }

    def close(self) -> None:
        """Stops everything in the namespaces, removes them, the veths and the directory. Safe
        to call again, and on a half set-up lab."""
        for sshd in self._sshds:
            sshd.terminate()
            try:
                sshd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                sshd.kill()
                sshd.wait()
        self._sshds.clear()
        for netns in self._netns:
            # the per-connection sshd sessions (and what they started) outlive the listener
            pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        for veth in self._veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        for netns in self._netns:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir("/etc/netns")  # if no other namespace has files there
        self._veths.clear()
        self._netns.clear()
        if self._sudoers is not None:
            with contextlib.suppress(FileNotFoundError):
                self._sudoers.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)


def _netns_etc() -> Path:
    """/etc/netns (what `ip netns exec NAME` mounts /etc/netns/NAME/* from), checked: a real
    directory of root's that only root may write; the files of labs that are gone removed."""
    etc = Path("/etc/netns")
    with contextlib.suppress(FileExistsError):
        etc.mkdir(mode=0o755)
    st = os.lstat(etc)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise LabError(f"{etc} is not a directory only root may write")
    live = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    for d in etc.glob("sl*k*n"):
        if d.name not in live:
            shutil.rmtree(d, ignore_errors=True)
    return etc


def _shadow_with(passwords: dict[str, str]) -> str:
    """/etc/shadow's text with the password of each user in `passwords` set (SHA-512 crypt)."""
    lines = []
    for line in Path("/etc/shadow").read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[0] in passwords:
            p = subprocess.run(
                ["openssl", "passwd", "-6", "-stdin"], input=passwords[fields[0]], capture_output=True, text=True, check=True
            )
            fields[1] = p.stdout.strip()
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


def _remove_stale_sudoers() -> None:
    """Removes the sudoers grants of labs whose process is gone (killed with SIGKILL: no
    teardown ran)."""
    for entry in Path("/etc/sudoers.d").glob("spawntrace-sshlab-*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


@contextlib.contextmanager
def _subnet_lock():
    """An exclusive flock on SUBNET_LOCK, a regular file of ours (never followed if a link)."""
    fd = os.open(SUBNET_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            raise LabError(f"{SUBNET_LOCK} is not a regular file of uid {os.geteuid()}")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _free_subnet() -> int:
    """A K with no 10.213.K.x address on any interface (a live lab has 10.213.K.1 on its veth)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    taken = {int(k) for k in re.findall(r"\binet %s\.(\d+)\." % re.escape(SUBNET_PREFIX), out)}
    for k in range(1, 255):
        if k not in taken:
            return k
    raise LabError(f"no free subnet in {SUBNET_PREFIX}.0.0/16")


def serve(hosts: int, group: str, sudo: bool) -> int:
    # A signal only wakes the loop below (through the pipe): raised as an exception, it could land
    # between the lab's setup and its `with`, leaving the lab up. One during setup is seen after it.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for s in STOP_SIGNALS:
        signal.signal(s, lambda *_: None)
    try:
        lab = Lab(hosts, sudo=sudo)
    except Exception as e:
        why = str(e) if isinstance(e, LabError) else f"{type(e).__name__}: {e}"
        print("sshlab: " + why.replace("\n", " "), file=sys.stderr, flush=True)
        return 1
    with lab:
        if select.select([wake_r], [], [], 0)[0]:
            print("sshlab: stopped by a signal during setup", file=sys.stderr, flush=True)
            return 1
        description = dict(lab.describe(), inventory=str(lab.write_inventory(group)))
        print(json.dumps(description), flush=True)
        while True:
            readable, _, _ = select.select([0, wake_r], [], [])
            if wake_r in readable or not os.read(0, 65536):
                break
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sshlab.py", description="sshd test hosts in network namespaces")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="set hosts up, print them as one JSON line, tear down at stdin EOF or a signal")
    serve_parser.add_argument("--hosts", type=int, default=1, metavar="N")
    serve_parser.add_argument("--group", default="targets", help="the hosts' group in the inventory written (default: targets)")
    serve_parser.add_argument("--sudo", action="store_true", help="let the login user sudo to root without a password while the lab lives")
    args = parser.parse_args(argv)
    if args.hosts < 1:
        parser.error("--hosts must be at least 1")
    return serve(args.hosts, args.group, args.sudo)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
