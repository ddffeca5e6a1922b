//! The process model: the traced tree rebuilt from events, one [`Process`] per process lifetime.
//!
//! A process is identified by [`ProcKey`] (tgid + fork time), so a recycled pid is a new process.
use std::collections::HashMap;

use crate::trace::{Event, Status};

/// Pid-reuse-safe identity: the tgid plus the time it was forked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcKey {
    pub tgid: u32,
    pub start_ns: u64,
}

/// One exec in a process's life.
#[derive(Clone, Debug, PartialEq)]
pub struct Exec {
    pub ts: u64,
    pub filename: String,
    pub argv: Vec<String>,
    pub argv_truncated: bool,
}

/// A failed exec attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct FailedExec {
    pub ts: u64,
    pub filename: String,
    pub errno: i32,
}

#[derive(Clone, Debug, Default)]
pub struct Process {
    pub key: Option<ProcKey>,
    /// Index of the parent in [`Model::processes`]; None for a root (or an unseen parent).
    pub parent: Option<usize>,
    pub children: Vec<usize>,
    pub ppid: u32,
    pub start_ns: u64,
    pub end_ns: Option<u64>,
    /// Forked by the tracer: a traced command.
    pub root: bool,
    /// First seen through a later event, its fork was not recorded.
    pub fork_unseen: bool,
    pub execs: Vec<Exec>,
    pub failed_execs: Vec<FailedExec>,
    pub status: Option<Status>,
    /// Sum of the CPU time of every thread that exited.
    pub cpu_ns: u64,
    /// Some thread's CPU time was unreadable.
    pub cpu_incomplete: bool,
    /// Threads created by this process (the main thread not counted).
    pub threads: u32,
    pub opens: u32,
    pub open_failures: u32,
    /// First open, since the last exec, of a path the model marks ([`Model::marking_opens`]):
    /// for Ansible a module's unpacked payload, where its start-up ends.
    pub first_marked_open_ns: Option<u64>,
}

impl Process {
    pub fn tgid(&self) -> u32 {
        self.key.map(|k| k.tgid).unwrap_or(0)
    }

    /// Path of the last exec'd image, if the process exec'd at all.
    pub fn exe(&self) -> Option<&str> {
        self.execs.last().map(|e| e.filename.as_str())
    }

    pub fn wall_ns(&self) -> Option<u64> {
        self.end_ns.map(|e| e.saturating_sub(self.start_ns))
    }
}

pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Counts over the whole trace, kept by [`Model::apply`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub forks: u64,
    pub threads: u64,
    pub execs: u64,
    pub failed_execs: u64,
    pub exits: u64,
    pub opens: u64,
    pub open_failures: u64,
    pub first_ns: Option<u64>,
    pub last_ns: u64,
}

/// The traced processes, built incrementally from events in time order.
#[derive(Debug, Default)]
pub struct Model {
    pub processes: Vec<Process>,
    pub totals: Totals,
    /// Live processes by tgid.
    live: HashMap<u32, usize>,
    /// Which opened paths are milestones worth a timestamp ([`Process::first_marked_open_ns`]).
    marks: Option<fn(&str) -> bool>,
}

impl Model {
    /// A model that notes each process's first open of a path `marks` picks. The model knows
    /// nothing of what runs in the processes: an analysis (e.g. Ansible's) says what matters.
    pub fn marking_opens(marks: fn(&str) -> bool) -> Self {
        Self { marks: Some(marks), ..Self::default() }
    }

    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self {
        let mut m = Self::default();
        for e in events {
            m.apply(e);
        }
        m
    }

    /// The live process with this tgid, created (and flagged) if its fork was not seen.
    fn live_or_placeholder(&mut self, tgid: u32, ts: u64) -> usize {
        if let Some(&i) = self.live.get(&tgid) {
            return i;
        }
        let i = self.processes.len();
        self.processes.push(Process {
            key: Some(ProcKey { tgid, start_ns: ts }),
            start_ns: ts,
            fork_unseen: true,
            ..Default::default()
        });
        self.live.insert(tgid, i);
        i
    }

    pub fn apply(&mut self, e: &Event) {
        let ts = e.ts();
        self.totals.first_ns.get_or_insert(ts);
        self.totals.last_ns = self.totals.last_ns.max(ts);
        match e {
            Event::Fork { ptgid, thread: true, .. } => {
                self.totals.threads += 1;
                let p = self.live_or_placeholder(*ptgid, ts);
                self.processes[p].threads += 1;
            }
            Event::Fork { tgid, ptgid, root, ppid, .. } => {
                self.totals.forks += 1;
                let parent = if *root { None } else { Some(self.live_or_placeholder(*ptgid, ts)) };
                let i = self.processes.len();
                self.processes.push(Process {
                    key: Some(ProcKey { tgid: *tgid, start_ns: ts }),
                    parent,
                    ppid: if *root { *ppid } else { *ptgid },
                    start_ns: ts,
                    root: *root,
                    ..Default::default()
                });
                if let Some(p) = parent {
                    self.processes[p].children.push(i);
                }
                // A tgid still live here means we missed its exit: the new fork wins.
                self.live.insert(*tgid, i);
            }
            Event::Exec { tgid, filename, argv, argv_truncated, .. } => {
                self.totals.execs += 1;
                let p = self.live_or_placeholder(*tgid, ts);
                self.processes[p].first_marked_open_ns = None;
                self.processes[p].execs.push(Exec {
                    ts,
                    filename: filename.clone(),
                    argv: argv.clone(),
                    argv_truncated: *argv_truncated,
                });
            }
            Event::ExecFailed { tgid, filename, errno, .. } => {
                self.totals.failed_execs += 1;
                let p = self.live_or_placeholder(*tgid, ts);
                self.processes[p].failed_execs.push(FailedExec {
                    ts,
                    filename: filename.clone(),
                    errno: *errno,
                });
            }
            Event::Exit { tgid, group_dead, status, cpu_ns, .. } => {
                let p = self.live_or_placeholder(*tgid, ts);
                let proc = &mut self.processes[p];
                match cpu_ns {
                    Some(c) => proc.cpu_ns += c,
                    None => proc.cpu_incomplete = true,
                }
                if *group_dead {
                    self.totals.exits += 1;
                    proc.end_ns = Some(ts);
                    proc.status = Some(*status);
                    self.live.remove(tgid);
                }
            }
            Event::Open { tgid, ret, path, .. } => {
                self.totals.opens += 1;
                let p = self.live_or_placeholder(*tgid, ts);
                self.processes[p].opens += 1;
                if self.marks.is_some_and(|marks| marks(path)) {
                    self.processes[p].first_marked_open_ns.get_or_insert(ts);
                }
                if *ret < 0 {
                    self.totals.open_failures += 1;
                    self.processes[p].open_failures += 1;
                }
            }
        }
    }

    /// Indices of the root processes (the traced commands).
    pub fn roots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.processes.len()).filter(|&i| self.processes[i].root)
    }

    /// Processes still running when the trace ended (e.g. daemons such as an ssh ControlMaster).
    pub fn still_running(&self) -> impl Iterator<Item = &Process> {
        self.processes.iter().filter(|p| p.end_ns.is_none())
    }

    /// Chain of ancestors from the root down to (and including) `i`.
    pub fn ancestry(&self, i: usize) -> Vec<usize> {
        let mut chain = vec![i];
        let mut cur = i;
        while let Some(p) = self.processes[cur].parent {
            chain.push(p);
            cur = p;
        }
        chain.reverse();
        chain
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{exec, exit_of, fork, open, root, thread};

    #[test]
    fn tree_with_threads_and_pid_reuse() {
        let exit = |ts, tgid, tid, group_dead, status| exit_of(ts, tgid, tid, group_dead, status, Some(10));
        let events = vec![
            root(1, 100),
            exec(2, 100, &["/bin/sh"]),
            fork(3, 101, 100),
            thread(4, 102, 101),
            exec(5, 101, &["/bin/true"]),
            exit(6, 101, 102, false, Status::Exited(0)),
            exit(7, 101, 101, true, Status::Exited(0)),
            fork(8, 101, 100), // pid 101 reused
            exit(9, 101, 101, true, Status::Signaled(9)),
            exit(10, 100, 100, true, Status::Exited(3)),
        ];
        let m = Model::from_events(&events);
        assert_eq!(m.processes.len(), 3);
        assert_eq!(m.totals.forks, 3);
        assert_eq!(m.totals.threads, 1);
        assert_eq!(m.totals.execs, 2);
        let first = &m.processes[1];
        assert_eq!(first.exe(), Some("/bin/true"));
        assert_eq!(first.threads, 1);
        assert_eq!(first.cpu_ns, 20, "thread CPU time is summed");
        let reused = &m.processes[2];
        assert_ne!(first.key, reused.key, "pid reuse makes a new identity");
        assert_eq!(reused.status, Some(Status::Signaled(9)));
        assert_eq!(m.processes[0].children, vec![1, 2]);
        assert_eq!(m.ancestry(2), vec![0, 2]);
        assert_eq!(m.roots().collect::<Vec<_>>(), vec![0]);
        assert_eq!(m.still_running().count(), 0);
    }

    #[test]
    fn events_without_fork_make_flagged_placeholders() {
        let m = Model::from_events(&[exec(5, 7, &["/bin/x"])]);
        assert!(m.processes[0].fork_unseen);
        assert_eq!(m.still_running().count(), 1);
    }

    #[test]
    fn marked_opens_are_noted_once_per_exec() {
        let events = [
            root(1, 10),
            open(2, 10, "/a.mark"),
            open(3, 10, "/b.mark"),
            open(4, 10, "/c"),
            exec(5, 10, &["/bin/x"]),
            open(6, 10, "/c"),
        ];
        let mut m = Model::marking_opens(|p| p.ends_with(".mark"));
        events.iter().take(3).for_each(|e| m.apply(e));
        assert_eq!(m.processes[0].first_marked_open_ns, Some(2));
        events.iter().skip(3).for_each(|e| m.apply(e));
        assert_eq!(m.processes[0].first_marked_open_ns, None, "an exec starts over");
        assert_eq!(Model::from_events(&events).processes[0].first_marked_open_ns, None, "nothing marked");
    }
}
