//! The run summary: what the command spawned, how it ended, and how healthy the trace is.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{
    analysis::Analysis,
    ansible::{
        attribution::Owner,
        target_attribution::{Target, TargetState},
    },
    report::labels::printable,
    trace::{Counters, Status},
};

fn target_summary(analysis: &Analysis, t: &Target) -> TargetSummary {
    let mut hosts: Vec<String> = Vec::new();
    if let Some(a) = &analysis.attribution {
        for w in t.owners.iter().filter_map(|o| match o {
            Owner::Task { worker, .. } => Some(*worker),
            _ => None,
        }) {
            let host = &a.workers[w].host;
            if !hosts.contains(host) {
                hosts.push(host.clone());
            }
        }
        for (pid, _) in &t.users {
            if let Some(w) = a.workers.iter().find(|w| w.pid == *pid)
                && !hosts.contains(&w.host)
            {
                hosts.push(w.host.clone());
            }
        }
    }
    TargetSummary {
        target: t.target.clone(),
        hosts,
        recorded: t.state == TargetState::Recording,
        reason: match &t.state {
            TargetState::Recording => None,
            TargetState::Unavailable(why) => Some(why.clone()),
        },
        processes: t.model.processes.len() as u64,
        execs: t.model.totals.execs,
        agent: t.owners.iter().filter(|o| **o == Owner::Agent).count() as u64,
        connection: t.owners.iter().filter(|o| **o == Owner::Connection).count() as u64,
        unattributed: t.unattributed(),
        unconfirmed: t.unconfirmed,
        complete: t.footer.is_some(),
        dropped_events: t.footer.as_ref().map(|f| f.counters.dropped_events()),
        clock_error_ms: t.clock.map(|(_, e)| (e as f64 / 1e4).round() / 100.0),
        recorder_start_ms: ms(t.start_ns),
        recorder_cpu_ms: t.footer.as_ref().map(|f| ms(f.tracer_cpu_ns)),
    }
}

/// How many executables the top list shows.
const TOP: usize = 10;

#[derive(Debug, Serialize, PartialEq)]
pub struct TopExe {
    pub path: String,
    pub execs: u64,
}

/// Machine-readable summary (`report --format json`); field names are a stable interface.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub command: Vec<String>,
    /// The traced command's own exit.
    pub status: Option<Status>,
    pub duration_ms: f64,
    pub processes: u64,
    pub forks: u64,
    pub threads: u64,
    pub execs: u64,
    pub failed_execs: u64,
    pub opens: u64,
    pub failed_opens: u64,
    /// Process exits by how they ended ("exit 0", "signal 9 (SIGKILL)", …).
    pub exits: BTreeMap<String, u64>,
    /// Processes still running when the recording ended (daemons such as an ssh ControlMaster),
    /// and the first of them by name.
    pub still_running: u64,
    pub still_running_processes: Vec<RunningProcess>,
    /// Full executable path -> successful execs.
    pub execs_by_path: BTreeMap<String, u64>,
    /// Failed exec attempts by error name.
    pub failed_execs_by_error: BTreeMap<String, u64>,
    pub top_executables: Vec<TopExe>,
    /// Events recorded in the trace.
    pub events: Option<u64>,
    /// Events lost; None when the trace is incomplete (its counters were never written).
    pub dropped_events: Option<u64>,
    pub counters: Counters,
    pub tracer_cpu_ms: Option<f64>,
    pub probe_cpu_ms: Option<f64>,
    /// False when the trace has no footer (the tracer was killed mid-run).
    pub complete: bool,
    pub interrupted: bool,
    /// The SSH targets the run reached: whether each was recorded (and if not, why), and what
    /// ran there.
    pub targets: Vec<TargetSummary>,
    /// Why the run's SSH targets could not be recorded at all, when that is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets_unrecorded: Option<String>,
}

/// One SSH target of the run.
#[derive(Debug, Serialize, PartialEq)]
pub struct TargetSummary {
    /// `user@host:port`.
    pub target: String,
    /// The inventory hosts whose workers reached it.
    pub hosts: Vec<String>,
    pub recorded: bool,
    /// Why it was not recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub processes: u64,
    pub execs: u64,
    /// Processes of long-lived agents (a persistent agent, Mitogen's context) and of the
    /// connection (the sshd session).
    pub agent: u64,
    pub connection: u64,
    /// Processes given to no task, agent or connection.
    pub unattributed: u64,
    /// Processes given to a worker by time while none of its ssh clients ran (normally 0).
    pub unconfirmed: u64,
    /// The target recorder's trace ended with its footer.
    pub complete: bool,
    /// Events lost on the target; None when unknown (its trace is incomplete).
    pub dropped_events: Option<u64>,
    /// The bound of the error of the target's clock mapped onto ours.
    pub clock_error_ms: Option<f64>,
    /// How long the recorder took to start, or to fail (the first worker to reach the target
    /// waited that long).
    pub recorder_start_ms: f64,
    /// The recorder's own CPU time on the target (None: its trace is incomplete).
    pub recorder_cpu_ms: Option<f64>,
}

/// A process still alive when the recording ended.
#[derive(Debug, Serialize, PartialEq)]
pub struct RunningProcess {
    pub pid: u32,
    pub name: String,
}

/// How many still-running processes the summary names.
const RUNNING_NAMED: usize = 10;

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e4).round() / 100.0
}

impl Summary {
    pub fn new(analysis: &Analysis) -> Self {
        let (header, footer, model) = (&analysis.header, analysis.footer.as_ref(), &analysis.model);
        let t = &model.totals;
        let mut execs_by_path = BTreeMap::new();
        let mut failed_execs_by_error = BTreeMap::new();
        let mut exits = BTreeMap::new();
        for p in &model.processes {
            for e in &p.execs {
                *execs_by_path.entry(e.filename.clone()).or_insert(0) += 1;
            }
            for f in &p.failed_execs {
                *failed_execs_by_error.entry(crate::trace::errno_name(f.errno)).or_insert(0) += 1;
            }
            if let Some(s) = p.status {
                *exits.entry(s.to_string()).or_insert(0) += 1;
            }
        }
        let over_ssh = execs_by_path.keys().any(|p: &String| crate::model::basename(p) == "ssh");
        let mut top: Vec<TopExe> =
            execs_by_path.iter().map(|(path, &execs)| TopExe { path: path.clone(), execs }).collect();
        top.sort_by(|a, b| b.execs.cmp(&a.execs).then_with(|| a.path.cmp(&b.path)));
        top.truncate(TOP);
        let counters = footer.map(|f| f.counters).unwrap_or_default();
        Self {
            command: header.command.clone(),
            status: footer.map(|f| f.status),
            duration_ms: ms(analysis.end_ns() - header.start_ns),
            processes: model.processes.len() as u64,
            forks: t.forks,
            threads: t.threads,
            execs: t.execs,
            failed_execs: t.failed_execs,
            opens: t.opens,
            failed_opens: t.open_failures,
            exits,
            still_running: model.still_running().count() as u64,
            still_running_processes: (0..model.processes.len())
                .filter(|&i| model.processes[i].end_ns.is_none())
                .take(RUNNING_NAMED)
                .map(|i| RunningProcess {
                    pid: model.processes[i].tgid(),
                    name: crate::report::labels::label(model, i),
                })
                .collect(),
            execs_by_path,
            failed_execs_by_error,
            top_executables: top,
            events: footer.map(|f| f.events),
            dropped_events: footer.map(|_| counters.dropped_events()),
            counters,
            tracer_cpu_ms: footer.map(|f| ms(f.tracer_cpu_ns)),
            probe_cpu_ms: footer.and_then(|f| f.probe_cpu_ns).map(ms),
            complete: footer.is_some(),
            interrupted: footer.is_some_and(|f| f.interrupted),
            targets: analysis.targets.iter().map(|t| target_summary(analysis, t)).collect(),
            targets_unrecorded: analysis
                .attribution
                .as_ref()
                .filter(|a| analysis.targets.is_empty() && a.strategies.iter().any(|s| s.contains("mitogen")))
                .filter(|_| over_ssh)
                .map(|_| "Mitogen ran over ssh, yet no target was asked for: spawntrace could not reach its connections (its version's `CONNECTION_METHOD`)".into()),
        }
    }

    /// One line per SSH target: recorded (what ran there) or why not.
    pub fn targets_text(&self) -> Vec<String> {
        self.targets
            .iter()
            .map(|t| {
                let hosts = match t.hosts.is_empty() {
                    true => String::new(),
                    false => format!(" ({})", t.hosts.join(", ")),
                };
                let what = match (&t.reason, t.complete) {
                    (Some(reason), _) => format!("not recorded: {reason}"),
                    (None, complete) => format!(
                        "{} processes ({} agent, {} unattributed{}), {} execs{}, recorder started in {:.3} s{}",
                        t.processes,
                        t.agent,
                        t.unattributed,
                        match t.unconfirmed {
                            0 => String::new(),
                            n => format!(", {n} while no ssh of their worker ran"),
                        },
                        t.execs,
                        t.clock_error_ms.map(|e| format!(", clock ±{e:.3} ms")).unwrap_or_default(),
                        t.recorder_start_ms / 1000.0,
                        match complete {
                            true => String::new(),
                            false => "; INCOMPLETE (its recorder ended early)".into(),
                        }
                    ),
                };
                format!("target {}{hosts}: {what}", printable(&t.target))
            })
            .collect()
    }

    fn status_text(&self) -> String {
        match self.status {
            Some(s) => s.to_string(),
            None => "unknown (trace incomplete)".into(),
        }
    }

    fn exits_text(&self) -> String {
        let mut parts: Vec<String> = self.exits.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
        if self.still_running > 0 {
            parts.push(format!("still running ×{}", self.still_running));
        }
        if parts.is_empty() { "none".into() } else { parts.join(", ") }
    }

    fn health_text(&self) -> String {
        let c = &self.counters;
        let mut s = match self.dropped_events {
            Some(n) => format!("dropped events {n}"),
            None => "dropped events unknown".to_owned(),
        };
        for (name, n) in [
            ("unreadable strings", c.read_failures),
            ("untracked processes", c.track_failures),
            ("lost syscall args", c.stash_failures),
        ] {
            if n > 0 {
                let _ = write!(s, ", {name} {n}");
            }
        }
        if let Some(cpu) = self.tracer_cpu_ms {
            let _ = write!(s, "; tracer CPU {cpu:.1} ms");
            if let Some(p) = self.probe_cpu_ms {
                let _ = write!(s, " + probes {p:.1} ms");
            }
        }
        if !self.complete {
            s.push_str("; TRACE INCOMPLETE (no footer: the tracer ended before the command, which may have run on untraced)");
        }
        if self.interrupted {
            s.push_str("; interrupted by a signal");
        }
        s
    }

    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "spawntrace: `{}` ended with {} after {:.3} s",
            printable(&self.command.join(" ")),
            self.status_text(),
            self.duration_ms / 1000.0
        );
        let _ = writeln!(
            o,
            "  processes {} (forks {}, threads {}), execs {} (failed {}), opens {} (failed {})",
            self.processes,
            self.forks,
            self.threads,
            self.execs,
            self.failed_execs,
            self.opens,
            self.failed_opens
        );
        let _ = writeln!(o, "  exits: {}", self.exits_text());
        if let Some(running) = self.running_text() {
            let _ = writeln!(o, "  still running when the recording ended: {running}");
        }
        if !self.top_executables.is_empty() {
            let _ = writeln!(o, "  top executables by execs:");
            for t in &self.top_executables {
                let _ = writeln!(o, "    {:>7}  {}", t.execs, printable(&t.path));
            }
        }
        let _ = writeln!(o, "  {}", self.health_text());
        for t in self.targets_text() {
            let _ = writeln!(o, "  {t}");
        }
        if let Some(why) = &self.targets_unrecorded {
            let _ = writeln!(o, "  {why}");
        }
        o
    }

    fn running_text(&self) -> Option<String> {
        if self.still_running == 0 {
            return None;
        }
        let mut names: Vec<String> = self
            .still_running_processes
            .iter()
            .map(|p| format!("{} (pid {})", printable(&p.name), p.pid))
            .collect();
        let unnamed = self.still_running as usize - names.len();
        if unnamed > 0 {
            names.push(format!("{unnamed} more"));
        }
        Some(names.join(", "))
    }

    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "## spawntrace: `{}`\n", printable(&self.command.join(" ")));
        let _ = writeln!(o, "| metric | value |\n|---|---|");
        let rows: [(&str, String); 11] = [
            ("exit", self.status_text()),
            ("duration", format!("{:.3} s", self.duration_ms / 1000.0)),
            ("processes", self.processes.to_string()),
            ("forks", self.forks.to_string()),
            ("threads", self.threads.to_string()),
            ("execs", self.execs.to_string()),
            ("failed execs", self.failed_execs.to_string()),
            ("opens", format!("{} (failed {})", self.opens, self.failed_opens)),
            ("exits", self.exits_text()),
            ("still running at the end", self.running_text().unwrap_or_else(|| "none".into())),
            ("trace health", self.health_text()),
        ];
        for (k, v) in rows {
            let _ = writeln!(o, "| {k} | {} |", v.replace('|', "\\|"));
        }
        for t in self.targets_text() {
            let _ = writeln!(o, "\n- {}", t.replace('|', "\\|"));
        }
        if !self.top_executables.is_empty() {
            let _ = writeln!(o, "\n| executable | execs |\n|---|---:|");
            for t in &self.top_executables {
                let _ = writeln!(o, "| `{}` | {} |", printable(&t.path), t.execs);
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{exec, header, root};

    #[test]
    fn counts_and_top_list() {
        let events = [
            root(1, 10),
            exec(2, 10, &["/bin/sh"]),
            exec(3, 10, &["/bin/true"]),
            exec(4, 10, &["/bin/true"]),
        ];
        let s = Summary::new(&Analysis::from_events(header(&["sh"]), None, &events, &[]));
        assert_eq!(s.execs, 3);
        assert_eq!(s.execs_by_path["/bin/true"], 2);
        assert_eq!(s.top_executables[0], TopExe { path: "/bin/true".into(), execs: 2 });
        assert!(!s.complete);
        assert_eq!(s.still_running, 1);
        assert!(s.text().contains("TRACE INCOMPLETE"));
        let json = serde_json::to_value(&s).unwrap();
        for key in [
            "processes",
            "execs",
            "failed_execs",
            "forks",
            "threads",
            "opens",
            "dropped_events",
            "execs_by_path",
            "duration_ms",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }
}
