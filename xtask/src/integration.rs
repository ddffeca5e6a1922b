//! `cargo xtask integration`: ansible-core's own integration targets (from its sdist) run classic
//! and through the persistent-agent connection plugins, side by side.
//!
//! Each target is a role; it runs as `roles: [target]` against `testhost` (connection local, the
//! system Python), with `output_dir` set, in a fresh working directory with a fresh copy of the
//! targets per run (targets write relative paths, and into their own roles), on a throw-away
//! root: an overlay over `/` discarded after the run, with an empty `/tmp` (targets create users,
//! sudoers files and files in /tmp that would change a later run's results). A target that ends
//! otherwise persistent than classic is a regression. Results are compared by position; random
//! temporary paths in task names are masked. Each run's log is kept in `target/integration/`.
use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    setup,
    util::{output, root, run},
};

/// The targets for the modules the runner's benchmark and tests centre on, and those that run
/// modules as an unprivileged user made for the run (setup_test_user: a become password).
pub const TARGETS: &[&str] =
    &["copy", "lineinfile", "file", "stat", "command_shell", "unarchive", "find", "slurp"];

/// Results whose value depends on the wall clock, not on how modules run: not compared.
/// (target, task line, occurrence of that task line in the run, result line within the task, why)
const CLOCK_DEPENDENT: &[(&str, &str, usize, usize, &str)] = &[(
    "copy",
    "TASK [copy : copy]",
    0,
    1,
    "invocation.yml's content embeds `date`: its second item changes only when a second ticks between the items",
)];

/// One result line of a run: `ok:`, `changed:`, … under a task.
#[derive(Debug, PartialEq)]
struct TaskResult {
    /// `TASK [role : name]`.
    task: String,
    /// How many times this task line appeared before in the run.
    occurrence: usize,
    /// The result's place among its task's result lines (loop items, hosts).
    index: usize,
    /// `ok`, `changed`, `failed`, `fatal` or `skipping`.
    status: String,
}

impl std::fmt::Display for TaskResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (#{}, result {}) => {}", self.task, self.occurrence, self.index, self.status)
    }
}

/// Why the result is not compared, when it is clock-dependent.
fn clock_dependent(target: &str, r: &TaskResult) -> Option<&'static str> {
    CLOCK_DEPENDENT
        .iter()
        .find(|(t, task, occurrence, index, _)| {
            (*t, *task, *occurrence, *index) == (target, r.task.as_str(), r.occurrence, r.index)
        })
        .map(|c| c.4)
}

/// One run's outcome.
#[derive(Debug, PartialEq)]
struct Outcome {
    rc: i32,
    /// The PLAY RECAP counters (ok, changed, failed, skipped, rescued, ignored).
    recap: String,
    /// Each task result in order.
    results: Vec<TaskResult>,
    /// Module runs the agent served (persistent runs).
    agent_runs: usize,
}

pub fn integration(env_names: &[String], targets: &[String]) -> Result<()> {
    setup::setup()?;
    let targets: Vec<String> =
        if targets.is_empty() { TARGETS.iter().map(|t| t.to_string()).collect() } else { targets.to_vec() };
    // not under /tmp, which each run gets empty (see run_target); /var/tmp as the targets become
    // other users, who must reach their files: a new directory of a random name, root's, that
    // only root writes in (the runs' files are root's configuration and playbooks)
    let work_dir = tempfile::Builder::new()
        .prefix("spawntrace-integration-")
        .permissions(std::fs::Permissions::from_mode(0o755))
        .tempdir_in(std::fs::canonicalize("/var/tmp").context("/var/tmp")?)
        .context("creating the integration runs' directory in /var/tmp")?;
    let work = work_dir.path().to_owned();
    let logs = root().join("target/integration");
    std::fs::create_dir_all(&logs)?;
    println!("{:<10} {:<14} {:<11} {:>4}  {:<54} agent runs", "env", "target", "mode", "rc", "recap");
    // the oldest and the newest ansible-core unless told (the others run the runner's e2e tests)
    let mut envs = setup::envs()?;
    if !env_names.is_empty() {
        envs = env_names
            .iter()
            .map(|name| {
                envs.iter()
                    .find(|e| e.file_name().is_some_and(|n| n == name.as_str()))
                    .cloned()
                    .with_context(|| format!("no environment {name:?} under tracer/python/envs"))
            })
            .collect::<Result<_>>()?;
    } else if envs.len() > 2 {
        envs.drain(1..envs.len() - 1);
    }
    // The environments run side by side: each run has a root, processes and /tmp of its own
    // (see run_target), and each environment is one ansible-playbook after another.
    let mut prepared = Vec::new();
    for env in envs {
        let python = env.join(".venv/bin/python");
        let version =
            output(Command::new(&python).args(["-c", "import ansible.release as r; print(r.__version__)"]))
                .context("ansible-core is not installed in the environment")?;
        // the throw-away root shows the root filesystem (and binds the checkout): an interpreter
        // on another filesystem would not be there
        let interpreter = std::fs::canonicalize(&python)?;
        anyhow::ensure!(
            std::fs::metadata(&interpreter)?.dev() == std::fs::metadata("/")?.dev()
                || interpreter.starts_with(root().canonicalize()?),
            "{} is not on the root filesystem, which is all the integration runs' root shows",
            interpreter.display()
        );
        let roles = sdist(&version)?.join("test/integration/targets");
        for target in &targets {
            anyhow::ensure!(
                roles.join(target).is_dir(),
                "ansible-core {version} has no integration target {target:?}"
            );
        }
        prepared.push((env, roles));
    }
    let results: Vec<Result<Vec<String>>> = std::thread::scope(|scope| {
        let runs: Vec<_> = prepared
            .iter()
            .map(|(env, roles)| scope.spawn(|| run_env(env, roles, &targets, &work, &logs)))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))).collect()
    });
    let mut regressions = Vec::new();
    for ((env, _), r) in prepared.iter().zip(results) {
        match r {
            Ok(found) => regressions.extend(found),
            Err(e) => regressions.push(format!("{}: {e:#}", env.display())),
        }
    }
    if !regressions.is_empty() {
        bail!(
            "persistent differs from classic (logs in {}):\n  {}",
            logs.display(),
            regressions.join("\n  ")
        );
    }
    println!("integration: persistent ended every target exactly as classic did");
    Ok(())
}

/// Runs `targets` of one environment classic then persistent; returns how they differ.
fn run_env(env: &Path, roles: &Path, targets: &[String], work: &Path, logs: &Path) -> Result<Vec<String>> {
    let name = env.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut regressions = Vec::new();
    for target in targets {
        let classic = run_target(&work.join(format!("{name}-{target}-classic")), env, roles, target, false)?;
        let persistent =
            run_target(&work.join(format!("{name}-{target}-persistent")), env, roles, target, true)?;
        for (mode, o) in [("classic", &classic), ("persistent", &persistent)] {
            println!("{name:<10} {target:<14} {mode:<11} {:>4}  {:<54} {}", o.rc, o.recap, o.agent_runs);
            let run = format!("{name}-{target}-{mode}");
            std::fs::copy(work.join(&run).join("run.log"), logs.join(format!("{run}.log")))?;
        }
        for (mode, o) in [("classic", &classic), ("persistent", &persistent)] {
            if o.results.is_empty() {
                regressions.push(format!("{name} {target}: the {mode} run ran no task (rc {})", o.rc));
            }
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
        if classic.results.len() != persistent.results.len() {
            regressions.push(format!(
                "{name} {target}: {} results classic, {} persistent",
                classic.results.len(),
                persistent.results.len()
            ));
        }
        for (i, (c, p)) in classic.results.iter().zip(&persistent.results).enumerate() {
            if c == p {
                continue;
            }
            if (&c.task, c.occurrence, c.index) == (&p.task, p.occurrence, p.index)
                && let Some(why) = clock_dependent(target, c)
            {
                println!("{name:<10} {target:<14} not compared: `{c}` vs `{}`: {why}", p.status);
                continue;
            }
            regressions.push(format!("{name} {target}: result {i} classic `{c}`, persistent `{p}`"));
            break;
        }
    }
    Ok(regressions)
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
    // A throw-away root per run: in mount, pid, ipc and uts namespaces of its own, an overlay
    // over `/` whose upper layer is a tmpfs that goes with the namespace, so nothing a target
    // does to the root filesystem (users, groups, /etc/sudoers.d, packages, files) reaches the
    // host or the next run, and no process it leaves outlives it (the namespace's first process
    // ends the run). /proc is the namespace's own, /sys read-only, /dev the host's with a fresh
    // /dev/shm; /tmp starts empty (copy's link targets, /tmp/worldwritable); the run's directory
    // is bound in writable (its log and outputs are kept), the checkout (environments, plugins)
    // read-only, also when it lives under /tmp (a CI clone). Paths are canonical: they are
    // resolved against the host's root before the chroot. A set-up step that fails exits 125.
    let stage = dir.with_file_name(format!("{}-root", dir.file_name().unwrap_or_default().to_string_lossy()));
    std::fs::create_dir(&stage).with_context(|| format!("creating {}", stage.display()))?;
    let _stage = RemoveEmptyDirOnDrop(stage.clone());
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--ipc",
        "--uts",
        "sh",
        "-c",
        r#"must() { "$@" || exit 125; }
r="$ST_STAGE/root"
must mount -t tmpfs -o mode=0700 spawntrace-integration "$ST_STAGE"
must mkdir "$ST_STAGE/upper" "$ST_STAGE/work" "$r"
must mount -t overlay spawntrace-integration -o "lowerdir=/,upperdir=$ST_STAGE/upper,workdir=$ST_STAGE/work" "$r"
must mount -t proc proc "$r/proc"
must mount -t sysfs -o ro sysfs "$r/sys"
must mount --rbind /dev "$r/dev"
must mount -t tmpfs -o mode=1777 tmpfs "$r/dev/shm"
must mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
must mkdir -p "$r$ST_CHECKOUT" "$r$ST_DIR"
must mount --bind "$ST_CHECKOUT" "$r$ST_CHECKOUT"
must mount -o remount,bind,ro "$r$ST_CHECKOUT"
must mount --bind "$ST_DIR" "$r$ST_DIR"
dir=$ST_DIR
unset ST_STAGE ST_DIR ST_CHECKOUT
# the copy target duplicates ~/.ssh/authorized_keys (ansible-test's hosts have one): made in
# the new root, by a shell in it
chroot "$r" sh -c 'mkdir -p "$HOME/.ssh" && { [ -e "$HOME/.ssh/authorized_keys" ] || : > "$HOME/.ssh/authorized_keys"; } || exit 125
cd "$1" || exit 125
shift
exec "$@"' sh "$dir" "$@""#,
        "sh",
    ])
    .env("ST_STAGE", &stage)
    .env("ST_DIR", dir)
    .env("ST_CHECKOUT", root().canonicalize()?)
    .arg(env.join(".venv/bin/ansible-playbook"))
    .args(["-i", "inventory.ini", "play.yml", "-e"])
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
    if status.code() == Some(125) {
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        bail!(
            "setting up the throw-away root for {} failed: {}",
            dir.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        );
    }
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
    let mut seen = std::collections::HashMap::<String, usize>::new();
    let (mut task, mut occurrence, mut index) = (String::new(), 0, 0);
    for line in text.lines() {
        if line.starts_with("TASK [") {
            task = mask_temporary_paths(line.trim_end_matches(['*', ' ']));
            let n = seen.entry(task.clone()).or_default();
            (occurrence, index) = (*n, 0);
            *n += 1;
        } else if let Some(status) =
            ["ok:", "changed:", "failed:", "fatal:", "skipping:"].iter().find(|s| line.starts_with(*s))
        {
            let status = status.trim_end_matches(':').to_owned();
            results.push(TaskResult { task: task.clone(), occurrence, index, status });
            index += 1;
        }
    }
    let agent_runs = std::fs::read_to_string(&timing).map(|t| t.lines().count()).unwrap_or(0);
    Ok(Outcome { rc: status.code().unwrap_or(-1), recap, results, agent_runs })
}

/// `name` with each path component right under `/tmp/` replaced by `*`: task names that embed a
/// directory made by mkdtemp (unarchive's `/tmp/ansible.XXXX.test`) differ in every run.
fn mask_temporary_paths(name: &str) -> String {
    let mut masked = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find("/tmp/") {
        let (before, after) = rest.split_at(at + "/tmp/".len());
        masked.push_str(before);
        let end = after.find(|c: char| c == '/' || c == ']' || c.is_whitespace()).unwrap_or(after.len());
        if end > 0 {
            masked.push('*');
        }
        rest = &after[end..];
    }
    masked.push_str(rest);
    masked
}

/// A directory that is removed if it is empty (never recursively: it is a mount point in the
/// runs' namespaces).
struct RemoveEmptyDirOnDrop(PathBuf);

impl Drop for RemoveEmptyDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::{mask_temporary_paths, run_target};
    use crate::setup;

    /// A role that changes the machine in the ways targets do, and leaves a process running.
    const LEAKY_ROLE: &str = r#"
- user: {name: spawntrace-leak-test}
- copy: {dest: /etc/spawntrace-leak-test, content: "x\n"}
- file: {path: /tmp/spawntrace-leak-test, state: touch}
- shell: "nohup /usr/bin/python3 -c 'import time; time.sleep(300)' spawntrace-leak-test >/dev/null 2>&1 &"
"#;

    #[test]
    fn a_run_leaves_nothing_on_the_host() {
        let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let env = setup::default_env().ok().filter(|e| e.join(".venv/bin/ansible-playbook").is_file());
        let (true, Some(env)) = (root, env) else {
            assert!(std::env::var_os("CI").is_none(), "needs root and `cargo xtask setup`'s environments");
            eprintln!("skipped: needs root and `cargo xtask setup`'s environments");
            return;
        };
        let work = tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempdir_in(std::fs::canonicalize("/var/tmp").unwrap())
            .unwrap();
        let roles = work.path().join("roles");
        std::fs::create_dir_all(roles.join("leaky/tasks")).unwrap();
        std::fs::write(roles.join("leaky/tasks/main.yml"), LEAKY_ROLE).unwrap();
        let outcome = run_target(&work.path().join("run"), &env, &roles, "leaky", false).unwrap();
        assert_eq!(
            (outcome.rc, outcome.recap.as_str()),
            (0, "ok=5 changed=4 failed=0 skipped=0 rescued=0 ignored=0")
        );
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        assert!(!passwd.lines().any(|l| l.starts_with("spawntrace-leak-test:")), "the user reached the host");
        for path in ["/etc/spawntrace-leak-test", "/tmp/spawntrace-leak-test"] {
            assert!(std::fs::symlink_metadata(path).is_err(), "{path} reached the host");
        }
        let left: Vec<_> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| c.split(|b| *b == 0).any(|a| a == b"spawntrace-leak-test"))
            .collect();
        assert!(left.is_empty(), "a process the run started outlived it");
    }

    #[test]
    fn temporary_paths_in_task_names_are_masked() {
        assert_eq!(
            mask_temporary_paths("TASK [unarchive : Create /tmp/ansible.x1_2.test/exclude directory]"),
            "TASK [unarchive : Create /tmp/*/exclude directory]"
        );
        assert_eq!(
            mask_temporary_paths("TASK [a : /tmp/x and /var/tmp/y]"),
            "TASK [a : /tmp/* and /var/tmp/*]"
        );
        assert_eq!(mask_temporary_paths("TASK [copy : copy]"), "TASK [copy : copy]");
        assert_eq!(mask_temporary_paths("TASK [a : /tmp/]"), "TASK [a : /tmp/]");
    }
}
