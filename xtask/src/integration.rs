//! `cargo xtask integration`: ansible-core's own integration targets (from its sdist) run classic
//! and through the persistent-agent connection plugins, side by side.
//!
//! Each target is a role; it runs as `roles: [target]` against `testhost` (connection local, the
//! system Python), with `output_dir` set, in a fresh working directory with a fresh copy of the
//! targets per run (targets write relative paths, and into their own roles). A target that passes classic but not persistent, or ends with other
//! task counts, is a regression.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    setup,
    util::{output, root, run},
};

/// The targets for the modules the runner's benchmark and tests centre on.
pub const TARGETS: &[&str] = &["copy", "lineinfile", "file", "stat", "command_shell"];

/// One run's outcome.
#[derive(Debug, PartialEq)]
struct Outcome {
    rc: i32,
    /// The PLAY RECAP counters (ok, changed, failed, skipped, rescued, ignored).
    recap: String,
    /// Each task result in order: `TASK [role : name] => ok|changed|failed|fatal|skipping`.
    results: Vec<String>,
    /// Module runs the agent served (persistent runs).
    agent_runs: usize,
}

pub fn integration(targets: &[String]) -> Result<()> {
    setup::setup()?;
    let targets: Vec<String> =
        if targets.is_empty() { TARGETS.iter().map(|t| t.to_string()).collect() } else { targets.to_vec() };
    let work = std::env::temp_dir().join(format!("spawntrace-integration-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(work.clone());
    // the copy target duplicates ~/.ssh/authorized_keys (ansible-test's hosts have one)
    let keys = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
        .join(".ssh/authorized_keys");
    let _keys = (!keys.exists()).then(|| TempFile::create(&keys)).transpose()?;
    let mut regressions = Vec::new();
    println!("{:<10} {:<14} {:<11} {:>4}  {:<54} agent runs", "env", "target", "mode", "rc", "recap");
    for env in setup::envs()? {
        let python = env.join(".venv/bin/python");
        let version =
            output(Command::new(&python).args(["-c", "import ansible.release as r; print(r.__version__)"]))
                .context("ansible-core is not installed in the environment")?;
        let sdist = sdist(&version)?;
        let name = env.file_name().unwrap_or_default().to_string_lossy().into_owned();
        for target in &targets {
            let roles = sdist.join("test/integration/targets");
            anyhow::ensure!(
                roles.join(target).is_dir(),
                "ansible-core {version} has no integration target {target:?}"
            );
            let classic =
                run_target(&work.join(format!("{name}-{target}-classic")), &env, &roles, target, false)?;
            let persistent =
                run_target(&work.join(format!("{name}-{target}-persistent")), &env, &roles, target, true)?;
            for (mode, o) in [("classic", &classic), ("persistent", &persistent)] {
                println!("{name:<10} {target:<14} {mode:<11} {:>4}  {:<54} {}", o.rc, o.recap, o.agent_runs);
            }
            if persistent.agent_runs == 0 {
                regressions.push(format!("{name} {target}: no module ran through the agent"));
            }
            if (classic.rc, &classic.recap) != (persistent.rc, &persistent.recap) {
                regressions.push(format!(
                    "{name} {target}: classic rc {} [{}], persistent rc {} [{}]",
                    classic.rc, classic.recap, persistent.rc, persistent.recap
                ));
            }
            if let Some((i, (c, p))) =
                classic.results.iter().zip(&persistent.results).enumerate().find(|(_, (c, p))| c != p)
            {
                regressions.push(format!("{name} {target}: result {i} classic `{c}`, persistent `{p}`"));
            }
        }
    }
    if !regressions.is_empty() {
        bail!("persistent differs from classic:\n  {}", regressions.join("\n  "));
    }
    println!("integration: persistent ended every target exactly as classic did");
    Ok(())
}

/// The extracted sdist of ansible-core `version` (downloaded once into the cache).
fn sdist(version: &str) -> Result<PathBuf> {
    let cache = setup::cache_dir().join("sdist");
    let dir = cache.join(format!("ansible_core-{version}"));
    if dir.join("test/integration/targets").is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&cache)?;
    let pip = setup::cache_dir().join("tools/bin/pip");
    run(Command::new(&pip)
        .args(["download", "--quiet", "--no-deps", "--no-binary", ":all:", "--ignore-requires-python", "-d"])
        .arg(&cache)
        .arg(format!("ansible-core=={version}")))?;
    let archive = cache.join(format!("ansible_core-{version}.tar.gz"));
    run(Command::new("tar").arg("xzf").arg(&archive).arg("-C").arg(&cache))?;
    anyhow::ensure!(
        dir.join("test/integration/targets").is_dir(),
        "{} has no integration targets",
        archive.display()
    );
    Ok(dir)
}

fn run_target(dir: &Path, env: &Path, targets: &Path, target: &str, persistent: bool) -> Result<Outcome> {
    std::fs::create_dir_all(dir.join("out"))?;
    // a fresh copy of the targets per run: some write into their own role (copy's empty dirs)
    let roles = dir.join("targets");
    run(Command::new("cp").arg("-a").arg(targets).arg(&roles))?;
    // the system Python when there is one: the targets become other users, who must be able to
    // run the interpreter (the environment's may sit in a directory only its owner can enter)
    let system = Path::new("/usr/bin/python3");
    let python = if system.exists() { system.to_owned() } else { env.join(".venv/bin/python") };
    std::fs::write(
        dir.join("inventory.ini"),
        format!(
            "[testgroup]\ntesthost ansible_connection=local ansible_python_interpreter={}\n",
            python.display()
        ),
    )?;
    std::fs::write(
        dir.join("play.yml"),
        format!("- hosts: testhost\n  gather_facts: true\n  roles:\n    - {target}\n"),
    )?;
    std::fs::write(dir.join("ansible.cfg"), "")?;
    let timing = dir.join("timing.jsonl");
    let mut cmd = Command::new(env.join(".venv/bin/ansible-playbook"));
    cmd.args(["-i", "inventory.ini", "play.yml", "-e"])
        .arg(format!("output_dir={}", dir.join("out").display()))
        .current_dir(dir)
        .env("ANSIBLE_CONFIG", dir.join("ansible.cfg"))
        .env("ANSIBLE_ROLES_PATH", &roles)
        .env("ANSIBLE_NOCOLOR", "1")
        // targets that run ansible-playbook themselves (copy's no_log checks) find this one
        .env(
            "PATH",
            std::env::join_paths(
                std::iter::once(env.join(".venv/bin"))
                    .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
            )?,
        )
        .env_remove("ANSIBLE_CONNECTION_PLUGINS");
    if persistent {
        let plugins = root().join("tracer/python/ansible_collections/spawntrace/tracer/plugins/connection");
        cmd.env("ANSIBLE_CONNECTION_PLUGINS", plugins).env("SPAWNTRACE_AGENT_TIMING", &timing);
    }
    let log = std::fs::File::create(dir.join("run.log"))?;
    let status = cmd.stdout(log.try_clone()?).stderr(log).status().context("running ansible-playbook")?;
    let text = std::fs::read_to_string(dir.join("run.log"))?;
    let recap = text
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .nth(1)
        .and_then(|l| l.split_once(':'))
        .map(|(_, counts)| {
            counts.split_whitespace().filter(|c| !c.starts_with("unreachable=")).collect::<Vec<_>>().join(" ")
        })
        .unwrap_or_else(|| "(no recap)".into());
    let mut results = Vec::new();
    let mut task = "";
    for line in text.lines() {
        if line.starts_with("TASK [") {
            task = line.trim_end_matches(['*', ' ']);
        } else if let Some(status) =
            ["ok:", "changed:", "failed:", "fatal:", "skipping:"].iter().find(|s| line.starts_with(*s))
        {
            results.push(format!("{task} => {status}"));
        }
    }
    let agent_runs = std::fs::read_to_string(&timing).map(|t| t.lines().count()).unwrap_or(0);
    Ok(Outcome { rc: status.code().unwrap_or(-1), recap, results, agent_runs })
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An empty file created for the run and removed after it.
struct TempFile(PathBuf);

impl TempFile {
    fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, "").with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path.to_owned()))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
