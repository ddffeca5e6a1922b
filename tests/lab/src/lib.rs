//! Test hosts from Rust: a real sshd per host in its own network namespace, set up and torn
//! down by `sshlab.py serve` next to this crate — the one lab the Python tests use too. A [`Lab`]
//! is that process: it lives while the `Lab` does, and ends (tearing everything down) when its
//! stdin closes, so even a test that panics or is killed leaves no namespace behind — unless
//! the script is killed with it by SIGKILL (a whole process group killed so).
use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

/// The script that does the work.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sshlab.py");

/// One test host.
#[derive(Clone, Debug, Deserialize)]
pub struct Host {
    /// `h1`, `h2`, …
    pub name: String,
    pub addr: String,
    pub netns: String,
}

/// What `sshlab.py serve` prints once its hosts accept logins.
#[derive(Debug, Deserialize)]
struct Description {
    dir: PathBuf,
    key: PathBuf,
    user: String,
    ssh_options: Vec<String>,
    hosts: Vec<Host>,
    inventory: PathBuf,
}

/// A set of test hosts sharing one client key and one login user.
pub struct Lab {
    pub hosts: Vec<Host>,
    /// The lab's directory (keys, sshd configs and logs); gone with the lab.
    pub dir: PathBuf,
    /// The client's private key.
    pub key: PathBuf,
    /// The login user on every host (shell /bin/sh, key-only logins).
    pub user: String,
    /// ssh options that keep the user's ssh config and known_hosts out of the test.
    pub ssh_options: Vec<String>,
    /// An INI inventory of the hosts (ssh as the lab's user, the targets' system Python).
    pub inventory: PathBuf,
    serve: Child,
    /// Held open for the lab's life: closing it ends the lab.
    stdin: Option<ChildStdin>,
}

impl Lab {
    /// Starts `n` hosts named h1..hn, in the inventory's `group`. Needs root, sshd and
    /// iproute2 (`cargo xtask setup` installs them); the error is the script's own one line.
    pub fn start(n: usize, group: &str) -> Result<Lab> {
        Self::start_with(n, group, &[])
    }

    /// As [`Lab::start`], with the login user allowed to sudo to root without a password while
    /// the lab lives.
    pub fn start_with_sudo(n: usize, group: &str) -> Result<Lab> {
        Self::start_with(n, group, &["--sudo"])
    }

    fn start_with(n: usize, group: &str, options: &[&str]) -> Result<Lab> {
        // The system's Python: the lab needs only its standard library, and root's PATH may
        // lead to a pyenv shim.
        let python =
            ["/usr/bin/python3", "python3"].into_iter().find(|p| Path::new(p).is_file()).unwrap_or("python3");
        let mut serve = Command::new(python)
            .args([SCRIPT, "serve", "--hosts", &n.to_string(), "--group", group])
            .args(options)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {SCRIPT}"))?;
        let stdin = serve.stdin.take();
        // Read on a thread of its own: a long error (sshd's log) must not fill the pipe while
        // we wait for the description on stdout.
        let mut stderr = serve.stderr.take().expect("piped");
        let errors = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        });
        let mut line = String::new();
        let read = BufReader::new(serve.stdout.take().expect("piped")).read_line(&mut line);
        let description = read.ok().filter(|&n| n > 0).map(|_| serde_json::from_str::<Description>(&line));
        let Some(Ok(d)) = description else {
            // EOF on its stdin, never a kill: it tears down whatever it set up
            drop(stdin);
            let _ = serve.wait();
            let errors = errors.join().unwrap_or_default();
            match description {
                Some(Err(e)) => bail!("sshlab printed something else than its description ({e}): {line}"),
                _ => bail!("cannot start the ssh test hosts: {}", errors.trim()),
            }
        };
        Ok(Lab {
            hosts: d.hosts,
            dir: d.dir,
            key: d.key,
            user: d.user,
            ssh_options: d.ssh_options,
            inventory: d.inventory,
            serve,
            stdin,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // EOF on its stdin: the script tears the lab down and exits.
        drop(self.stdin.take());
        let _ = self.serve.wait();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lab_that_cannot_start_says_why() {
        let err = match super::Lab::start(0, "targets") {
            Ok(_) => panic!("a lab of no host started"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("--hosts must be at least 1"), "{err}");
    }
}
