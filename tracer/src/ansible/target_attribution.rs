//! What a run did on its SSH targets: each target's processes rebuilt from its recorder's trace
//! (one model per target: pids of different machines are different processes), its clock mapped
//! onto the controller's, and each process given to the worker (task, host, loop item) that was
//! using the target when it started.
//!
//! Ansible runs one task per host at a time, so a target's processes that start while one of
//! its workers runs are that worker's. A process that lives across several of the target's
//! workers is an agent (Mitogen's context, our persistent agent); the sshd session the recorder
//! records is connection infrastructure.
use std::collections::BTreeMap;

use crate::{
    analysis::Analysis,
    ansible::{
        attribution::{Attribution, Owner},
        processes::{self, Kind},
    },
    model::{Model, basename},
    trace::{Bookend, Footer, Header, TargetLine, TargetRecord},
};

/// Whether a target was recorded.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetState {
    Recording,
    /// Why not (no root there, no BTF, another architecture, no ControlMaster, …).
    Unavailable(String),
}

/// One SSH target of the run.
#[derive(Debug)]
pub struct Target {
    /// `user@host:port`, as the run's ssh connection reached it.
    pub target: String,
    pub state: TargetState,
    /// The recorder's header and footer (None: it never started, or its trace was cut short).
    pub header: Option<Header>,
    pub footer: Option<Footer>,
    /// The target's `CLOCK_MONOTONIC` minus the controller's, and the bound of its error.
    pub clock: Option<(i64, u64)>,
    /// How long its recorder took to start (the first worker to reach it waited that long).
    pub start_ns: u64,
    /// The target's processes; times on the target's clock (see [`Target::local_ns`]).
    pub model: Model,
    /// The workers (pids) that reached the target, with when they said so.
    pub users: Vec<(u32, u64)>,
    /// One per process of the model, once attributed.
    pub owners: Vec<Owner>,
    /// The processes the agent there reported as module runners.
    pub runners: Vec<usize>,
    /// Processes given to a worker by time that started while none of that worker's ssh clients
    /// ran (where no agent reports its runners): the attribution's doubt, normally 0.
    pub unconfirmed: u64,
}

impl Target {
    fn new(target: String) -> Self {
        Self {
            target,
            state: TargetState::Unavailable("no state recorded".into()),
            header: None,
            footer: None,
            clock: None,
            start_ns: 0,
            model: Analysis::new_model(),
            users: Vec::new(),
            owners: Vec::new(),
            runners: Vec::new(),
            unconfirmed: 0,
        }
    }

    /// A target time on the controller's clock.
    pub fn local_ns(&self, target_ns: u64) -> u64 {
        let offset = self.clock.map_or(0, |(o, _)| o);
        (target_ns as i128 - offset as i128).clamp(0, u64::MAX as i128) as u64
    }

    /// A controller time on the target's clock.
    pub fn target_ns(&self, local_ns: u64) -> u64 {
        let offset = self.clock.map_or(0, |(o, _)| o);
        (local_ns as i128 + offset as i128).clamp(0, u64::MAX as i128) as u64
    }

    /// The recorded sshd session: the model's process the recorder tracked first.
    pub fn session(&self) -> Option<usize> {
        let pid = self.header.as_ref()?.root_pid;
        self.model.processes.iter().position(|p| p.tgid() == pid && p.parent.is_none())
    }

    /// Whether process `i` is a runner the agent there reported (it runs modules itself).
    pub fn runner(&self, i: usize) -> bool {
        self.runners.contains(&i)
    }

    /// Processes given to no worker.
    pub fn unattributed(&self) -> u64 {
        self.owners.iter().filter(|o| **o == Owner::Unattributed).count() as u64
    }
}

/// The targets of a run, in the order they were first reached, built from its target records.
pub fn targets(records: &[TargetRecord]) -> Vec<Target> {
    let mut order: Vec<String> = Vec::new();
    let mut by_name: BTreeMap<String, Target> = BTreeMap::new();
    for r in records {
        let t = by_name.entry(r.target().to_owned()).or_insert_with(|| {
            order.push(r.target().to_owned());
            Target::new(r.target().to_owned())
        });
        match r {
            TargetRecord::TargetUser { worker_pid, ts, .. } => t.users.push((*worker_pid, *ts)),
            TargetRecord::TargetState { recording, reason, start_ns, .. } => {
                t.start_ns = *start_ns;
                t.state = match recording {
                    true => TargetState::Recording,
                    false => TargetState::Unavailable(reason.clone().unwrap_or_default()),
                };
            }
            TargetRecord::TargetClock { offset_ns, error_ns, .. } => t.clock = Some((*offset_ns, *error_ns)),
            TargetRecord::TargetLine { line, .. } => match line {
                TargetLine::Event(e) => t.model.apply(e),
                TargetLine::Bookend(Bookend::Header(h)) => t.header = Some(h.clone()),
                TargetLine::Bookend(Bookend::Footer(f)) => t.footer = Some(f.clone()),
            },
        }
    }
    order.into_iter().filter_map(|name| by_name.remove(&name)).collect()
}

/// Gives each of `target`'s processes an owner:
/// - a runner a persistent agent there reported (`runner_start`, remote) works for the worker
///   and item it named, and so does what it starts (a runner that ran several modules: the one
///   of the time);
/// - the recorded sshd session is the connection's;
/// - what led from it to a reported runner (the agent, its zygote, their launchers) is the agent,
///   and so are a Mitogen context (known by the name Mitogen gives it) and its launchers;
/// - a process that lives on while another of the target's workers starts is an agent (Mitogen's
///   context, our persistent agent, its zygote), and so are the processes that only led to it
///   (its launchers);
/// - where the agent reports its runners, the rest of its tree is the agent's too (spare runners);
///   otherwise (Mitogen) a process belongs to the worker using the target when it started, and
///   to that worker's loop item then.
pub fn attribute(target: &mut Target, controller: &Model, a: &Attribution) {
    let model = &target.model;
    // The target's workers, as (index in a.workers, start, end) on the controller's clock.
    let workers: Vec<(usize, u64, u64)> = a
        .workers
        .iter()
        .enumerate()
        .filter(|(_, w)| {
            target.users.iter().any(|&(pid, ts)| pid == w.pid && lives_at(controller, w.proc, ts))
        })
        .map(|(i, w)| {
            let p = &controller.processes[w.proc];
            (i, p.start_ns, p.end_ns.unwrap_or(u64::MAX))
        })
        .collect();
    let ours = |w: usize| workers.iter().any(|(x, _, _)| *x == w);
    // Reported runners: their process here, and each run (its start, on the controller's clock).
    let mut runs: BTreeMap<usize, Vec<(u64, Owner)>> = BTreeMap::new();
    for r in a.remote_runners.iter().filter(|r| ours(r.worker)) {
        let at = target.target_ns(r.ts);
        if let Some(proc) = find(model, r.runner_pid, at) {
            runs.entry(proc).or_default().push((r.ts, Owner::Task { worker: r.worker, item: r.item }));
        }
    }
    let reported = !runs.is_empty();
    // Each worker's ssh clients (when they ran, on our clock): a command the worker sent to the
    // target runs while one of them is alive.
    let mut ssh_of: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
    for (i, p) in controller.processes.iter().enumerate() {
        let is_ssh = p.execs.last().is_some_and(|e| matches!(basename(&e.filename), "ssh" | "sftp" | "scp"));
        if let (true, Some(Owner::Task { worker, .. })) = (is_ssh, a.owners.get(i)) {
            ssh_of.entry(*worker).or_default().push((p.start_ns, p.end_ns.unwrap_or(u64::MAX)));
        }
    }
    let mut unconfirmed = 0;
    let session = target.session();
    let n = model.processes.len();
    let mut owners = vec![Owner::Unattributed; n];
    // `from` and what led to it from the session, up to a reported runner, are an agent's.
    let agent_from = |owners: &mut Vec<Owner>, from: Option<usize>| {
        let mut cur = from;
        while let Some(q) = cur.filter(|&q| Some(q) != session && !runs.contains_key(&q)) {
            owners[q] = Owner::Agent;
            cur = model.processes[q].parent;
        }
    };
    // Where runners are reported, what led to them (the agent, its zygote, their launchers) is
    // the agent's, whatever the workers' times: one task's agent outlives no other worker. So
    // is a Mitogen context (known by its name).
    for &r in runs.keys() {
        agent_from(&mut owners, model.processes[r].parent);
    }
    for i in 0..n {
        if model.processes[i].execs.last().is_some() && processes::kind(model, i) == Kind::Agent {
            agent_from(&mut owners, Some(i));
        }
    }
    // Long-lived processes: agents, and the launchers that only led to them.
    for i in 0..n {
        let p = &model.processes[i];
        let (start, end) = (target.local_ns(p.start_ns), p.end_ns.map_or(u64::MAX, |e| target.local_ns(e)));
        let alive_at_start = workers.iter().filter(|(_, ws, we)| *ws <= start && start <= *we).count();
        let outlives = workers.iter().any(|(_, ws, _)| start < *ws && *ws < end);
        if outlives && alive_at_start <= 1 && !runs.contains_key(&i) && Some(i) != session {
            agent_from(&mut owners, Some(i));
        }
    }
    // Parents come before their children: an owner decided for a parent is final here.
    for i in 0..n {
        let p = &model.processes[i];
        let start = target.local_ns(p.start_ns);
        if Some(i) == session {
            owners[i] = Owner::Connection;
            continue;
        }
        // the nearest reported runner above (or the process itself)
        let mut cur = Some(i);
        let mut stated = None;
        while let Some(c) = cur {
            if let Some(r) = runs.get(&c) {
                stated = match c == i {
                    true => r.first().map(|(_, o)| *o),
                    false => r.iter().rev().find(|(ts, _)| *ts <= start).or(r.first()).map(|(_, o)| *o),
                };
                break;
            }
            cur = model.processes[c].parent;
        }
        if let Some(owner) = stated {
            owners[i] = owner;
            continue;
        }
        if owners[i] == Owner::Agent {
            continue;
        }
        if reported && p.parent.is_some_and(|q| owners[q] == Owner::Agent) {
            owners[i] = Owner::Agent;
            continue;
        }
        let mut alive = workers.iter().filter(|(_, ws, we)| *ws <= start && start <= *we);
        owners[i] = match (alive.next(), alive.next()) {
            (Some(&(w, _, _)), None) => {
                let item = a.workers[w]
                    .items
                    .iter()
                    .find(|win| win.start_ns <= start && win.end_ns.is_none_or(|e| start <= e))
                    .map(|win| win.index);
                // the check of time against cause: one of the worker's ssh clients was there
                // (a worker with none of its own reaches the target through another process's
                // connection, Mitogen's: nothing to check against)
                let under_ssh =
                    ssh_of.get(&w).is_none_or(|s| s.iter().any(|&(b, e)| b <= start && start <= e));
                if !reported && !under_ssh {
                    unconfirmed += 1;
                }
                Owner::Task { worker: w, item }
            }
            // none, or several workers at once (delegate_to from several hosts): unknown
            _ => Owner::Unattributed,
        };
    }
    target.owners = owners;
    target.runners = runs.into_keys().collect();
    target.unconfirmed = unconfirmed;
}

/// The live process of `model` with this tgid at `ts`.
fn find(model: &Model, tgid: u32, ts: u64) -> Option<usize> {
    (0..model.processes.len()).rev().find(|&i| {
        let p = &model.processes[i];
        p.tgid() == tgid && p.start_ns <= ts && p.end_ns.is_none_or(|e| e >= ts)
    })
}

fn lives_at(model: &Model, proc: usize, ts: u64) -> bool {
    let p = &model.processes[proc];
    p.start_ns <= ts && p.end_ns.is_none_or(|e| ts <= e)
}
