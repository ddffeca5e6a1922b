//! What a run does on its SSH targets, recorded there: real sshd hosts in network namespaces
//! (tests/lab), real ansible-playbook, real eBPF recorders started on the hosts through the run's
//! own ssh ControlMaster.
mod common;

use std::{
    collections::BTreeMap,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::ansible::{envs, playbook};
use serial_test::file_serial;
use spawntrace::{
    ansible::attribution::Owner,
    model::basename,
    report::{
        categories::{Categories, Category},
        summary::Summary,
        tasks::{By, TaskReport},
    },
};

/// Each item runs printf as many times as its number, marking each with host and item.
const MARKS: &str = r#"
- hosts: targets
  gather_facts: false
  tasks:
    - name: marks
      ansible.builtin.shell: "for i in $(seq {{ item }}); do /usr/bin/printf 'mark-{{ inventory_hostname }}-{{ item }} '; done"
      loop: [1, 2, 3]
    - name: copy
      ansible.builtin.copy:
        content: "hello\n"
        dest: "/tmp/spawntrace-targets-{{ inventory_hostname }}"
"#;

fn newest_env() -> std::path::PathBuf {
    envs().into_iter().next_back().expect("an environment")
}

/// [`mitogen_env`], or None after saying the Mitogen part is skipped (under `CI`: a failure).
fn mitogen_env_or_skip() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let found = mitogen_env();
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "no environment with Mitogen");
        eprintln!("skipped: no environment with Mitogen");
    }
    found
}

/// The environment with Mitogen, and its strategy plugins' directory.
fn mitogen_env() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    envs().into_iter().find_map(|env| {
        let out = Command::new(env.join(".venv/bin/python"))
            .args(["-c", "import os, ansible_mitogen; print(os.path.dirname(ansible_mitogen.__file__))"])
            .output()
            .ok()?;
        let dir =
            std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("plugins/strategy");
        (out.status.success() && dir.is_dir()).then_some((env, dir))
    })
}

#[test]
#[file_serial(ebpf)]
fn target_processes_land_on_their_task_host_and_item_and_nothing_else_is_recorded() {
    require_root!();
    let lab = sshlab::Lab::start_with_sudo(2, "targets").expect("the ssh test hosts");
    let cp = tempfile::tempdir().unwrap();
    let mitogen = mitogen_env_or_skip();
    for (strategy, mode) in
        [("linear", "classic"), ("free", "classic"), ("linear", "persistent"), ("mitogen_linear", "mitogen")]
    {
        let what = format!("{strategy} {mode}");
        let (env, strategy_plugins) = match (mode, &mitogen) {
            ("mitogen", Some((env, plugins))) => (env.clone(), plugins.to_str().unwrap().to_owned()),
            ("mitogen", None) => continue,
            _ => (newest_env(), String::new()),
        };
        // An unrelated ssh session to h1 while the run goes on: its own sshd session, not the
        // run's, so none of it may appear.
        let stop = Arc::new(AtomicBool::new(false));
        let unrelated = {
            let (stop, key, user, addr) =
                (stop.clone(), lab.key.clone(), lab.user.clone(), lab.hosts[0].addr.clone());
            let options = lab.ssh_options.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = Command::new("ssh")
                        .args(&options)
                        .arg("-i")
                        .arg(&key)
                        .args(["-o", "BatchMode=yes", &format!("{user}@{addr}"), "/usr/bin/printf unrelated"])
                        .output();
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        let pb = common::ansible::playbook_with(
            if mode == "persistent" { &["--persistent"] } else { &[] },
            &env,
            MARKS,
            lab.inventory.to_str().unwrap(),
            &[
                ("ANSIBLE_FORKS", "2"),
                ("ANSIBLE_STRATEGY", strategy),
                ("ANSIBLE_STRATEGY_PLUGINS", &strategy_plugins),
                ("ANSIBLE_SSH_CONTROL_PATH_DIR", cp.path().to_str().unwrap()),
            ],
            &[],
        );
        stop.store(true, Ordering::Relaxed);
        unrelated.join().unwrap();
        let a = &pb.run.analysis;
        let summary = Summary::new(a);
        assert_eq!(summary.targets.len(), 2, "{what}: {:?}", summary.targets);
        for (t, s) in a.targets.iter().zip(&summary.targets) {
            assert!(s.recorded && s.complete, "{what}: {s:?}");
            assert_eq!((s.unattributed, s.unconfirmed), (0, 0), "{what}: {s:?}");
            // the persistent agent there (and its zygote, spare runners), Mitogen's context
            assert_eq!(s.agent > 0, mode != "classic", "{what}: {s:?}");
            let [host] = s.hosts.as_slice() else { panic!("{what}: one host per target: {s:?}") };
            // every printf there is this host's, none is the unrelated session's
            let printfs: Vec<&Vec<String>> = t
                .model
                .processes
                .iter()
                .flat_map(|p| &p.execs)
                .filter(|e| basename(&e.filename) == "printf")
                .map(|e| &e.argv)
                .collect();
            assert_eq!(printfs.len(), 1 + 2 + 3, "{what} {host}: {printfs:?}");
            assert!(
                printfs.iter().all(|argv| argv.join(" ").contains(&format!("mark-{host}-"))),
                "{printfs:?}"
            );
            assert!(t.owners.iter().filter(|o| **o == Owner::Connection).count() == 1, "the sshd session");
        }
        // per task, host and item: as many printf execs there as the item's number
        let rows = TaskReport::new(a, By::Item).tasks;
        let mut seen = BTreeMap::new();
        for row in rows.iter().filter(|r| r.name == "marks" && r.item.is_some()) {
            let target = row.target.as_ref().expect("target work in every row");
            let printf = target.execs_by_exe.get("printf").copied().unwrap_or(0);
            let label: u64 = row.item_label.as_deref().unwrap().parse().unwrap();
            assert_eq!(printf, label, "{what}: {} item {label}", row.host.as_deref().unwrap());
            seen.insert((row.host.clone().unwrap(), label), printf);
        }
        assert_eq!(seen.len(), 2 * 3, "{what}: {seen:?}");
        // copy's work on each target is in its task: a module Python each (classic), the
        // agent's runner and the programs the module runs (persistent); Mitogen runs it in its
        // context: no interpreter
        let copy = TaskReport::new(a, By::Task).tasks.into_iter().find(|r| r.name == "copy").unwrap();
        let on_targets = copy.target.unwrap_or_default();
        match mode {
            "classic" => assert!(on_targets.execs_by_exe.get("python3").copied().unwrap_or(0) >= 2, "{what}"),
            "persistent" => assert!(
                on_targets.processes >= 2 && !on_targets.execs_by_exe.contains_key("python3"),
                "{what}"
            ),
            // the programs copy runs (lsattr, file), from Mitogen's context or a fork of it
            _ => assert!(
                on_targets.processes > 0 && !on_targets.execs_by_exe.contains_key("python3"),
                "{what}: {on_targets:?}"
            ),
        }
        // where the time went: the target's shell helpers and module take over from the ssh
        // that waits for them; the first task waited for the recorders
        let categories = Categories::new(a);
        let share = |task: &str, c: Category| {
            let t = categories.tasks.iter().find(|t| t.name == task).unwrap();
            t.categories.get(&c).map_or(0.0, |s| s.share)
        };
        assert!(share("copy", Category::Module) > 0.0, "{what}: {categories:?}");
        assert!(share("copy", Category::Other) < 0.05, "{what}: {categories:?}");
        if mode == "classic" {
            assert!(share("marks", Category::Shell) > 0.0 && share("copy", Category::Shell) > 0.0, "{what}");
        }
        assert!(share("marks", Category::TargetRecorder) > 0.0, "{what}: {categories:?}");
    }
}

#[test]
#[file_serial(ebpf)]
fn a_target_without_root_is_reported_and_the_run_goes_on() {
    require_root!();
    let lab = sshlab::Lab::start(1, "targets").expect("the ssh test hosts");
    let cp = tempfile::tempdir().unwrap();
    let pb = playbook(
        &newest_env(),
        MARKS,
        lab.inventory.to_str().unwrap(),
        &[("ANSIBLE_SSH_CONTROL_PATH_DIR", cp.path().to_str().unwrap())],
        &[],
    );
    let summary = Summary::new(&pb.run.analysis);
    let [t] = summary.targets.as_slice() else { panic!("{:?}", summary.targets) };
    assert!(!t.recorded, "{t:?}");
    assert!(t.reason.as_deref().is_some_and(|r| r.contains("no root")), "{t:?}");
    assert!(
        summary.targets_text()[0].contains("not recorded: no root there"),
        "{:?}",
        summary.targets_text()
    );
    // the controller side is as without target recording
    let marks =
        TaskReport::new(&pb.run.analysis, By::Task).tasks.into_iter().find(|r| r.name == "marks").unwrap();
    assert!(marks.execs_by_exe.get("ssh").copied().unwrap_or(0) >= 3, "{:?}", marks.execs_by_exe);
    assert!(marks.target.is_none(), "no target recorded: no target columns");
}

#[test]
#[file_serial(ebpf)]
fn a_recorder_killed_mid_run_leaves_an_incomplete_target_and_nothing_running() {
    require_root!();
    let lab = sshlab::Lab::start_with_sudo(1, "targets").expect("the ssh test hosts");
    let cp = tempfile::tempdir().unwrap();
    let recorders = || -> Vec<String> {
        let out =
            Command::new("pgrep").args(["-f", "^/var/cache/spawntrace/bin/[0-9a-f]+ target-record"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    // the hosts are network namespaces of this machine: their recorder is a process here
    let killer = std::thread::spawn(move || {
        for _ in 0..600 {
            if let Some(pid) = recorders().first() {
                // once it records (its start takes about a second), during the sleep
                std::thread::sleep(Duration::from_millis(2500));
                let _ = Command::new("kill").args(["-KILL", pid]).status();
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    let pb = playbook(
        &newest_env(),
        "- hosts: targets\n  gather_facts: false\n  tasks:\n    - command: sleep 5\n    - command: /usr/bin/printf after\n",
        lab.inventory.to_str().unwrap(),
        &[("ANSIBLE_SSH_CONTROL_PATH_DIR", cp.path().to_str().unwrap())],
        &[],
    );
    assert!(killer.join().unwrap(), "the recorder was never seen");
    let summary = Summary::new(&pb.run.analysis);
    let [t] = summary.targets.as_slice() else { panic!("{:?}", summary.targets) };
    assert!(t.recorded && !t.complete && t.dropped_events.is_none(), "{t:?}");
    assert!(summary.targets_text()[0].contains("INCOMPLETE"), "{:?}", summary.targets_text());
    assert!(recorders().is_empty(), "a recorder is still running: {:?}", recorders());
}

/// The target side counted against ground truth: `strace -f` on the host's sshd sees every exec
/// a run causes there; a recorded run of the same playbook must count the same execs, by
/// executable, per task (one module task per playbook), classic and persistent.
#[test]
#[file_serial(ebpf)]
fn target_execs_match_strace_on_the_hosts_sshd() {
    require_root!();
    let lab = sshlab::Lab::start_with_sudo(1, "targets").expect("the ssh test hosts");
    let sshd = Command::new("pgrep")
        .args(["-f", &format!("sshd -D -e -f {}/sshd_h1.conf", lab.dir.display())])
        .output()
        .unwrap();
    let sshd = String::from_utf8_lossy(&sshd.stdout).split_whitespace().next().expect("h1's sshd").to_owned();
    // each run writes files of its own (`run`): the same work, whatever ran before
    let tasks = [
        (
            "copy",
            "ansible.builtin.copy: {content: \"{{ item }}\\n\", dest: \"/tmp/spawntrace-gt-{{ run }}-{{ item }}\"}",
        ),
        (
            "lineinfile",
            "ansible.builtin.lineinfile: {path: \"/tmp/spawntrace-gt-{{ run }}-{{ item }}\", line: x, create: true}",
        ),
    ];
    for mode in ["classic", "persistent"] {
        for (name, task) in tasks {
            let pb = format!(
                "- hosts: targets\n  gather_facts: false\n  tasks:\n    - {task}\n      loop: [a, b, c]\n"
            );
            let flags: &[&str] = if mode == "persistent" { &["--persistent"] } else { &[] };
            // ground truth: the same playbook, untraced, with strace on the sshd (a fresh
            // ControlPath dir: a new connection, so a new session strace follows)
            let untraced_cp = tempfile::tempdir().unwrap();
            let log = untraced_cp.path().join("strace.log");
            let mut strace = Command::new("strace")
                .args(["-f", "-qq", "-e", "trace=execve", "-o"])
                .arg(&log)
                .args(["-p", &sshd])
                .spawn()
                .expect("strace (cargo xtask setup installs it)");
            std::thread::sleep(Duration::from_millis(500));
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("pb.yml"), &pb).unwrap();
            std::fs::write(dir.path().join("ansible.cfg"), "[defaults]\n").unwrap();
            let mut untraced = match mode {
                "persistent" => {
                    let mut c = common::spawntrace();
                    c.args(["run", "--persistent", "--"]);
                    c
                }
                _ => Command::new(newest_env().join(".venv/bin/ansible-playbook")),
            };
            if mode == "persistent" {
                untraced.arg(newest_env().join(".venv/bin/ansible-playbook"));
            }
            let out = untraced
                .args([
                    "-i",
                    lab.inventory.to_str().unwrap(),
                    "pb.yml",
                    "-e",
                    &format!("run={mode}-{name}-strace-{}", std::process::id()),
                ])
                .current_dir(dir.path())
                .env("ANSIBLE_CONFIG", dir.path().join("ansible.cfg"))
                .env("ANSIBLE_HOST_KEY_CHECKING", "False")
                .env("ANSIBLE_SSH_CONTROL_PATH_DIR", untraced_cp.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
            std::thread::sleep(Duration::from_millis(300));
            let _ = Command::new("kill").args(["-INT", &strace.id().to_string()]).status();
            let _ = strace.wait();
            let truth = strace_execs(&std::fs::read_to_string(&log).unwrap());
            // recorded
            let traced_cp = tempfile::tempdir().unwrap();
            let run = common::ansible::playbook_with(
                flags,
                &newest_env(),
                &pb,
                lab.inventory.to_str().unwrap(),
                &[("ANSIBLE_SSH_CONTROL_PATH_DIR", traced_cp.path().to_str().unwrap())],
                &["-e", &format!("run={mode}-{name}-traced-{}", std::process::id())],
            );
            let [target] = run.run.analysis.targets.as_slice() else { panic!("one target") };
            // what was lost, with what led to it, for the failure message
            let lost: Vec<String> = (0..target.model.processes.len())
                .filter(|&i| target.owners[i] == Owner::Unattributed)
                .map(|i| {
                    let mut chain = Vec::new();
                    let mut cur = Some(i);
                    while let Some(q) = cur {
                        let p = &target.model.processes[q];
                        let exe = p.execs.last().map_or("(fork)", |e| basename(&e.filename));
                        chain.push(format!(
                            "{exe} {:?} at {}",
                            target.owners[q],
                            target.local_ns(p.start_ns)
                        ));
                        cur = p.parent;
                    }
                    chain.join(" <- ")
                })
                .collect();
            assert!(lost.is_empty(), "{mode} {name}: unattributed {lost:#?}");
            let mut recorded: BTreeMap<String, u64> = BTreeMap::new();
            for p in &target.model.processes {
                for e in &p.execs {
                    *recorded.entry(basename(&e.filename).to_owned()).or_default() += 1;
                }
            }
            assert_eq!(recorded, truth, "{mode} {name}: recorded vs strace on the sshd");
            // and they are the task's (the agent's start aside)
            let row = TaskReport::new(&run.run.analysis, By::Task).tasks.into_iter().next().unwrap();
            let in_task: u64 = row.target.unwrap().execs;
            let agent: u64 = target
                .owners
                .iter()
                .zip(&target.model.processes)
                .filter(|(o, _)| **o == Owner::Agent)
                .map(|(_, p)| p.execs.len() as u64)
                .sum();
            assert_eq!(in_task + agent, recorded.values().sum::<u64>(), "{mode} {name}");
        }
    }
    // the hosts' /tmp is this machine's
    for entry in std::fs::read_dir("/tmp").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("spawntrace-gt-") && name.contains(&format!("-{}-", std::process::id())) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Successful execs by executable in an `strace -f -e trace=execve` log, sshd's own re-execs
/// (a new connection's) left out.
fn strace_execs(log: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("execve(\"") && l.trim_end().ends_with("= 0")) {
        let path = line.split("execve(\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("");
        let exe = basename(path);
        if !exe.starts_with("sshd") {
            *counts.entry(exe.to_owned()).or_default() += 1;
        }
    }
    counts
}

/// `compare` against a network-namespace host: each mode's target side, in report.json and
/// report.md, with every target process attributed and the agents there (ours, Mitogen's
/// context) counted.
#[test]
#[file_serial(ebpf)]
fn compare_over_ssh_reports_each_modes_target_side() {
    require_root!();
    let Some((env, _)) = mitogen_env_or_skip() else { return };
    let lab = sshlab::Lab::start_with_sudo(1, "targets").expect("the ssh test hosts");
    let dir = tempfile::tempdir().unwrap();
    let cp = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pb.yml"),
        "- hosts: targets\n  gather_facts: false\n  tasks:\n    - name: copy\n      ansible.builtin.copy: {content: \"{{ item }}\\n\", dest: \"/tmp/spawntrace-compare-{{ item }}\"}\n      loop: [a, b, c]\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let result = common::spawntrace()
        .current_dir(dir.path())
        .args(["compare", "--runs", "1", "--warmup", "0", "--modes", "classic,persistent,mitogen", "-o"])
        .arg(&out)
        .arg("--")
        .arg(env.join(".venv/bin/ansible-playbook"))
        .args(["-i", lab.inventory.to_str().unwrap(), "pb.yml"])
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", cp.path())
        // (Mitogen's own host key option comes before the inventory's)
        .env("ANSIBLE_HOST_KEY_CHECKING", "False")
        .output()
        .unwrap();
    let logs: String = std::fs::read_dir(out.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            format!("{}:\n{}", e.path().display(), std::fs::read_to_string(e.path()).unwrap_or_default())
        })
        .collect();
    assert!(result.status.success(), "{}\n{logs}", String::from_utf8_lossy(&result.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let modes = report["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 3, "{report:#}");
    let target_execs = |m: &serde_json::Value| m["tasks"][0]["target_execs"].as_f64().unwrap();
    for m in modes {
        let t = &m["target"];
        assert!(t["execs"]["mean"].as_f64().unwrap() > 0.0, "{m:#}");
        assert_eq!(t["unattributed"], 0, "{m:#}");
        let agents = t["agent_processes"]["mean"].as_f64().unwrap();
        assert_eq!(agents > 0.0, m["mode"] != "classic", "{m:#}");
    }
    // classic starts a Python per item there; the agents do not
    assert!(target_execs(&modes[0]) > target_execs(&modes[1]), "{report:#}");
    assert!(target_execs(&modes[0]) > target_execs(&modes[2]), "{report:#}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## On the SSH targets") && md.contains("| copy |"), "{md}");
    for item in ["a", "b", "c"] {
        let _ = std::fs::remove_file(format!("/tmp/spawntrace-compare-{item}"));
    }
}

/// Under Mitogen, a target whose connection cannot be shared with the recorder (sharing turned
/// off in the user's ssh arguments, or a password Mitogen types) is reported with why, and the
/// run goes on.
#[test]
#[file_serial(ebpf)]
fn mitogen_targets_that_cannot_share_their_connection_are_reported() {
    require_root!();
    let Some((env, plugins)) = mitogen_env_or_skip() else { return };
    let lab = sshlab::Lab::start_with_sudo(1, "targets").expect("the ssh test hosts");
    let base = std::fs::read_to_string(&lab.inventory).unwrap();
    for (vars, why) in [
        ("ansible_ssh_extra_args='-o ControlPath=none'", "no shared connection"),
        ("ansible_password=unused", "password authentication"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let inventory = dir.path().join("inventory.ini");
        let text: String = base
            .lines()
            .map(|l| if l.starts_with("h1 ") { format!("{l} {vars}\n") } else { format!("{l}\n") })
            .collect();
        std::fs::write(&inventory, text).unwrap();
        let pb = playbook(
            &env,
            MARKS,
            inventory.to_str().unwrap(),
            &[
                ("ANSIBLE_STRATEGY", "mitogen_linear"),
                ("ANSIBLE_STRATEGY_PLUGINS", plugins.to_str().unwrap()),
            ],
            &[],
        );
        let summary = Summary::new(&pb.run.analysis);
        let [t] = summary.targets.as_slice() else { panic!("{vars}: {:?}", summary.targets) };
        assert!(!t.recorded && t.reason.as_deref().is_some_and(|r| r.contains(why)), "{vars}: {t:?}");
    }
}

/// Whether an ELF executable has no program interpreter (is statically linked).
fn is_static_elf(bytes: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) =
        (u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize, u16_at(0x36), u16_at(0x38));
    bytes.starts_with(b"\x7fELF")
        && (0..phnum)
            .all(|i| u32::from_le_bytes(bytes[phoff + i * phentsize..][..4].try_into().unwrap()) != 3)
}

/// Targets receive the static build installed with spawntrace (`cargo xtask test` builds it next
/// to the tests' binary), and never one that another local user could have changed: with the
/// static build theirs, no target is recorded.
#[test]
#[file_serial(ebpf)]
fn targets_receive_the_static_build_and_never_one_another_user_could_change() {
    use sha2::Digest as _;
    use std::os::unix::fs::PermissionsExt as _;
    require_root!();
    let built = common::bin().parent().unwrap().join(spawntrace::ansible::targets::STATIC_BUILD);
    if !built.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no static build at {}: `cargo xtask test` builds it",
            built.display()
        );
        eprintln!("skipped: no static build at {} (`cargo xtask test` builds it)", built.display());
        return;
    }
    let bytes = std::fs::read(&built).unwrap();
    assert!(is_static_elf(&bytes), "{} is not statically linked", built.display());
    assert!(!is_static_elf(&std::fs::read(common::bin()).unwrap()), "the tests' own binary is dynamic");
    let cached =
        std::path::Path::new("/var/cache/spawntrace/bin").join(format!("{:x}", sha2::Sha256::digest(&bytes)));
    let _ = std::fs::remove_file(&cached);
    let lab = sshlab::Lab::start_with_sudo(1, "targets").expect("the ssh test hosts");
    let cp = tempfile::tempdir().unwrap();
    let control = [("ANSIBLE_SSH_CONTROL_PATH_DIR", cp.path().to_str().unwrap())];
    let pb = playbook(&newest_env(), MARKS, lab.inventory.to_str().unwrap(), &control, &[]);
    let summary = Summary::new(&pb.run.analysis);
    assert!(summary.targets.iter().all(|t| t.recorded && t.complete), "{:?}", summary.targets);
    assert!(cached.is_file(), "the static build was not what the target received");

    // the attacker owns the static build installed with a copy of spawntrace
    let attacker = common::TestUser::create("static");
    let root = tempfile::tempdir().unwrap();
    let (bin, lib) = (root.path().join("bin"), root.path().join("lib/spawntrace"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&lib).unwrap();
    for d in [root.path(), &bin, &root.path().join("lib"), &lib] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let copy = bin.join("spawntrace");
    std::fs::copy(common::bin(), &copy).unwrap();
    let theirs = lib.join("spawntrace-static");
    std::fs::copy(&built, &theirs).unwrap();
    nix::unistd::chown(&theirs, Some(attacker.uid.into()), Some(attacker.gid.into())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pb.yml"), MARKS).unwrap();
    std::fs::write(dir.path().join("ansible.cfg"), "[defaults]\n").unwrap();
    let trace = dir.path().join("trace.jsonl");
    let out = Command::new(&copy)
        .args(["-q", "-o"])
        .arg(&trace)
        .arg("--")
        .arg(newest_env().join(".venv/bin/ansible-playbook"))
        .args(["-i", lab.inventory.to_str().unwrap(), "pb.yml"])
        .current_dir(dir.path())
        .env("ANSIBLE_CONFIG", dir.path().join("ansible.cfg"))
        .env("ANSIBLE_HOST_KEY_CHECKING", "False")
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", cp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = Command::new(&copy).args(["report", "--format", "json"]).arg(&trace).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let reason = report["targets"][0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("not shipped"), "{:#}", report["targets"]);
}
