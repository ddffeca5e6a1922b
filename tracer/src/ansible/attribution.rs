//! Joins the kernel's process tree with the plugins' messages: every process is given to the
//! (play, task, host, loop item) whose worker it descends from, or classified as controller,
//! connection infrastructure or unattributed.
use std::collections::HashMap;

use crate::{
    ansible::messages::{PluginEvent, Received, TaskStatus},
    model::{Model, Process, basename},
};

/// A task (or handler) as announced by the callback plugin.
#[derive(Clone, Debug, Default)]
pub struct Task {
    pub uuid: String,
    pub name: String,
    pub action: String,
    pub role: Option<String>,
    pub play: String,
    pub handler: bool,
    pub is_loop: bool,
    pub start_ns: u64,
}

/// One loop item's window inside a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemWindow {
    pub index: u32,
    pub label: String,
    pub start_ns: u64,
    pub end_ns: Option<u64>,
}

/// A WorkerProcess: the process Ansible forked to run one task on one host.
#[derive(Clone, Debug)]
pub struct Worker {
    /// Index in [`Model::processes`].
    pub proc: usize,
    pub pid: u32,
    pub host: String,
    pub task: usize,
    pub items: Vec<ItemWindow>,
    /// How the task ended on the host (the result the controller received).
    pub status: Option<TaskStatus>,
}

/// Who a process belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Spawned for a task on a host (the worker itself included); `item` inside a loop item.
    Task { worker: usize, item: Option<u32> },
    /// ansible-playbook itself and what it runs outside any worker (wrappers, lookups, ...).
    Controller,
    /// Connection infrastructure shared across tasks (an ssh ControlMaster mux).
    Connection,
    /// A persistent agent (or its runners) that reported no task for itself.
    Agent,
    /// Could not be tied to a task (e.g. a worker whose announcement was lost).
    Unattributed,
}

impl Owner {
    pub fn category(self) -> &'static str {
        match self {
            Owner::Task { .. } => "task",
            Owner::Controller => "controller",
            Owner::Connection => "connection",
            Owner::Agent => "agent",
            Owner::Unattributed => "unattributed",
        }
    }
}

/// What decides a process's owner: the nearest of its ancestors (itself included) that is
/// either a worker or a process whose owner a message stated.
#[derive(Clone, Copy)]
enum Decider {
    /// A message said whom this ancestor works for.
    Stated(Owner),
    /// This ancestor is the worker with this index.
    Worker(usize),
}

/// Every process of a run given to its play / task / host / item, or classified.
#[derive(Debug, Default)]
pub struct Attribution {
    pub playbook: Option<String>,
    /// The plays' strategies, as announced.
    pub strategies: Vec<String>,
    pub tasks: Vec<Task>,
    pub workers: Vec<Worker>,
    /// One per process of the model.
    pub owners: Vec<Owner>,
    /// Messages the plugins reported they could not send: each sender's last count, summed
    /// over senders.
    pub dropped_messages: u64,
    /// Messages whose payload pid disagreed with the kernel's word.
    pub pid_mismatches: u64,
    /// worker_start messages whose pid matched no traced process.
    pub unmatched_workers: u64,
    /// Module runs a persistent agent on an SSH target handed to a runner there.
    pub remote_runners: Vec<RemoteRunner>,
}

/// A module run handed to a runner process on an SSH target (a `runner_start` with `remote`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRunner {
    pub worker: usize,
    pub item: Option<u32>,
    /// The runner's pid on the target.
    pub runner_pid: u32,
    /// When it was reported (controller clock).
    pub ts: u64,
}

impl Attribution {
    /// Joins the model with the plugins' messages (in arrival order).
    pub fn new(model: &Model, messages: &[Received]) -> Self {
        let mut a =
            Attribution { owners: vec![Owner::Unattributed; model.processes.len()], ..Default::default() };
        let mut task_index: HashMap<&str, usize> = HashMap::new();
        let mut plays: HashMap<&str, &str> = HashMap::new();
        let mut worker_of_pid: HashMap<u32, usize> = HashMap::new();
        let mut worker_by_host_task: HashMap<(&str, usize), usize> = HashMap::new();
        // `dropped` never decreases within a sender: its last value is its total.
        let mut dropped: HashMap<u32, u64> = HashMap::new();
        let mut controller = None;
        let processes = ByTgid::new(model);
        // Processes whose owner a message states outright (persistent agents and their runners).
        let mut stated: HashMap<usize, Owner> = HashMap::new();
        // Runners that ran several modules (in-process runs): (start, owner) of each, in order;
        // the runner itself keeps its first owner, processes it starts get the one of their time.
        let mut runs: HashMap<usize, Vec<(u64, Owner)>> = HashMap::new();
        for m in messages {
            let pid = m.pid();
            let ts = m.ts();
            let entry = dropped.entry(pid).or_default();
            *entry = (*entry).max(m.message.dropped);
            // Older agents and clients named the runner in a runner_start's `pid`.
            let old_runner_start = matches!(m.event(), PluginEvent::RunnerStart { runner_pid, .. }
                if runner_pid.is_none_or(|r| r == m.message.pid));
            if m.sender_pid != 0 && m.message.pid != m.sender_pid && !old_runner_start {
                a.pid_mismatches += 1;
            }
            match m.event() {
                PluginEvent::PlaybookStart { playbook, .. } => {
                    a.playbook.clone_from(playbook);
                    controller = processes.find(pid, ts);
                }
                PluginEvent::PlayStart { uuid, name, strategy } => {
                    plays.insert(uuid, name);
                    if let Some(s) = strategy.as_ref().filter(|s| !a.strategies.contains(s)) {
                        a.strategies.push(s.clone());
                    }
                }
                PluginEvent::TaskStart { uuid, name, action, role, play_uuid, handler, is_loop, .. } => {
                    if task_index.contains_key(uuid.as_str()) {
                        continue; // announced again, e.g. once per host under `free`
                    }
                    task_index.insert(uuid, a.tasks.len());
                    a.tasks.push(Task {
                        uuid: uuid.clone(),
                        name: name.clone(),
                        action: action.clone(),
                        role: role.clone(),
                        play: play_uuid
                            .as_deref()
                            .and_then(|u| plays.get(u))
                            .map(|p| p.to_string())
                            .unwrap_or_default(),
                        handler: *handler,
                        is_loop: *is_loop,
                        start_ns: ts,
                    });
                }
                PluginEvent::WorkerStart { host, task_uuid, .. } => {
                    let Some(&task) = task_index.get(task_uuid.as_str()) else { continue };
                    let Some(proc) = processes.find(pid, ts) else {
                        a.unmatched_workers += 1;
                        continue;
                    };
                    let w = a.workers.len();
                    a.workers.push(Worker {
                        proc,
                        pid,
                        host: host.clone(),
                        task,
                        items: Vec::new(),
                        status: None,
                    });
                    worker_of_pid.insert(pid, w);
                    worker_by_host_task.insert((host, task), w);
                }
                PluginEvent::ItemStart { index, label, .. } => {
                    if let Some(&w) = worker_of_pid.get(&pid) {
                        a.workers[w].items.push(ItemWindow {
                            index: *index,
                            label: label.clone().unwrap_or_default(),
                            start_ns: ts,
                            end_ns: None,
                        });
                    }
                }
                PluginEvent::ItemEnd { index, .. } => {
                    let Some(&w) = worker_of_pid.get(&pid) else { continue };
                    if let Some(win) =
                        a.workers[w].items.iter_mut().rev().find(|i| i.index == *index && i.end_ns.is_none())
                    {
                        win.end_ns = Some(ts);
                    }
                }
                PluginEvent::AgentStart { .. } => {
                    if let Some(proc) = processes.find(pid, ts) {
                        stated.insert(proc, Owner::Agent);
                    }
                }
                PluginEvent::RunnerStart { remote, worker_pid, host, task_uuid, item, .. } => {
                    let Some(runner) = m.runner_pid() else { continue };
                    let worker = worker_pid.and_then(|wp| worker_of_pid.get(&wp).copied()).or_else(|| {
                        let task = *task_index.get(task_uuid.as_deref()?)?;
                        worker_by_host_task.get(&(host.as_deref()?, task)).copied()
                    });
                    let Some(w) = worker else { continue };
                    // A remote runner is on the target: a process of its recording, if any.
                    if *remote {
                        a.remote_runners.push(RemoteRunner {
                            worker: w,
                            item: *item,
                            runner_pid: runner,
                            ts,
                        });
                    } else if let Some(proc) = processes.find(runner, ts) {
                        let owner = Owner::Task { worker: w, item: *item };
                        stated.entry(proc).or_insert(owner);
                        runs.entry(proc).or_default().push((ts, owner));
                    }
                }
                PluginEvent::RunnerEnd { host, task_uuid, status, .. } => {
                    if let Some(&task) = task_index.get(task_uuid.as_str())
                        && let Some(&w) = worker_by_host_task.get(&(host.as_str(), task))
                    {
                        a.workers[w].status = Some(*status);
                    }
                }
                PluginEvent::PlaybookEnd {} | PluginEvent::Other => {}
            }
        }
        a.dropped_messages = dropped.values().sum();
        let worker_at: HashMap<usize, usize> =
            a.workers.iter().enumerate().map(|(w, wk)| (wk.proc, w)).collect();
        // The launchers between a worker and the agent it started (the `python -c` exec, the
        // double fork) exist only to become the agent: they are the agent's too.
        let agents: Vec<usize> =
            stated.iter().filter(|(_, o)| **o == Owner::Agent).map(|(p, _)| *p).collect();
        for agent in agents {
            let mut cur = model.processes[agent].parent;
            while let Some(p) = cur.filter(|p| !worker_at.contains_key(p) && !stated.contains_key(p)) {
                if Some(p) == controller {
                    break;
                }
                stated.insert(p, Owner::Agent);
                cur = model.processes[p].parent;
            }
        }
        for i in 0..model.processes.len() {
            a.owners[i] = a.classify(model, i, &worker_at, &stated, &runs, controller);
        }
        a
    }

    fn classify(
        &self,
        model: &Model,
        i: usize,
        worker_at: &HashMap<usize, usize>,
        stated: &HashMap<usize, Owner>,
        runs: &HashMap<usize, Vec<(u64, Owner)>>,
        controller: Option<usize>,
    ) -> Owner {
        let chain = model.ancestry(i);
        let start = model.processes[i].start_ns;
        // Below a runner that ran several modules, the module running when the process started
        // decides.
        let nearest = chain.iter().enumerate().rev().find_map(|(depth, p)| {
            let owner = match runs.get(p) {
                Some(r) if r.len() > 1 && *p != i => {
                    r.iter().rev().find(|(ts, _)| *ts <= start).or(r.first()).map(|(_, o)| *o)
                }
                _ => stated.get(p).copied(),
            };
            owner
                .map(Decider::Stated)
                .or_else(|| worker_at.get(p).map(|&w| Decider::Worker(w)))
                .map(|d| (depth, d))
        });
        match nearest {
            Some((_, Decider::Stated(owner))) => return owner,
            Some((depth, Decider::Worker(w))) => {
                let worker = &self.workers[w];
                if is_connection_mux(model, &chain[depth..], &model.processes[worker.proc]) {
                    return Owner::Connection;
                }
                if i == worker.proc {
                    return Owner::Task { worker: w, item: None };
                }
                let item = worker
                    .items
                    .iter()
                    .find(|win| win.start_ns <= start && win.end_ns.is_none_or(|e| start <= e))
                    .map(|win| win.index);
                return Owner::Task { worker: w, item };
            }
            None => {}
        }
        // Outside every worker: an unannounced fork of ansible-playbook that lives across several
        // tasks is a persistent helper of another runner (e.g. Mitogen's multiplexer and the
        // contexts it starts); one that does not is a worker whose message was lost. Anything
        // else belongs to the controller.
        if let Some(c) = controller
            && let Some(&first) = chain.iter().position(|&p| p == c).and_then(|pos| chain.get(pos + 1))
        {
            let fork = &model.processes[first];
            if fork.execs.is_empty() {
                let end = fork.end_ns.unwrap_or(u64::MAX);
                let spans = self.tasks.iter().filter(|t| (fork.start_ns..=end).contains(&t.start_ns)).count();
                return if spans >= 2 { Owner::Agent } else { Owner::Unattributed };
            }
        }
        Owner::Controller
    }

    pub fn unattributed(&self) -> u64 {
        self.owners.iter().filter(|o| **o == Owner::Unattributed).count() as u64
    }
}

/// The model's processes by tgid (a recycled tgid has several), so that each message finds its
/// sender without a scan of every process.
struct ByTgid<'m> {
    model: &'m Model,
    lifetimes: HashMap<u32, Vec<usize>>,
}

impl<'m> ByTgid<'m> {
    fn new(model: &'m Model) -> Self {
        let mut lifetimes: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, p) in model.processes.iter().enumerate() {
            lifetimes.entry(p.tgid()).or_default().push(i);
        }
        Self { model, lifetimes }
    }

    /// The live process with this tgid at `ts` (the latest started, if the trace disagrees).
    fn find(&self, tgid: u32, ts: u64) -> Option<usize> {
        let live = |&&i: &&usize| {
            let p = &self.model.processes[i];
            p.start_ns <= ts && p.end_ns.is_none_or(|e| e >= ts)
        };
        self.lifetimes
            .get(&tgid)?
            .iter()
            .filter(live)
            .max_by_key(|&&i| self.model.processes[i].start_ns)
            .copied()
    }
}

/// An ssh ControlMaster mux: a fork (no exec of its own) of an `ssh` client, below the worker,
/// that outlives the worker — it goes on serving later tasks and hosts.
fn is_connection_mux(model: &Model, below_worker: &[usize], worker: &Process) -> bool {
    let Some(&me) = below_worker.last() else {
        return false;
    };
    let p = &model.processes[me];
    if !p.execs.is_empty() {
        return false;
    }
    let image = below_worker.iter().rev().find_map(|&a| model.processes[a].execs.last());
    let is_ssh = image.is_some_and(|e| basename(&e.filename) == "ssh");
    let outlives = match (p.end_ns, worker.end_ns) {
        (None, _) => true,
        (Some(e), Some(we)) => e > we,
        (Some(_), None) => false,
    };
    is_ssh && outlives
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fixtures::{exec, exit, fork, msg, root};

    fn owners(model: &Model, a: &Attribution) -> impl Fn(u32) -> Owner {
        let found: Vec<(u32, Owner)> =
            model.processes.iter().map(|p| p.tgid()).zip(a.owners.clone()).collect();
        move |tgid| found.iter().find(|(t, _)| *t == tgid).expect("a traced process").1
    }

    #[test]
    fn processes_go_to_their_worker_item_or_category() {
        let events = vec![
            root(1, 10),
            exec(2, 10, &["/venv/bin/ansible-playbook"]),
            fork(10, 20, 10), // worker for h1
            fork(12, 21, 20), // item 0 command
            exec(13, 21, &["/bin/sh"]),
            exit(14, 21),
            fork(16, 22, 20), // item 1: ssh client
            exec(17, 22, &["/usr/bin/ssh"]),
            fork(18, 23, 22), // ssh forks the would-be mux
            fork(19, 24, 23), // daemonised mux
            exit(19, 23),
            exit(21, 22),
            exit(30, 20),
            fork(40, 25, 10), // a worker that never announced itself
            exit(41, 25),
            fork(3, 27, 10), // a multiplexer living across both tasks
            exit(60, 27),
            fork(50, 26, 10), // controller runs a command
            exec(51, 26, &["/usr/bin/ldconfig"]),
            exit(52, 26),
        ];
        let model = Model::from_events(&events);
        let messages = vec![
            msg(10, 3, json!({"ev": "playbook_start", "playbook": "/p.yml"})),
            msg(10, 4, json!({"ev": "play_start", "uuid": "p1", "name": "Play"})),
            msg(
                10,
                5,
                json!({"ev": "task_start", "uuid": "t1", "name": "echo", "action": "command", "play_uuid": "p1", "loop": true}),
            ),
            msg(20, 11, json!({"ev": "worker_start", "host": "h1", "task_uuid": "t1", "dropped": 1})),
            msg(
                20,
                11,
                json!({"ev": "item_start", "host": "h1", "task_uuid": "t1", "index": 0, "label": "a"}),
            ),
            msg(20, 15, json!({"ev": "item_end", "host": "h1", "task_uuid": "t1", "index": 0, "dropped": 2})),
            msg(
                20,
                15,
                json!({"ev": "item_start", "host": "h1", "task_uuid": "t1", "index": 1, "label": "b"}),
            ),
            msg(20, 29, json!({"ev": "item_end", "host": "h1", "task_uuid": "t1", "index": 1, "dropped": 2})),
            msg(
                10,
                31,
                json!({"ev": "runner_end", "host": "h1", "task_uuid": "t1", "status": "changed", "dropped": 3}),
            ),
            msg(10, 39, json!({"ev": "task_start", "uuid": "t2", "name": "later", "action": "debug"})),
        ];
        let a = Attribution::new(&model, &messages);
        let owner = owners(&model, &a);
        assert_eq!(a.tasks[0].play, "Play");
        assert_eq!(owner(20), Owner::Task { worker: 0, item: None });
        assert_eq!(owner(21), Owner::Task { worker: 0, item: Some(0) });
        assert_eq!(owner(22), Owner::Task { worker: 0, item: Some(1) });
        assert_eq!(owner(23), Owner::Task { worker: 0, item: Some(1) }, "short-lived intermediate fork");
        assert_eq!(owner(24), Owner::Connection, "the mux outlives the worker");
        assert_eq!(owner(25), Owner::Unattributed);
        assert_eq!(owner(27), Owner::Agent);
        assert_eq!(owner(26), Owner::Controller);
        assert_eq!(owner(10), Owner::Controller);
        assert_eq!(a.workers[0].status, Some(TaskStatus::Changed));
        assert_eq!(a.unattributed(), 1);
        assert_eq!(a.dropped_messages, 2 + 3, "each sender's last count, summed over senders");
        assert_eq!(a.pid_mismatches, 0);
    }

    /// Tasks t1 and t2 announced by the controller (pid 10), t1's worker (pid 20) and an agent
    /// (pid 30) started.
    fn two_tasks_and_an_agent() -> Vec<Received> {
        vec![
            msg(10, 2, json!({"ev": "playbook_start", "playbook": null})),
            msg(10, 3, json!({"ev": "task_start", "uuid": "t1", "name": "a", "action": "copy"})),
            msg(10, 4, json!({"ev": "task_start", "uuid": "t2", "name": "b", "action": "copy"})),
            msg(20, 10, json!({"ev": "worker_start", "host": "h", "task_uuid": "t1"})),
            msg(30, 11, json!({"ev": "agent_start"})),
        ]
    }

    #[test]
    fn persistent_agents_and_their_runners() {
        let events = vec![
            root(1, 10),
            fork(10, 20, 10), // worker
            fork(11, 29, 20), // the launcher that execs the agent's Python
            exec(11, 29, &["/usr/bin/python3"]),
            fork(11, 30, 29), // the agent (daemonised, outlives the worker)
            fork(12, 31, 30), // a runner for the worker's item 1
            fork(13, 32, 30), // agent housekeeping, no task
            exit(20, 20),
            fork(30, 40, 10), // next task's worker
            fork(31, 33, 30), // runner for that worker
        ];
        let model = Model::from_events(&events);
        let mut messages = two_tasks_and_an_agent();
        messages.extend([
            msg(30, 12, json!({"ev": "runner_start", "runner_pid": 31, "worker_pid": 20, "item": 1})),
            msg(40, 30, json!({"ev": "worker_start", "host": "h", "task_uuid": "t2"})),
            msg(30, 31, json!({"ev": "runner_start", "runner_pid": 33, "host": "h", "task_uuid": "t2"})),
            msg(40, 31, json!({"ev": "runner_start", "runner_pid": 5, "remote": true})),
        ]);
        let a = Attribution::new(&model, &messages);
        let owner = owners(&model, &a);
        assert_eq!(owner(30), Owner::Agent);
        assert_eq!(owner(29), Owner::Agent, "the agent's launcher");
        assert_eq!(owner(20), Owner::Task { worker: 0, item: None });
        assert_eq!(owner(32), Owner::Agent);
        assert_eq!(owner(31), Owner::Task { worker: 0, item: Some(1) });
        assert_eq!(owner(33), Owner::Task { worker: 1, item: None });
        assert_eq!(a.unattributed(), 0);
    }

    #[test]
    fn a_runner_reused_for_several_modules_splits_its_children_by_time() {
        let events = vec![
            root(1, 10),
            fork(10, 20, 10), // worker of task 1
            fork(11, 30, 1),  // the agent
            fork(12, 31, 30), // one runner, reused (in-process runs)
            fork(14, 32, 31), // a command run by the module of task 1
            exit(20, 20),
            fork(30, 40, 10), // worker of task 2
            fork(32, 33, 31), // a command run by the module of task 2
        ];
        let model = Model::from_events(&events);
        let mut messages = two_tasks_and_an_agent();
        messages.extend([
            msg(30, 13, json!({"ev": "runner_start", "runner_pid": 31, "worker_pid": 20})),
            msg(40, 30, json!({"ev": "worker_start", "host": "h", "task_uuid": "t2"})),
            msg(30, 31, json!({"ev": "runner_start", "runner_pid": 31, "worker_pid": 40})),
        ]);
        let a = Attribution::new(&model, &messages);
        let owner = owners(&model, &a);
        assert_eq!(owner(31), Owner::Task { worker: 0, item: None }, "the runner keeps its first task");
        assert_eq!(owner(32), Owner::Task { worker: 0, item: None });
        assert_eq!(owner(33), Owner::Task { worker: 1, item: None });
    }

    #[test]
    fn an_older_agents_runner_start_names_the_runner_in_pid() {
        let events = vec![root(1, 10), fork(10, 20, 10), fork(11, 30, 1), fork(12, 31, 30)];
        let model = Model::from_events(&events);
        let mut old = msg(30, 12, json!({"ev": "runner_start", "worker_pid": 20}));
        old.message.pid = 31;
        // the client of older agents sent the runner in both `pid` and `runner_pid`
        let mut old_client = msg(20, 13, json!({"ev": "runner_start", "runner_pid": 31, "remote": true}));
        old_client.message.pid = 31;
        let messages = vec![
            msg(10, 2, json!({"ev": "playbook_start", "playbook": null})),
            msg(10, 3, json!({"ev": "task_start", "uuid": "t1", "name": "a", "action": "copy"})),
            msg(20, 10, json!({"ev": "worker_start", "host": "h", "task_uuid": "t1"})),
            old,
            old_client,
        ];
        let a = Attribution::new(&model, &messages);
        assert_eq!(owners(&model, &a)(31), Owner::Task { worker: 0, item: None });
        assert_eq!(a.pid_mismatches, 0);
    }

    #[test]
    fn a_pid_that_is_not_the_senders_is_counted() {
        let model = Model::from_events(&[root(1, 10)]);
        let mut lying = msg(10, 2, json!({"ev": "playbook_end"}));
        lying.message.pid = 11;
        assert_eq!(Attribution::new(&model, &[lying]).pid_mismatches, 1);
    }
}
