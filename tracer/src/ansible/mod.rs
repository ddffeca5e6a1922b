//! Everything spawntrace knows of Ansible: the bundled plugins and how they are injected, the
//! channel they report on and its message schema, the join of their messages with the kernel's
//! process tree, and what Ansible's processes are.
pub mod attribution;
pub mod channel;
pub mod config;
pub mod messages;
pub mod processes;
pub mod target_attribution;
pub mod targets;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use include_dir::{Dir, include_dir};

use crate::record::launch::RunAs;
use channel::Channel;

/// The bundled collection (callback and connection plugins, agent), embedded so that spawntrace
/// works without installing anything.
static COLLECTIONS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/python/ansible_collections");

/// Name under which the callback plugin is enabled.
pub const CALLBACK_NAME: &str = "spawntrace";

/// Whether to inject the callback plugin (`--ansible`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum InjectCallback {
    /// When the command runs ansible-playbook or ansible (possibly behind wrappers such as
    /// `uv run` or `env`).
    #[default]
    Auto,
    Always,
    Never,
}

impl InjectCallback {
    pub fn enabled(self, argv: &[OsString]) -> bool {
        match self {
            InjectCallback::Always => true,
            InjectCallback::Never => false,
            InjectCallback::Auto => argv.iter().take(8).any(|a| {
                let a = a.to_string_lossy();
                let b = crate::model::basename(&a);
                b == "ansible" || b.starts_with("ansible-playbook")
            }),
        }
    }
}

/// A private directory holding the plugins and the channel's socket, for one traced run.
///
/// It is made, and removed, with the command's user's filesystem credentials
/// ([`crate::output::as_user`]): a 0700 directory of theirs, which root never writes into or
/// reads back from by path (the socket is read through its fd).
pub struct Session {
    dir: Option<tempfile::TempDir>,
    owner: Option<RunAs>,
    /// Variables to add to the command's environment.
    pub env: Vec<(OsString, OsString)>,
}

/// Whether this build embeds the persistent-agent connection plugins.
pub fn has_persistent_plugins() -> bool {
    COLLECTIONS.get_file("spawntrace/tracer/plugins/connection/local.py").is_some()
}

/// Whether the persistent agents run a module in a runner process shared with other module runs
/// or in a fresh one (the connection option `spawntrace_isolation`, agent `isolation.py`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// In-process for the builtin modules known to be safe there, a fresh runner for the others.
    #[default]
    Auto,
    /// Every module in-process (runners still retire after a module that changed their state).
    InProcess,
    /// A fresh runner for every module run.
    Fork,
}

impl Isolation {
    /// The environment that sets it (`SPAWNTRACE_ISOLATION`; a `spawntrace_isolation` variable
    /// of a host or task still wins, as Ansible's variables win over its environment).
    pub fn env(self) -> (&'static str, &'static str) {
        let value = match self {
            Isolation::Auto => "auto",
            Isolation::InProcess => "in-process",
            Isolation::Fork => "fork",
        };
        ("SPAWNTRACE_ISOLATION", value)
    }
}

/// Which plugins a [`Session`] injects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plugins {
    /// The callback plugin and its channel (attribution).
    pub callback: bool,
    /// The persistent-agent connection plugins (`local`, `ssh`).
    pub persistent: bool,
    /// An `ssh` connection plugin that has spawntrace record each SSH target, and the socket
    /// it asks on (the persistent agent's `ssh` plugin asks too).
    pub targets: bool,
}

/// The sockets a [`Session`] binds for spawntrace to serve.
#[derive(Default)]
pub struct Sockets {
    /// The plugins' attribution messages.
    pub channel: Option<Channel>,
    /// The connection plugins' requests to record a target ([`targets`]).
    pub targets: Option<std::os::unix::net::UnixListener>,
}

impl Session {
    /// Writes the plugins, binds the channel (when the callback is injected) and works out the
    /// environment, all owned by the user the command will run as.
    pub fn start(run_as: Option<&RunAs>, inject: Plugins) -> Result<(Self, Sockets)> {
        let home =
            run_as.map(|r| PathBuf::from(&r.home)).or_else(|| std::env::var_os("HOME").map(PathBuf::from));
        let cwd = std::env::current_dir().context("current directory")?;
        crate::output::as_user(run_as, || {
            let dir = tempfile::Builder::new()
                .prefix("spawntrace-")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .tempdir()
                .context("creating a private directory for the Ansible plugins")?;
            let mut session = Self { dir: Some(dir), owner: run_as.cloned(), env: Vec::new() };
            let root = session.collections();
            write_tree(&COLLECTIONS, &root)?;
            let socket = session.path().join("events.sock");
            let channel = match inject.callback {
                true => Some(Channel::bind(&socket)?),
                false => None,
            };
            let target_socket = session.path().join("targets.sock");
            let targets = match inject.targets {
                true => Some(
                    std::os::unix::net::UnixListener::bind(&target_socket)
                        .with_context(|| format!("binding {}", target_socket.display()))?,
                ),
                false => None,
            };
            // Read as the user: a config file root could read but they cannot is not theirs to use.
            let settings = config::plugin_settings(&cwd, |k| std::env::var(k).ok(), home.as_deref())?;
            let plugins = root.join("spawntrace/tracer/plugins");
            let mut env: Vec<(OsString, OsString)> = Vec::new();
            if inject.callback {
                let callbacks = settings.callback_path_with(&plugins.join("callback"), home.as_deref());
                env.push(("ANSIBLE_CALLBACK_PLUGINS".into(), callbacks.into()));
                env.push(("ANSIBLE_CALLBACKS_ENABLED".into(), settings.enabled_with(CALLBACK_NAME).into()));
                env.push(("SPAWNTRACE_SOCKET".into(), socket.into_os_string()));
            }
            // The persistent agent's ssh plugin records targets too: one plugin directory.
            let connection = match (inject.persistent, inject.targets) {
                (true, _) => Some(plugins.join("connection")),
                (false, true) => Some(plugins.join("target_recording")),
                (false, false) => None,
            };
            if let Some(connection) = connection {
                anyhow::ensure!(
                    connection.join("ssh.py").is_file(),
                    "this spawntrace was built without its connection plugins"
                );
                let path = settings.connection_path_with(&connection, home.as_deref());
                env.push(("ANSIBLE_CONNECTION_PLUGINS".into(), path.into()));
            }
            if inject.targets {
                env.push((targets::SOCKET_ENV.into(), target_socket.into_os_string()));
            }
            session.env = env;
            Ok((session, Sockets { channel, targets }))
        })
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().expect("removed only on drop").path()
    }

    /// Where the bundled `ansible_collections` tree was written.
    pub fn collections(&self) -> PathBuf {
        self.path().join("ansible_collections")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = crate::output::as_user(self.owner.as_ref(), || Ok(dir.close()?));
        }
    }
}

/// Writes the embedded tree into a new directory, leaving out tests and bytecode.
fn write_tree(dir: &Dir<'_>, to: &Path) -> Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    std::fs::create_dir(to).with_context(|| format!("creating {}", to.display()))?;
    for f in dir.files() {
        let name = f.path().file_name().unwrap_or_default();
        if name.to_string_lossy().ends_with(".pyc") {
            continue;
        }
        let path = to.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut out| out.write_all(f.contents()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for d in dir.dirs() {
        let name = d.path().file_name().unwrap_or_default();
        if name == "__pycache__" || name == "tests" {
            continue;
        }
        write_tree(d, &to.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_mode_spots_ansible_behind_wrappers() {
        let v = |s: &[&str]| s.iter().map(OsString::from).collect::<Vec<_>>();
        use InjectCallback::{Always, Auto, Never};
        assert!(Auto.enabled(&v(&["ansible-playbook", "site.yml"])));
        assert!(Auto.enabled(&v(&["/venv/bin/ansible-playbook", "site.yml"])));
        assert!(Auto.enabled(&v(&["uv", "run", "ansible-playbook", "x.yml"])));
        assert!(Auto.enabled(&v(&["ansible", "all", "-m", "ping"])));
        assert!(!Auto.enabled(&v(&["sh", "-c", "true"])));
        assert!(!Never.enabled(&v(&["ansible-playbook"])));
        assert!(Always.enabled(&v(&["make"])));
    }

    #[test]
    fn bundled_callback_is_embedded() {
        assert!(COLLECTIONS.get_file("spawntrace/tracer/plugins/callback/spawntrace.py").is_some());
    }
}
