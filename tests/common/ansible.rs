//! Running real ansible-playbook (from the project's uv environments) under spawntrace.
use std::path::{Path, PathBuf};

use spawntrace::ansible::attribution::Attribution;

use super::{Run, record_with};

fn envs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tracer/python/envs")
}

/// The ansible-core environments `cargo xtask setup` creates, oldest first. Skips the test when
/// there are none (fails under CI, where setup must have made them).
pub fn envs() -> Vec<PathBuf> {
    let root = envs_dir();
    let mut envs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    envs.retain(|e| e.join(".venv/bin/ansible-playbook").is_file());
    envs.sort();
    if envs.is_empty() && std::env::var_os("CI").is_some() {
        panic!("no Python environments under {}: `cargo xtask setup` makes them", root.display());
    }
    envs
}

/// The default environment, named in `tracer/python/envs/default-env` (the one the demo and
/// the benchmarks use), when it has been made (under CI it must have been).
pub fn default_env() -> Option<PathBuf> {
    let root = envs_dir();
    let name = std::fs::read_to_string(root.join("default-env")).expect("tracer/python/envs/default-env");
    let env = root.join(name.trim());
    let made = envs().contains(&env);
    assert!(
        made || std::env::var_os("CI").is_none(),
        "{} was not made: `cargo xtask setup` makes it",
        env.display()
    );
    made.then_some(env)
}

/// The ansible-core line of an environment, from its name (`core-2.16` → (2, 16)).
pub fn core_version(env: &Path) -> (u32, u32) {
    let name = env_name(env);
    let version = name.strip_prefix("core-").unwrap_or_else(|| panic!("{name} is not core-X.Y"));
    let (major, minor) = version.split_once('.').unwrap_or_else(|| panic!("{name} is not core-X.Y"));
    (major.parse().expect("major version"), minor.parse().expect("minor version"))
}

pub fn env_name(env: &Path) -> String {
    env.file_name().unwrap().to_string_lossy().into_owned()
}

/// A playbook run traced by spawntrace.
pub struct PlaybookRun {
    pub run: Run,
}

impl PlaybookRun {
    /// The run's attribution; panics when no plugin message arrived.
    pub fn attribution(&self) -> &Attribution {
        self.run.analysis.attribution.as_ref().expect("no plugin message arrived")
    }
}

/// Writes `playbook` (YAML) next to `inventory` (INI text or a path) in a fresh directory and
/// runs it with `env`'s ansible-playbook under spawntrace. Extra environment variables and
/// ansible-playbook arguments are passed through.
pub fn playbook(
    env: &Path,
    playbook: &str,
    inventory: &str,
    vars: &[(&str, &str)],
    args: &[&str],
) -> PlaybookRun {
    playbook_with(&[], env, playbook, inventory, vars, args)
}

/// As [`playbook`], with extra spawntrace options (e.g. `--persistent`).
pub fn playbook_with(
    spawntrace_args: &[&str],
    env: &Path,
    playbook: &str,
    inventory: &str,
    vars: &[(&str, &str)],
    args: &[&str],
) -> PlaybookRun {
    let dir = tempfile::tempdir().unwrap();
    let pb = dir.path().join("playbook.yml");
    std::fs::write(&pb, playbook).unwrap();
    let inv = if Path::new(inventory).is_file() {
        PathBuf::from(inventory)
    } else {
        let p = dir.path().join("inventory.ini");
        std::fs::write(&p, inventory).unwrap();
        p
    };
    let ap = env.join(".venv/bin/ansible-playbook");
    let mut argv: Vec<String> = vec![ap.display().to_string(), "-i".into(), inv.display().to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    argv.push(pb.display().to_string());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    // An empty config: the test's settings come from the environment only.
    let cfg = dir.path().join("ansible.cfg");
    std::fs::write(&cfg, "[defaults]\n").unwrap();
    let mut all_vars: Vec<(&str, &str)> = vec![
        ("ANSIBLE_CONFIG", cfg.to_str().unwrap()),
        ("ANSIBLE_HOST_KEY_CHECKING", "False"),
        ("ANSIBLE_LOCAL_TEMP", "/tmp/spawntrace-test-ansible-local"),
    ];
    all_vars.extend_from_slice(vars);
    let mut opts = vec!["-q"];
    opts.extend_from_slice(spawntrace_args);
    let run = record_with(&opts, &all_vars, &argv);
    assert_eq!(run.code(), Some(0), "ansible-playbook failed:\n{}\n{}", run.stdout(), run.stderr());
    PlaybookRun { run }
}
