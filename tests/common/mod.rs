//! Helpers shared by the end-to-end tests: running the real `spawntrace` binary and reading what
//! it wrote.
//!
//! Tests that load eBPF need root. They are ordinary tests, serialised with
//! `#[serial_test::file_serial(ebpf)]`, and start with [`require_root!`]: elsewhere they are
//! skipped with a message, except under CI (`CI` set), where a skip would hide a failure.
#![allow(dead_code)]

pub mod ansible;

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use spawntrace::{analysis::Analysis, trace::Trace};

/// Skips the calling test (with a message) unless we are root; under CI, fails instead.
#[macro_export]
macro_rules! require_root {
    () => {
        if !nix::unistd::Uid::effective().is_root() {
            if std::env::var_os("CI").is_some() {
                panic!("this test needs root (to load eBPF probes or create test users), and CI must run it");
            }
            eprintln!(
                "skipped: needs root to load eBPF probes or create test users (run the tests with sudo)"
            );
            return;
        }
    };
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spawntrace"))
}

pub fn spawntrace() -> Command {
    Command::new(bin())
}

/// A finished recording: the process output, the trace it wrote (events kept) and its analysis.
pub struct Run {
    pub output: Output,
    pub trace: Trace,
    pub analysis: Analysis,
    pub dir: tempfile::TempDir,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn trace_path(&self) -> PathBuf {
        self.dir.path().join("trace.jsonl")
    }

    /// Successful execs of exactly this path.
    pub fn execs_of(&self, path: &str) -> usize {
        self.analysis.model.processes.iter().flat_map(|p| &p.execs).filter(|e| e.filename == path).count()
    }

    pub fn dropped(&self) -> u64 {
        self.trace.footer.as_ref().expect("complete trace").counters.dropped_events()
    }
}

/// Runs `spawntrace [extra] -o <tmp> -- argv` with `env` added and returns its trace.
pub fn record_with(extra: &[&str], env: &[(&str, &str)], argv: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace.jsonl");
    let mut cmd = spawntrace();
    cmd.args(extra).arg("-o").arg(&out).arg("--").args(argv);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().expect("running spawntrace");
    let trace = Trace::read(&out)
        .unwrap_or_else(|e| panic!("{e:#}\nstderr:\n{}", String::from_utf8_lossy(&output.stderr)));
    let mut model = Analysis::new_model();
    trace.events.iter().for_each(|e| model.apply(e));
    let analysis = Analysis::new(
        trace.header.clone(),
        trace.footer.clone(),
        model,
        &trace.plugin_messages,
        &trace.targets,
    );
    Run { output, trace, analysis, dir }
}

pub fn record(argv: &[&str]) -> Run {
    record_with(&["-q"], &[], argv)
}

pub fn sh(script: &str) -> Run {
    record(&["sh", "-c", script])
}

/// A real unprivileged user, created for a test and removed (with their files under /tmp) when
/// dropped: the hostile local user of security tests.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// A directory of theirs (0755) where they plant files.
    pub dir: PathBuf,
}

impl TestUser {
    pub fn create(tag: &str) -> Self {
        let name = format!("st-{tag}-{}", std::process::id() % 100_000);
        let _ = Command::new("userdel").arg(&name).output();
        let out = Command::new("useradd").args(["-M", "-U", "-s", "/bin/sh", &name]).output().unwrap();
        assert!(out.status.success(), "useradd {name}: {}", String::from_utf8_lossy(&out.stderr));
        let user = nix::unistd::User::from_name(&name).unwrap().expect("user just added");
        let base = tempfile::Builder::new().prefix("st-user-").tempdir().unwrap().keep();
        std::fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let dir = base.join("home");
        std::fs::create_dir(&dir).unwrap();
        nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
        Self { name, uid: user.uid.as_raw(), gid: user.gid.as_raw(), dir }
    }

    /// Runs `sh -c script` as this user.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("setpriv")
            .args([format!("--reuid={}", self.uid), format!("--regid={}", self.gid), "--init-groups".into()])
            .args(["sh", "-c", script])
            .output()
            .unwrap()
    }

    /// `spawntrace` as started by this user through sudo.
    pub fn sudo_spawntrace(&self) -> Command {
        let mut cmd = spawntrace();
        cmd.env("SUDO_UID", self.uid.to_string())
            .env("SUDO_GID", self.gid.to_string())
            .current_dir(&self.dir);
        cmd
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-KILL", "-u", &self.name]).output();
        let _ = Command::new("userdel").arg(&self.name).output();
        if let Some(base) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

/// A small complete trace (a shell that ran /bin/true), for tests that render saved traces.
pub fn minimal_trace() -> String {
    let lines = [
        r#"{"type":"header","format":"spawntrace-trace","version":1,"tool_version":"0","kernel":"k","hostname":"h","clock":"CLOCK_MONOTONIC","realtime_offset_ns":0,"boot_time_s":0,"command":["sh"],"root_pid":10,"uid":0,"gid":0,"start_ns":1000,"argv_cap":4096,"path_cap":256}"#,
        r#"{"type":"fork","ts":1000,"pid":10,"tgid":10,"ppid":1,"ptgid":1,"thread":false,"root":true}"#,
        r#"{"type":"exec","ts":1100,"pid":10,"tgid":10,"old_pid":10,"filename":"/bin/sh","argv":["sh"],"argv_bytes":3}"#,
        r#"{"type":"fork","ts":2000,"pid":11,"tgid":11,"ppid":10,"ptgid":10,"thread":false}"#,
        r#"{"type":"exec","ts":2100,"pid":11,"tgid":11,"old_pid":11,"filename":"/bin/true","argv":["true"],"argv_bytes":5}"#,
        r#"{"type":"exit","ts":3000,"pid":11,"tgid":11,"group_dead":true,"status":{"exited":0},"cpu_ns":100}"#,
        r#"{"type":"exit","ts":4000,"pid":10,"tgid":10,"group_dead":true,"status":{"exited":0},"cpu_ns":100}"#,
        r#"{"type":"footer","end_ns":5000,"status":{"exited":0},"events":6,"counters":{"ringbuf_drops":0,"read_failures":0,"track_failures":0,"stash_failures":0,"decode_failures":0},"tracer_cpu_ns":1,"probe_cpu_ns":null}"#,
    ];
    lines.join("\n") + "\n"
}
