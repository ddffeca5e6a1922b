//! A timeline in Chrome trace-event JSON, for Perfetto (ui.perfetto.dev) and chrome://tracing.
//!
//! Ansible runs get one track group (a Chrome "process") per host: a `tasks` lane with one slice
//! per worker, its loop items nested inside, and the task's processes below on one lane group per
//! depth below the worker. Controller, connection, agent and unattributed processes get a group
//! each. Other runs get one group for the whole tree, lanes by depth. Failed execs are instant
//! events on their process's lane. Times are whole µs from `Header::start_ns`.
use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
};

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    analysis::Analysis,
    ansible::{
        attribution::{Attribution, Owner},
        processes::Kind,
    },
    model::{Model, basename},
    report::labels,
    trace::errno_name,
};

/// Longest argv (joined, in characters) kept in a slice's args.
const ARGV_CAP: usize = 512;

/// A complete slice before lane assignment; times in µs from the trace start.
struct Slice {
    group: usize,
    /// Lane group: 0 holds tasks and items, n the processes n levels below the group's top.
    level: usize,
    ts: u64,
    end: u64,
    /// Tasks before items before processes when two slices span the same time.
    rank: u8,
    name: String,
    cat: &'static str,
    args: Args,
    /// The process the slice stands for (a task slice stands for its worker).
    proc: Option<usize>,
}

/// A slice's `args`, typed: serialized only when written (a JSON value per slice would cost
/// several times the trace's size on large traces).
#[derive(Serialize)]
#[serde(untagged)]
enum Args {
    Task {
        action: Option<String>,
        play: Option<String>,
        host: String,
        status: Option<&'static str>,
        worker_pid: u32,
        items: usize,
        cpu_ms: f64,
    },
    Item {
        index: u32,
        label: String,
    },
    Process {
        pid: u32,
        argv: Option<String>,
        status: String,
        cpu_ms: f64,
    },
}

/// The timeline of a run, as Chrome trace-event JSON (object form), as a value.
pub fn timeline(analysis: &Analysis) -> Value {
    let mut out = Vec::new();
    write_timeline(analysis, &mut out).expect("writing to memory");
    serde_json::from_slice(&out).expect("the timeline is JSON")
}

/// Writes the timeline of a run, event by event: memory is the slices' (one per process, task
/// and item), not the output's.
pub fn write_timeline(analysis: &Analysis, w: &mut impl std::io::Write) -> anyhow::Result<()> {
    let (header, model, attribution) = (&analysis.header, &analysis.model, analysis.attribution.as_ref());
    let start = header.start_ns;
    let trace_end = model.totals.last_ns.max(start);
    let us = |t: u64| (t.saturating_sub(start) + 500) / 1000;
    let (mut groups, hosts, place) = layout(model, attribution);
    // Groups whose lane 0 holds tasks: the hosts', then each recorded SSH target's.
    let mut task_groups: Vec<usize> = (0..hosts).collect();

    let mut slices = Vec::new();
    let mut is_worker = vec![false; model.processes.len()];
    if let Some(a) = attribution {
        for w in &a.workers {
            let Some(p) = model.processes.get(w.proc) else { continue };
            is_worker[w.proc] = true;
            let (group, _) = place[w.proc];
            let (ws, we) = (p.start_ns, p.end_ns.unwrap_or(trace_end).max(p.start_ns));
            slices.push(task_slice(a, w, p.cpu_ns, group, (us(ws), us(we)), Some(w.proc)));
            for win in &w.items {
                let s = win.start_ns.clamp(ws, we);
                let e = win.end_ns.unwrap_or(we).clamp(s, we);
                slices.push(Slice {
                    group,
                    level: 0,
                    ts: us(s),
                    end: us(e),
                    rank: 1,
                    name: format!("[{}] {}", win.index, win.label),
                    cat: "item",
                    args: Args::Item { index: win.index, label: win.label.clone() },
                    proc: None,
                });
            }
        }
    }
    for (i, p) in model.processes.iter().enumerate() {
        if is_worker[i] {
            continue;
        }
        let (group, level) = place[i];
        let argv = p.execs.last().map(|e| {
            let joined = e.argv.join(" ");
            let mut s: String = joined.chars().take(ARGV_CAP).collect();
            if e.argv_truncated || s.len() < joined.len() {
                s.push('…');
            }
            s
        });
        slices.push(Slice {
            group,
            level,
            ts: us(p.start_ns),
            end: us(p.end_ns.unwrap_or(trace_end).max(p.start_ns)),
            rank: 2,
            name: labels::label(model, i),
            cat: kind_name(analysis.kind(i)),
            args: Args::Process {
                pid: p.tgid(),
                argv,
                status: p.status.map_or("running at trace end".to_owned(), |s| s.to_string()),
                cpu_ms: cpu_ms(p.cpu_ns),
            },
            proc: Some(i),
        });
    }
    // Each recorded SSH target: a group of its own, the tasks of the workers that used it on
    // lane 0, its processes below by depth under the sshd session (times mapped onto ours).
    if let Some(a) = attribution {
        for target in analysis.targets.iter().filter(|t| t.header.is_some()) {
            let group = groups.len();
            groups.push(format!("target {}", target.target));
            task_groups.push(group);
            let model = &target.model;
            let target_end = model.totals.last_ns;
            let mut workers: Vec<usize> = target
                .owners
                .iter()
                .filter_map(|o| match o {
                    Owner::Task { worker, .. } => Some(*worker),
                    _ => None,
                })
                .collect();
            workers.sort_unstable();
            workers.dedup();
            for w in workers.into_iter().map(|w| &a.workers[w]) {
                let Some(p) = analysis.model.processes.get(w.proc) else { continue };
                let span = (us(p.start_ns), us(p.end_ns.unwrap_or(trace_end).max(p.start_ns)));
                slices.push(task_slice(a, w, p.cpu_ns, group, span, None));
            }
            let session = target.session();
            let mut depth = vec![0usize; model.processes.len()];
            for (i, p) in model.processes.iter().enumerate() {
                depth[i] = p.parent.filter(|&q| q < i).map_or(0, |q| depth[q] + 1);
                if Some(i) == session {
                    continue;
                }
                let end = p.end_ns.unwrap_or(target_end).max(p.start_ns);
                slices.push(Slice {
                    group,
                    level: depth[i].max(1),
                    ts: us(target.local_ns(p.start_ns)),
                    end: us(target.local_ns(end)),
                    rank: 2,
                    name: labels::target_label(model, i, session),
                    cat: "target",
                    args: Args::Process {
                        pid: p.tgid(),
                        argv: p.execs.last().map(|e| e.argv.join(" ").chars().take(ARGV_CAP).collect()),
                        status: p.status.map_or("running at trace end".to_owned(), |s| s.to_string()),
                        cpu_ms: cpu_ms(p.cpu_ns),
                    },
                    proc: None,
                });
            }
        }
    }
    slices.sort_by_key(|s| (s.group, s.level, s.ts, Reverse(s.end), s.rank));

    // Greedy lanes: per lane the stack of still-open slice ends; a slice goes to the first lane
    // where it nests inside the innermost open slice (or where none is open).
    let mut lanes: BTreeMap<(usize, usize), Vec<Vec<u64>>> = BTreeMap::new();
    let lane_of: Vec<usize> = slices
        .iter()
        .map(|s| {
            let stacks = lanes.entry((s.group, s.level)).or_default();
            for (n, stack) in stacks.iter_mut().enumerate() {
                while stack.last().is_some_and(|&e| e <= s.ts) {
                    stack.pop();
                }
                if stack.last().is_none_or(|&e| s.end <= e) {
                    stack.push(s.end);
                    return n;
                }
            }
            stacks.push(vec![s.end]);
            stacks.len() - 1
        })
        .collect();
    // Chrome tids, unique over the whole trace, in (group, level, lane) order.
    let tids: BTreeMap<(usize, usize, usize), u64> = lanes
        .iter()
        .flat_map(|(&(g, l), stacks)| (0..stacks.len()).map(move |n| (g, l, n)))
        .zip(1..)
        .collect();

    let other = json!({
        "generator": format!("spawntrace {}", header.tool_version),
        "command": header.command.join(" "),
        "hostname": header.hostname,
        "kernel": header.kernel,
        "start_ns": header.start_ns,
        "playbook": attribution.and_then(|a| a.playbook.as_deref()),
    });
    write!(w, "{{\"displayTimeUnit\":\"ms\",\"otherData\":")?;
    serde_json::to_writer(&mut *w, &other)?;
    write!(w, ",\"traceEvents\":[")?;
    let mut first = true;
    let mut event = |w: &mut dyn std::io::Write, e: &dyn erased::Event| -> anyhow::Result<()> {
        if !std::mem::take(&mut first) {
            w.write_all(b",")?;
        }
        e.write(w)
    };
    for (g, name) in groups.iter().enumerate() {
        let pid = g + 1;
        event(w, &json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}))?;
        event(
            w,
            &json!({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}),
        )?;
    }
    for (&(g, level, n), &tid) in &tids {
        let mut name = if task_groups.contains(&g) && level == 0 {
            "tasks".to_owned()
        } else {
            format!("depth {level}")
        };
        if n > 0 {
            name.push_str(&format!(" #{}", n + 1));
        }
        let pid = g + 1;
        event(w, &json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}))?;
        event(
            w,
            &json!({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}}),
        )?;
    }
    #[derive(Serialize)]
    struct Complete<'a> {
        ph: &'static str,
        name: &'a str,
        cat: &'static str,
        pid: usize,
        tid: u64,
        ts: u64,
        dur: u64,
        args: &'a Args,
    }
    let mut tid_of_proc = HashMap::new();
    for (s, n) in slices.into_iter().zip(lane_of) {
        let tid = tids[&(s.group, s.level, n)];
        if let Some(i) = s.proc {
            tid_of_proc.insert(i, tid);
        }
        let e = Complete {
            ph: "X",
            name: &s.name,
            cat: s.cat,
            pid: s.group + 1,
            tid,
            ts: s.ts,
            dur: s.end - s.ts,
            args: &s.args,
        };
        event(w, &e)?;
    }
    for (i, p) in model.processes.iter().enumerate() {
        let Some(&tid) = tid_of_proc.get(&i) else { continue };
        for f in &p.failed_execs {
            event(
                w,
                &json!({
                    "ph": "i",
                    "s": "t",
                    "name": format!("exec {} failed: {}", basename(&f.filename), errno_name(f.errno)),
                    "cat": "exec_failed",
                    "pid": place[i].0 + 1,
                    "tid": tid,
                    "ts": us(f.ts),
                    "args": {"errno": f.errno, "error": errno_name(f.errno), "filename": f.filename, "pid": p.tgid()},
                }),
            )?;
        }
    }
    w.write_all(b"]}")?;
    Ok(())
}

/// Worker `w`'s task as a slice on lane 0 of `group`, `span` in µs; `proc`: the worker's
/// process, when the slice stands for it.
fn task_slice(
    a: &Attribution,
    w: &crate::ansible::attribution::Worker,
    cpu_ns: u64,
    group: usize,
    (ts, end): (u64, u64),
    proc: Option<usize>,
) -> Slice {
    let task = a.tasks.get(w.task);
    Slice {
        group,
        level: 0,
        ts,
        end,
        rank: 0,
        name: task
            .map_or(String::new(), |t| if t.name.is_empty() { t.action.clone() } else { t.name.clone() }),
        cat: "task",
        args: Args::Task {
            action: task.map(|t| t.action.clone()),
            play: task.map(|t| t.play.clone()),
            host: w.host.clone(),
            status: w.status.map(|s| s.name()),
            worker_pid: w.pid,
            items: w.items.len(),
            cpu_ms: cpu_ms(cpu_ns),
        },
        proc,
    }
}

/// Serializes any event through one `&dyn` (the writer closure takes events of several types).
mod erased {
    pub trait Event {
        fn write(&self, w: &mut dyn std::io::Write) -> anyhow::Result<()>;
    }

    impl<T: serde::Serialize> Event for T {
        fn write(&self, w: &mut dyn std::io::Write) -> anyhow::Result<()> {
            Ok(serde_json::to_writer(w, self)?)
        }
    }
}

/// Track group names (hosts first), how many are hosts, and each process's (group, level).
fn layout(model: &Model, attribution: Option<&Attribution>) -> (Vec<String>, usize, Vec<(usize, usize)>) {
    let n = model.processes.len();
    let (groups, hosts, group_of): (Vec<String>, usize, Vec<usize>) = match attribution {
        None => {
            let root =
                model.roots().next().map_or_else(|| "(no process)".to_owned(), |r| labels::label(model, r));
            (vec![format!("command: {root}")], 0, vec![0; n])
        }
        Some(a) => {
            let mut names: Vec<String> = Vec::new();
            for w in &a.workers {
                intern(&mut names, format!("host {}", w.host));
            }
            let hosts = names.len();
            for o in [Owner::Controller, Owner::Connection, Owner::Agent, Owner::Unattributed] {
                if a.owners.contains(&o) {
                    intern(&mut names, o.category().to_owned());
                }
            }
            let group_of = (0..n)
                .map(|i| match a.owners.get(i) {
                    Some(Owner::Task { worker, .. }) if *worker < a.workers.len() => {
                        intern(&mut names, format!("host {}", a.workers[*worker].host))
                    }
                    o => intern(&mut names, o.unwrap_or(&Owner::Unattributed).category().to_owned()),
                })
                .collect();
            (names, hosts, group_of)
        }
    };
    let worker_procs: std::collections::HashSet<usize> =
        attribution.map(|a| a.workers.iter().map(|w| w.proc).collect()).unwrap_or_default();
    let mut depth = vec![0usize; n];
    for i in 0..n {
        // Parents are created before their children, so depth[p] is known here.
        let d = model.processes[i]
            .parent
            .filter(|&p| p < i && group_of[p] == group_of[i])
            .map_or(0, |p| depth[p] + 1);
        let task_process = matches!(attribution.and_then(|a| a.owners.get(i)), Some(Owner::Task { .. }));
        // Lane 0 of a host holds the tasks: processes of a task start one level below.
        depth[i] = if task_process && !worker_procs.contains(&i) { d.max(1) } else { d };
    }
    (groups, hosts, group_of.into_iter().zip(depth).collect())
}

/// The index of a group name, added if new (there are few groups: a linear search is enough).
fn intern(names: &mut Vec<String>, name: String) -> usize {
    names.iter().position(|n| *n == name).unwrap_or_else(|| {
        names.push(name);
        names.len() - 1
    })
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Module => "module",
        Kind::Shell => "shell",
        Kind::Ssh => "ssh",
        Kind::Agent => "agent",
        Kind::Other => "other",
    }
}

fn cpu_ms(ns: u64) -> f64 {
    (ns as f64 / 1e3).round() / 1e3
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::analysis::fixture;

    fn of<'a>(v: &'a Value, ph: &str) -> Vec<&'a Value> {
        v["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == ph).collect()
    }

    /// Lane names by (pid, tid), group names by pid.
    fn names(v: &Value) -> (BTreeMap<(u64, u64), String>, BTreeMap<u64, String>) {
        let (mut lanes, mut groups) = (BTreeMap::new(), BTreeMap::new());
        for m in of(v, "M") {
            let (pid, name) = (m["pid"].as_u64().unwrap(), m["args"]["name"].as_str().map(str::to_owned));
            match (m["name"].as_str().unwrap(), name) {
                ("thread_name", Some(n)) => drop(lanes.insert((pid, m["tid"].as_u64().unwrap()), n)),
                ("process_name", Some(n)) => drop(groups.insert(pid, n)),
                _ => {}
            }
        }
        (lanes, groups)
    }

    fn slice<'a>(v: &'a Value, name: &str) -> &'a Value {
        of(v, "X").into_iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("no slice {name}"))
    }

    fn by_pid(v: &Value, pid: u32) -> &Value {
        of(v, "X").into_iter().find(|e| e["args"]["pid"] == pid).unwrap_or_else(|| panic!("no process {pid}"))
    }

    /// Every slice on a lane is disjoint from or contained in the ones before it.
    fn assert_nested(v: &Value) {
        let mut lanes: BTreeMap<(u64, u64), Vec<(u64, u64)>> = BTreeMap::new();
        for e in of(v, "X") {
            let (ts, dur) = (e["ts"].as_u64().unwrap(), e["dur"].as_u64().unwrap());
            lanes
                .entry((e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap()))
                .or_default()
                .push((ts, ts + dur));
        }
        for (lane, mut slices) in lanes {
            slices.sort_by_key(|&(s, e)| (s, std::cmp::Reverse(e)));
            let mut open: Vec<u64> = Vec::new();
            for (s, e) in slices {
                while open.last().is_some_and(|&end| end <= s) {
                    open.pop();
                }
                assert!(open.last().is_none_or(|&end| e <= end), "{lane:?}: [{s}, {e}] overlaps {open:?}");
                open.push(e);
            }
        }
    }

    #[test]
    fn ansible_run_by_host_with_nested_lanes() {
        let v = timeline(&fixture::analysis());
        assert_eq!(v["displayTimeUnit"], "ms");
        assert_eq!(v["otherData"]["playbook"], "/site.yml");
        for e in v["traceEvents"].as_array().unwrap() {
            assert!(
                e["ph"].is_string() && e["pid"].is_u64() && e["tid"].is_u64() && e["name"].is_string(),
                "{e}"
            );
            if e["ph"] != "M" {
                assert!(e["ts"].is_u64(), "{e}");
            }
            if e["ph"] == "X" {
                assert!(e["dur"].is_u64() && e["cat"].is_string() && e["args"].is_object(), "{e}");
            }
        }
        let (lanes, groups) = names(&v);
        assert_eq!(
            groups.values().map(String::as_str).collect::<Vec<_>>(),
            ["host h1", "host h2", "controller", "agent"]
        );
        assert_nested(&v);

        // Times are µs from the trace start.
        let task = slice(&v, "copy stuff");
        assert_eq!((task["ts"].as_u64(), task["dur"].as_u64()), (Some(10_000), Some(50_000)));
        assert_eq!(task["args"]["action"], "copy");
        assert_eq!(lanes[&(task["pid"].as_u64().unwrap(), task["tid"].as_u64().unwrap())], "tasks");
        let module = slice(&v, "python3 AnsiballZ_copy");
        assert_eq!((module["ts"].as_u64(), module["dur"].as_u64()), (Some(15_000), Some(20_000)));
        assert_eq!(module["cat"], "module");
        assert_eq!(module["args"]["pid"], 22);
        assert_eq!(module["args"]["status"], "exit 0");
        assert_eq!(module["args"]["cpu_ms"], 2.0);
        assert_eq!(lanes[&(module["pid"].as_u64().unwrap(), module["tid"].as_u64().unwrap())], "depth 2");

        // Loop items nest inside their task, on its lane.
        let ping = slice(&v, "ping");
        for item in ["[0] a", "[1] b"] {
            let it = slice(&v, item);
            assert_eq!((&it["pid"], &it["tid"]), (&ping["pid"], &ping["tid"]), "{item}");
        }
        // ssh (42-50) and sh (45-55) overlap: two lanes at depth 1 of host h1.
        let (ssh, sh) = (slice(&v, "ssh"), slice(&v, "sh -c rm -rf tmp"));
        assert_ne!(ssh["tid"], sh["tid"]);
        let depth1: BTreeSet<&str> =
            lanes.iter().filter(|((pid, _), _)| *pid == 1).map(|(_, n)| n.as_str()).collect();
        assert!(depth1.contains("depth 1") && depth1.contains("depth 1 #2"), "{depth1:?}");
        // The agent's runner is on worker B's host, one level below the tasks.
        let runner = by_pid(&v, 41);
        assert_eq!(runner["pid"], ping["pid"]);
        assert_eq!(lanes[&(runner["pid"].as_u64().unwrap(), runner["tid"].as_u64().unwrap())], "depth 1");
        // Still running at the trace end (its last event, 90 ms).
        let agent = by_pid(&v, 40);
        assert_eq!(groups[&agent["pid"].as_u64().unwrap()], "agent");
        assert_eq!((agent["ts"].as_u64(), agent["dur"].as_u64()), (Some(72_000), Some(18_000)));
        assert_eq!(agent["args"]["status"], "running at trace end");
    }

    #[test]
    fn failed_execs_are_instants_on_their_process_lane() {
        let v = timeline(&fixture::analysis());
        let instants = of(&v, "i");
        assert_eq!(instants.len(), 1);
        let i = instants[0];
        assert_eq!(i["ts"], 25_500);
        assert_eq!(i["s"], "t");
        assert_eq!(i["args"]["errno"], 2);
        assert_eq!(i["args"]["filename"], "/usr/local/bin/make");
        assert_eq!(i["name"], "exec make failed: ENOENT");
        let make = by_pid(&v, 23);
        assert_eq!((&i["pid"], &i["tid"]), (&make["pid"], &make["tid"]));
    }

    #[test]
    fn plain_runs_are_one_tree_by_depth() {
        let analysis = fixture::unattributed();
        let v = timeline(&analysis);
        let (lanes, groups) = names(&v);
        assert_eq!(groups.values().collect::<Vec<_>>(), ["command: python ansible-playbook"]);
        assert_nested(&v);
        let module = slice(&v, "python3 AnsiballZ_copy");
        assert_eq!(lanes[&(1, module["tid"].as_u64().unwrap())], "depth 3");
        assert_eq!(of(&v, "X").len(), analysis.model.processes.len());
    }
}
