//! Helpers shared by the end-to-end tests: running the real `spawntrace` binary and reading what
//! it wrote.
//!
//! Tests that load eBPF need root. They are ordinary tests, serialised with
//! `#[serial_test::file_serial(ebpf)]`, and start with [`require_root!`]: elsewhere they are
//! skipped with a message, except under CI (`CI` set), where a skip would hide a failure.
#![allow(dead_code)]

pub mod ansible;
pub mod lab;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use spawntrace::{model::Model, trace::Trace};

/// Skips the calling test (with a message) unless we are root; under CI, fails instead.
#[macro_export]
macro_rules! require_root {
    () => {
        if !nix::unistd::Uid::effective().is_root() {
            if std::env::var_os("CI").is_some() {
                panic!("this test needs root to load eBPF probes, and CI must run it");
            }
            eprintln!("skipped: needs root to load eBPF probes (run the tests with sudo)");
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

/// A finished recording: the process output and the trace it wrote.
pub struct Run {
    pub output: Output,
    pub trace: Trace,
    pub model: Model,
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
        self.model.processes.iter().flat_map(|p| &p.execs).filter(|e| e.filename == path).count()
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
    let model = Model::from_events(&trace.events);
    Run { output, trace, model, dir }
}

pub fn record(argv: &[&str]) -> Run {
    record_with(&["-q"], &[], argv)
}

pub fn sh(script: &str) -> Run {
    record(&["sh", "-c", script])
}

/// Path of an executable on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}
