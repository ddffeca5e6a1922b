//! The user's own plugin settings, found the way Ansible finds them, so spawntrace can add its
//! callback (and its connection plugins) without replacing theirs.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// Plugin settings in effect for a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginSettings {
    /// `callback_plugins` search path (env `ANSIBLE_CALLBACK_PLUGINS` or ansible.cfg), if set.
    pub callback_path: Option<String>,
    /// `callbacks_enabled` (or the older `callback_whitelist`), if set.
    pub enabled: Option<String>,
    /// `connection_plugins` search path (env `ANSIBLE_CONNECTION_PLUGINS` or ansible.cfg), if set.
    pub connection_path: Option<String>,
    /// The ansible.cfg these came from, if any.
    pub config_file: Option<PathBuf>,
}

/// Ansible's config file search: $ANSIBLE_CONFIG, ./ansible.cfg (unless the directory is
/// world-writable), ~/.ansible.cfg, /etc/ansible/ansible.cfg.
pub fn find_config(cwd: &Path, env: impl Fn(&str) -> Option<String>, home: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = env("ANSIBLE_CONFIG") {
        let p = PathBuf::from(p);
        let p = if p.is_dir() { p.join("ansible.cfg") } else { p };
        if p.is_file() {
            return Some(p);
        }
    }
    let world_writable = std::fs::metadata(cwd)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o002 != 0)
        .unwrap_or(true);
    let mut candidates = Vec::new();
    if !world_writable {
        candidates.push(cwd.join("ansible.cfg"));
    }
    if let Some(h) = home {
        candidates.push(h.join(".ansible.cfg"));
    }
    candidates.push(PathBuf::from("/etc/ansible/ansible.cfg"));
    candidates.into_iter().find(|p| p.is_file())
}

/// Reads the plugin settings: environment variables win over the config file.
pub fn plugin_settings(
    cwd: &Path,
    env: impl Fn(&str) -> Option<String>,
    home: Option<&Path>,
) -> Result<PluginSettings> {
    let config_file = find_config(cwd, &env, home);
    let mut s = PluginSettings { config_file: config_file.clone(), ..Default::default() };
    if let Some(cfg) = &config_file {
        let ini =
            ini::Ini::load_from_file_noescape(cfg).with_context(|| format!("reading {}", cfg.display()))?;
        if let Some(defaults) = ini.section(Some("defaults")) {
            let get = |k: &str| defaults.get(k).map(strip_inline_comment).filter(|v| !v.is_empty());
            // Relative entries are relative to the config file, as Ansible resolves them.
            let base = cfg.parent().unwrap_or(Path::new("."));
            let path = |k: &str| {
                get(k).map(|v| {
                    v.split(':')
                        .map(|e| match e.starts_with(['/', '~', '$']) {
                            true => e.to_owned(),
                            false => base.join(e).display().to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(":")
                })
            };
            s.callback_path = path("callback_plugins");
            s.connection_path = path("connection_plugins");
            s.enabled = get("callbacks_enabled").or_else(|| get("callback_whitelist"));
        }
    }
    if let Some(v) = env("ANSIBLE_CALLBACK_PLUGINS") {
        s.callback_path = Some(v);
    }
    if let Some(v) = env("ANSIBLE_CONNECTION_PLUGINS") {
        s.connection_path = Some(v);
    }
    if let Some(v) = env("ANSIBLE_CALLBACKS_ENABLED").or_else(|| env("ANSIBLE_CALLBACK_WHITELIST")) {
        s.enabled = Some(v);
    }
    Ok(s)
}

/// Ansible's configparser treats `;` after whitespace as an inline comment.
fn strip_inline_comment(v: &str) -> String {
    let cut = v.find(" ;").or_else(|| v.find("\t;")).unwrap_or(v.len());
    v[..cut].trim().to_owned()
}

/// `dir` in front of a plugin search path: the user's, or Ansible's default for `kind`
/// (`callback`, `connection`) when the user set none.
fn path_with(user: Option<&str>, dir: &Path, kind: &str, home: Option<&Path>) -> String {
    let rest = match user {
        Some(p) => p.to_owned(),
        None => {
            let home = home.map(|h| h.display().to_string()).unwrap_or_else(|| "~".into());
            format!("{home}/.ansible/plugins/{kind}:/usr/share/ansible/plugins/{kind}")
        }
    };
    format!("{}:{rest}", dir.display())
}

impl PluginSettings {
    /// `ANSIBLE_CALLBACK_PLUGINS` with `dir` first.
    pub fn callback_path_with(&self, dir: &Path, home: Option<&Path>) -> String {
        path_with(self.callback_path.as_deref(), dir, "callback", home)
    }

    /// `ANSIBLE_CONNECTION_PLUGINS` with `dir` first, so its `local`/`ssh` shadow the builtins
    /// for plays that name them without a collection.
    pub fn connection_path_with(&self, dir: &Path, home: Option<&Path>) -> String {
        path_with(self.connection_path.as_deref(), dir, "connection", home)
    }

    /// `ANSIBLE_CALLBACKS_ENABLED` with `name` appended to the user's list.
    pub fn enabled_with(&self, name: &str) -> String {
        let mut list: Vec<String> = self
            .enabled
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if !list.iter().any(|c| c == name) {
            list.push(name.to_owned());
        }
        list.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_values_merge_and_env_wins() {
        let dir = tempfile::tempdir().unwrap();
        let cfg =
            "[defaults]\ncallbacks_enabled = profile_tasks, timer ; inline\ncallback_plugins = /opt/cb:rel\n";
        std::fs::write(dir.path().join("ansible.cfg"), cfg).unwrap(); // safe: test fixture, private tempdir
        let no_env = |_: &str| None;
        let s = plugin_settings(dir.path(), no_env, None).unwrap();
        assert_eq!(s.enabled.as_deref(), Some("profile_tasks, timer"));
        assert_eq!(s.enabled_with("spawntrace"), "profile_tasks,timer,spawntrace");
        let rel = dir.path().join("rel");
        assert_eq!(
            s.callback_path_with(Path::new("/t/cb"), None),
            format!("/t/cb:/opt/cb:{}", rel.display())
        );

        let env = |k: &str| (k == "ANSIBLE_CALLBACKS_ENABLED").then(|| "mine".to_owned());
        let s = plugin_settings(dir.path(), env, None).unwrap();
        assert_eq!(s.enabled_with("spawntrace"), "mine,spawntrace");
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let s = plugin_settings(dir.path(), |_| None, Some(Path::new("/home/u"))).unwrap();
        assert_eq!(s.enabled_with("spawntrace"), "spawntrace");
        assert_eq!(
            s.callback_path_with(Path::new("/t"), Some(Path::new("/home/u"))),
            "/t:/home/u/.ansible/plugins/callback:/usr/share/ansible/plugins/callback"
        );
        assert_eq!(
            s.connection_path_with(Path::new("/c"), Some(Path::new("/home/u"))),
            "/c:/home/u/.ansible/plugins/connection:/usr/share/ansible/plugins/connection"
        );
    }
}
