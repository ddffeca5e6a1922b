//! Test hosts: a real sshd in its own network namespace per host, reached over a veth pair.
//!
//! Logins go to a dedicated user whose shell is `/bin/sh` (which reads no dotfiles for ssh
//! commands), so what we measure is Ansible, not a login shell's start-up (root's .bashrc here
//! runs `pyenv init`). Everything is torn down on drop.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The login user on the test hosts.
pub const USER: &str = "spawntrace-test";

pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: String,
    veth: String,
    sshd: Child,
}

/// A set of test hosts sharing one client key.
pub struct Lab {
    pub hosts: Vec<Host>,
    pub dir: tempfile::TempDir,
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl Lab {
    /// Starts `n` hosts named h1..hn. Panics (with the failing command) if anything is missing:
    /// `cargo xtask setup` installs openssh-server and iproute2.
    pub fn start(n: usize) -> Lab {
        assert!(Path::new("/usr/sbin/sshd").exists(), "sshd missing: run `cargo xtask setup`");
        ensure_user();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let d = dir.path().display().to_string();
        sh(&format!("ssh-keygen -q -t ed25519 -N '' -f {d}/client_key"));
        sh(&format!("ssh-keygen -q -t ed25519 -N '' -f {d}/host_key"));
        std::fs::copy(dir.path().join("client_key.pub"), dir.path().join("authorized_keys")).unwrap();
        sh("mkdir -p /run/sshd && chmod 0755 /run/sshd");
        // A unique prefix per test process keeps parallel runs apart (interface names ≤ 15).
        let tag = std::process::id() % 100_000;
        let mut hosts = Vec::new();
        for i in 1..=n {
            let netns = format!("st{tag}h{i}");
            let veth = format!("st{tag}v{i}");
            let peer = format!("st{tag}p{i}");
            let net = format!("10.213.{}", (tag % 60) * 4 + i as u32);
            let addr = format!("{net}.2");
            sh(&format!("ip netns add {netns}"));
            sh(&format!("ip link add {veth} type veth peer name {peer} netns {netns}"));
            sh(&format!("ip addr add {net}.1/24 dev {veth} && ip link set {veth} up"));
            sh(&format!(
                "ip -n {netns} addr add {addr}/24 dev {peer} && ip -n {netns} link set {peer} up && ip -n {netns} link set lo up"
            ));
            let config = dir.path().join(format!("sshd_{i}.conf"));
            std::fs::write(
                &config,
                format!(
                    "ListenAddress {addr}\nPort 22\nHostKey {d}/host_key\nPidFile none\n\
                     AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
                     PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                     AllowUsers {USER}\nSubsystem sftp internal-sftp\nMaxSessions 64\nMaxStartups 64\n"
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join(format!("sshd_{i}.log"))).unwrap();
            let sshd = Command::new("ip")
                .args(["netns", "exec", &netns, "/usr/sbin/sshd", "-D", "-e", "-f"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting sshd");
            hosts.push(Host { name: format!("h{i}"), netns, addr, veth, sshd });
        }
        let lab = Lab { hosts, dir };
        for h in &lab.hosts {
            lab.wait_ready(h);
        }
        lab
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// ssh options that keep the user's config and known_hosts out of the test.
    pub fn ssh_args(&self) -> String {
        format!(
            "-F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -i {}",
            self.key().display()
        )
    }

    fn wait_ready(&self, h: &Host) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = Command::new("ssh")
                .args(self.ssh_args().split(' '))
                .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=2"])
                .arg(format!("{USER}@{}", h.addr))
                .arg("true")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "sshd on {} never accepted a login", h.addr);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An INI inventory of the hosts, ssh connection, system Python on the targets.
    pub fn inventory(&self, group: &str) -> PathBuf {
        let mut s = format!("[{group}]\n");
        for h in &self.hosts {
            s.push_str(&format!(
                "{} ansible_host={} ansible_user={USER} ansible_connection=ssh ansible_python_interpreter=/usr/bin/python3 ansible_ssh_private_key_file={} ansible_ssh_common_args='{}'\n",
                h.name,
                h.addr,
                self.key().display(),
                "-F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes"
            ));
        }
        let path = self.dir.path().join("inventory.ini");
        std::fs::write(&path, s).unwrap();
        path
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            let _ = h.sshd.kill();
            let _ = h.sshd.wait();
            // the per-connection sshd sessions outlive the listener: end all of the namespace's
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &h.netns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["link", "del", &h.veth]).status();
            let _ = Command::new("ip").args(["netns", "del", &h.netns]).status();
        }
    }
}

/// The login user: /bin/sh, key-only logins.
fn ensure_user() {
    let exists = Command::new("id")
        .arg(USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        sh(&format!("useradd --create-home --shell /bin/sh {USER}"));
    }
    // No password, but not locked either (sshd refuses locked accounts even for keys).
    sh(&format!("usermod -p '*' {USER}"));
}
