//! `spawntrace record` against real processes under real eBPF probes, each checked against
//! ground truth the test controls.
mod common;

use std::{collections::BTreeMap, os::unix::fs::MetadataExt as _, process::Command, time::Duration};

use common::{record, sh, spawntrace};
use serial_test::file_serial;
use spawntrace::trace::{Event, Status};

#[test]
#[file_serial(ebpf)]
fn shell_loop_of_true_gives_exact_exec_count() {
    require_root!();
    let run = sh("for i in $(seq 500); do /bin/true; done");
    assert_eq!(run.code(), Some(0), "{}", run.stderr());
    assert_eq!(run.execs_of("/bin/true"), 500);
    assert_eq!(run.dropped(), 0);
    let footer = run.trace.footer.as_ref().unwrap();
    assert_eq!(footer.counters.read_failures, 0);
    assert_eq!(footer.counters.track_failures, 0);
    // Every exec'd /bin/true is its own process that exited 0.
    let trues: Vec<_> =
        run.analysis.model.processes.iter().filter(|p| p.exe() == Some("/bin/true")).collect();
    assert_eq!(trues.len(), 500);
    assert!(trues.iter().all(|p| p.status == Some(Status::Exited(0)) && p.end_ns.is_some()));
}

#[test]
#[file_serial(ebpf)]
fn forks_without_exec_and_threads_are_told_apart() {
    require_root!();
    let script = r#"
import os, sys, threading
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
ts = [threading.Thread(target=lambda: None) for _ in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
"#;
    // The real interpreter, not a wrapper such as a pyenv shim.
    let python = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().unwrap();
    let python = String::from_utf8(python.stdout).unwrap();
    let run = record(&[python.trim(), "-c", script, "marker-forks"]);
    assert_eq!(run.code(), Some(0), "{}", run.stderr());
    let i = run
        .analysis
        .model
        .processes
        .iter()
        .position(|p| p.execs.iter().any(|e| e.argv.last().map(String::as_str) == Some("marker-forks")))
        .expect("the python process");
    let py = &run.analysis.model.processes[i];
    assert_eq!(py.threads, 4, "four threads, not processes");
    let kids: Vec<_> = py.children.iter().map(|&c| &run.analysis.model.processes[c]).collect();
    assert_eq!(kids.len(), 3, "three forked children");
    assert!(kids.iter().all(|k| k.execs.is_empty() && k.status == Some(Status::Exited(0))));
}

#[test]
#[file_serial(ebpf)]
fn failed_execs_carry_their_errno() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let noexec = dir.path().join("not-executable");
    std::fs::write(&noexec, "#!/bin/sh\n").unwrap();
    let script = format!("/nonexistent/spawntrace-x; {}; exit 0", noexec.display());
    let run = sh(&script);
    let failed: Vec<(String, i32)> = run
        .trace
        .events
        .iter()
        .filter_map(|e| match e {
            Event::ExecFailed { filename, errno, .. } => Some((filename.clone(), *errno)),
            _ => None,
        })
        .collect();
    assert!(failed.contains(&("/nonexistent/spawntrace-x".into(), libc::ENOENT)), "{failed:?}");
    assert!(failed.contains(&(noexec.display().to_string(), libc::EACCES)), "{failed:?}");
}

#[test]
#[file_serial(ebpf)]
fn exit_codes_and_signals() {
    require_root!();
    let run = sh("(exit 3); sh -c 'kill -9 $$'; exit 0");
    let statuses: Vec<Status> = run.analysis.model.processes.iter().filter_map(|p| p.status).collect();
    assert!(statuses.contains(&Status::Exited(3)), "{statuses:?}");
    assert!(statuses.contains(&Status::Signaled(libc::SIGKILL)), "{statuses:?}");
    // spawntrace exits with the command's status, 128+signal when it was killed.
    assert_eq!(sh("exit 7").code(), Some(7));
    let killed = sh("kill -9 $$");
    assert_eq!(killed.code(), Some(137));
    assert_eq!(killed.trace.footer.unwrap().status, Status::Signaled(9));
}

#[test]
#[file_serial(ebpf)]
fn opens_of_known_files_with_their_results() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("known.txt");
    std::fs::write(&file, "hello").unwrap();
    let missing = dir.path().join("missing.txt");
    let run = record(&["cat", file.to_str().unwrap(), missing.to_str().unwrap()]);
    assert_eq!(run.code(), Some(1));
    let opens: BTreeMap<String, i64> = run
        .trace
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Open { path, ret, .. } => Some((path.clone(), *ret)),
            _ => None,
        })
        .collect();
    assert!(opens[file.to_str().unwrap()] >= 0, "{opens:?}");
    assert_eq!(opens[missing.to_str().unwrap()], -(libc::ENOENT as i64));
}

#[test]
#[file_serial(ebpf)]
fn daemonised_descendants_stay_traced() {
    require_root!();
    // The subshell forks a setsid'd grandchild and exits at once: the grandchild is reparented
    // away from the traced tree's shell before it execs.
    let run = sh("( setsid sh -c 'sleep 0.3; exec /bin/echo daemon-marker' & ); sleep 1.5");
    let daemon = run
        .analysis
        .model
        .processes
        .iter()
        .position(|p| p.execs.iter().any(|e| e.argv.iter().any(|a| a == "daemon-marker")))
        .expect("the daemon's exec was recorded");
    let parent = run.analysis.model.processes[daemon].parent.expect("parent known");
    let exec_ts = run.analysis.model.processes[daemon].execs.last().unwrap().ts;
    let parent_end = run.analysis.model.processes[parent].end_ns.expect("the subshell exited");
    assert!(parent_end < exec_ts, "parent exited before the daemon's exec (it was reparented)");
}

#[test]
#[file_serial(ebpf)]
fn argv_longer_than_the_cap_is_flagged() {
    require_root!();
    let long = "a".repeat(6000);
    let run = record(&["/bin/true", "short", &long]);
    let exec = run
        .trace
        .events
        .iter()
        .find_map(|e| match e {
            Event::Exec { filename, argv, argv_bytes, argv_truncated, .. } if filename == "/bin/true" => {
                Some((argv.clone(), *argv_bytes, *argv_truncated))
            }
            _ => None,
        })
        .expect("exec of /bin/true");
    assert!(exec.2, "truncation flagged");
    assert_eq!(exec.1 as usize, "/bin/true".len() + "short".len() + long.len() + 3);
    assert_eq!(exec.0[..2], ["/bin/true", "short"]);
    assert!(exec.0[2].len() < long.len());
}

#[test]
#[file_serial(ebpf)]
fn exec_counts_match_strace() {
    require_root!();
    let Ok(strace) = which::which("strace") else {
        panic!("strace is not installed: `cargo xtask setup` installs it");
    };
    let script = "for i in 1 2 3; do ls / >/dev/null; date >/dev/null; done; /bin/true; env true; \
                  sh -c 'cat /dev/null' ";
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let st = Command::new(strace)
        .args(["-f", "-qq", "-e", "trace=execve,execveat", "-o"])
        .arg(&log)
        .args(["sh", "-c", script])
        .status()
        .unwrap();
    assert!(st.success());
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        // 1234  execve("/usr/bin/ls", ["ls", "/"], 0x... /* 20 vars */) = 0
        if let Some(rest) = line.split("execve(\"").nth(1)
            && line.trim_end().ends_with("= 0")
        {
            let path = rest.split('"').next().unwrap();
            *want.entry(path.to_owned()).or_default() += 1;
        }
    }
    let run = sh(script);
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for p in &run.analysis.model.processes {
        for e in &p.execs {
            *got.entry(e.filename.clone()).or_default() += 1;
        }
    }
    assert_eq!(got, want);
}

#[test]
#[file_serial(ebpf)]
fn summary_json_from_a_saved_trace() {
    require_root!();
    let run = sh("/bin/true; /bin/true");
    let out = spawntrace().args(["report", "--format", "json"]).arg(run.trace_path()).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["execs_by_path"]["/bin/true"], 2);
    assert_eq!(v["execs"], 3); // sh + 2 × true
    assert_eq!(v["dropped_events"], 0);
    assert!(v["duration_ms"].as_f64().unwrap() > 0.0);
    for format in ["text", "markdown"] {
        let out = spawntrace().args(["report", "--format", format]).arg(run.trace_path()).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("/bin/true"), "{format}");
    }
}

#[test]
#[file_serial(ebpf)]
fn interrupted_recording_still_writes_a_complete_trace() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.jsonl");
    let started = dir.path().join("started");
    let script = format!("touch {}; exec sleep 30", started.display());
    let mut child =
        spawntrace().args(["-q", "-o"]).arg(&out).args(["--", "sh", "-c", &script]).spawn().unwrap();
    // Wait until the command is running under the tracer, then interrupt the tracer.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !started.exists() {
        assert!(std::time::Instant::now() < deadline, "recording never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "exit status of the interrupted command");
    let trace = spawntrace::trace::Trace::read(&out).unwrap();
    let footer = trace.footer.expect("footer written");
    assert!(footer.interrupted);
    assert_eq!(footer.status, Status::Signaled(libc::SIGINT));
}

#[test]
#[file_serial(ebpf)]
fn runs_as_the_sudo_caller_and_gives_them_the_trace() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = dir.path().join("t.jsonl");
    let output = spawntrace()
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .args(["-q", "-o"])
        .arg(&out)
        .args(["--", "id", "-u"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "65534");
    assert_eq!(std::fs::metadata(&out).unwrap().uid(), 65534);
    // --as-root keeps root.
    let output =
        spawntrace().env("SUDO_UID", "65534").args(["-q", "--as-root", "--", "id", "-u"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "0");
}

#[test]
#[file_serial(ebpf)]
fn command_not_found_exits_127_and_leaves_no_file() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.jsonl");
    let output = spawntrace().arg("-o").arg(&out).args(["--", "no-such-command-xyz"]).output().unwrap();
    assert_eq!(output.status.code(), Some(127));
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no-such-command-xyz: command not found"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no file left behind");
}

/// Bad input that needs no eBPF: one clear line and a non-zero exit, never a panic.
#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.jsonl");
    std::fs::write(&garbage, "this is not a trace\n").unwrap();
    let marker = dir.path().join("marker");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["report".into(), garbage.display().to_string()], "is not a readable spawntrace trace"),
        (vec!["report".into(), "/nonexistent/trace".into()], "cannot open"),
        (
            vec![
                "-o".into(),
                "/nonexistent-dir/t.jsonl".into(),
                "--".into(),
                "touch".into(),
                marker.display().to_string(),
            ],
            "cannot write /nonexistent-dir/t.jsonl",
        ),
    ];
    for (args, want) in cases {
        let out = spawntrace().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!marker.exists(), "the command must not run when the output is unwritable");
}

#[test]
fn non_root_gets_a_how_to_run_line() {
    if nix::unistd::Uid::effective().is_root() {
        // Drop to nobody for the check.
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(common::bin())
            .args(["--", "true"])
            .output();
        let Ok(out) = out else {
            eprintln!("skipped: setpriv unavailable");
            return;
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.contains("needs root") && err.contains("sudo"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// `spawntrace run` needs no root: it only injects plugins and passes the status through.
#[test]
fn run_passes_the_command_status_through() {
    let status = |args: &[&str]| spawntrace().arg("run").args(args).status().unwrap().code();
    assert_eq!(status(&["--", "sh", "-c", "exit 3"]), Some(3));
    assert_eq!(status(&["--", "sh", "-c", "kill -9 $$"]), Some(137));
    assert_eq!(status(&["--", "no-such-command-xyz"]), Some(127));
}

/// Waits until `path` exists (the traced command signals it is running).
fn wait_for(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `spawntrace ARGS -o OUT -- sh -c SCRIPT` and returns once SCRIPT has touched the
/// file its `{started}` names: the command is running under the tracer.
fn start_traced(args: &[&str], out: &std::path::Path, script: &str) -> std::process::Child {
    let started = out.with_extension("started");
    let _ = std::fs::remove_file(&started);
    let script = script.replace("{started}", &started.display().to_string());
    let child = spawntrace().args(args).arg("-o").arg(out).args(["--", "sh", "-c", &script]).spawn().unwrap();
    wait_for(&started);
    child
}

fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Processes whose command line contains `marker`.
fn running_with(marker: &str) -> Vec<u32> {
    let out = Command::new("pgrep").args(["-f", marker]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[test]
#[file_serial(ebpf)]
fn daemons_left_behind_are_named_and_recorded_with_linger() {
    require_root!();
    // By default recording ends with the command, and the summary names what it left running.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.jsonl");
    let script = "(sleep 1.5; exec /bin/echo daemon-marker-1) & exit 0";
    let run = spawntrace().arg("-o").arg(&out).args(["--", "sh", "-c", script]).output().unwrap();
    assert!(run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("still running when the recording ended: "), "{err}");
    assert!(err.contains("(fork) (pid "), "the subshell is named: {err}");
    let json = spawntrace().args(["report", "--format", "json"]).arg(&out).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(v["still_running"].as_u64().unwrap() >= 1, "{v}");
    assert!(!v["still_running_processes"].as_array().unwrap().is_empty(), "{v}");
    // --linger keeps recording until the whole tree has ended (not for the whole linger time).
    let started = std::time::Instant::now();
    let run = common::record_with(&["-q", "--linger", "20"], &[], &["sh", "-c", script]);
    assert!(started.elapsed() < Duration::from_secs(15), "waited for the linger time, not the tree");
    let daemon = run
        .analysis
        .model
        .processes
        .iter()
        .find(|p| p.execs.iter().any(|e| e.argv.iter().any(|a| a == "daemon-marker-1")));
    assert!(daemon.is_some_and(|p| p.end_ns.is_some()), "the daemon's exec and exit were recorded");
    assert_eq!(run.analysis.model.still_running().count(), 0);
    // ... and stops after SECS when something lives on.
    let started = std::time::Instant::now();
    let run = common::record_with(
        &["-q", "--linger", "1"],
        &[],
        &["sh", "-c", "(exec sleep 9.1234 >/dev/null 2>&1) & exit 0"],
    );
    assert!(started.elapsed() < Duration::from_secs(8), "lingered past SECS");
    assert_eq!(run.analysis.model.still_running().count(), 1);
    for pid in running_with("sleep 9.1234") {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
    }
}

#[test]
#[file_serial(ebpf)]
fn signals_reach_the_whole_tree_and_the_trace_is_completed() {
    require_root!();
    for (sig, marker) in [(nix::sys::signal::SIGTERM, "31.4159"), (nix::sys::signal::SIGINT, "31.2718")] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("t.jsonl");
        let mut child =
            start_traced(&["-q"], &out, &format!("touch {{started}}; sleep {marker}; echo never"));
        std::thread::sleep(Duration::from_millis(200));
        let sent = std::time::Instant::now();
        signal(&child, sig);
        let status = child.wait().unwrap();
        assert!(sent.elapsed() < Duration::from_secs(8), "{sig}: the command was not signalled");
        assert_eq!(status.code(), Some(128 + sig as i32), "{sig}");
        assert!(running_with(&format!("sleep {marker}")).is_empty(), "{sig}: sleep was left running");
        let trace = spawntrace::trace::Trace::read(&out).unwrap();
        let footer = trace.footer.expect("footer written");
        assert!(footer.interrupted);
        assert_eq!(footer.status, Status::Signaled(sig as i32));
    }
}

#[test]
#[file_serial(ebpf)]
fn what_ignores_the_signal_is_killed_after_the_grace_period() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.jsonl");
    let grace = ["-q", "--kill-after", "1"];
    let mut child = start_traced(&grace, &out, "trap '' TERM; touch {started}; sleep 32.5; echo never");
    let sent = std::time::Instant::now();
    signal(&child, nix::sys::signal::SIGTERM);
    let status = child.wait().unwrap();
    assert!(sent.elapsed() >= Duration::from_millis(900), "killed before the grace period");
    assert!(sent.elapsed() < Duration::from_secs(10));
    assert_eq!(status.code(), Some(137));
    assert!(running_with("sleep 32.5").is_empty());
    let footer = spawntrace::trace::Trace::read(&out).unwrap().footer.expect("footer");
    assert!(footer.interrupted);
    // A member of the group that ignores the signal does not outlive the run when COMMAND
    // itself obeys it: it is killed at the end of the grace period, and its end is recorded.
    let mut child = start_traced(&grace, &out, "(trap '' TERM; exec sleep 32.6) & touch {started}; wait");
    std::thread::sleep(Duration::from_millis(200));
    let sent = std::time::Instant::now();
    signal(&child, nix::sys::signal::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "COMMAND obeyed SIGTERM");
    assert!(sent.elapsed() >= Duration::from_millis(900), "spawntrace left before the grace period");
    assert!(running_with("sleep 32.6").is_empty(), "the member that ignored SIGTERM outlived the run");
    let trace = spawntrace::trace::Trace::read(&out).unwrap();
    let model = spawntrace::model::Model::from_events(&trace.events);
    let sleep = model.processes.iter().find(|p| p.execs.iter().any(|e| e.argv.iter().any(|a| a == "32.6")));
    assert_eq!(sleep.and_then(|p| p.status), Some(Status::Signaled(libc::SIGKILL)));
}

#[test]
#[file_serial(ebpf)]
fn a_killed_tracer_leaves_a_readable_incomplete_trace() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.jsonl");
    let mut child = start_traced(&["-q"], &out, "/bin/true; /bin/true; touch {started}; exec sleep 33.5");
    std::thread::sleep(Duration::from_millis(300)); // > the writer's 100 ms flush interval
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = dir.path().join("t.jsonl.partial");
    let text = std::fs::read_to_string(&partial).unwrap();
    assert!(text.ends_with('\n'), "whole lines only");
    let trace = spawntrace::trace::Trace::read(&partial).unwrap();
    assert!(trace.footer.is_none());
    let trues = trace
        .events
        .iter()
        .filter(|e| matches!(e, Event::Exec { filename, .. } if filename == "/bin/true"))
        .count();
    assert_eq!(trues, 2, "events up to the last flush are there");
    // The command was not killed with the tracer: it runs on, and the report says so.
    assert_eq!(running_with("sleep 33.5").len(), 1);
    for pid in running_with("sleep 33.5") {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
    }
    // A torn last line (killed mid-write) is skipped, not an error, for every reader.
    std::fs::write(&partial, text + r#"{"type":"exec","ts":12"#).unwrap();
    let report = spawntrace().arg("report").arg(&partial).output().unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let stdout = String::from_utf8_lossy(&report.stdout);
    assert!(stdout.contains("TRACE INCOMPLETE") && stdout.contains("dropped events unknown"), "{stdout}");
    for args in [vec!["flamegraph", "-o", "f.svg"], vec!["timeline", "-o", "t.json"]] {
        let out = spawntrace().args(&args).arg(&partial).current_dir(dir.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // check refuses to judge it (exit 2), on either side.
    let complete = common::record(&["true"]);
    for (a, b) in [(&partial, &complete.trace_path()), (&complete.trace_path(), &partial)] {
        let out = spawntrace().arg("check").arg(a).arg("--baseline").arg(b).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("is incomplete"));
    }
}

#[test]
fn check_limits_must_be_finite_and_not_negative() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.jsonl");
    std::fs::write(&t, common::minimal_trace()).unwrap();
    for bad in ["NaN", "-1", "inf", "x"] {
        let out = spawntrace()
            .arg("check")
            .arg(&t)
            .arg("--baseline")
            .arg(&t)
            .arg(format!("--max-exec-increase={bad}"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("finite number"), "{bad}");
    }
    let ok = spawntrace().arg("check").arg(&t).arg("--baseline").arg(&t).output().unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
#[file_serial(ebpf)]
fn any_argv_is_accepted() {
    require_root!();
    use std::os::unix::ffi::OsStrExt as _;
    let dir = tempfile::tempdir().unwrap();
    let arg = std::ffi::OsStr::from_bytes(b"caf\xff");
    let out = dir.path().join("t.jsonl");
    let run =
        spawntrace().args(["-q", "-o"]).arg(&out).args(["--", "printf", "%s"]).arg(arg).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(run.stdout, b"caf\xff", "passed to the command byte for byte");
    let run = spawntrace().args(["run", "--", "printf", "%s"]).arg(arg).output().unwrap();
    assert_eq!(run.stdout, b"caf\xff");
}

#[test]
fn overlong_lines_are_a_one_line_error() {
    let out = spawntrace().args(["report", "/dev/zero"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("longer than 1048576 bytes"), "{err}");
}

/// Peak resident memory of `spawntrace ARGS` (a fresh process), bytes.
fn peak_rss(args: &[&std::ffi::OsStr]) -> u64 {
    // getrusage(RUSAGE_CHILDREN) of a helper process that runs only spawntrace.
    let script = "import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); \
                  print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)";
    let out = Command::new("python3").arg("-c").arg(script).arg(common::bin()).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_timeline_of_a_large_trace_streams() {
    use std::io::Write as _;
    // 200k short-lived processes: about 1M events, 130 MB.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.jsonl");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let header = common::minimal_trace();
    let mut lines = header.lines();
    writeln!(w, "{}", lines.next().unwrap()).unwrap();
    writeln!(
        w,
        r#"{{"type":"fork","ts":1000,"pid":10,"tgid":10,"ppid":1,"ptgid":1,"thread":false,"root":true}}"#
    )
    .unwrap();
    let mut ts = 2000u64;
    for i in 0..200_000u32 {
        let pid = 1000 + i;
        ts += 1000;
        writeln!(
            w,
            r#"{{"type":"fork","ts":{ts},"pid":{pid},"tgid":{pid},"ppid":10,"ptgid":10,"thread":false}}"#
        )
        .unwrap();
        writeln!(w, r#"{{"type":"exec","ts":{},"pid":{pid},"tgid":{pid},"old_pid":{pid},"filename":"/bin/true","argv":["/bin/true","--marker"],"argv_bytes":18}}"#, ts + 10).unwrap();
        for (k, lib) in ["/etc/ld.so.cache", "/lib/x86_64-linux-gnu/libc.so.6"].iter().enumerate() {
            writeln!(w, r#"{{"type":"open","ts":{},"pid":{pid},"tgid":{pid},"syscall":"openat","path":"{lib}","flags":524288,"ret":3}}"#, ts + 20 + k as u64).unwrap();
        }
        writeln!(w, r#"{{"type":"exit","ts":{},"pid":{pid},"tgid":{pid},"group_dead":true,"status":{{"exited":0}},"cpu_ns":1000}}"#, ts + 40).unwrap();
    }
    writeln!(w, r#"{{"type":"exit","ts":{ts},"pid":10,"tgid":10,"group_dead":true,"status":{{"exited":0}},"cpu_ns":1000}}"#).unwrap();
    w.flush().unwrap();
    drop(w);
    let size = std::fs::metadata(&path).unwrap().len();
    let out = dir.path().join("t.json");
    let rss = peak_rss(&["timeline".as_ref(), path.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    assert!(rss <= 2 * size, "timeline of a {size}-byte trace peaked at {rss} bytes (> 2x the file)");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert!(v["traceEvents"].as_array().unwrap().len() > 200_000);
}

#[test]
#[file_serial(ebpf)]
fn each_recording_measures_its_own_cpu_and_frees_what_it_loaded() {
    require_root!();
    // compare records many runs in one process: nothing may pile up, nothing may add up.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let record = |argv: &[&str]| {
        let argv = argv.iter().map(std::ffi::OsString::from).collect();
        rt.block_on(spawntrace::record::record(spawntrace::record::Options::new(argv))).unwrap()
    };
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let big = record(&["sh", "-c", "for i in $(seq 3000); do /bin/true; done"]);
    std::thread::sleep(Duration::from_millis(200));
    let after_first = fds();
    let small = [record(&["true"]), record(&["true"]), record(&["true"])];
    std::thread::sleep(Duration::from_millis(200));
    assert!(fds() <= after_first, "fds grew from {after_first} to {} over three recordings", fds());
    // Cumulative figures would make the third small run's at least the storm's plus the first
    // small run's; each run's own is about one small run's.
    let cpu = |r: &spawntrace::record::Recording| r.footer().tracer_cpu_ns;
    assert!(
        cpu(&small[2]) < cpu(&big) + cpu(&small[0]),
        "tracer CPU of `true` runs after a storm: {} {} {} (storm {}): cumulative?",
        cpu(&small[0]),
        cpu(&small[1]),
        cpu(&small[2]),
        cpu(&big)
    );
}

/// An interactive bash on a pseudo-terminal runs `spawntrace -- sh -c 'sleep …'`, then Ctrl-Z,
/// `fg` and Ctrl-C, as a person would; prints what the terminal showed.
const JOB_CONTROL: &str = r#"
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp("bash", ["bash", "--norc", "--noprofile", "-i"])
out = b""
def read(t):
    global out
    end = time.time() + t
    while time.time() < end:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                out += os.read(fd, 4096)
            except OSError:
                return
def send(b, t):
    os.write(fd, b)
    read(t)
read(1)
send(b"PS1='PROMPT> '\n", 0.5)
send(("%s -q -- sh -c 'sleep 34.5; echo finished'\n" % sys.argv[1]).encode(), 4)
send(b"\x1a", 2)
send(b"echo; ps -o stat= -p $(pgrep -f 'sleep 34.5')\n", 1)
send(b"fg\n", 2)
send(b"\x03", 3)
send(b"echo rc=$?\n", 1)
send(b"exit\n", 1)
sys.stdout.write(out.decode(errors="replace"))
"#;

#[test]
#[file_serial(ebpf)]
fn job_control_works_on_a_terminal() {
    require_root!();
    let out = Command::new("python3").arg("-c").arg(JOB_CONTROL).arg(common::bin()).output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("Stopped"), "Ctrl-Z did not stop the job:\n{screen}");
    assert!(
        screen.lines().any(|l| l.trim().starts_with('T')),
        "the command was not stopped with it:\n{screen}"
    );
    assert!(screen.contains("rc=130"), "Ctrl-C after fg did not end the command:\n{screen}");
    assert!(running_with("sleep 34.5").is_empty(), "left running:\n{screen}");
}
