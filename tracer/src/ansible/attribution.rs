//! Joins the kernel's process tree with the plugins' messages: every process is given to the
//! (play, task, host, loop item) whose worker it descends from, or classified as controller,
//! connection infrastructure or unattributed.
use std::collections::HashMap;

use crate::{
    model::{Model, Process, basename},
    trace::AnsibleRecord,
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
    /// ok | changed | failed | skipped | unreachable, from the runner result.
    pub status: Option<String>,
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

/// The result of attribution over a whole trace.
#[derive(Debug, Default)]
pub struct Attribution {
    /// False when no plugin message arrived: every number below is then empty.
    pub available: bool,
    pub playbook: Option<String>,
    pub tasks: Vec<Task>,
    pub workers: Vec<Worker>,
    /// One per process of the model.
    pub owners: Vec<Owner>,
    /// Messages the plugins reported they could not send.
    pub dropped_messages: u64,
    /// Messages whose payload pid disagreed with the kernel's word.
    pub pid_mismatches: u64,
    /// worker_start messages whose pid matched no traced process.
    pub unmatched_workers: u64,
}

impl Attribution {
    pub fn new(model: &Model, records: &[AnsibleRecord]) -> Self {
        let mut a = Attribution {
            available: !records.is_empty(),
            owners: vec![Owner::Unattributed; model.processes.len()],
            ..Default::default()
        };
        if !a.available {
            return a;
        }
        let mut task_index: HashMap<String, usize> = HashMap::new();
        let mut plays: HashMap<String, String> = HashMap::new();
        let mut worker_of_pid: HashMap<u32, usize> = HashMap::new();
        let mut worker_by_host_task: HashMap<(String, usize), usize> = HashMap::new();
        let mut controller = None;
        // Processes whose owner a message states outright (persistent agents and their runners).
        let mut stated: HashMap<usize, Owner> = HashMap::new();
        // Runners that ran several modules (in-process runs): (start, owner) of each, in order;
        // the runner itself keeps its first owner, processes it starts get the one of their time.
        let mut runs: HashMap<usize, Vec<(u64, Owner)>> = HashMap::new();
        for r in records {
            a.dropped_messages = a.dropped_messages.max(r.u64("dropped").unwrap_or(0));
            let pid = if r.sender_pid != 0 { r.sender_pid } else { r.u64("pid").unwrap_or(0) as u32 };
            // runner_start may name the runner in `pid` when the agent sends it.
            if r.ev() != "runner_start" && r.u64("pid").is_some_and(|p| p as u32 != pid) {
                a.pid_mismatches += 1;
            }
            let task_of = |a: &Attribution, key: &str| {
                r.str(key).and_then(|u| task_index.get(u).copied()).filter(|&t| t < a.tasks.len())
            };
            match r.ev() {
                "playbook_start" => {
                    a.playbook = r.str("playbook").map(str::to_owned);
                    controller = find_process(model, pid, r.ts());
                }
                "play_start" => {
                    if let (Some(u), Some(n)) = (r.str("uuid"), r.str("name")) {
                        plays.insert(u.to_owned(), n.to_owned());
                    }
                }
                "task_start" => {
                    let Some(uuid) = r.str("uuid") else { continue };
                    if task_index.contains_key(uuid) {
                        continue; // announced again, e.g. once per host under `free`
                    }
                    task_index.insert(uuid.to_owned(), a.tasks.len());
                    a.tasks.push(Task {
                        uuid: uuid.to_owned(),
                        name: r.str("name").unwrap_or("").to_owned(),
                        action: r.str("action").unwrap_or("").to_owned(),
                        role: r.str("role").map(str::to_owned),
                        play: r.str("play_uuid").and_then(|u| plays.get(u)).cloned().unwrap_or_default(),
                        handler: r.bool("handler"),
                        is_loop: r.bool("loop"),
                        start_ns: r.ts(),
                    });
                }
                "worker_start" => {
                    let (Some(task), Some(host)) = (task_of(&a, "task_uuid"), r.str("host")) else {
                        continue;
                    };
                    let Some(proc) = find_process(model, pid, r.ts()) else {
                        a.unmatched_workers += 1;
                        continue;
                    };
                    let w = a.workers.len();
                    a.workers.push(Worker {
                        proc,
                        pid,
                        host: host.to_owned(),
                        task,
                        items: Vec::new(),
                        status: None,
                    });
                    worker_of_pid.insert(pid, w);
                    worker_by_host_task.insert((host.to_owned(), task), w);
                }
                ev @ ("item_start" | "item_end") => {
                    let Some(&w) = worker_of_pid.get(&pid) else {
                        continue;
                    };
                    let index = r.u64("index").unwrap_or(0) as u32;
                    let items = &mut a.workers[w].items;
                    if ev == "item_start" {
                        items.push(ItemWindow {
                            index,
                            label: r.str("label").unwrap_or("").to_owned(),
                            start_ns: r.ts(),
                            end_ns: None,
                        });
                    } else if let Some(win) =
                        items.iter_mut().rev().find(|i| i.index == index && i.end_ns.is_none())
                    {
                        win.end_ns = Some(r.ts());
                    }
                }
                "agent_start" => {
                    if let Some(proc) = find_process(model, pid, r.ts()) {
                        stated.insert(proc, Owner::Agent);
                    }
                }
                "runner_start" if !r.bool("remote") => {
                    let runner =
                        r.u64("runner_pid").or_else(|| r.u64("pid")).map(|p| p as u32).unwrap_or(pid);
                    let worker = r
                        .u64("worker_pid")
                        .and_then(|wp| worker_of_pid.get(&(wp as u32)).copied())
                        .or_else(|| {
                            let task = task_of(&a, "task_uuid")?;
                            worker_by_host_task.get(&(r.str("host")?.to_owned(), task)).copied()
                        });
                    if let (Some(w), Some(proc)) = (worker, find_process(model, runner, r.ts())) {
                        let owner = Owner::Task { worker: w, item: r.u64("item").map(|i| i as u32) };
                        stated.entry(proc).or_insert(owner);
                        runs.entry(proc).or_default().push((r.ts(), owner));
                    }
                }
                "runner_end" => {
                    if let (Some(task), Some(host)) = (task_of(&a, "task_uuid"), r.str("host"))
                        && let Some(&w) = worker_by_host_task.get(&(host.to_owned(), task))
                    {
                        a.workers[w].status = r.str("status").map(str::to_owned);
                    }
                }
                _ => {}
            }
        }
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
        // The nearest ancestor (the process itself included) that is a worker or whose owner a
        // message stated decides; below a runner that ran several modules, the module running
        // when the process started.
        let nearest = chain.iter().enumerate().rev().find_map(|(d, p)| {
            let owner = match runs.get(p) {
                Some(r) if r.len() > 1 && *p != i => {
                    r.iter().rev().find(|(ts, _)| *ts <= start).or(r.first()).map(|(_, o)| *o)
                }
                _ => stated.get(p).copied(),
            };
            owner.map(|o| (d, Err(o))).or_else(|| worker_at.get(p).map(|&w| (d, Ok(w))))
        });
        if let Some((_, Err(owner))) = nearest {
            return owner;
        }
        if let Some((depth, Ok(w))) = nearest {
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

/// The live process with this tgid at `ts`.
fn find_process(model: &Model, tgid: u32, ts: u64) -> Option<usize> {
    model
        .processes
        .iter()
        .enumerate()
        .filter(|(_, p)| p.tgid() == tgid && p.start_ns <= ts && p.end_ns.is_none_or(|e| e >= ts))
        .max_by_key(|(_, p)| p.start_ns)
        .map(|(i, _)| i)
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
    use super::*;
    use crate::trace::{Event, Status};

    fn rec(pid: u32, body: serde_json::Value) -> AnsibleRecord {
        AnsibleRecord { sender_pid: pid, body: body.as_object().unwrap().clone() }
    }

    fn fork(ts: u64, tgid: u32, ptgid: u32, root: bool) -> Event {
        Event::Fork { ts, pid: tgid, tgid, ppid: ptgid, ptgid, thread: false, root }
    }

    fn exec(ts: u64, tgid: u32, file: &str) -> Event {
        Event::Exec {
            ts,
            pid: tgid,
            tgid,
            old_pid: tgid,
            filename: file.into(),
            argv: vec![file.into()],
            argv_bytes: 0,
            argv_truncated: false,
            argv_unreadable: false,
            filename_truncated: false,
        }
    }

    fn exit(ts: u64, tgid: u32) -> Event {
        Event::Exit { ts, pid: tgid, tgid, group_dead: true, status: Status::Exited(0), cpu_ns: Some(1) }
    }

    #[test]
    fn processes_go_to_their_worker_item_or_category() {
        let events = vec![
            fork(1, 10, 1, true),
            exec(2, 10, "/venv/bin/ansible-playbook"),
            fork(10, 20, 10, false), // worker for h1
            fork(12, 21, 20, false), // item 0 command
            exec(13, 21, "/bin/sh"),
            exit(14, 21),
            fork(16, 22, 20, false), // item 1: ssh client
            exec(17, 22, "/usr/bin/ssh"),
            fork(18, 23, 22, false), // ssh forks the would-be mux
            fork(19, 24, 23, false), // daemonised mux
            exit(19, 23),
            exit(21, 22),
            exit(30, 20),
            fork(40, 25, 10, false), // a worker that never announced itself
            exit(41, 25),
            fork(3, 27, 10, false), // a multiplexer living across both tasks
            exit(60, 27),
            fork(50, 26, 10, false), // controller runs a command
            exec(51, 26, "/usr/bin/ldconfig"),
            exit(52, 26),
        ];
        let model = Model::from_events(&events);
        let records = vec![
            rec(10, serde_json::json!({"ev": "playbook_start", "ts": 3, "pid": 10, "playbook": "/p.yml"})),
            rec(10, serde_json::json!({"ev": "play_start", "ts": 4, "uuid": "p1", "name": "Play"})),
            rec(
                10,
                serde_json::json!({"ev": "task_start", "ts": 5, "uuid": "t1", "name": "echo", "action": "command", "play_uuid": "p1", "loop": true}),
            ),
            rec(
                20,
                serde_json::json!({"ev": "worker_start", "ts": 11, "pid": 20, "host": "h1", "task_uuid": "t1"}),
            ),
            rec(20, serde_json::json!({"ev": "item_start", "ts": 11, "index": 0, "label": "a"})),
            rec(20, serde_json::json!({"ev": "item_end", "ts": 15, "index": 0})),
            rec(20, serde_json::json!({"ev": "item_start", "ts": 15, "index": 1, "label": "b"})),
            rec(20, serde_json::json!({"ev": "item_end", "ts": 29, "index": 1})),
            rec(
                10,
                serde_json::json!({"ev": "runner_end", "ts": 31, "host": "h1", "task_uuid": "t1", "status": "changed"}),
            ),
            rec(10, serde_json::json!({"ev": "task_start", "ts": 39, "uuid": "t2", "name": "later"})),
        ];
        let a = Attribution::new(&model, &records);
        let owner = |tgid: u32| a.owners[model.processes.iter().position(|p| p.tgid() == tgid).unwrap()];
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
        assert_eq!(a.workers[0].status.as_deref(), Some("changed"));
        assert_eq!(a.unattributed(), 1);
    }

    #[test]
    fn persistent_agents_and_their_runners() {
        let events = vec![
            fork(1, 10, 1, true),
            fork(10, 20, 10, false), // worker
            fork(11, 29, 20, false), // the launcher that execs the agent's Python
            exec(11, 29, "/usr/bin/python3"),
            fork(11, 30, 29, false), // the agent (daemonised, outlives the worker)
            fork(12, 31, 30, false), // a runner for the worker's item 1
            fork(13, 32, 30, false), // agent housekeeping, no task
            exit(20, 20),
            fork(30, 40, 10, false), // next task's worker
            fork(31, 33, 30, false), // runner for that worker
        ];
        let model = Model::from_events(&events);
        let records = vec![
            rec(10, serde_json::json!({"ev": "playbook_start", "ts": 2})),
            rec(10, serde_json::json!({"ev": "task_start", "ts": 3, "uuid": "t1", "name": "a"})),
            rec(10, serde_json::json!({"ev": "task_start", "ts": 4, "uuid": "t2", "name": "b"})),
            rec(20, serde_json::json!({"ev": "worker_start", "ts": 10, "host": "h", "task_uuid": "t1"})),
            rec(30, serde_json::json!({"ev": "agent_start", "ts": 11, "pid": 30})),
            rec(
                30,
                serde_json::json!({"ev": "runner_start", "ts": 12, "pid": 31, "worker_pid": 20, "item": 1}),
            ),
            rec(40, serde_json::json!({"ev": "worker_start", "ts": 30, "host": "h", "task_uuid": "t2"})),
            rec(
                30,
                serde_json::json!({"ev": "runner_start", "ts": 31, "pid": 33, "host": "h", "task_uuid": "t2"}),
            ),
            rec(40, serde_json::json!({"ev": "runner_start", "ts": 31, "pid": 5, "remote": true})),
        ];
        let a = Attribution::new(&model, &records);
        let owner = |tgid: u32| a.owners[model.processes.iter().position(|p| p.tgid() == tgid).unwrap()];
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
            fork(1, 10, 1, true),
            fork(10, 20, 10, false), // worker of task 1
            fork(11, 30, 1, false),  // the agent
            fork(12, 31, 30, false), // one runner, reused (in-process runs)
            fork(14, 32, 31, false), // a command run by the module of task 1
            exit(20, 20),
            fork(30, 40, 10, false), // worker of task 2
            fork(32, 33, 31, false), // a command run by the module of task 2
        ];
        let model = Model::from_events(&events);
        let records = vec![
            rec(10, serde_json::json!({"ev": "playbook_start", "ts": 2})),
            rec(10, serde_json::json!({"ev": "task_start", "ts": 3, "uuid": "t1", "name": "a"})),
            rec(10, serde_json::json!({"ev": "task_start", "ts": 4, "uuid": "t2", "name": "b"})),
            rec(20, serde_json::json!({"ev": "worker_start", "ts": 10, "host": "h", "task_uuid": "t1"})),
            rec(30, serde_json::json!({"ev": "agent_start", "ts": 11, "pid": 30})),
            rec(30, serde_json::json!({"ev": "runner_start", "ts": 13, "pid": 31, "worker_pid": 20})),
            rec(40, serde_json::json!({"ev": "worker_start", "ts": 30, "host": "h", "task_uuid": "t2"})),
            rec(30, serde_json::json!({"ev": "runner_start", "ts": 31, "pid": 31, "worker_pid": 40})),
        ];
        let a = Attribution::new(&model, &records);
        let owner = |tgid: u32| a.owners[model.processes.iter().position(|p| p.tgid() == tgid).unwrap()];
        assert_eq!(owner(31), Owner::Task { worker: 0, item: None }, "the runner keeps its first task");
        assert_eq!(owner(32), Owner::Task { worker: 0, item: None });
        assert_eq!(owner(33), Owner::Task { worker: 1, item: None });
    }

    #[test]
    fn no_messages_means_unavailable() {
        let model = Model::from_events(&[fork(1, 10, 1, true)]);
        let a = Attribution::new(&model, &[]);
        assert!(!a.available);
        assert_eq!(a.unattributed(), 1);
    }
}
