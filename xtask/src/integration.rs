//! `cargo xtask integration`: ansible-core's own integration targets (from its sdist) run classic
//! and through the persistent-agent connection plugins, side by side.
//!
//! Each target is a role; it runs as `roles: [target]` against `testhost` (connection local, the
//! system Python), with `output_dir` set, in a fresh working directory with a fresh copy of the
//! targets per run (targets write relative paths, and into their own roles), and a private, empty
//! `/tmp` per run (targets leave files there that change a later run's results). A target that
//! ends otherwise persistent than classic is a regression. Each run's log is kept in
//! `target/integration/`.
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

pub fn integration(targets: &[String]) -> Result<()> {
    setup::setup()?;
    let targets: Vec<String> =
        if targets.is_empty() { TARGETS.iter().map(|t| t.to_string()).collect() } else { targets.to_vec() };
    // not under /tmp, which each run gets empty (see run_target); /var/tmp as the targets become
    // other users, who must reach their files
    let work = PathBuf::from("/var/tmp").join(format!("spawntrace-integration-{}", std::process::id()));
    let logs = root().join("target/integration");
    std::fs::create_dir_all(&logs)?;
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
    // a mount namespace of its own with an empty /tmp: copy's link targets, /tmp/worldwritable, …
    // must not be there from the run before. The checkout (environments, plugins) stays where it
    // is when it lives under /tmp (a CI clone): the old /tmp is bound aside first, and the
    // checkout bound back from there (read-only, like the old /tmp in there).
    let old = PathBuf::from(format!("{}-old-tmp", dir.display()));
    std::fs::create_dir_all(&old)?;
    let _old = RemoveEmptyDirOnDrop(old.clone());
    let keep = root().strip_prefix("/tmp").map(|rel| rel.to_owned()).unwrap_or_default();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-ec",
        r#"mount --bind /tmp "$ST_OLD_TMP"
mount -o remount,bind,ro "$ST_OLD_TMP"
mount -t tmpfs -o mode=1777 tmpfs /tmp
if [ -n "$ST_KEEP" ]; then mkdir -p "/tmp/$ST_KEEP"; mount --bind "$ST_OLD_TMP/$ST_KEEP" "/tmp/$ST_KEEP"; fi
unset ST_OLD_TMP ST_KEEP
exec "$@""#,
        "sh",
    ])
    .env("ST_OLD_TMP", &old)
    .env("ST_KEEP", &keep)
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
    let (users, groups) = (entries("/etc/passwd")?, entries("/etc/group")?);
    let status = cmd.stdout(log.try_clone()?).stderr(log).status().context("running ansible-playbook");
    // Every run starts from the accounts the first one found: targets create users and groups
    // they do not all remove (file's test2, made for ansible-test's throw-away hosts), and remove
    // fixtures they find left over (copy's test_ansible_test_group from an interrupted run).
    let (users_after, groups_after) = (entries("/etc/passwd")?, entries("/etc/group")?);
    for user in users_after.keys().filter(|u| !users.contains_key(*u)) {
        let _ = Command::new("userdel").args(["--remove", "--force", user]).output();
    }
    for group in groups_after.keys().filter(|g| !groups.contains_key(*g)) {
        let _ = Command::new("groupdel").arg(group).output();
    }
    for (group, fields) in groups.iter().filter(|(g, _)| !groups_after.contains_key(*g)) {
        let gid = fields.get(1).context("/etc/group entry without a gid")?;
        run(Command::new("groupadd").args(["--gid", gid, group]))?;
    }
    for (user, fields) in users.iter().filter(|(u, _)| !users_after.contains_key(*u)) {
        let [_, uid, gid, gecos, home, shell] = fields.as_slice() else {
            bail!("/etc/passwd entry for {user} is not name:x:uid:gid:gecos:home:shell")
        };
        run(Command::new("useradd").args([
            "--no-create-home",
            "--no-user-group",
            "--uid",
            uid,
            "--gid",
            gid,
            "--comment",
            gecos,
            "--home-dir",
            home,
            "--shell",
            shell,
            user,
        ]))?;
    }
    let status = status?;
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
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    let (mut task, mut occurrence, mut index) = ("", 0, 0);
    for line in text.lines() {
        if line.starts_with("TASK [") {
            task = line.trim_end_matches(['*', ' ']);
            let n = seen.entry(task).or_default();
            (occurrence, index) = (*n, 0);
            *n += 1;
        } else if let Some(status) =
            ["ok:", "changed:", "failed:", "fatal:", "skipping:"].iter().find(|s| line.starts_with(*s))
        {
            let status = status.trim_end_matches(':').to_owned();
            results.push(TaskResult { task: task.to_owned(), occurrence, index, status });
            index += 1;
        }
    }
    let agent_runs = std::fs::read_to_string(&timing).map(|t| t.lines().count()).unwrap_or(0);
    Ok(Outcome { rc: status.code().unwrap_or(-1), recap, results, agent_runs })
}

/// The entries of /etc/passwd or /etc/group: name → the fields after it.
fn entries(path: &str) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(':').map(str::to_owned);
            let name = fields.next().filter(|n| !n.is_empty())?;
            Some((name, fields.collect()))
        })
        .collect())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory that is removed if it is empty (never recursively: it is a mount point in the
/// runs' namespaces).
struct RemoveEmptyDirOnDrop(PathBuf);

impl Drop for RemoveEmptyDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
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
