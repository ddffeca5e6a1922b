//! Wall-time categories: every nanosecond of each Ansible worker's life goes to exactly one
//! category, by what its processes were doing then; the run's time outside every worker is
//! `controller`.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{
    analysis::Analysis,
    ansible::{attribution::Owner, processes::Kind},
    model::Process,
};

/// What a worker's time went to. Declared most specific first: when several of a worker's
/// processes are alive at once, the first category in this order wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// A module's Python after its first payload open (the whole of it when none was seen).
    Module,
    /// A module's Python from its exec to its first payload open.
    InterpreterStartup,
    /// ssh, scp, sftp.
    Ssh,
    /// Shell helpers (`sh -c`, mkdir, chmod, rm, sleep, …).
    Shell,
    /// A persistent agent started by this worker, and runners working for it.
    Agent,
    /// Any other program.
    Other,
    /// Waiting for spawntrace's recorder to start on an SSH target (the first command to each
    /// target waits for it): the tracing's own cost.
    TargetRecorder,
    /// The worker's own Python, no other process of it running.
    Worker,
    /// No worker alive: ansible-playbook's own time (run level only).
    Controller,
}

impl Category {
    pub const ALL: [Category; 9] = [
        Category::Module,
        Category::InterpreterStartup,
        Category::Ssh,
        Category::Shell,
        Category::Agent,
        Category::Other,
        Category::TargetRecorder,
        Category::Worker,
        Category::Controller,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::Module => "module",
            Category::InterpreterStartup => "interpreter_startup",
            Category::Ssh => "ssh",
            Category::Shell => "shell",
            Category::Agent => "agent",
            Category::Other => "other",
            Category::TargetRecorder => "target_recorder",
            Category::Worker => "worker",
            Category::Controller => "controller",
        }
    }
}

/// Time in a category, and its share of the total it belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Share {
    pub ns: u64,
    pub share: f64,
}

/// One task's workers (all hosts) by category.
#[derive(Clone, Debug, Serialize)]
pub struct TaskCategories {
    pub name: String,
    pub action: String,
    pub workers: u64,
    /// Summed worker lifetimes: the total of this task's shares.
    pub wall_ns: u64,
    pub categories: BTreeMap<Category, Share>,
}

/// The wall-time breakdown of a run; field names are a stable JSON interface.
#[derive(Clone, Debug, Serialize)]
pub struct Categories {
    /// Summed worker lifetimes (workers on several hosts overlap, so this can exceed the run).
    pub worker_wall_ns: u64,
    /// Time from the trace start to its end with no worker alive.
    pub controller_ns: u64,
    /// `worker_wall_ns + controller_ns`: the total of the run-level shares.
    pub total_ns: u64,
    pub categories: BTreeMap<Category, Share>,
    /// Share of `total_ns` that is not `other`: the time spent in something named.
    pub explained_share: f64,
    pub tasks: Vec<TaskCategories>,
}

/// The segments of an SSH target's processes, added to the segments of the workers they worked
/// for. A program's category comes from what it runs (a module's Python split at its payload
/// open); a fork that has not exec'd yet is still its parent's (the sshd session's forks are the
/// session's: `ssh`); a runner the agent there reported runs its module itself: `module`, and
/// so do an agent's fork working for a task and a program a module's Python or an agent starts
/// directly (copy's `lsattr` from a module, or from Mitogen's context, which runs modules in
/// itself or in a fork).
fn target_segments(target: &crate::ansible::target_attribution::Target, segments: &mut [Vec<Segment>]) {
    let model = &target.model;
    let session = target.session();
    let end_of_trace = model.totals.last_ns;
    let mut image: Vec<Category> = vec![Category::Other; model.processes.len()];
    for (i, p) in model.processes.iter().enumerate() {
        let parent = p.parent.filter(|&q| q < i);
        let inherited = match parent {
            Some(q) if Some(q) == session => Category::Ssh,
            Some(q) => image[q],
            None => Category::Ssh,
        };
        let owner = target.owners.get(i).copied();
        let under_module = matches!(inherited, Category::Module | Category::Agent)
            || parent.is_some_and(|q| target.owners.get(q) == Some(&Owner::Agent));
        image[i] = match (p.execs.last(), owner) {
            (Some(_), _) => match crate::ansible::processes::kind(model, i) {
                Kind::Module => Category::Module,
                Kind::Shell => Category::Shell,
                Kind::Ssh => Category::Ssh,
                Kind::Agent => Category::Agent,
                Kind::Other if under_module => Category::Module,
                Kind::Other => Category::Other,
            },
            (None, Some(Owner::Agent)) => Category::Agent,
            (None, _) if target.runner(i) => Category::Module,
            // an agent's fork working for a task: the module run Mitogen forks
            (None, Some(Owner::Task { .. })) if inherited == Category::Agent => Category::Module,
            (None, _) => inherited,
        };
        let Some(Owner::Task { worker, .. }) = owner else { continue };
        let Some(spans) = segments.get_mut(worker) else { continue };
        let (start, end) = (p.start_ns, p.end_ns.unwrap_or(end_of_trace).max(p.start_ns));
        let push = |from: u64, to: u64, category: Category| {
            let (from, to) = (target.local_ns(from), target.local_ns(to));
            if from < to {
                spans.push(Segment { start: from, end: to, category, on_target: true });
            }
        };
        split(p, (start, end), inherited, image[i], push);
    }
}

/// A process's time between `start` and `end` in categories: before its last exec what it
/// `inherited`, then its `image`'s (a module's Python split at its first payload open).
fn split(
    p: &Process,
    (start, end): (u64, u64),
    inherited: Category,
    image: Category,
    mut push: impl FnMut(u64, u64, Category),
) {
    let Some(exec) = p.execs.last().map(|e| e.ts.clamp(start, end)) else {
        push(start, end, image);
        return;
    };
    push(start, exec, inherited);
    match (image, p.first_marked_open_ns) {
        (Category::Module, Some(open)) => {
            let open = open.clamp(exec, end);
            push(exec, open, Category::InterpreterStartup);
            push(open, end, Category::Module);
        }
        (category, _) => push(exec, end, category),
    }
}

/// A process's stretch of time in one category.
struct Segment {
    start: u64,
    end: u64,
    category: Category,
    /// Work on an SSH target: it outranks the controller's `ssh` that waits for it.
    on_target: bool,
}

/// Which of the segments alive at a moment takes it: the most specific category, with the
/// targets' shell helpers, agents and other programs before the controller's ssh (so that
/// `ssh` is what the connection itself costs) and the controller's own after it.
const PRECEDENCE: [(Category, bool); 11] = [
    (Category::TargetRecorder, false),
    (Category::Module, true),
    (Category::InterpreterStartup, true),
    (Category::Shell, true),
    (Category::Agent, true),
    (Category::Other, true),
    (Category::Ssh, false),
    (Category::Shell, false),
    (Category::Agent, false),
    (Category::Other, false),
    (Category::Worker, false),
];

/// A segment's place in [`PRECEDENCE`] (module and start-up rank the same on either side).
fn rank(category: Category, on_target: bool) -> usize {
    let on_target = on_target || matches!(category, Category::Module | Category::InterpreterStartup);
    PRECEDENCE
        .iter()
        .position(|&(c, t)| c == category && t == on_target)
        .or_else(|| PRECEDENCE.iter().position(|&(c, _)| c == category))
        .unwrap_or(PRECEDENCE.len() - 1)
}

const N: usize = Category::ALL.len();

impl Categories {
    /// Processes without an end end at the run's end ([`Analysis::end_ns`]).
    pub fn new(analysis: &Analysis) -> Self {
        let model = &analysis.model;
        let (run_start, run_end) = (analysis.header.start_ns, analysis.end_ns());
        let end_of = |i: usize| {
            let p = &model.processes[i];
            p.end_ns.unwrap_or(run_end).max(p.start_ns)
        };
        let (workers, tasks, owners) = match &analysis.attribution {
            Some(a) => (&a.workers[..], &a.tasks[..], &a.owners[..]),
            None => (&[][..], &[][..], &[][..]),
        };
        let n = model.processes.len();
        // The worker whose process tree a process is in (itself included), and the worker whose
        // time a process counts in: its own task's, or for an agent the worker that started it.
        let mut under: Vec<Option<usize>> = vec![None; n];
        let mut is_worker = vec![false; n];
        for (w, wk) in workers.iter().enumerate() {
            if wk.proc < n {
                under[wk.proc] = Some(w);
                is_worker[wk.proc] = true;
            }
        }
        let mut context: Vec<Option<usize>> = vec![None; n];
        let mut image: Vec<Category> = vec![Category::Other; n];
        // What runs in a process before its first exec: its parent's image.
        let mut inherited: Vec<Category> = vec![Category::Other; n];
        for i in 0..n {
            let p = &model.processes[i];
            // Parents are created before their children, so their entries are final here.
            let parent = p.parent.filter(|&q| q < i);
            if !is_worker[i] {
                under[i] = parent.and_then(|q| under[q]);
            }
            context[i] = match owners.get(i) {
                Some(Owner::Task { worker, .. }) => Some(*worker),
                Some(Owner::Agent) => under[i],
                _ => None,
            };
            // Outside the worker's own tree (runners for it) or an agent: agent work.
            let agentish = owners.get(i) == Some(&Owner::Agent) || under[i] != context[i];
            inherited[i] = parent
                .filter(|&q| context[q] == context[i])
                .map_or(if agentish { Category::Agent } else { Category::Other }, |q| image[q]);
            image[i] = if is_worker[i] {
                Category::Worker
            } else if owners.get(i) == Some(&Owner::Agent) {
                Category::Agent
            } else if p.execs.is_empty() {
                inherited[i]
            } else {
                match analysis.kind(i) {
                    Kind::Module => Category::Module,
                    Kind::Shell => Category::Shell,
                    Kind::Ssh => Category::Ssh,
                    Kind::Agent => Category::Agent,
                    Kind::Other if agentish => Category::Agent,
                    // what a module's Python runs itself is that module's work
                    Kind::Other if inherited[i] == Category::Module => Category::Module,
                    Kind::Other => Category::Other,
                }
            };
        }

        let mut segments: Vec<Vec<Segment>> = workers.iter().map(|_| Vec::new()).collect();
        for i in 0..n {
            let Some(w) = context[i].filter(|&w| w < workers.len()) else { continue };
            if is_worker[i] {
                continue;
            }
            let p = &model.processes[i];
            let (start, end) = (p.start_ns, end_of(i));
            let push = |start: u64, end: u64, category: Category| {
                if start < end && category != Category::Worker {
                    segments[w].push(Segment { start, end, category, on_target: false });
                }
            };
            split(p, (start, end), inherited[i], image[i], push);
        }
        // What the workers' processes did on the SSH targets, on the controller's clock: it runs
        // while the worker's ssh waits, and being more specific, takes that time over.
        for target in &analysis.targets {
            target_segments(target, &mut segments);
            // the worker that first reached the target waited for its recorder to start
            let first = target.users.first().and_then(|&(pid, ts)| {
                let w = workers.iter().position(|w| {
                    let p = &model.processes[w.proc];
                    w.pid == pid && p.start_ns <= ts && p.end_ns.is_none_or(|e| ts <= e)
                })?;
                Some((w, ts))
            });
            if let Some((w, ts)) = first.filter(|_| target.start_ns > 0) {
                segments[w].push(Segment {
                    start: ts,
                    end: ts + target.start_ns,
                    category: Category::TargetRecorder,
                    on_target: false,
                });
            }
        }

        let mut run = [0u64; N];
        let mut per_task: BTreeMap<usize, ([u64; N], u64, u64)> = BTreeMap::new();
        let mut windows = Vec::with_capacity(workers.len());
        for (w, wk) in workers.iter().enumerate() {
            let Some(p) = model.processes.get(wk.proc) else { continue };
            let (start, end) = (p.start_ns, end_of(wk.proc));
            windows.push((start, end));
            let spent = sweep(start, end, &segments[w]);
            let task = per_task.entry(wk.task).or_insert(([0; N], 0, 0));
            for c in 0..N {
                run[c] += spent[c];
                task.0[c] += spent[c];
            }
            task.1 += 1;
            task.2 += end - start;
        }
        let worker_wall_ns: u64 = windows.iter().map(|(s, e)| e - s).sum();
        let controller_ns = (run_end - run_start) - covered(run_start, run_end, windows);
        run[Category::Controller as usize] = controller_ns;
        let total_ns = worker_wall_ns + controller_ns;
        let other = run[Category::Other as usize];
        Self {
            worker_wall_ns,
            controller_ns,
            total_ns,
            categories: shares(&run, total_ns, &Category::ALL),
            explained_share: ratio(total_ns - other, total_ns),
            tasks: per_task
                .into_iter()
                .map(|(t, (spent, workers, wall_ns))| TaskCategories {
                    name: tasks.get(t).map(|t| t.name.clone()).unwrap_or_default(),
                    action: tasks.get(t).map(|t| t.action.clone()).unwrap_or_default(),
                    workers,
                    wall_ns,
                    categories: shares(&spent, wall_ns, &Category::ALL[..N - 1]),
                })
                .collect(),
        }
    }

    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "wall time by category: {:.3} s = workers {:.3} s (summed) + controller {:.3} s; explained {:.1}%",
            s(self.total_ns),
            s(self.worker_wall_ns),
            s(self.controller_ns),
            self.explained_share * 100.0
        );
        for (c, sh) in &self.categories {
            let _ = writeln!(o, "  {:<20} {:>9.3} s {:>6.1}%", c.name(), s(sh.ns), sh.share * 100.0);
        }
        if self.tasks.is_empty() {
            return o;
        }
        let w = self.tasks.iter().map(|t| t.name.chars().count()).max().unwrap_or(0).clamp(4, 40);
        let _ = write!(o, "{:<w$} {:>7} {:>8}", "task", "workers", "wall s");
        for c in &Category::ALL[..N - 1] {
            let _ = write!(o, " {:>8}", short(*c));
        }
        o.push('\n');
        for t in &self.tasks {
            let name: String = t.name.chars().take(w).collect();
            let _ = write!(o, "{name:<w$} {:>7} {:>8.3}", t.workers, s(t.wall_ns));
            for c in &Category::ALL[..N - 1] {
                let _ = write!(o, " {:>7.1}%", t.categories.get(c).map_or(0.0, |x| x.share * 100.0));
            }
            o.push('\n');
        }
        o
    }

    pub fn markdown(&self) -> String {
        let mut o = format!(
            "Wall time {:.3} s (workers {:.3} s summed + controller {:.3} s), explained {:.1}%.\n\n\
             | category | s | share |\n|---|---:|---:|\n",
            s(self.total_ns),
            s(self.worker_wall_ns),
            s(self.controller_ns),
            self.explained_share * 100.0
        );
        for (c, sh) in &self.categories {
            let _ = writeln!(o, "| {} | {:.3} | {:.1}% |", c.name(), s(sh.ns), sh.share * 100.0);
        }
        if self.tasks.is_empty() {
            return o;
        }
        o.push_str("\n| task | workers | wall s |");
        for c in &Category::ALL[..N - 1] {
            let _ = write!(o, " {} |", short(*c));
        }
        o.push_str("\n|---|---:|---:|");
        o.push_str(&"---:|".repeat(N - 1));
        o.push('\n');
        for t in &self.tasks {
            let _ = write!(o, "| {} | {} | {:.3} |", t.name.replace('|', "\\|"), t.workers, s(t.wall_ns));
            for c in &Category::ALL[..N - 1] {
                let _ = write!(o, " {:.1}% |", t.categories.get(c).map_or(0.0, |x| x.share * 100.0));
            }
            o.push('\n');
        }
        o
    }
}

/// Time per category within `[start, end]`: at each instant the most specific category among
/// the segments alive then, `worker` when none is. Sorting the boundaries makes it O(n log n).
fn sweep(start: u64, end: u64, segments: &[Segment]) -> [u64; N] {
    let mut points: Vec<(u64, usize, bool)> = Vec::with_capacity(segments.len() * 2);
    for s in segments {
        let (a, b) = (s.start.max(start), s.end.min(end));
        if a < b {
            let r = rank(s.category, s.on_target);
            points.push((a, r, true));
            points.push((b, r, false));
        }
    }
    points.sort_unstable();
    let mut alive = [0u32; PRECEDENCE.len()];
    let mut spent = [0u64; N];
    let mut at = start;
    let top = |alive: &[u32]| alive.iter().position(|&k| k > 0).map_or(Category::Worker, |r| PRECEDENCE[r].0);
    for (t, r, opens) in points {
        spent[top(&alive) as usize] += t - at;
        at = t;
        if opens {
            alive[r] += 1;
        } else {
            alive[r] -= 1;
        }
    }
    spent[top(&alive) as usize] += end - at;
    spent
}

/// Length of the union of the windows, within `[start, end]`.
fn covered(start: u64, end: u64, mut windows: Vec<(u64, u64)>) -> u64 {
    windows.sort_unstable();
    let (mut total, mut reach) = (0, start);
    for (s, e) in windows {
        let (s, e) = (s.max(reach), e.min(end));
        if s < e {
            total += e - s;
            reach = e;
        }
    }
    total
}

fn shares(spent: &[u64; N], total: u64, categories: &[Category]) -> BTreeMap<Category, Share> {
    categories
        .iter()
        .map(|&c| (c, Share { ns: spent[c as usize], share: ratio(spent[c as usize], total) }))
        .collect()
}

/// `part / total` to 4 decimals; 0 for an empty total.
fn ratio(part: u64, total: u64) -> f64 {
    if total == 0 { 0.0 } else { (part as f64 / total as f64 * 1e4).round() / 1e4 }
}

fn s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Column headers for the per-task table.
fn short(c: Category) -> &'static str {
    match c {
        Category::InterpreterStartup => "interp",
        Category::TargetRecorder => "recorder",
        c => c.name(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::fixture;

    const MS: u64 = 1_000_000;

    fn ns(c: &BTreeMap<Category, Share>, k: Category) -> u64 {
        c[&k].ns
    }

    #[test]
    fn every_worker_nanosecond_has_one_category() {
        let c = Categories::new(&fixture::analysis());
        // Worker A (10-60): worker 10-13, 40-42, 55-56, 58-60; shell 13-16 (the python's
        // pre-exec included), 35-40, 50-55 (nested rm); interpreter 16-20; module 20-35 (make
        // inside it loses); ssh 42-50 (wins over the overlapping sh); other 56-58.
        let t1 = &c.tasks[0];
        assert_eq!((t1.name.as_str(), t1.workers, t1.wall_ns), ("copy stuff", 1, 50 * MS));
        let want = [
            (Category::Worker, 8),
            (Category::Shell, 13),
            (Category::InterpreterStartup, 4),
            (Category::Module, 15),
            (Category::Ssh, 8),
            (Category::Other, 2),
            (Category::Agent, 0),
        ];
        for (k, v) in want {
            assert_eq!(ns(&t1.categories, k), v * MS, "task 1 {k:?}");
        }
        assert!(!t1.categories.contains_key(&Category::Controller));
        // Worker B (70-90): worker 70-72; agent 72-76 and 79-90 (the agent it started, and its
        // runner); interpreter 76-78; module 78-79.
        let t2 = &c.tasks[1];
        assert_eq!(t2.wall_ns, 20 * MS);
        for (k, v) in [
            (Category::Worker, 2),
            (Category::Agent, 15),
            (Category::InterpreterStartup, 2),
            (Category::Module, 1),
        ] {
            assert_eq!(ns(&t2.categories, k), v * MS, "task 2 {k:?}");
        }
        assert_eq!(t2.categories[&Category::Agent].share, 0.75);
        // Run: 100 ms, workers cover 70 of them.
        assert_eq!((c.worker_wall_ns, c.controller_ns, c.total_ns), (70 * MS, 30 * MS, 100 * MS));
        assert_eq!(ns(&c.categories, Category::Controller), 30 * MS);
        assert_eq!(ns(&c.categories, Category::Module), 16 * MS);
        assert_eq!(c.categories.values().map(|s| s.ns).sum::<u64>(), c.total_ns);
        assert_eq!(c.explained_share, 0.98);
        let text = c.text();
        assert!(text.contains("explained 98.0%"), "{text}");
        assert!(c.markdown().contains("| copy stuff | 1 | 0.050 |"), "{}", c.markdown());
    }

    #[test]
    fn incomplete_trace_ends_at_the_last_event() {
        let c = Categories::new(&fixture::incomplete());
        // The last event is worker B's exit at 90; the agent, still running, ends there too.
        assert_eq!(c.controller_ns, 20 * MS);
        assert_eq!(ns(&c.tasks[1].categories, Category::Agent), 15 * MS);
    }

    #[test]
    fn without_attribution_everything_is_controller() {
        let c = Categories::new(&fixture::unattributed());
        assert_eq!((c.worker_wall_ns, c.controller_ns), (0, 100 * MS));
        assert!(c.tasks.is_empty());
        assert_eq!(c.explained_share, 1.0);
    }

    #[test]
    fn sweep_picks_the_most_specific_alive() {
        let seg = |start, end, category| Segment { start, end, category, on_target: false };
        let spent = sweep(
            0,
            100,
            &[
                seg(10, 50, Category::Other),
                seg(20, 30, Category::Shell),
                seg(25, 40, Category::Module),
                seg(90, 200, Category::Ssh), // clipped to the window
            ],
        );
        assert_eq!(spent[Category::Worker as usize], 10 + 40);
        assert_eq!(spent[Category::Other as usize], 10 + 10);
        assert_eq!(spent[Category::Shell as usize], 5);
        assert_eq!(spent[Category::Module as usize], 15);
        assert_eq!(spent[Category::Ssh as usize], 10);
        assert_eq!(covered(0, 100, vec![(50, 70), (10, 20), (15, 30), (90, 150)]), 20 + 20 + 10);
    }
}
