//! Wall-time categories: every nanosecond of each Ansible worker's life goes to exactly one
//! category, by what its processes were doing then; the run's time outside every worker is
//! `controller`.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{
    ansible::attribution::{Attribution, Owner},
    model::Model,
    report::labels::{self, Kind},
    trace::{Footer, Header},
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
    /// The worker's own Python, no other process of it running.
    Worker,
    /// No worker alive: ansible-playbook's own time (run level only).
    Controller,
}

impl Category {
    pub const ALL: [Category; 8] = [
        Category::Module,
        Category::InterpreterStartup,
        Category::Ssh,
        Category::Shell,
        Category::Agent,
        Category::Other,
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

/// A process's stretch of time in one category.
struct Segment {
    start: u64,
    end: u64,
    category: Category,
}

const N: usize = Category::ALL.len();

impl Categories {
    /// Processes without an end end at the trace end: the footer's, else the last event's.
    pub fn new(
        header: &Header,
        footer: Option<&Footer>,
        model: &Model,
        attribution: Option<&Attribution>,
    ) -> Self {
        let run_start = header.start_ns;
        let run_end = footer.map_or(model.totals.last_ns, |f| f.end_ns).max(run_start);
        let end_of = |i: usize| {
            let p = &model.processes[i];
            p.end_ns.unwrap_or(run_end).max(p.start_ns)
        };
        let (workers, tasks, owners) = match attribution.filter(|a| a.available) {
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
                match labels::kind(model, i) {
                    Kind::Module => Category::Module,
                    Kind::Shell => Category::Shell,
                    Kind::Ssh => Category::Ssh,
                    Kind::Other if agentish => Category::Agent,
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
            let mut push = |start: u64, end: u64, category: Category| {
                if start < end && category != Category::Worker {
                    segments[w].push(Segment { start, end, category });
                }
            };
            let Some(exec) = p.execs.last().map(|e| e.ts.clamp(start, end)) else {
                push(start, end, image[i]);
                continue;
            };
            push(start, exec, inherited[i]);
            match (image[i], p.first_payload_open_ns) {
                (Category::Module, Some(open)) => {
                    let open = open.clamp(exec, end);
                    push(exec, open, Category::InterpreterStartup);
                    push(open, end, Category::Module);
                }
                (category, _) => push(exec, end, category),
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
            let _ = write!(o, " {:>7}", short(*c));
        }
        o.push('\n');
        for t in &self.tasks {
            let name: String = t.name.chars().take(w).collect();
            let _ = write!(o, "{name:<w$} {:>7} {:>8.3}", t.workers, s(t.wall_ns));
            for c in &Category::ALL[..N - 1] {
                let _ = write!(o, " {:>6.1}%", t.categories.get(c).map_or(0.0, |x| x.share * 100.0));
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
            points.push((a, s.category as usize, true));
            points.push((b, s.category as usize, false));
        }
    }
    points.sort_unstable();
    let mut alive = [0u32; N];
    let mut spent = [0u64; N];
    let mut at = start;
    for (t, c, opens) in points {
        let top = alive.iter().position(|&k| k > 0).unwrap_or(Category::Worker as usize);
        spent[top] += t - at;
        at = t;
        if opens {
            alive[c] += 1;
        } else {
            alive[c] -= 1;
        }
    }
    let top = alive.iter().position(|&k| k > 0).unwrap_or(Category::Worker as usize);
    spent[top] += end - at;
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
        c => c.name(),
    }
}

/// A synthetic Ansible run shared by the report tests; times in ms after [`fixture::BASE`].
///
/// ```text
/// 0    ansible-playbook (root, never exits); 2-4 ldconfig (controller)
/// 10-60 worker A, host h1, task "copy stuff" (copy), no loop:
///   12-40 sh (exec 13) > 15-35 python3 AnsiballZ_copy (exec 16, payload open 20)
///                           > 25-30 make (exec 26, a failed exec at 25.5)
///   42-50 ssh;  45-55 sh > 52-54 rm;  56-58 make
/// 70-90 worker B, host h2, task "ping" (ping), items [0] 71-80, [1] 80-89:
///   72-  agent (never exits) > 75-80 runner for B > 76-79 python3 AnsiballZ_ping (open 78)
/// footer end 100
/// ```
#[cfg(test)]
pub(crate) mod fixture {
    use serde_json::json;

    use crate::{
        ansible::attribution::Attribution,
        model::Model,
        trace::{AnsibleRecord, Counters, Event, Footer, Header, Status},
    };

    pub const BASE: u64 = 1_000_000_000;

    pub fn t(ms: f64) -> u64 {
        BASE + (ms * 1e6) as u64
    }

    pub fn fork(ms: f64, tgid: u32, ptgid: u32) -> Event {
        Event::Fork { ts: t(ms), pid: tgid, tgid, ppid: ptgid, ptgid, thread: false, root: ptgid == 1 }
    }

    pub fn exec(ms: f64, tgid: u32, argv: &[&str]) -> Event {
        Event::Exec {
            ts: t(ms),
            pid: tgid,
            tgid,
            old_pid: tgid,
            filename: argv[0].into(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
            argv_bytes: 0,
            argv_truncated: false,
            argv_unreadable: false,
            filename_truncated: false,
        }
    }

    pub fn exit(ms: f64, tgid: u32) -> Event {
        Event::Exit {
            ts: t(ms),
            pid: tgid,
            tgid,
            group_dead: true,
            status: Status::Exited(0),
            cpu_ns: Some(2_000_000),
        }
    }

    pub fn open(ms: f64, tgid: u32, path: &str) -> Event {
        Event::Open {
            ts: t(ms),
            pid: tgid,
            tgid,
            syscall: "openat".into(),
            path: path.into(),
            flags: 0,
            ret: 3,
            path_truncated: false,
        }
    }

    pub fn header() -> Header {
        serde_json::from_value(json!({
            "format": "spawntrace-trace", "version": 1, "tool_version": "0", "kernel": "k",
            "hostname": "h", "clock": "CLOCK_MONOTONIC", "realtime_offset_ns": 0, "boot_time_s": 0,
            "command": ["ansible-playbook", "site.yml"], "root_pid": 10, "uid": 0, "gid": 0,
            "start_ns": BASE, "argv_cap": 4096, "path_cap": 256, "ansible": true
        }))
        .unwrap()
    }

    pub fn footer() -> Footer {
        Footer {
            end_ns: t(100.0),
            status: Status::Exited(0),
            events: 0,
            counters: Counters::default(),
            tracer_cpu_ns: 0,
            probe_cpu_ns: None,
            interrupted: false,
        }
    }

    pub fn events() -> Vec<Event> {
        vec![
            fork(0.0, 10, 1),
            exec(0.0, 10, &["/venv/bin/python", "/venv/bin/ansible-playbook", "site.yml"]),
            fork(2.0, 15, 10),
            exec(2.0, 15, &["/sbin/ldconfig"]),
            exit(4.0, 15),
            fork(10.0, 20, 10),
            fork(12.0, 21, 20),
            exec(
                13.0,
                21,
                &["/bin/sh", "-c", "/usr/bin/python3 /tmp/ansible-tmp-1/AnsiballZ_copy.py && sleep 0"],
            ),
            fork(15.0, 22, 21),
            exec(16.0, 22, &["/usr/bin/python3", "/tmp/ansible-tmp-1/AnsiballZ_copy.py"]),
            open(20.0, 22, "/tmp/ansible_copy_payload_x/ansible_copy_payload.zip"),
            fork(25.0, 23, 22),
            Event::ExecFailed {
                ts: t(25.5),
                pid: 23,
                tgid: 23,
                syscall: "execve".into(),
                errno: 2,
                error: "ENOENT".into(),
                filename: "/usr/local/bin/make".into(),
                filename_truncated: false,
            },
            exec(26.0, 23, &["/usr/bin/make"]),
            exit(30.0, 23),
            exit(35.0, 22),
            exit(40.0, 21),
            fork(42.0, 24, 20),
            exec(42.0, 24, &["/usr/bin/ssh", "h1"]),
            fork(45.0, 25, 20),
            exec(45.0, 25, &["/bin/sh", "-c", "rm -f -r /tmp/x"]),
            exit(50.0, 24),
            fork(52.0, 27, 25),
            exec(52.0, 27, &["/bin/rm", "-f", "-r", "/tmp/x"]),
            exit(54.0, 27),
            exit(55.0, 25),
            fork(56.0, 26, 20),
            exec(56.0, 26, &["/usr/bin/make"]),
            exit(58.0, 26),
            exit(60.0, 20),
            fork(70.0, 30, 10),
            fork(72.0, 40, 30),
            fork(75.0, 41, 40),
            fork(76.0, 42, 41),
            exec(76.0, 42, &["/usr/bin/python3", "/tmp/ansible-tmp-2/AnsiballZ_ping.py"]),
            open(78.0, 42, "/tmp/ansible_ping_payload_y/ansible_ping_payload.zip"),
            exit(79.0, 42),
            exit(80.0, 41),
            exit(90.0, 30),
        ]
    }

    pub fn records() -> Vec<AnsibleRecord> {
        let rec = |pid: u32, body: serde_json::Value| AnsibleRecord {
            sender_pid: pid,
            body: body.as_object().cloned().unwrap_or_default(),
        };
        vec![
            rec(10, json!({"ev": "playbook_start", "ts": t(1.0), "playbook": "/site.yml"})),
            rec(10, json!({"ev": "play_start", "ts": t(1.0), "uuid": "p", "name": "Play"})),
            rec(
                10,
                json!({"ev": "task_start", "ts": t(5.0), "uuid": "t1", "name": "copy stuff", "action": "copy", "play_uuid": "p"}),
            ),
            rec(20, json!({"ev": "worker_start", "ts": t(10.0), "host": "h1", "task_uuid": "t1"})),
            rec(
                10,
                json!({"ev": "task_start", "ts": t(65.0), "uuid": "t2", "name": "ping", "action": "ping", "play_uuid": "p", "loop": true}),
            ),
            rec(30, json!({"ev": "worker_start", "ts": t(70.0), "host": "h2", "task_uuid": "t2"})),
            rec(30, json!({"ev": "item_start", "ts": t(71.0), "index": 0, "label": "a"})),
            rec(40, json!({"ev": "agent_start", "ts": t(72.0), "pid": 40})),
            rec(40, json!({"ev": "runner_start", "ts": t(75.0), "pid": 41, "worker_pid": 30, "item": 0})),
            rec(30, json!({"ev": "item_end", "ts": t(80.0), "index": 0})),
            rec(30, json!({"ev": "item_start", "ts": t(80.0), "index": 1, "label": "b"})),
            rec(30, json!({"ev": "item_end", "ts": t(89.0), "index": 1})),
        ]
    }

    pub fn scenario() -> (Header, Footer, Model, Attribution) {
        let model = Model::from_events(&events());
        let attribution = Attribution::new(&model, &records());
        (header(), footer(), model, attribution)
    }
}

#[cfg(test)]
mod tests {
    use super::{fixture::*, *};

    const MS: u64 = 1_000_000;

    fn ns(c: &BTreeMap<Category, Share>, k: Category) -> u64 {
        c[&k].ns
    }

    #[test]
    fn every_worker_nanosecond_has_one_category() {
        let (h, f, model, a) = scenario();
        let c = Categories::new(&h, Some(&f), &model, Some(&a));
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
        let (h, _, model, a) = scenario();
        let c = Categories::new(&h, None, &model, Some(&a));
        // The last event is worker B's exit at 90; the agent, still running, ends there too.
        assert_eq!(c.controller_ns, 20 * MS);
        assert_eq!(ns(&c.tasks[1].categories, Category::Agent), 15 * MS);
    }

    #[test]
    fn without_attribution_everything_is_controller() {
        let (h, f, model, _) = scenario();
        let c = Categories::new(&h, Some(&f), &model, None);
        assert_eq!((c.worker_wall_ns, c.controller_ns), (0, 100 * MS));
        assert!(c.tasks.is_empty());
        assert_eq!(c.explained_share, 1.0);
    }

    #[test]
    fn sweep_picks_the_most_specific_alive() {
        let seg = |start, end, category| Segment { start, end, category };
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
