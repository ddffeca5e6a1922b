//! `spawntrace compare`: run one playbook in several execution modes (classic Ansible, the
//! persistent-agent runner, Mitogen), traced, side by side, and explain the difference.
//! `spawntrace check`: fail when a trace spawns more than its baseline.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::{
    analysis::Analysis,
    ansible::{self, attribution::Owner, target_attribution::TargetState},
    output::write_file,
    record::{self, Progress, launch},
    report::{
        categories::Categories,
        flamegraph::{self, FlameBy, Weight},
        tasks::{By, TaskReport, TaskRow},
    },
};

/// How Ansible runs its modules: what `compare` sets side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionMode {
    /// Ansible as configured.
    Classic,
    /// spawntrace's persistent-agent connection plugins (isolation auto).
    Persistent,
    /// The same, every module in-process (`--isolation in-process`).
    #[serde(rename = "in-process")]
    InProcess,
    /// The same, every module in a fresh runner (`--isolation fork`).
    Fork,
    /// Mitogen's strategy plugin (when Mitogen is installed next to ansible-playbook).
    Mitogen,
}

impl ExecutionMode {
    /// Whether the mode uses the persistent-agent connection plugins.
    pub fn persistent(self) -> bool {
        matches!(self, ExecutionMode::Persistent | ExecutionMode::InProcess | ExecutionMode::Fork)
    }

    fn name(self) -> &'static str {
        match self {
            ExecutionMode::Classic => "classic",
            ExecutionMode::Persistent => "persistent",
            ExecutionMode::InProcess => "in-process",
            ExecutionMode::Fork => "fork",
            ExecutionMode::Mitogen => "mitogen",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub command: Vec<OsString>,
    pub runs: usize,
    pub warmup: usize,
    pub modes: Vec<ExecutionMode>,
    pub out: PathBuf,
    pub as_root: bool,
    pub ring_mib: u32,
}

/// mean ± σ, min, max of a sample.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub sd: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    pub fn of(xs: &[f64]) -> Self {
        if xs.is_empty() {
            return Self::default();
        }
        let n = xs.len();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var =
            if n > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Self { mean, sd: var.sqrt(), min, max, n }
    }
}

/// One mode's results.
#[derive(Debug, Serialize)]
pub struct ModeReport {
    pub mode: ExecutionMode,
    pub wall_s: Stats,
    /// Wall time of the one untraced run, and traced mean / untraced.
    pub untraced_wall_s: Option<f64>,
    pub tracer_overhead: Option<f64>,
    /// classic mean wall / this mode's mean wall.
    pub speedup_vs_classic: Option<f64>,
    pub processes: Stats,
    pub execs: Stats,
    pub opens: Stats,
    pub dropped_events: u64,
    pub unattributed: u64,
    /// Per task (in playbook order): mean wall ms and mean execs over the runs.
    pub tasks: Vec<TaskMean>,
    /// On the recorded SSH targets, all together (None when no run recorded one).
    pub target: Option<TargetMeans>,
    /// Where the first run's wall time went.
    pub categories: crate::report::categories::Categories,
    pub traces: Vec<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskMean {
    pub name: String,
    pub action: String,
    pub wall_ms: f64,
    pub execs: f64,
    pub processes: f64,
    /// Mean execs on the SSH targets over the runs that recorded one (None when none did).
    pub target_execs: Option<f64>,
}

/// One mode's work on its recorded SSH targets, per run that recorded one.
#[derive(Clone, Debug, Serialize)]
pub struct TargetMeans {
    /// Runs that recorded a target (the means are over these).
    pub runs: usize,
    pub processes: Stats,
    pub execs: Stats,
    /// Processes of the agents there (our agent, Mitogen's context).
    pub agent_processes: Stats,
    /// Summed over the runs.
    pub unattributed: u64,
}

#[derive(Debug, Serialize)]
pub struct CompareReport {
    pub command: Vec<String>,
    pub runs: usize,
    pub skipped: BTreeMap<String, String>,
    pub modes: Vec<ModeReport>,
}

/// Extra environment for a mode, or why it cannot run here. `owner`: who COMMAND runs as.
fn mode_env(
    mode: ExecutionMode,
    command: &[OsString],
    owner: Option<&launch::RunAs>,
) -> Result<Vec<(OsString, OsString)>, String> {
    match mode {
        ExecutionMode::Classic => Ok(Vec::new()),
        ExecutionMode::Persistent | ExecutionMode::InProcess | ExecutionMode::Fork => {
            let isolation = match mode {
                ExecutionMode::InProcess => ansible::Isolation::InProcess,
                ExecutionMode::Fork => ansible::Isolation::Fork,
                _ => ansible::Isolation::Auto,
            };
            let (k, v) = isolation.env();
            Ok(vec![(k.into(), v.into())])
        }
        ExecutionMode::Mitogen => {
            let strategy = mitogen_strategy_dir(command, owner)
                .ok_or("Mitogen is not installed next to ansible-playbook")?;
            Ok(vec![
                ("ANSIBLE_STRATEGY_PLUGINS".into(), strategy.into_os_string()),
                ("ANSIBLE_STRATEGY".into(), "mitogen_linear".into()),
            ])
        }
    }
}

/// How long the Python that runs ansible-playbook may take to say where Mitogen is.
const MITOGEN_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// `ansible_mitogen/plugins/strategy` of the Python that runs the command's ansible-playbook.
///
/// That Python is the command's, so it is asked as the user COMMAND runs as, isolated (`-I`:
/// no environment, no current directory on sys.path, no user site) from `/`; the script's
/// shebang is read as that user too, at most 256 bytes of it.
fn mitogen_strategy_dir(command: &[OsString], owner: Option<&launch::RunAs>) -> Option<PathBuf> {
    use std::io::Read as _;
    let playbook = command
        .iter()
        .find(|a| crate::model::basename(&a.to_string_lossy()).starts_with("ansible-playbook"))?;
    let shebang = crate::output::as_user(owner, || {
        let path = which::which(playbook)?;
        let mut head = Vec::new();
        crate::output::open_read(&path, None)?.take(256).read_to_end(&mut head)?;
        Ok(head)
    })
    .ok()?;
    let first = String::from_utf8(shebang).ok()?;
    let first = first.lines().next()?.strip_prefix("#!")?.trim().to_owned();
    let mut parts = first.split_whitespace();
    let mut python = parts.next()?.to_owned();
    if crate::model::basename(&python) == "env" {
        python = parts.next()?.to_owned();
    }
    let mut probe = std::process::Command::new(python);
    probe
        .args(["-I", "-c", "import os, ansible_mitogen; print(os.path.dirname(ansible_mitogen.__file__))"])
        .current_dir("/")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    if let Some(r) = owner {
        r.apply(&mut probe);
    }
    let mut child = probe.spawn().ok()?;
    let deadline = Instant::now() + MITOGEN_PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let mut out = String::new();
    child.stdout.take()?.take(4096).read_to_string(&mut out).ok()?;
    let dir = PathBuf::from(out.trim()).join("plugins/strategy");
    (status.success() && dir.is_dir()).then_some(dir)
}

/// The files a comparison writes, relative to its output directory (one place for their names:
/// they are checked before the first run and written later).
fn trace_file(m: ExecutionMode, run: usize) -> String {
    format!("traces/{}-{run}.jsonl", m.name())
}

/// `tag`: the run number, `untraced` or `warmup-N`.
fn log_file(m: ExecutionMode, tag: &str) -> String {
    format!("logs/{}-{tag}.log", m.name())
}

fn flamegraph_file(m: ExecutionMode) -> String {
    format!("flamegraph-{}.svg", m.name())
}

fn timeline_file(m: ExecutionMode) -> String {
    format!("timeline-{}.json", m.name())
}

fn diff_file(m: ExecutionMode) -> String {
    format!("flamegraph-diff-classic-{}.svg", m.name())
}

/// Runs the comparison and writes `opts.out`.
pub async fn compare(opts: Options) -> Result<CompareReport> {
    launch::check_argv(&opts.command)?;
    anyhow::ensure!(opts.runs >= 1, "--runs must be at least 1");
    let run_as = launch::RunAs::from_sudo(opts.as_root)?;
    let owner = run_as.as_ref();
    for dir in [opts.out.clone(), opts.out.join("traces"), opts.out.join("logs")] {
        crate::output::create_dir(&dir, owner)?;
    }
    let mut skipped = BTreeMap::new();
    let mut modes = Vec::new();
    for &m in &opts.modes {
        let available = match m {
            ExecutionMode::Persistent | ExecutionMode::InProcess | ExecutionMode::Fork
                if !ansible::has_persistent_plugins() =>
            {
                Err("this spawntrace has no persistent-agent plugins".to_owned())
            }
            _ => mode_env(m, &opts.command, owner),
        };
        match available {
            Ok(env) => modes.push((m, env)),
            Err(why) => {
                eprintln!("compare: skipping {}: {why}", m.name());
                skipped.insert(m.name().to_owned(), why);
            }
        }
    }
    anyhow::ensure!(!modes.is_empty(), "no mode can run here");
    // Every file this comparison will write, checked before anything runs (a link or special
    // file at any of them would only be refused at the end).
    let names = modes.iter().flat_map(|&(m, _)| {
        let runs = (1..=opts.runs).flat_map(move |r| [trace_file(m, r), log_file(m, &r.to_string())]);
        let once = [log_file(m, "untraced"), flamegraph_file(m), timeline_file(m), diff_file(m)];
        runs.chain(once).chain((0..opts.warmup).map(move |w| log_file(m, &format!("warmup-{w}"))))
    });
    let planned: Vec<PathBuf> =
        names.chain(["report.json".to_owned(), "report.md".to_owned()]).map(|n| opts.out.join(n)).collect();
    crate::output::as_user(owner, || planned.iter().try_for_each(|p| crate::output::check_target(p)))?;
    let progress = Arc::new(Progress::default());
    let display = spawn_progress(progress.clone());

    let label = |m: ExecutionMode, what: &str| {
        progress.task.lock().map(|mut t| *t = format!("{} {what}", m.name())).ok()
    };
    for w in 0..opts.warmup {
        for (m, env) in &modes {
            label(*m, &format!("warm-up {}/{}", w + 1, opts.warmup));
            untraced(&opts, *m, env, run_as.as_ref(), &format!("warmup-{w}")).await?;
        }
    }
    let mut results: BTreeMap<ExecutionMode, ModeRuns> = BTreeMap::new();
    for r in 0..opts.runs {
        for (m, env) in &modes {
            label(*m, &format!("run {}/{}", r + 1, opts.runs));
            let trace = opts.out.join(trace_file(*m, r + 1));
            let log = opts.out.join(log_file(*m, &(r + 1).to_string()));
            let rec = record::record(record::Options {
                output: Some(trace.clone()),
                as_root: opts.as_root,
                ring_mib: opts.ring_mib,
                inject_callback: ansible::InjectCallback::Always,
                persistent: m.persistent(),
                env: env.clone(),
                log: Some(log.clone()),
                progress: Some(progress.clone()),
                ..record::Options::new(opts.command.clone())
            })
            .await?;
            if rec.footer().status != crate::trace::Status::Exited(0) {
                bail!("{} run {} ended with {}: see {}", m.name(), r + 1, rec.footer().status, log.display());
            }
            results.entry(*m).or_default().add(rec.analysis, trace);
        }
    }
    let mut untraced_walls = BTreeMap::new();
    for (m, env) in &modes {
        label(*m, "untraced run");
        untraced_walls.insert(*m, untraced(&opts, *m, env, run_as.as_ref(), "untraced").await?);
    }
    display.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }

    let classic_mean = results.get(&ExecutionMode::Classic).map(|r| Stats::of(&r.walls).mean);
    let mut reports = Vec::new();
    // In the order the modes were asked for.
    for (m, _) in &modes {
        let runs = &results[m];
        let first = runs.first.as_ref().expect("every mode ran at least once");
        let wall = Stats::of(&runs.walls);
        let stat = |f: &dyn Fn(&RunNumbers) -> u64| {
            Stats::of(&runs.numbers.iter().map(|n| f(n) as f64).collect::<Vec<_>>())
        };
        reports.push(ModeReport {
            mode: *m,
            untraced_wall_s: untraced_walls.get(m).copied(),
            tracer_overhead: untraced_walls.get(m).map(|u| wall.mean / u),
            speedup_vs_classic: classic_mean.map(|c| c / wall.mean),
            processes: stat(&|n| n.processes),
            execs: stat(&|n| n.execs),
            opens: stat(&|n| n.opens),
            dropped_events: runs.numbers.iter().map(|n| n.dropped_events).sum(),
            unattributed: runs.numbers.iter().map(|n| n.unattributed).sum(),
            tasks: task_means(&runs.numbers),
            target: {
                // over the runs that recorded a target
                let recorded: Vec<&TargetNumbers> =
                    runs.numbers.iter().filter_map(|n| n.target.as_ref()).collect();
                let stat = |f: &dyn Fn(&TargetNumbers) -> u64| {
                    Stats::of(&recorded.iter().map(|t| f(t) as f64).collect::<Vec<_>>())
                };
                (!recorded.is_empty()).then(|| TargetMeans {
                    runs: recorded.len(),
                    processes: stat(&|t| t.processes),
                    execs: stat(&|t| t.execs),
                    agent_processes: stat(&|t| t.agent),
                    unattributed: recorded.iter().map(|t| t.unattributed).sum(),
                })
            },
            categories: Categories::new(first),
            traces: runs.traces.clone(),
            wall_s: wall,
        });
        write_pictures(&opts.out, *m, first, &runs.first_stacks, owner)?;
    }
    if let Some(classic) = results.get(&ExecutionMode::Classic) {
        let before = &classic.first_stacks;
        for (m, _) in modes.iter().filter(|(m, _)| *m != ExecutionMode::Classic) {
            let runs = &results[m];
            let title = format!("spawntrace: classic → {} (processes spawned)", m.name());
            write_file(&opts.out.join(diff_file(*m)), owner, |w| {
                flamegraph::diff_svg(before, &runs.first_stacks, Weight::Count, &title, w)
            })?;
        }
    }
    let command = opts.command.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let report = CompareReport { command, runs: opts.runs, skipped, modes: reports };
    write_file(&opts.out.join("report.json"), owner, |w| Ok(serde_json::to_writer_pretty(w, &report)?))?;
    write_file(&opts.out.join("report.md"), owner, |w| Ok(w.write_all(markdown(&report).as_bytes())?))?;
    Ok(report)
}

/// What a comparison keeps of one traced run: its numbers (the model is not kept).
struct RunNumbers {
    processes: u64,
    execs: u64,
    opens: u64,
    dropped_events: u64,
    unattributed: u64,
    /// Per task, in playbook order.
    tasks: Vec<TaskRow>,
    /// On the recorded SSH targets (None: none was).
    target: Option<TargetNumbers>,
}

/// A run's processes on its recorded SSH targets, all together.
struct TargetNumbers {
    processes: u64,
    execs: u64,
    agent: u64,
    unattributed: u64,
}

impl TargetNumbers {
    fn of(analysis: &Analysis) -> Option<Self> {
        let recorded: Vec<_> =
            analysis.targets.iter().filter(|t| t.state == TargetState::Recording).collect();
        (!recorded.is_empty()).then(|| Self {
            processes: recorded.iter().map(|t| t.model.processes.len() as u64).sum(),
            execs: recorded.iter().map(|t| t.model.totals.execs).sum(),
            agent: recorded
                .iter()
                .map(|t| t.owners.iter().filter(|o| **o == Owner::Agent).count() as u64)
                .sum(),
            unattributed: recorded.iter().map(|t| t.unattributed()).sum(),
        })
    }
}

/// One mode's traced runs: every run's numbers, the first run whole (for its pictures and the
/// wall-time categories) and its folded stacks (processes spawned, by task: its flamegraph and
/// the differential ones).
#[derive(Default)]
struct ModeRuns {
    walls: Vec<f64>,
    numbers: Vec<RunNumbers>,
    traces: Vec<PathBuf>,
    first: Option<Analysis>,
    first_stacks: Vec<String>,
}

impl ModeRuns {
    fn add(&mut self, analysis: Analysis, trace: PathBuf) {
        let model = &analysis.model;
        self.walls.push(analysis.wall_s());
        self.numbers.push(RunNumbers {
            processes: model.processes.len() as u64,
            execs: model.totals.execs,
            opens: model.totals.opens,
            dropped_events: analysis.dropped_events().unwrap_or(0),
            unattributed: analysis.unattributed(),
            tasks: TaskReport::new(&analysis, By::Task).tasks,
            target: TargetNumbers::of(&analysis),
        });
        self.traces.push(trace);
        if self.first.is_none() {
            self.first_stacks = flamegraph::folded(&analysis, Weight::Count, FlameBy::Task);
            self.first = Some(analysis);
        }
    }
}

/// The flamegraph (processes spawned, from `stacks`: its folded stacks) and the timeline of one
/// run of a mode.
fn write_pictures(
    out: &Path,
    m: ExecutionMode,
    a: &Analysis,
    stacks: &[String],
    owner: Option<&launch::RunAs>,
) -> Result<()> {
    write_file(&out.join(flamegraph_file(m)), owner, |w| flamegraph::svg(a, stacks, Weight::Count, w))?;
    write_file(&out.join(timeline_file(m)), owner, |w| crate::report::timeline::write_timeline(a, w))
}

/// Per-task means over runs, in the first run's task order.
fn task_means(runs: &[RunNumbers]) -> Vec<TaskMean> {
    let Some(first) = runs.first() else { return Vec::new() };
    first
        .tasks
        .iter()
        .map(|t| {
            let same: Vec<&TaskRow> =
                runs.iter().filter_map(|r| r.tasks.iter().find(|x| x.uuid == t.uuid)).collect();
            let mean = |f: &dyn Fn(&TaskRow) -> f64| {
                same.iter().map(|x| f(x)).sum::<f64>() / same.len().max(1) as f64
            };
            TaskMean {
                name: t.name.clone(),
                action: t.action.clone(),
                wall_ms: mean(&|x| x.wall_ms),
                execs: mean(&|x| x.execs as f64),
                processes: mean(&|x| x.processes as f64),
                target_execs: {
                    // over the runs that recorded a target
                    let recorded: Vec<u64> = runs
                        .iter()
                        .filter(|r| r.target.is_some())
                        .filter_map(|r| r.tasks.iter().find(|x| x.uuid == t.uuid))
                        .map(|x| x.target.as_ref().map_or(0, |w| w.execs))
                        .collect();
                    (!recorded.is_empty())
                        .then(|| recorded.iter().sum::<u64>() as f64 / recorded.len() as f64)
                },
            }
        })
        .collect()
}

/// Runs the command once without tracing (for warm-up and the overhead reference).
async fn untraced(
    opts: &Options,
    m: ExecutionMode,
    env: &[(OsString, OsString)],
    run_as: Option<&launch::RunAs>,
    tag: &str,
) -> Result<f64> {
    let inject = ansible::Plugins { callback: false, persistent: m.persistent(), targets: false };
    let session = match inject.persistent {
        true => Some(ansible::Session::start(run_as, inject)?.0),
        false => None,
    };
    let mut all = session.as_ref().map(|s| s.env.clone()).unwrap_or_default();
    all.extend(env.iter().cloned());
    let log = opts.out.join(log_file(m, tag));
    let file = crate::output::open_log(&log, run_as)?;
    let start = Instant::now();
    let status = launch::spawn(&opts.command, run_as, &all, Some(file), false)
        .map_err(record::LaunchFailed)?
        .wait()
        .await
        .context("waiting for the command")?;
    let wall = start.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "{} {tag} run failed ({status}): see {}", m.name(), log.display());
    Ok(wall)
}

/// A status line on a terminal (mode, run, task, events), refreshed five times a second.
fn spawn_progress(p: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    let tty = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            // The task name came from the traced command's plugin messages: escaped for the terminal.
            let task =
                p.task.lock().map(|t| crate::report::labels::printable(&t).into_owned()).unwrap_or_default();
            let line = format!("compare: {task} · {} events", p.events.load(Ordering::Relaxed));
            if tty {
                eprint!("\r\x1b[2K{}", line.chars().take(120).collect::<String>());
            } else if task != last {
                eprintln!("compare: {task}");
                last = task;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The side-by-side report (control characters in names escaped: it is printed too).
pub fn markdown(r: &CompareReport) -> String {
    crate::report::labels::printable_text(&markdown_raw(r)).into_owned()
}

fn markdown_raw(r: &CompareReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# spawntrace compare\n\n`{}` — {} traced run(s) per mode\n",
        r.command.join(" "),
        r.runs
    );
    for (m, why) in &r.skipped {
        let _ = writeln!(o, "- {m} skipped: {why}");
    }
    let _ = writeln!(
        o,
        "\n| mode | wall s (mean ± σ) | min | max | speedup vs classic | processes | execs | opens | tracer overhead | dropped | unattributed |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for m in &r.modes {
        let opt = |x: Option<f64>, suffix: &str| x.map_or("–".into(), |v| format!("{v:.2}{suffix}"));
        let _ = writeln!(
            o,
            "| {} | {:.2} ± {:.2} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            m.mode.name(),
            m.wall_s.mean,
            m.wall_s.sd,
            m.wall_s.min,
            m.wall_s.max,
            opt(m.speedup_vs_classic, "×"),
            m.processes.mean,
            m.execs.mean,
            m.opens.mean,
            opt(m.tracer_overhead, "×"),
            m.dropped_events,
            m.unattributed
        );
    }
    let _ = writeln!(o, "\n## Per task (mean wall ms / execs)\n");
    per_task_table(&mut o, r, &["wall ms", "execs"], |x| {
        vec![Some(format!("{:.1}", x.wall_ms)), Some(format!("{:.1}", x.execs))]
    });
    if r.modes.iter().any(|m| m.target.is_some()) {
        let _ = writeln!(
            o,
            "\n## On the SSH targets (mean per run)\n\n| mode | processes | execs | agent processes | unattributed |\n|---|---:|---:|---:|---:|"
        );
        for m in &r.modes {
            match &m.target {
                Some(t) => {
                    let _ = writeln!(
                        o,
                        "| {} | {:.0} | {:.0} | {:.0} | {} |",
                        m.mode.name(),
                        t.processes.mean,
                        t.execs.mean,
                        t.agent_processes.mean,
                        t.unattributed
                    );
                }
                None => {
                    let _ = writeln!(o, "| {} | – | – | – | – |", m.mode.name());
                }
            }
        }
        o.push('\n');
        per_task_table(&mut o, r, &["target execs"], |x| vec![x.target_execs.map(|e| format!("{e:.1}"))]);
    }
    let _ = writeln!(o, "\n## Where the wall time went (first run)\n");
    for m in &r.modes {
        let _ = writeln!(o, "### {}\n\n{}", m.mode.name(), m.categories.markdown());
    }
    let _ = writeln!(
        o,
        "Timelines (Perfetto / chrome://tracing): {}.",
        r.modes.iter().map(|m| timeline_file(m.mode)).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(o, "\nFlamegraphs: {}.", {
        let mut v: Vec<String> = r.modes.iter().map(|m| flamegraph_file(m.mode)).collect();
        // differentials against classic exist only when classic ran
        if r.modes.iter().any(|m| m.mode == ExecutionMode::Classic) {
            v.extend(r.modes.iter().filter(|m| m.mode != ExecutionMode::Classic).map(|m| diff_file(m.mode)));
        }
        v.join(", ")
    });
    o
}

/// A table with a row per task (the first mode's) and, for each mode, `columns` (headed `MODE
/// COLUMN`) filled by `cells`; `–` where a mode lacks the task or a value.
fn per_task_table(
    o: &mut String,
    r: &CompareReport,
    columns: &[&str],
    cells: impl Fn(&TaskMean) -> Vec<Option<String>>,
) {
    use std::fmt::Write as _;
    let _ = write!(o, "| task |");
    for m in &r.modes {
        for c in columns {
            let _ = write!(o, " {} {c} |", m.mode.name());
        }
    }
    o.push_str("\n|---|");
    o.push_str(&"---:|".repeat(r.modes.len() * columns.len()));
    o.push('\n');
    let Some(first) = r.modes.first() else { return };
    for (i, t) in first.tasks.iter().enumerate() {
        let _ = write!(o, "| {} |", t.name.replace('|', "\\|"));
        for m in &r.modes {
            let values = m.tasks.get(i).filter(|x| x.name == t.name).map(&cells).unwrap_or_default();
            for k in 0..columns.len() {
                let _ = write!(o, " {} |", values.get(k).cloned().flatten().as_deref().unwrap_or("–"));
            }
        }
        o.push('\n');
    }
}

/// Exec-count regression gate: compares `trace` with `baseline`, total and per task.
///
/// An incomplete trace (no footer: the tracer was killed) on either side cannot be judged: its
/// events stop anywhere, so it is an error, never a pass.
pub fn check(
    trace: &Path,
    baseline: &Path,
    max_increase_pct: f64,
    owner: Option<&launch::RunAs>,
) -> Result<Vec<String>> {
    anyhow::ensure!(
        max_increase_pct.is_finite() && max_increase_pct >= 0.0,
        "--max-exec-increase must be a finite number of percent, at least 0"
    );
    let (now, base) = (Analysis::read(trace, owner)?, Analysis::read(baseline, owner)?);
    for (path, a) in [(trace, &now), (baseline, &base)] {
        anyhow::ensure!(
            a.complete(),
            "{} is incomplete (no footer: the tracer did not finish it): check cannot judge it",
            path.display()
        );
    }
    let mut regressions = Vec::new();
    let mut cmp = |what: String, before: u64, after: u64| {
        let limit = before as f64 * (1.0 + max_increase_pct / 100.0);
        if after as f64 > limit {
            regressions.push(format!("{what}: {before} → {after} execs (limit {limit:.0})"));
        }
    };
    cmp("total".into(), base.model.totals.execs, now.model.totals.execs);
    let before = TaskReport::new(&base, By::Task).tasks;
    for t in TaskReport::new(&now, By::Task).tasks {
        if let Some(b) = before.iter().find(|b| b.name == t.name && b.action == t.action) {
            cmp(format!("task {:?}", t.name), b.execs, t.execs);
        }
    }
    Ok(regressions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        let s = Stats::of(&[1.0, 2.0, 3.0]);
        assert_eq!((s.mean, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert!((s.sd - 1.0).abs() < 1e-9);
        assert_eq!(Stats::of(&[5.0]).sd, 0.0);
        assert_eq!(Stats::of(&[]).n, 0);
    }
}
