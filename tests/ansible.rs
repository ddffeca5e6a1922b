//! Real ansible-playbook under real tracing: every process must land on the task, host and loop
//! item that caused it.
mod common;

use std::collections::BTreeMap;

use common::ansible::{core_version, env_name, envs, playbook};
use serial_test::file_serial;
use spawntrace::{
    ansible::attribution::{Attribution, Owner},
    model::{Model, basename},
    report::tasks::{By, TaskReport},
};

const TAG_PLAYBOOK: &str = r#"
- name: attribution play
  hosts: targets
  gather_facts: false
  tasks:
    - name: first
      ansible.builtin.command: echo TAG first {{ inventory_hostname }} {{ item }}
      loop: [a, b, c]
      changed_when: true
      notify: handler_one
    - name: second
      ansible.builtin.command: echo TAG second {{ inventory_hostname }} {{ item }}
      loop: [x, y]
    - name: single
      ansible.builtin.command: echo TAG single {{ inventory_hostname }} -
    - name: delegated
      ansible.builtin.command: echo TAG delegated {{ inventory_hostname }} -
      delegate_to: h2
  handlers:
    - name: handler_one
      ansible.builtin.command: echo TAG handler_one {{ inventory_hostname }} -
"#;

fn local_inventory(env: &std::path::Path, hosts: &[&str]) -> String {
    let python = env.join(".venv/bin/python");
    let mut s = String::from("[targets]\n");
    for h in hosts {
        s.push_str(&format!(
            "{h} ansible_connection=local ansible_python_interpreter={}\n",
            python.display()
        ));
    }
    s
}

/// Checks that every `echo TAG <task> <host> <item>` exec is attributed to exactly that task,
/// host and item; returns how many there were.
fn check_tags(model: &Model, a: &Attribution, items: &BTreeMap<&str, Vec<&str>>) -> usize {
    let mut seen = 0;
    for (i, p) in model.processes.iter().enumerate() {
        for e in &p.execs {
            if basename(e.argv.first().map(String::as_str).unwrap_or("")) != "echo"
                || e.argv.get(1).map(String::as_str) != Some("TAG")
            {
                continue;
            }
            seen += 1;
            let (task, host, item) = (&e.argv[2], &e.argv[3], &e.argv[4]);
            let Owner::Task { worker, item: idx } = a.owners[i] else {
                panic!("{:?} attributed to {:?}", e.argv, a.owners[i]);
            };
            let w = &a.workers[worker];
            assert_eq!(&a.tasks[w.task].name, task, "{:?}", e.argv);
            assert_eq!(&w.host, host, "{:?}", e.argv);
            let expect = items[task.as_str()].iter().position(|x| x == item).map(|p| p as u32);
            assert_eq!(idx, expect, "{:?}", e.argv);
            if let Some(ix) = idx {
                let win = w.items.iter().find(|win| win.index == ix).unwrap();
                assert!(win.label.contains(item.as_str()), "label {:?} for {item}", win.label);
            }
        }
    }
    seen
}

#[test]
#[file_serial(ebpf)]
fn loop_items_hosts_and_handlers_are_attributed_exactly() {
    require_root!();
    let items: BTreeMap<&str, Vec<&str>> = [
        ("first", vec!["a", "b", "c"]),
        ("second", vec!["x", "y"]),
        ("single", vec![]),
        ("delegated", vec![]),
        ("handler_one", vec![]),
    ]
    .into();
    for env in envs() {
        for strategy in ["linear", "free"] {
            let pb = playbook(
                &env,
                TAG_PLAYBOOK,
                &local_inventory(&env, &["h1", "h2"]),
                &[("ANSIBLE_STRATEGY", strategy), ("ANSIBLE_FORKS", "2")],
                &[],
            );
            let what = format!("{} {strategy}", env_name(&env));
            let a = pb.attribution();
            // delegate_to: the delegated run is still the work of the delegating host's task.
            assert_eq!(check_tags(&pb.run.analysis.model, a, &items), 2 * (3 + 2 + 1 + 1 + 1), "{what}");
            assert_eq!(a.unattributed(), 0, "{what}");
            assert_eq!(a.dropped_messages, 0, "{what}");
            assert_eq!(a.pid_mismatches, 0, "{what}");
            assert_eq!(pb.run.trace.footer.as_ref().unwrap().malformed_messages, 0, "{what}");
            assert!(a.tasks.iter().any(|t| t.name == "handler_one" && t.handler), "{what}");
            let report = TaskReport::new(&pb.run.analysis, By::Task);
            let first = report.tasks.iter().find(|r| r.name == "first").unwrap();
            assert_eq!((first.hosts.len(), first.items), (2, 6), "{what}");
            // Per-item rows split the loop task by host and item.
            let by_item = TaskReport::new(&pb.run.analysis, By::Item);
            let rows: Vec<_> =
                by_item.tasks.iter().filter(|r| r.name == "first" && r.item.is_some()).collect();
            assert_eq!(rows.len(), 6, "{what}");
            assert!(rows.iter().all(|r| r.wall_ms > 0.0), "{what}: an item row's wall is its window");
        }
    }
}

const SHAPES_PLAYBOOK: &str = r#"
- name: module shapes
  hosts: targets
  gather_facts: false
  vars:
    d: "{{ lookup('env', 'SHAPES_DIR') }}"
  tasks:
    - name: copy
      ansible.builtin.copy:
        content: "file {{ item }}\n"
        dest: "{{ d }}/f{{ item }}"
      loop: [1, 2, 3]
    - name: lineinfile
      ansible.builtin.lineinfile:
        path: "{{ d }}/f{{ item }}"
        line: "edit {{ item }}"
      loop: [1, 2, 3]
    - name: file
      ansible.builtin.file:
        path: "{{ d }}/f{{ item }}"
        mode: "0600"
      loop: [1, 2, 3]
    - name: command
      ansible.builtin.command: "true {{ item }}"
      loop: [1, 2, 3]
"#;

/// Execs per loop item of each task, checked to be the same for every item.
fn execs_per_item(pb: &common::ansible::PlaybookRun) -> BTreeMap<String, u64> {
    let report = TaskReport::new(&pb.run.analysis, By::Item);
    let mut per: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in report.tasks.iter().filter(|r| r.item.is_some()) {
        per.entry(r.name.clone()).or_default().push(r.execs);
    }
    per.into_iter()
        .map(|(k, v)| {
            assert_eq!(v.len(), 3, "{k}: {v:?}");
            assert!(v.iter().all(|&x| x == v[0]), "{k}: items differ: {v:?}");
            (k, v[0])
        })
        .collect()
}

#[test]
#[file_serial(ebpf)]
fn module_exec_shapes_with_and_without_pipelining() {
    require_root!();
    let env = envs().into_iter().next_back().expect("an environment");
    let mut shapes = BTreeMap::new();
    for pipelining in ["True", "False"] {
        let dir = tempfile::tempdir().unwrap();
        let pb = playbook(
            &env,
            SHAPES_PLAYBOOK,
            &local_inventory(&env, &["localhost"]),
            &[("ANSIBLE_PIPELINING", pipelining), ("SHAPES_DIR", dir.path().to_str().unwrap())],
            &[],
        );
        assert_eq!(pb.attribution().unattributed(), 0);
        shapes.insert(pipelining, execs_per_item(&pb));
    }
    eprintln!("execs per item (pipelining on / off): {shapes:?}");
    for task in ["copy", "lineinfile", "file", "command"] {
        let (on, off) = (shapes["True"][task], shapes["False"][task]);
        assert!(on >= 2, "{task}: at least a shell and the module's python ({on})");
        assert!(off > on, "{task}: without pipelining the module is staged as a file ({off} vs {on})");
    }
    assert!(shapes["True"]["copy"] > shapes["True"]["lineinfile"], "copy stats the dest first");
}

#[test]
#[file_serial(ebpf)]
fn users_own_callbacks_keep_working() {
    require_root!();
    let env = envs().into_iter().next_back().expect("an environment");
    let junit = tempfile::tempdir().unwrap();
    let pb = playbook(
        &env,
        TAG_PLAYBOOK,
        &local_inventory(&env, &["h1", "h2"]),
        &[("ANSIBLE_CALLBACKS_ENABLED", "junit"), ("JUNIT_OUTPUT_DIR", junit.path().to_str().unwrap())],
        &[],
    );
    assert!(pb.run.analysis.attribution.is_some());
    let xml: Vec<_> = std::fs::read_dir(junit.path()).unwrap().collect();
    assert_eq!(xml.len(), 1, "the junit callback wrote its report");
    assert!(pb.run.stdout().contains("PLAY RECAP"), "the default stdout callback is untouched");
}

#[test]
#[file_serial(ebpf)]
fn ssh_spawns_go_to_their_task_and_host_and_the_mux_is_infrastructure() {
    require_root!();
    let env = envs().into_iter().next_back().expect("an environment");
    let lab = sshlab::Lab::start(2, "targets").expect("the ssh test hosts");
    let cp = tempfile::tempdir().unwrap();
    // Targets skipped: their recorder's ssh would make the ControlMaster spawntrace's own.
    let pb = common::ansible::playbook_with(
        &["--targets", "skip"],
        &env,
        r#"
- name: over ssh
  hosts: targets
  gather_facts: false
  tasks:
    - name: first
      ansible.builtin.command: echo TAG first {{ inventory_hostname }} {{ item }}
      loop: [a, b]
    - name: copy
      ansible.builtin.copy:
        content: "hello\n"
        dest: "/tmp/spawntrace-test-{{ inventory_hostname }}"
"#,
        lab.inventory.to_str().unwrap(),
        &[("ANSIBLE_FORKS", "2"), ("ANSIBLE_SSH_CONTROL_PATH_DIR", cp.path().to_str().unwrap())],
        &[],
    );
    let (model, a) = (&pb.run.analysis.model, pb.attribution());
    let items: BTreeMap<&str, Vec<&str>> = [("first", vec!["a", "b"])].into();
    assert_eq!(check_tags(model, a, &items), 0, "the echo runs on the targets, not here");
    let addr_of: BTreeMap<&str, &str> =
        lab.hosts.iter().map(|h| (h.name.as_str(), h.addr.as_str())).collect();
    let mut ssh_execs = 0;
    for (i, p) in model.processes.iter().enumerate() {
        for e in &p.execs {
            let exe = basename(&e.filename);
            if exe != "ssh" && exe != "sftp" && exe != "scp" {
                continue;
            }
            ssh_execs += 1;
            let Owner::Task { worker, .. } = a.owners[i] else {
                panic!("{:?} owned by {:?}", e.argv, a.owners[i]);
            };
            let host = &a.workers[worker].host;
            assert!(e.argv.iter().any(|x| x.contains(addr_of[host.as_str()])), "{:?} for {host}", e.argv);
        }
    }
    assert!(ssh_execs >= 6, "ssh per item and host ({ssh_execs})");
    let muxes = a.owners.iter().filter(|o| **o == Owner::Connection).count();
    assert_eq!(muxes, 2, "one ControlMaster mux per host");
    assert_eq!(a.unattributed(), 0);
}

#[test]
#[file_serial(ebpf)]
fn a_silent_channel_is_reported_not_hidden() {
    require_root!();
    let out = common::spawntrace().args(["--ansible", "always", "--", "true"]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Ansible attribution unavailable"), "{err}");
}

/// What the traced command writes to the attribution socket that is not a message of the
/// protocol is dropped and counted in the footer and the report; the messages it sends that are
/// well-formed but lie about their pid are counted too.
#[test]
#[file_serial(ebpf)]
fn malformed_and_lying_messages_are_counted() {
    require_root!();
    let script = r#"
import json, os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(os.environ["SPAWNTRACE_SOCKET"])
def send(ev, **fields):
    m = dict(v=1, ev=ev, ts=1, pid=os.getpid(), dropped=2)
    m.update(fields)
    s.send(json.dumps(m).encode())
s.send(b"not json")
send("task_start", name="no uuid")
send("runner_end", host="h", task_uuid="t", status="fine")
send("an_event_nobody_knows")
send("playbook_start", playbook="/p.yml")
send("play_start", uuid="p", name="a play", pid=1)
"#;
    let run = common::record_with(&["-q", "--ansible", "always"], &[], &["/usr/bin/python3", "-c", script]);
    assert_eq!(run.code(), Some(0), "{}", run.stderr());
    assert_eq!(run.trace.footer.as_ref().unwrap().malformed_messages, 4);
    assert_eq!(run.trace.plugin_messages.len(), 2, "the well-formed ones are kept");
    let a = run.analysis.attribution.as_ref().expect("attribution from the well-formed messages");
    assert_eq!((a.pid_mismatches, a.dropped_messages), (1, 2));
    let report = common::spawntrace().arg("report").arg(run.trace_path()).output().unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(text.contains("plugin messages lost: 2, malformed: 4, pid mismatches: 1"), "{text}");
}

#[test]
#[file_serial(ebpf)]
fn persistent_runs_exec_nothing_per_module_task_and_stay_attributed() {
    require_root!();
    // isolation fork: a runner per module run; auto (the default): copy, lineinfile and file
    // share runners, command runs get their own
    for (args, shared) in
        [(&["--persistent", "--isolation", "fork"][..], false), (&["--persistent"][..], true)]
    {
        for env in envs() {
            let dir = tempfile::tempdir().unwrap();
            let pb = common::ansible::playbook_with(
                args,
                &env,
                SHAPES_PLAYBOOK,
                &local_inventory(&env, &["localhost"]),
                &[("SHAPES_DIR", dir.path().to_str().unwrap())],
                &[],
            );
            let what = format!("{} {args:?}", env_name(&env));
            let a = pb.attribution();
            assert_eq!(a.unattributed(), 0, "{what}");
            assert!(a.owners.contains(&Owner::Agent), "{what}: the agent is classified");
            let mut runners = std::collections::HashMap::new();
            for runner in pb.run.trace.plugin_messages.iter().filter_map(|m| m.runner_pid()) {
                *runners.entry(runner).or_insert(0) += 1;
            }
            // runners are reused from 2.19 (the AnsiballZ shape whose zip the agent keeps);
            // before, a fresh runner per module, as with fork (RUNNER.md)
            let reuse = shared && core_version(&env) >= (2, 19);
            let most = runners.values().copied().max().unwrap_or(0);
            assert_eq!(most > 1, reuse, "{what}: module runs per runner process {runners:?}");
            let report = TaskReport::new(&pb.run.analysis, By::Task);
            for row in &report.tasks {
                // `command` execs the program it runs (`true`); the other modules exec nothing.
                let want = if row.name == "command" { 3 } else { 0 };
                assert_eq!(row.execs, want, "{what}: {} execs {:?}", row.name, row.execs_by_exe);
                assert_eq!(row.items, 3, "{what}: {} items run", row.name);
            }
            // a runner process per module carries its loop item; in-process, one runner serves
            // many modules and what it starts carries the item of its time
            for row in &TaskReport::new(&pb.run.analysis, By::Item).tasks {
                if row.item.is_some() && (!reuse || row.name == "command") {
                    assert!(row.processes >= 1, "{what}: {} item {:?} has no process", row.name, row.item);
                }
            }
            assert_eq!(std::fs::read_to_string(dir.path().join("f2")).unwrap(), "file 2\nedit 2\n", "{what}");
        }
    }
}
