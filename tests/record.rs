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
    let trues: Vec<_> = run.model.processes.iter().filter(|p| p.exe() == Some("/bin/true")).collect();
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
        .model
        .processes
        .iter()
        .position(|p| p.execs.iter().any(|e| e.argv.last().map(String::as_str) == Some("marker-forks")))
        .expect("the python process");
    let py = &run.model.processes[i];
    assert_eq!(py.threads, 4, "four threads, not processes");
    let kids: Vec<_> = py.children.iter().map(|&c| &run.model.processes[c]).collect();
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
    let statuses: Vec<Status> = run.model.processes.iter().filter_map(|p| p.status).collect();
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
        .model
        .processes
        .iter()
        .position(|p| p.execs.iter().any(|e| e.argv.iter().any(|a| a == "daemon-marker")))
        .expect("the daemon's exec was recorded");
    let parent = run.model.processes[daemon].parent.expect("parent known");
    let exec_ts = run.model.processes[daemon].execs.last().unwrap().ts;
    let parent_end = run.model.processes[parent].end_ns.expect("the subshell exited");
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
    let Some(strace) = common::which("strace") else {
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
    for p in &run.model.processes {
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
