//! `spawntrace compare`, `check` and `timeline` on real ansible-playbook runs.
mod common;

use std::path::Path;

use common::ansible::{default_env, playbook};
use serial_test::file_serial;

fn small_playbook(n: usize) -> String {
    format!(
        r#"
- name: small
  hosts: targets
  gather_facts: false
  tasks:
    - name: loop task
      ansible.builtin.command: "true {{{{ item }}}}"
      loop: "{{{{ range({n}) | list }}}}"
"#
    )
}

fn inventory(env: &Path) -> String {
    format!(
        "[targets]\nh1 ansible_connection=local ansible_python_interpreter={}\n",
        env.join(".venv/bin/python").display()
    )
}

/// `spawntrace compare --runs RUNS --modes MODES` of a loop of `items` commands, in a temporary
/// directory: (that directory, the output directory, report.json), or None without environments.
fn compare(
    items: usize,
    runs: usize,
    modes: &str,
) -> Option<(tempfile::TempDir, std::path::PathBuf, serde_json::Value)> {
    let env = default_env()?;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pb.yml"), small_playbook(items)).unwrap();
    std::fs::write(dir.path().join("inv.ini"), inventory(&env)).unwrap();
    let out = dir.path().join("out");
    let result = common::spawntrace()
        .current_dir(dir.path())
        .args(["compare", "--runs", &runs.to_string(), "--modes", modes, "-o"])
        .arg(&out)
        .arg("--")
        .arg(env.join(".venv/bin/ansible-playbook"))
        .args(["-i", "inv.ini", "pb.yml"])
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let report = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    Some((dir, out, report))
}

#[test]
#[file_serial(ebpf)]
fn compare_writes_a_side_by_side_report() {
    require_root!();
    let Some((_dir, out, report)) = compare(2, 2, "classic,mitogen") else { return };
    let modes: Vec<&str> =
        report["modes"].as_array().unwrap().iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["classic", "mitogen"], "Mitogen is installed in the 2.19 environment");
    let classic = &report["modes"][0];
    assert_eq!(classic["wall_s"]["n"], 2);
    assert!(classic["tracer_overhead"].as_f64().unwrap() > 0.0);
    assert_eq!(classic["unattributed"], 0);
    assert_eq!(classic["tasks"][0]["name"], "loop task");
    assert!(classic["categories"]["explained_share"].as_f64().unwrap() >= 0.95);
    let mitogen = &report["modes"][1];
    assert!(
        mitogen["execs"]["mean"].as_f64().unwrap() < classic["execs"]["mean"].as_f64().unwrap(),
        "Mitogen spawns less"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| classic |") && md.contains("| mitogen |") && md.contains("loop task"));
    for f in ["flamegraph-classic.svg", "flamegraph-mitogen.svg", "flamegraph-diff-classic-mitogen.svg"] {
        assert!(std::fs::read_to_string(out.join(f)).unwrap().contains("<svg"), "{f}");
    }
    for f in ["timeline-classic.json", "timeline-mitogen.json"] {
        let t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(f)).unwrap()).unwrap();
        let events = t["traceEvents"].as_array().unwrap();
        assert!(events.iter().any(|e| e["ph"] == "X" && e["name"] == "loop task"), "{f}: task slice");
        assert!(events.iter().all(|e| e["ph"] != "X" || e["dur"].as_f64().is_some_and(|d| d >= 0.0)));
    }
}

#[test]
#[file_serial(ebpf)]
fn compare_persistent_modes_without_classic() {
    require_root!();
    let Some((_dir, out, report)) = compare(3, 1, "in-process,fork,persistent") else { return };
    let modes: Vec<&str> =
        report["modes"].as_array().unwrap().iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["in-process", "fork", "persistent"], "in the order asked for");
    for m in report["modes"].as_array().unwrap() {
        assert_eq!(m["unattributed"], 0, "{}", m["mode"]);
        // the command module execs `true` once per item, and nothing else runs a program
        assert_eq!(m["tasks"][0]["execs"], 3.0, "{}", m["mode"]);
    }
    // every picture the report names exists (no differential without a classic run)
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let named: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("Flamegraphs:") || l.starts_with("Timelines"))
        .flat_map(|l| l.rsplit_once(": ").unwrap().1.trim().trim_end_matches('.').split(", "))
        .collect();
    assert_eq!(named.len(), 6, "a flamegraph and a timeline per mode: {named:?}");
    for f in named {
        assert!(out.join(f.trim()).is_file(), "{f} is named in report.md but missing");
    }
}

#[test]
#[file_serial(ebpf)]
fn check_flags_exec_regressions() {
    require_root!();
    let Some(env) = default_env() else { return };
    let two = playbook(&env, &small_playbook(2), &inventory(&env), &[], &[]);
    let four = playbook(&env, &small_playbook(4), &inventory(&env), &[], &[]);
    let check = |trace: &Path, base: &Path, pct: &str| {
        common::spawntrace()
            .arg("check")
            .arg(trace)
            .arg("--baseline")
            .arg(base)
            .args(["--max-exec-increase", pct])
            .output()
            .unwrap()
    };
    let same = check(&two.run.trace_path(), &two.run.trace_path(), "0");
    assert!(same.status.success());
    let worse = check(&four.run.trace_path(), &two.run.trace_path(), "10");
    assert_eq!(worse.status.code(), Some(1));
    let text = String::from_utf8_lossy(&worse.stdout);
    assert!(text.contains("task \"loop task\""), "{text}");
    let better = check(&two.run.trace_path(), &four.run.trace_path(), "0");
    assert!(better.status.success(), "fewer execs is no regression");
    // Bad input: one clear line, exit 2.
    let bad = check(Path::new("/nonexistent"), &two.run.trace_path(), "0");
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&bad.stderr).trim().lines().count(), 1);
}
