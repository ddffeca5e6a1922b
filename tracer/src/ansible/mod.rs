//! Ansible attribution: the bundled plugins, the channel they report on, and the join of their
//! reports with the kernel's process tree.
pub mod attribution;
pub mod channel;
pub mod config;

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

/// Whether to inject the plugins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// When the command runs ansible-playbook or ansible (possibly behind wrappers such as
    /// `uv run` or `env`).
    #[default]
    Auto,
    Always,
    Never,
}

impl Mode {
    pub fn enabled(self, argv: &[String]) -> bool {
        match self {
            Mode::Always => true,
            Mode::Never => false,
            Mode::Auto => argv.iter().take(8).any(|a| {
                let b = crate::model::basename(a);
                b == "ansible" || b.starts_with("ansible-playbook")
            }),
        }
    }
}

/// A private directory holding the plugins and the channel's socket, for one traced run.
pub struct Session {
    dir: tempfile::TempDir,
    /// Variables to add to the command's environment.
    pub env: Vec<(OsString, OsString)>,
}

/// Whether this build embeds the persistent-agent connection plugins.
pub fn has_persistent_plugins() -> bool {
    COLLECTIONS.get_file("spawntrace/tracer/plugins/connection/local.py").is_some()
}

/// The environment that makes the persistent agents run modules in-process: one runner process
/// runs up to this many modules in a row instead of one (opt-in; see the agent's `_Reuse`).
pub const IN_PROCESS_ENV: (&str, &str) = ("SPAWNTRACE_AGENT_REUSE", "100");

/// What a [`Session`] injects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inject {
    /// The callback plugin and its channel (attribution).
    pub callback: bool,
    /// The persistent-agent connection plugins (`local`, `ssh`).
    pub persistent: bool,
}

impl Session {
    /// Writes the plugins, binds the channel (when the callback is injected) and works out the
    /// environment, all owned by the user the command will run as.
    pub fn start(run_as: Option<&RunAs>, inject: Inject) -> Result<(Self, Option<Channel>)> {
        let dir = tempfile::Builder::new()
            .prefix("spawntrace-")
            .tempdir()
            .context("creating a private directory for the Ansible plugins")?;
        let root = dir.path().join("ansible_collections");
        write_tree(&COLLECTIONS, &root)?;
        let socket = dir.path().join("events.sock");
        let channel = match inject.callback {
            true => Some(Channel::bind(&socket)?),
            false => None,
        };
        if let Some(user) = run_as {
            chown_tree(dir.path(), user)?;
        }
        let home =
            run_as.map(|r| PathBuf::from(&r.home)).or_else(|| std::env::var_os("HOME").map(PathBuf::from));
        let cwd = std::env::current_dir().context("current directory")?;
        let settings = config::plugin_settings(&cwd, |k| std::env::var(k).ok(), home.as_deref())?;
        let plugins = root.join("spawntrace/tracer/plugins");
        let mut env: Vec<(OsString, OsString)> = Vec::new();
        if inject.callback {
            let callbacks = settings.callback_path_with(&plugins.join("callback"), home.as_deref());
            env.push(("ANSIBLE_CALLBACK_PLUGINS".into(), callbacks.into()));
            env.push(("ANSIBLE_CALLBACKS_ENABLED".into(), settings.enabled_with(CALLBACK_NAME).into()));
            env.push(("SPAWNTRACE_SOCKET".into(), socket.into_os_string()));
        }
        if inject.persistent {
            let connection = plugins.join("connection");
            anyhow::ensure!(
                connection.join("local.py").is_file(),
                "this spawntrace was built without the persistent-agent connection plugins"
            );
            let path = settings.connection_path_with(&connection, home.as_deref());
            env.push(("ANSIBLE_CONNECTION_PLUGINS".into(), path.into()));
        }
        Ok((Self { dir, env }, channel))
    }

    /// Where the bundled `ansible_collections` tree was written.
    pub fn collections(&self) -> PathBuf {
        self.dir.path().join("ansible_collections")
    }
}

/// Writes the embedded tree, leaving out tests and bytecode.
fn write_tree(dir: &Dir<'_>, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for f in dir.files() {
        let name = f.path().file_name().unwrap_or_default();
        if name.to_string_lossy().ends_with(".pyc") {
            continue;
        }
        std::fs::write(to.join(name), f.contents())
            .with_context(|| format!("writing {}", to.join(name).display()))?;
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

fn chown_tree(path: &Path, user: &RunAs) -> Result<()> {
    user.chown(path)?;
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), user)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_mode_spots_ansible_behind_wrappers() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(Mode::Auto.enabled(&v(&["ansible-playbook", "site.yml"])));
        assert!(Mode::Auto.enabled(&v(&["/venv/bin/ansible-playbook", "site.yml"])));
        assert!(Mode::Auto.enabled(&v(&["uv", "run", "ansible-playbook", "x.yml"])));
        assert!(Mode::Auto.enabled(&v(&["ansible", "all", "-m", "ping"])));
        assert!(!Mode::Auto.enabled(&v(&["sh", "-c", "true"])));
        assert!(!Mode::Never.enabled(&v(&["ansible-playbook"])));
        assert!(Mode::Always.enabled(&v(&["make"])));
    }

    #[test]
    fn bundled_callback_is_embedded() {
        assert!(COLLECTIONS.get_file("spawntrace/tracer/plugins/callback/spawntrace.py").is_some());
    }
}
