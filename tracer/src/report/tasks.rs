//! Per-task spawn tables: what each Ansible task (and each host, each loop item) cost in
//! processes, execs, opens, CPU and wall time.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use serde::Serialize;

use crate::{
    analysis::Analysis,
    ansible::attribution::{Attribution, Owner},
    model::{Model, basename},
};

/// Rows per task, per (task, host) or per (task, host, item).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    #[default]
    Task,
    Host,
    Item,
}

/// One row of the table; field names are a stable JSON interface.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TaskRow {
    pub play: String,
    pub name: String,
    pub action: String,
    pub uuid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_label: Option<String>,
    pub hosts: Vec<String>,
    /// Loop items run (over all hosts).
    pub items: u64,
    /// From the first worker's start to the last worker's end.
    pub wall_ms: f64,
    pub processes: u64,
    pub execs: u64,
    /// Executable basename -> execs.
    pub execs_by_exe: BTreeMap<String, u64>,
    pub failed_execs: u64,
    pub opens: u64,
    pub cpu_ms: f64,
    /// What the row's work cost on its SSH targets (present when a target was recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetWork>,
}

/// A row's processes on the SSH targets.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TargetWork {
    pub processes: u64,
    pub execs: u64,
    /// Executable basename -> execs.
    pub execs_by_exe: BTreeMap<String, u64>,
    pub opens: u64,
    pub cpu_ms: f64,
}

/// Processes outside any task, by category.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct OtherRows {
    pub controller: u64,
    pub connection: u64,
    pub agent: u64,
    pub unattributed: u64,
}

/// The attribution report.
#[derive(Clone, Debug, Serialize)]
pub struct TaskReport {
    /// False when no plugin message arrived (the tables are then empty).
    pub attribution_available: bool,
    pub playbook: Option<String>,
    pub by: String,
    pub tasks: Vec<TaskRow>,
    #[serde(rename = "task_totals")]
    pub totals: TaskRow,
    #[serde(rename = "outside_tasks")]
    pub other: OtherRows,
    /// Plugin messages lost on the way (the plugins count what they could not send).
    pub dropped_messages: u64,
    /// Datagrams on the attribution socket that were not messages of the protocol.
    pub malformed_messages: u64,
    pub pid_mismatches: u64,
    /// Worker announcements whose pid matched no traced process.
    pub unmatched_workers: u64,
}

#[derive(Default)]
struct Acc {
    row: TaskRow,
    hosts: BTreeSet<String>,
    items: BTreeSet<(usize, u32)>,
    first: Option<u64>,
    last: u64,
}

impl Acc {
    fn add(&mut self, model: &Model, i: usize) {
        let p = &model.processes[i];
        self.row.processes += 1;
        for e in &p.execs {
            self.row.execs += 1;
            *self.row.execs_by_exe.entry(basename(&e.filename).to_owned()).or_insert(0) += 1;
        }
        self.row.failed_execs += p.failed_execs.len() as u64;
        self.row.opens += p.opens as u64;
        self.row.cpu_ms += p.cpu_ns as f64 / 1e6;
    }

    /// A process of an SSH target.
    fn add_target(&mut self, model: &Model, i: usize) {
        let p = &model.processes[i];
        let t = self.row.target.get_or_insert_default();
        t.processes += 1;
        for e in &p.execs {
            t.execs += 1;
            *t.execs_by_exe.entry(basename(&e.filename).to_owned()).or_insert(0) += 1;
        }
        t.opens += p.opens as u64;
        t.cpu_ms += p.cpu_ns as f64 / 1e6;
    }

    fn span(&mut self, start: u64, end: Option<u64>) {
        self.first = Some(self.first.map_or(start, |f| f.min(start)));
        self.last = self.last.max(end.unwrap_or(start));
    }

    fn finish(mut self) -> TaskRow {
        self.row.hosts = self.hosts.into_iter().collect();
        self.row.items = self.items.len() as u64;
        self.row.wall_ms = self.first.map_or(0.0, |f| (self.last.saturating_sub(f)) as f64 / 1e6);
        self.row.cpu_ms = (self.row.cpu_ms * 100.0).round() / 100.0;
        self.row.wall_ms = (self.row.wall_ms * 100.0).round() / 100.0;
        if let Some(t) = &mut self.row.target {
            t.cpu_ms = (t.cpu_ms * 100.0).round() / 100.0;
        }
        self.row
    }
}

impl TaskReport {
    pub fn new(analysis: &Analysis, by: By) -> Self {
        let model = &analysis.model;
        // Without attribution every process is unattributed.
        let none =
            Attribution { owners: vec![Owner::Unattributed; model.processes.len()], ..Default::default() };
        let a = analysis.attribution.as_ref().unwrap_or(&none);
        // Row key: (task, host?, item?) in task order.
        let mut rows: BTreeMap<(usize, Option<String>, Option<u32>), Acc> = BTreeMap::new();
        let mut totals = Acc::default();
        let mut other = OtherRows::default();
        for (i, owner) in a.owners.iter().enumerate() {
            match *owner {
                Owner::Task { worker, item } => {
                    let w = &a.workers[worker];
                    let key = match by {
                        By::Task => (w.task, None, None),
                        By::Host => (w.task, Some(w.host.clone()), None),
                        By::Item => (w.task, Some(w.host.clone()), item),
                    };
                    let acc = rows.entry(key).or_default();
                    acc.add(model, i);
                    totals.add(model, i);
                    acc.hosts.insert(w.host.clone());
                    totals.hosts.insert(w.host.clone());
                    if i == w.proc {
                        let wp = &model.processes[i];
                        acc.span(wp.start_ns, wp.end_ns);
                        totals.span(wp.start_ns, wp.end_ns);
                    }
                }
                Owner::Controller => other.controller += 1,
                Owner::Connection => other.connection += 1,
                Owner::Agent => other.agent += 1,
                Owner::Unattributed => other.unattributed += 1,
            }
        }
        // The targets' processes go to the rows of the workers they worked for.
        for target in &analysis.targets {
            for (i, owner) in target.owners.iter().enumerate() {
                if let Owner::Task { worker, item } = *owner {
                    let w = &a.workers[worker];
                    let key = match by {
                        By::Task => (w.task, None, None),
                        By::Host => (w.task, Some(w.host.clone()), None),
                        By::Item => (w.task, Some(w.host.clone()), item),
                    };
                    rows.entry(key).or_default().add_target(&target.model, i);
                    totals.add_target(&target.model, i);
                }
            }
        }
        let recorded = analysis.targets.iter().any(|t| t.header.is_some());
        // Items run are the workers' item windows (whatever processes they started).
        for (wi, w) in a.workers.iter().enumerate() {
            for win in &w.items {
                let key = match by {
                    By::Task => (w.task, None, None),
                    By::Host => (w.task, Some(w.host.clone()), None),
                    By::Item => (w.task, Some(w.host.clone()), Some(win.index)),
                };
                let acc = rows.entry(key).or_default();
                acc.hosts.insert(w.host.clone());
                acc.items.insert((wi, win.index));
                totals.items.insert((wi, win.index));
            }
        }
        let tasks = rows
            .into_iter()
            .map(|((t, host, item), acc)| {
                let task = &a.tasks[t];
                let window = item.and_then(|it| {
                    a.workers
                        .iter()
                        .filter(|w| w.task == t && Some(&w.host) == host.as_ref())
                        .flat_map(|w| &w.items)
                        .find(|win| win.index == it)
                });
                let mut row = acc.finish();
                if recorded {
                    row.target.get_or_insert_default();
                }
                // An item row's wall time is its window inside the worker.
                if let Some(win) = window {
                    let end = win.end_ns.unwrap_or(win.start_ns);
                    row.wall_ms = (end.saturating_sub(win.start_ns) as f64 / 1e4).round() / 100.0;
                }
                let label = window.map(|win| win.label.clone());
                row.play = task.play.clone();
                row.name = task.name.clone();
                row.action = task.action.clone();
                row.uuid = task.uuid.clone();
                row.host = host;
                row.item = item;
                row.item_label = label;
                row
            })
            .collect();
        let mut totals = totals.finish();
        totals.name = "TOTAL".into();
        if recorded {
            totals.target.get_or_insert_default();
        }
        Self {
            attribution_available: analysis.attribution.is_some(),
            playbook: a.playbook.clone(),
            by: format!("{by:?}").to_lowercase(),
            tasks,
            totals,
            other,
            dropped_messages: a.dropped_messages,
            malformed_messages: analysis.malformed_messages(),
            pid_mismatches: a.pid_mismatches,
            unmatched_workers: a.unmatched_workers,
        }
    }

    /// Rows sorted by a key, largest first, at most `n`.
    pub fn top(&self, n: usize, key: impl Fn(&TaskRow) -> f64) -> Vec<&TaskRow> {
        let mut v: Vec<&TaskRow> = self.tasks.iter().collect();
        v.sort_by(|a, b| key(b).total_cmp(&key(a)));
        v.truncate(n);
        v
    }

    fn label(r: &TaskRow) -> String {
        let mut s = r.name.clone();
        if let Some(h) = &r.host {
            let _ = write!(s, " @{h}");
        }
        if let Some(i) = r.item {
            let _ = write!(s, " [{i}");
            if let Some(l) = &r.item_label {
                let _ = write!(s, ": {}", truncate(l, 24));
            }
            s.push(']');
        }
        s
    }

    /// The row's most exec'd executables (then, with targets, theirs).
    fn top_execs(r: &TaskRow, n: usize) -> String {
        let top = |by: &BTreeMap<String, u64>| {
            let mut v: Vec<(&String, &u64)> = by.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let mut s: Vec<String> = v.iter().take(n).map(|(k, c)| format!("{k} {c}")).collect();
            if v.len() > n {
                s.push("…".into());
            }
            s.join(", ")
        };
        match &r.target {
            Some(t) if !t.execs_by_exe.is_empty() => {
                format!("{}; on targets: {}", top(&r.execs_by_exe), top(&t.execs_by_exe))
            }
            _ => top(&r.execs_by_exe),
        }
    }

    fn unavailable_note(&self) -> Option<&'static str> {
        match (self.attribution_available, self.malformed_messages) {
            (true, _) => None,
            (false, 0) => Some(
                "Ansible attribution unavailable: no message arrived from the spawntrace callback plugin",
            ),
            (false, _) => Some(
                "Ansible attribution unavailable: no message of the protocol arrived from the spawntrace plugins",
            ),
        }
    }

    fn other_line(&self) -> String {
        let o = &self.other;
        format!(
            "outside tasks: controller {}, connection infrastructure {}, agents {}, unattributed {}",
            o.controller, o.connection, o.agent, o.unattributed
        )
    }

    pub fn text(&self, top_n: usize) -> String {
        let mut o = String::new();
        if let Some(n) = self.unavailable_note() {
            let _ = writeln!(o, "{n}");
            if let Some(health) = self.health() {
                let _ = writeln!(o, "{health}");
            }
            return o;
        }
        let w = self.tasks.iter().map(|r| Self::label(r).chars().count()).max().unwrap_or(4).clamp(4, 48);
        // the targets' processes and execs, when a target was recorded
        let targets = self.totals.target.is_some();
        let _ = writeln!(
            o,
            "{:<w$}  {:<16} {:>5} {:>5} {:>9} {:>6} {:>6} {:>7} {:>9}{}  execs by executable",
            "task",
            "action",
            "hosts",
            "items",
            "wall s",
            "procs",
            "execs",
            "opens",
            "cpu s",
            if targets { format!(" {:>7} {:>7}", "t.procs", "t.execs") } else { String::new() }
        );
        for r in self.tasks.iter().chain(std::iter::once(&self.totals)) {
            let on_targets = match &r.target {
                Some(t) if targets => format!(" {:>7} {:>7}", t.processes, t.execs),
                _ => String::new(),
            };
            let _ = writeln!(
                o,
                "{:<w$}  {:<16} {:>5} {:>5} {:>9.3} {:>6} {:>6} {:>7} {:>9.3}{on_targets}  {}",
                truncate(&Self::label(r), w),
                truncate(short_action(&r.action), 16),
                r.hosts.len(),
                r.items,
                r.wall_ms / 1000.0,
                r.processes,
                r.execs,
                r.opens,
                r.cpu_ms / 1000.0,
                Self::top_execs(r, 5)
            );
        }
        let _ = writeln!(o, "{}", self.other_line());
        if let Some(health) = self.health() {
            let _ = writeln!(o, "{health}");
        }
        if top_n > 0 && self.tasks.len() > top_n {
            for (what, rows) in [
                ("spawns", self.top(top_n, |r| r.processes as f64)),
                ("wall time", self.top(top_n, |r| r.wall_ms)),
            ] {
                let names: Vec<String> = rows.iter().map(|r| truncate(&Self::label(r), 40)).collect();
                let _ = writeln!(o, "top {top_n} by {what}: {}", names.join("; "));
            }
        }
        o
    }

    pub fn markdown(&self) -> String {
        let mut o = String::new();
        if let Some(n) = self.unavailable_note() {
            let _ = writeln!(o, "_{n}_");
            if let Some(health) = self.health() {
                let _ = writeln!(o, "\n{health}");
            }
            return o;
        }
        let targets = self.totals.target.is_some();
        let (head, rule) = match targets {
            true => (" target processes | target execs |", "---:|---:|"),
            false => ("", ""),
        };
        let _ = writeln!(
            o,
            "| task | action | hosts | items | wall s | processes | execs | opens | cpu s |{head} execs by executable |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|{rule}---|"
        );
        for r in self.tasks.iter().chain(std::iter::once(&self.totals)) {
            let on_targets = match &r.target {
                Some(t) if targets => format!(" {} | {} |", t.processes, t.execs),
                _ => String::new(),
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {:.3} | {} | {} | {} | {:.3} |{on_targets} {} |",
                Self::label(r).replace('|', "\\|"),
                r.action,
                r.hosts.len(),
                r.items,
                r.wall_ms / 1000.0,
                r.processes,
                r.execs,
                r.opens,
                r.cpu_ms / 1000.0,
                Self::top_execs(r, 8)
            );
        }
        let _ = writeln!(o, "\n{}", self.other_line());
        if let Some(health) = self.health() {
            let _ = writeln!(o, "\n{health}");
        }
        o
    }

    /// How well the plugins' messages came through, when anything went wrong.
    fn health(&self) -> Option<String> {
        let counts =
            [self.dropped_messages, self.malformed_messages, self.pid_mismatches, self.unmatched_workers];
        counts.iter().any(|&n| n > 0).then(|| {
            format!(
                "plugin messages lost: {}, malformed: {}, pid mismatches: {}, workers not seen by the kernel: {}",
                self.dropped_messages, self.malformed_messages, self.pid_mismatches, self.unmatched_workers
            )
        })
    }
}

/// `copy` for `ansible.builtin.copy` (and `ansible.legacy.copy`): the table has little room.
fn short_action(a: &str) -> &str {
    a.strip_prefix("ansible.builtin.").or_else(|| a.strip_prefix("ansible.legacy.")).unwrap_or(a)
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
