//! What `cargo xtask install` puts next to the binary, made by the binary itself: shell
//! completions, man pages, and a `--version` that names the trace format it writes.
use std::process::Command;

use spawntrace::trace;

fn spawntrace(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_spawntrace")).args(args).output().unwrap();
    assert!(out.status.success(), "spawntrace {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let script = spawntrace(&["generate", "completions", shell]);
        assert!(script.contains("spawntrace") && script.contains("report"), "{shell}: {script}");
        assert!(script.contains("linger"), "{shell}: no record option in {script}");
        // the hidden generator is not offered to the user
        assert!(!script.contains("generate"), "{shell}: {script}");
    }
}

#[test]
fn man_pages_one_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    spawntrace(&["generate", "man", out.to_str().unwrap()]);
    let main = std::fs::read_to_string(out.join("spawntrace.1")).unwrap();
    assert!(main.lines().any(|l| l.starts_with(".TH spawntrace 1")), "{main}");
    assert!(main.contains(r"\fB\-\-linger\fR"), "{main}");
    let report = std::fs::read_to_string(out.join("spawntrace-report.1")).unwrap();
    assert!(report.contains(".TH spawntrace-report 1"), "{report}");
    assert!(!out.join("spawntrace-generate.1").exists());
    assert!(!out.join("spawntrace-help.1").exists());
}

#[test]
fn version_names_the_trace_format() {
    let v = spawntrace(&["--version"]);
    let want = format!(
        "spawntrace {} (trace format {} {})\n",
        env!("CARGO_PKG_VERSION"),
        trace::FORMAT,
        trace::VERSION
    );
    assert_eq!(v, want);
}

#[test]
fn bad_shell_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_spawntrace"))
        .args(["generate", "completions", "nosh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'nosh'"));
}
