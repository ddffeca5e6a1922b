//! The flamegraphs a person looks at, rendered by a real browser (headless Chromium): the SVG
//! loads, has a frame per task, and its search and zoom script runs. The screenshot is kept in
//! target/test-artifacts/.
mod common;

use std::{path::Path, process::Command};

use common::ansible::{default_env, playbook};
use serial_test::file_serial;

const PLAYBOOK: &str = r#"
- name: render play
  hosts: targets
  gather_facts: false
  tasks:
    - name: alpha task
      ansible.builtin.command: "true {{ item }}"
      loop: [1, 2]
    - name: beta task
      ansible.builtin.command: "true"
"#;

/// Runs headless Chromium on `url` with the flags that work on this closed network.
fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium is installed by `cargo xtask setup`")
}

#[test]
#[file_serial(ebpf)]
fn flamegraph_renders_with_task_frames_search_and_zoom() {
    require_root!();
    let Some(env) = default_env() else { return };
    let python = env.join(".venv/bin/python");
    let pb = playbook(
        &env,
        PLAYBOOK,
        &format!("[targets]\nh1 ansible_connection=local ansible_python_interpreter={}\n", python.display()),
        &[],
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("flame.svg");
    let out =
        common::spawntrace().arg("flamegraph").arg(pb.run.trace_path()).arg("-o").arg(&svg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let url = format!("file://{}", svg.display());

    // Search through the URL (`?s=`): the script highlights matches and reports their share.
    let dom = chromium(&["--dump-dom"], &format!("{url}?s=true"));
    let dom = String::from_utf8_lossy(&dom.stdout);
    for task in ["alpha task", "beta task"] {
        assert!(dom.contains(&format!("<title>{task} (")), "no frame for {task}");
    }
    let matched = dom
        .split("id=\"matched\"")
        .nth(1)
        .and_then(|s| s.split("Matched: ").nth(1))
        .and_then(|s| s.split('%').next())
        .unwrap_or("");
    assert!(matched.parse::<f64>().is_ok_and(|m| m > 0.0), "search did not run: {matched:?}");

    // Zoom through the URL (`?x=&y=` of a frame): the script shows the "Reset Zoom" button.
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    let frame = svg_text.split("<title>alpha task (").nth(1).expect("alpha frame");
    let attr =
        |name: &str| frame.split(&format!(" {name}=\"")).nth(1).and_then(|s| s.split('"').next()).unwrap();
    let zoomed = chromium(&["--dump-dom"], &format!("{url}?x={}&y={}", attr("fg:x"), attr("y")));
    let zoomed = String::from_utf8_lossy(&zoomed.stdout);
    let unzoom = zoomed.split("id=\"unzoom\"").nth(1).and_then(|s| s.split('>').next()).unwrap_or("");
    assert!(!unzoom.contains("hide"), "zoom did not run: {unzoom}");

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("flamegraph.png");
    let _ = std::fs::remove_file(&png);
    let shot = chromium(&[&format!("--screenshot={}", png.display()), "--window-size=1200,600"], &url);
    assert!(shot.status.success());
    assert!(std::fs::metadata(&png).is_ok_and(|m| m.len() > 10_000), "screenshot missing or empty");
}
