//! Latency distributions (HdrHistogram, 3 significant digits): Ansible task latency per action,
//! process lifetime per executable, fork→exec latency and module interpreter start-up.
use std::{collections::BTreeMap, fmt::Write as _};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{analysis::Analysis, ansible::processes::Kind, model::basename};

/// Percentiles of one latency, in ms (to within HdrHistogram's 0.1 %).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    /// Stats of samples given in ns.
    pub fn from_ns(samples: impl IntoIterator<Item = u64>) -> Self {
        let mut h = Histogram::<u64>::new(3).expect("3 significant digits is a valid precision");
        for s in samples {
            // Auto-resizing: only a value beyond the histogram's largest possible range fails.
            h.record(s).unwrap_or_else(|_| h.saturating_record(s));
        }
        if h.is_empty() {
            return Self::default();
        }
        let ms = |ns: u64| (ns as f64 / 1e3).round() / 1e3;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// The latency histograms of a trace; field names are a stable JSON interface.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Histograms {
    /// Per task action: one sample per loop item window, or per worker when it ran no items.
    pub task_latency: BTreeMap<String, Stats>,
    /// Fork to exit per executable basename (`(fork)`: never exec'd); processes whose fork was
    /// not seen are left out, those still running end at the trace end.
    pub process_lifetime: BTreeMap<String, Stats>,
    /// Fork to first exec.
    pub fork_exec: Stats,
    /// Exec of a module's Python to its first open of the module payload.
    pub interpreter_startup: Stats,
    /// Module processes without a payload open (left out of `interpreter_startup`).
    pub interpreter_startup_missing: u64,
}

impl Histograms {
    pub fn new(analysis: &Analysis) -> Self {
        let model = &analysis.model;
        let trace_end = model.totals.last_ns;
        let end_of = |i: usize| {
            let p = &model.processes[i];
            p.end_ns.unwrap_or(trace_end).max(p.start_ns)
        };
        let mut tasks: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        if let Some(a) = &analysis.attribution {
            for w in &a.workers {
                let (Some(task), Some(p)) = (a.tasks.get(w.task), model.processes.get(w.proc)) else {
                    continue;
                };
                let worker_end = end_of(w.proc);
                let samples = tasks.entry(task.action.clone()).or_default();
                if w.items.is_empty() {
                    samples.push(worker_end - p.start_ns);
                }
                for win in &w.items {
                    samples.push(win.end_ns.unwrap_or(worker_end).saturating_sub(win.start_ns));
                }
            }
        }
        let mut lifetimes: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let (mut fork_exec, mut startup, mut missing) = (Vec::new(), Vec::new(), 0);
        for (i, p) in model.processes.iter().enumerate() {
            let exe = p.exe().map_or("(fork)", basename);
            if !p.fork_unseen {
                lifetimes.entry(exe.to_owned()).or_default().push(end_of(i) - p.start_ns);
                if let Some(first) = p.execs.first() {
                    fork_exec.push(first.ts.saturating_sub(p.start_ns));
                }
            }
            if let Some(last) = p.execs.last().filter(|_| analysis.kind(i) == Kind::Module) {
                match p.first_marked_open_ns {
                    Some(open) => startup.push(open.saturating_sub(last.ts)),
                    None => missing += 1,
                }
            }
        }
        let stats =
            |m: BTreeMap<String, Vec<u64>>| m.into_iter().map(|(k, v)| (k, Stats::from_ns(v))).collect();
        Self {
            task_latency: stats(tasks),
            process_lifetime: stats(lifetimes),
            fork_exec: Stats::from_ns(fork_exec),
            interpreter_startup: Stats::from_ns(startup),
            interpreter_startup_missing: missing,
        }
    }

    /// Table rows: tasks by action, lifetimes by descending count, then the single latencies.
    fn rows(&self) -> Vec<(String, &Stats)> {
        let mut lifetimes: Vec<_> = self.process_lifetime.iter().collect();
        lifetimes.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        self.task_latency
            .iter()
            .map(|(k, s)| (format!("task {k}"), s))
            .chain(lifetimes.into_iter().map(|(k, s)| (format!("lifetime {k}"), s)))
            .chain([
                ("fork→exec".to_owned(), &self.fork_exec),
                ("interpreter start-up".to_owned(), &self.interpreter_startup),
            ])
            .collect()
    }

    fn missing_note(&self) -> Option<String> {
        (self.interpreter_startup_missing > 0).then(|| {
            format!(
                "{} module process(es) without a payload open are not in interpreter start-up",
                self.interpreter_startup_missing
            )
        })
    }

    pub fn text(&self) -> String {
        let rows = self.rows();
        let w = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0).clamp(8, 48);
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{:<w$}  {:>6} {:>10} {:>10} {:>10} {:>10}",
            "latency (ms)", "count", "p50", "p90", "p99", "max"
        );
        for (k, s) in rows {
            let k: String = k.chars().take(w).collect();
            let _ = writeln!(
                o,
                "{k:<w$}  {:>6} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
            );
        }
        if let Some(n) = self.missing_note() {
            let _ = writeln!(o, "{n}");
        }
        o
    }

    pub fn markdown(&self) -> String {
        let mut o = String::from(
            "| latency | count | p50 ms | p90 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|\n",
        );
        for (k, s) in self.rows() {
            let _ = writeln!(
                o,
                "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
                k.replace('|', "\\|"),
                s.count,
                s.p50_ms,
                s.p90_ms,
                s.p99_ms,
                s.max_ms
            );
        }
        if let Some(n) = self.missing_note() {
            let _ = writeln!(o, "\n_{n}_");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        analysis::fixture,
        fixtures::{exec, header, root},
    };

    /// Within HdrHistogram's precision (3 significant digits).
    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() <= want * 1e-3
    }

    fn assert_stats(s: &Stats, count: u64, [p50, p90, p99, max]: [f64; 4]) {
        assert_eq!(s.count, count, "{s:?}");
        for (got, want) in [(s.p50_ms, p50), (s.p90_ms, p90), (s.p99_ms, p99), (s.max_ms, max)] {
            assert!(close(got, want), "{s:?}: {got} vs {want}");
        }
    }

    #[test]
    fn percentiles_of_known_samples() {
        assert_stats(&Stats::from_ns((1..=100).map(|ms| ms * 1_000_000)), 100, [50.0, 90.0, 99.0, 100.0]);
        assert_stats(&Stats::from_ns([3_000, 1_000, 2_000, 4_000]), 4, [0.002, 0.004, 0.004, 0.004]);
        assert_eq!(Stats::from_ns([]), Stats::default());
    }

    #[test]
    fn latencies_of_a_run() {
        let h = Histograms::new(&fixture::analysis());
        // copy: one worker without items (50 ms); ping: two 9 ms items.
        assert_stats(&h.task_latency["copy"], 1, [50.0; 4]);
        assert_stats(&h.task_latency["ping"], 2, [9.0; 4]);
        // sh: 12-40 and 45-55; forks without exec: workers (50, 20), the agent (running until
        // the last event at 90: 18) and its runner (5).
        assert_stats(&h.process_lifetime["sh"], 2, [10.0, 28.0, 28.0, 28.0]);
        assert_stats(&h.process_lifetime["(fork)"], 4, [18.0, 50.0, 50.0, 50.0]);
        assert_stats(&h.process_lifetime["python3"], 2, [3.0, 20.0, 20.0, 20.0]);
        // Ten processes exec'd: the sh, python and make below worker A after 1 ms, the rest at once.
        assert_eq!(h.fork_exec.count, 10);
        assert!(close(h.fork_exec.max_ms, 1.0) && h.fork_exec.p50_ms == 0.0, "{:?}", h.fork_exec);
        // Python exec to payload open: 16-20 and 76-78.
        assert_stats(&h.interpreter_startup, 2, [2.0, 4.0, 4.0, 4.0]);
        assert_eq!(h.interpreter_startup_missing, 0);
        let text = h.text();
        let ping: Vec<&str> =
            text.lines().find(|l| l.starts_with("task ping")).unwrap().split_whitespace().collect();
        assert_eq!(ping[2..4], ["2", "9.003"], "{text}");
        assert!(h.markdown().contains("| interpreter start-up | 2 | 2.001 | 4.002 |"), "{}", h.markdown());
    }

    #[test]
    fn module_without_payload_open_is_counted_missing() {
        let events = [root(0, 10), exec(1, 10, &["/usr/bin/python3"])];
        let h = Histograms::new(&Analysis::from_events(header(&["python3"]), None, &events, &[]));
        assert_eq!(h.interpreter_startup.count, 0);
        assert_eq!(h.interpreter_startup_missing, 1);
        assert!(h.task_latency.is_empty());
        assert!(h.text().contains("1 module process(es) without a payload open"));
    }
}
