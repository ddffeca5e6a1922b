//! spawntrace runs as root next to other users (SECURITY.md). Each test here is written as the
//! attacker: a real unprivileged user the test creates (common::TestUser) plants links, files or
//! names, then spawntrace runs as root through "sudo" (SUDO_UID/SUDO_GID, as sudo sets them),
//! and the test checks that nothing of root's was touched.
mod common;

use std::{os::unix::fs::MetadataExt as _, path::Path, process::Command};

use common::{TestUser, spawntrace};
use serial_test::file_serial;

/// A file only root can write, with known content: what the attacker wants overwritten.
fn victim(dir: &Path) -> std::path::PathBuf {
    let v = dir.join("victim");
    std::fs::write(&v, "precious\n").unwrap();
    v
}

fn assert_untouched(victim: &Path) {
    assert_eq!(std::fs::read_to_string(victim).unwrap(), "precious\n", "victim overwritten");
    let m = std::fs::metadata(victim).unwrap();
    assert_eq!((m.uid(), m.gid()), (0, 0), "victim chowned");
}

fn one_line_error(out: &std::process::Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(want), "want {want:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
#[file_serial(ebpf)]
fn a_planted_partial_link_does_not_redirect_roots_trace() {
    require_root!();
    let root_dir = tempfile::tempdir().unwrap();
    let victim = victim(root_dir.path());
    let attacker = TestUser::create("trace");
    let out = attacker.dir.join("x.jsonl");
    let plant = attacker.sh(&format!("ln -s {} {}.partial", victim.display(), out.display()));
    assert!(plant.status.success());
    let run = attacker.sudo_spawntrace().args(["-q", "-o"]).arg(&out).args(["--", "true"]).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_untouched(&victim);
    let m = std::fs::symlink_metadata(&out).unwrap();
    assert!(m.is_file());
    assert_eq!((m.uid(), m.gid()), (attacker.uid, attacker.gid), "the trace is the user's");
    spawntrace::trace::Trace::read(&out).unwrap().footer.expect("a complete trace");
}

#[test]
fn outputs_of_saved_traces_are_written_as_the_user() {
    require_root!();
    let root_dir = tempfile::tempdir().unwrap();
    let victim = victim(root_dir.path());
    let attacker = TestUser::create("render");
    let trace = attacker.dir.join("t.jsonl");
    std::fs::write(&trace, common::minimal_trace()).unwrap();
    for (args, name) in [
        (vec!["flamegraph", "t.jsonl", "-o", "f.svg"], "f.svg"),
        (vec!["flamegraph", "t.jsonl", "--folded", "-o", "f.txt"], "f.txt"),
        (vec!["timeline", "t.jsonl", "-o", "tl.json"], "tl.json"),
    ] {
        let target = attacker.dir.join(name);
        attacker.sh(&format!("ln -s {} {}.partial", victim.display(), target.display()));
        let out = attacker.sudo_spawntrace().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_untouched(&victim);
        assert_eq!(std::fs::metadata(&target).unwrap().uid(), attacker.uid, "{name} is the user's");
        // A target that is itself a link to root's file is refused, not replaced.
        std::fs::remove_file(&target).unwrap();
        attacker.sh(&format!("ln -s {} {}", victim.display(), target.display()));
        let out = attacker.sudo_spawntrace().args(&args).output().unwrap();
        one_line_error(&out, "it exists and is a symbolic link, not a regular file");
        assert_untouched(&victim);
    }
    // A directory the user cannot write is refused, as if they had written there themselves.
    let out = attacker
        .sudo_spawntrace()
        .args(["timeline", "t.jsonl", "-o"])
        .arg(root_dir.path().join("tl.json"))
        .output()
        .unwrap();
    one_line_error(&out, "Permission denied");
    assert!(!root_dir.path().join("tl.json").exists() && !root_dir.path().join("tl.json.partial").exists());
}

#[test]
#[file_serial(ebpf)]
fn a_directory_the_user_cannot_write_is_refused_before_the_command_runs() {
    require_root!();
    let root_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let attacker = TestUser::create("rootdir");
    let marker = attacker.dir.join("ran");
    let out = attacker
        .sudo_spawntrace()
        .arg("-o")
        .arg(root_dir.path().join("t.jsonl"))
        .args(["--", "touch"])
        .arg(&marker)
        .output()
        .unwrap();
    one_line_error(&out, "Permission denied");
    assert!(!marker.exists(), "the command ran");
    assert_eq!(std::fs::read_dir(root_dir.path()).unwrap().count(), 0);
}

#[test]
#[file_serial(ebpf)]
fn special_files_and_directories_are_never_replaced() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    // A device of our own (the null device's numbers): a broken build must not replace the
    // system's /dev/null while this test finds out.
    let device = dir.path().join("null");
    nix::sys::stat::mknod(
        &device,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    for (target, what) in
        [(device.as_path(), "is a device"), (fifo.as_path(), "is a FIFO"), (sub.as_path(), "is a directory")]
    {
        let out = spawntrace().arg("-o").arg(target).args(["--", "touch"]).arg(&marker).output().unwrap();
        one_line_error(&out, what);
        assert!(!marker.exists(), "{}: the command ran", target.display());
    }
    use std::os::unix::fs::FileTypeExt as _;
    assert!(std::fs::symlink_metadata(&device).unwrap().file_type().is_char_device());
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(!dir.path().join("sub.partial").exists(), "no DIR.partial left");
}

#[test]
#[file_serial(ebpf)]
fn the_plugin_directory_is_private_to_the_user() {
    require_root!();
    let user = TestUser::create("session");
    let out = user
        .sudo_spawntrace()
        .args([
            "-q",
            "--ansible",
            "always",
            "--",
            "sh",
            "-c",
            r#"stat -c '%a %u' "$(dirname "$SPAWNTRACE_SOCKET")""#,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("700 {}", user.uid));
}

#[test]
#[file_serial(ebpf)]
fn ambient_capabilities_are_not_passed_to_the_command() {
    require_root!();
    // spawntrace given CAP_BPF and CAP_PERFMON as ambient capabilities by an unprivileged user
    // (the way a service unit would): it can trace, the command must not inherit them.
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let bin = bin_dir.path().join("spawntrace");
    std::fs::copy(common::bin(), &bin).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=+bpf,+perfmon", "--ambient-caps=+bpf,+perfmon"])
        .arg(&bin)
        .args(["-q", "--", "grep", "-E", "^Cap(Eff|Prm|Amb):", "/proc/self/status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let caps = String::from_utf8_lossy(&out.stdout);
    assert_eq!(caps.lines().count(), 3, "{caps}");
    for line in caps.lines() {
        assert!(line.ends_with("0000000000000000"), "the command has capabilities: {caps}");
    }
}

#[test]
#[file_serial(ebpf)]
fn control_characters_in_exe_names_are_escaped() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("evil\x1b]0;owned\x07\x1b[2J");
    std::fs::copy("/bin/true", &evil).unwrap();
    let trace = dir.path().join("t.jsonl");
    let out = spawntrace().arg("-o").arg(&trace).arg("--").arg(&evil).output().unwrap();
    assert!(out.status.success());
    let report = spawntrace().arg("report").arg(&trace).output().unwrap();
    for text in [&out.stderr, &report.stdout] {
        let text = String::from_utf8_lossy(text);
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "raw control characters: {text:?}");
        assert!(text.contains("evil\\x1b]0;owned\\x07\\x1b[2J"), "{text}");
    }
}

#[test]
#[file_serial(ebpf)]
fn compare_writes_its_directory_as_the_user_and_refuses_planted_links_up_front() {
    require_root!();
    let root_dir = tempfile::tempdir().unwrap();
    let victim = victim(root_dir.path());
    let attacker = TestUser::create("compare");
    let out = attacker.dir.join("out");
    let compare = || {
        attacker
            .sudo_spawntrace()
            .args(["compare", "--runs", "1", "--modes", "classic", "-o"])
            .arg(&out)
            .args(["--", "true"])
            .output()
            .unwrap()
    };
    // A link at a final name is refused before any run.
    attacker.sh(&format!("mkdir {0} && ln -s {1} {0}/report.json", out.display(), victim.display()));
    let run = compare();
    one_line_error(&run, "report.json: it exists and is a symbolic link");
    assert!(!out.join("traces/classic-1.jsonl").exists(), "the command ran before the refusal");
    assert!(!out.join("logs/classic-1.log").exists(), "the command ran before the refusal");
    // Links at the partial names are replaced, never followed; everything is the user's.
    attacker.sh(&format!(
        "rm {0}/report.json; for f in report.json report.md flamegraph-classic.svg; do ln -s {1} {0}/$f.partial; done",
        out.display(),
        victim.display()
    ));
    let run = compare();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_untouched(&victim);
    let mut seen = 0;
    for dir in [out.clone(), out.join("traces"), out.join("logs")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let m = std::fs::symlink_metadata(e.unwrap().path()).unwrap();
            assert_eq!(m.uid(), attacker.uid);
            seen += 1;
        }
    }
    assert!(seen >= 8, "{seen} files");
}

#[test]
fn compare_asks_the_commands_python_about_mitogen_as_the_user_in_isolation() {
    require_root!();
    // The playbook repository (the current directory) holds an `ansible_mitogen` package: a
    // Python run as root from there with `-c` would import it.
    let attacker = TestUser::create("mitogen");
    let marker = attacker.dir.join("imported-as");
    let script = format!(
        "mkdir ansible_mitogen && printf 'import os\\nopen(\"{}\", \"a\").write(\"%d\\\\n\" % os.getuid())\\n' > ansible_mitogen/__init__.py \
         && printf '#!/usr/bin/python3\\n' > ansible-playbook && chmod 755 ansible-playbook",
        marker.display()
    );
    let plant = attacker.sh(&format!("cd {} && {script}", attacker.dir.display()));
    assert!(plant.status.success(), "{}", String::from_utf8_lossy(&plant.stderr));
    let out = attacker
        .sudo_spawntrace()
        .args(["compare", "--runs", "1", "--modes", "mitogen", "-o", "out", "--", "./ansible-playbook"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mode can run here"));
    let imported = std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(!imported.lines().any(|l| l == "0"), "the user's ansible_mitogen ran as root");
}

#[test]
fn saved_traces_are_read_as_the_user() {
    require_root!();
    let root_dir = tempfile::tempdir().unwrap();
    let secret = root_dir.path().join("root-only.jsonl");
    std::fs::write(&secret, common::minimal_trace()).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let user = TestUser::create("reader");
    for args in [
        vec!["report".as_ref(), secret.as_os_str()],
        vec!["timeline".as_ref(), secret.as_os_str(), "-o".as_ref(), "t.json".as_ref()],
        vec!["flamegraph".as_ref(), secret.as_os_str(), "-o".as_ref(), "f.svg".as_ref()],
        vec!["check".as_ref(), secret.as_os_str(), "--baseline".as_ref(), secret.as_os_str()],
    ] {
        let out = user.sudo_spawntrace().args(&args).output().unwrap();
        one_line_error(&out, "Permission denied");
    }
    assert_eq!(std::fs::read_dir(&user.dir).unwrap().count(), 0, "nothing was written");
}

#[test]
fn root_does_not_write_into_another_users_directory() {
    require_root!();
    // root's own run (no sudo) with -o a directory another user made first (in /tmp, say):
    // its entries could be swapped for links while root writes into it.
    let attacker = TestUser::create("outdir");
    let out = attacker.dir.join("cmp");
    attacker.sh(&format!("mkdir -m 777 {}", out.display()));
    let run = spawntrace()
        .args(["compare", "--runs", "1", "--modes", "classic", "-o"])
        .arg(&out)
        .args(["--", "true"])
        .output()
        .unwrap();
    one_line_error(&run, &format!("belongs to uid {}, not 0", attacker.uid));
}

/// The traced command asks spawntrace to "record a target" with a command of its choosing: it
/// runs with the user's credentials and groups, none of spawntrace's capabilities, environment
/// or files, from `/`, never as root.
#[test]
#[file_serial(ebpf)]
fn a_target_request_runs_its_command_as_the_user_only() {
    require_root!();
    let root_dir = tempfile::tempdir().unwrap();
    let victim = victim(root_dir.path());
    let attacker = TestUser::create("target");
    let witness = attacker.dir.join("witness");
    // the "ssh command" writes who ran it, with what, where, then tries root's file
    let command = format!(
        "{{ id -u; id -G; pwd; grep -E '^Cap(Eff|Prm|Amb):' /proc/self/status; ls -l /proc/self/fd | grep -c -e anon_inode -e socket -e jsonl; env | sort; }} > {w}; echo pwned > {v}",
        w = witness.display(),
        v = victim.display()
    );
    // the user's own "ssh": a script of theirs (spawntrace passes it ssh options it ignores)
    let fake_ssh = attacker.dir.join("ssh");
    std::fs::write(&fake_ssh, format!("#!/bin/sh\n{command}\n")).unwrap();
    std::fs::set_permissions(&fake_ssh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&fake_ssh, Some(attacker.uid), Some(attacker.gid)).unwrap();
    let fake_ssh = fake_ssh.display().to_string();
    let script = format!(
        r#"
import json, os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["SPAWNTRACE_TARGET_SOCKET"])
s.sendall(json.dumps({{"target": "me@nowhere:22", "argv": [{fake_ssh:?}], "control_master": True,
                       "env": {{"SSH_AUTH_SOCK": "/agent", "PATH": "/usr/bin:/bin"}}}}).encode() + b"\n")
print(s.makefile().readline().strip())
"#
    );
    let run = attacker
        .sudo_spawntrace()
        .env("SECRET_OF_ROOTS_ENV", "1")
        .args(["-q", "--ansible", "always", "--", "/usr/bin/python3", "-c", &script])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let answer = String::from_utf8_lossy(&run.stdout);
    assert!(answer.contains(r#""recording":false"#), "{answer}");
    assert_untouched(&victim);
    let seen = std::fs::read_to_string(&witness)
        .unwrap_or_else(|e| panic!("the command did not run ({e}); spawntrace answered {answer}"));
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], attacker.uid.to_string(), "{seen}");
    assert!(lines[1].split_whitespace().all(|g| g != "0"), "root's group: {seen}");
    assert_eq!(lines[2], "/", "{seen}");
    for cap in &lines[3..6] {
        assert!(cap.ends_with("0000000000000000"), "capabilities passed on: {seen}");
    }
    // only its own pipes and files: none of spawntrace's maps, sockets or trace
    assert_eq!(lines[6].trim(), "0", "spawntrace's descriptors leaked: {seen}");
    // the environment is the one the request carried (the user's own), nothing of root's
    let env: Vec<&str> = lines[7..].iter().map(|l| l.split('=').next().unwrap()).collect();
    assert!(
        !env.contains(&"SECRET_OF_ROOTS_ENV") && !env.contains(&"SUDO_UID"),
        "root's environment: {env:?}"
    );
    assert!(seen.contains("SSH_AUTH_SOCK=/agent"), "{seen}");
    let m = std::fs::metadata(&witness).unwrap();
    assert_eq!(m.uid(), attacker.uid, "written by the user");
}
