//! `cargo xtask bench …`: side-by-side measurements printed as ratios from one run (the machine
//! is shared and noisy, so nothing here is compared with a stored number).
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{root, run};

/// The exec/exit storm: `count` short-lived /bin/true processes from `threads` spawner threads.
pub fn storm(count: usize, threads: usize) -> Result<()> {
    let per = count.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<()> {
                for _ in 0..per {
                    Command::new("/bin/true").status()?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().expect("spawner thread")?;
    }
    Ok(())
}

/// Traced vs untraced exec storm, alternating `rounds` times.
pub fn tracer(count: usize, rounds: usize) -> Result<()> {
    run(Command::new("cargo")
        .args(["build", "--release", "-p", "tracer", "-p", "xtask"])
        .current_dir(root()))?;
    let bin = root().join("target/release");
    let spawntrace = bin.join("spawntrace");
    let xtask = bin.join("xtask");
    let tmp = std::env::temp_dir().join(format!("spawntrace-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let storm_args =
        ["storm".to_owned(), "--count".into(), count.to_string(), "--threads".into(), "2".into()];
    let mut traced = Vec::new();
    let mut untraced = Vec::new();
    let mut rates = Vec::new();
    let mut drops = 0;
    for round in 0..rounds {
        let t = time(Command::new(&xtask).args(&storm_args).env_remove("LD_LIBRARY_PATH"))?;
        untraced.push(t);
        let trace = tmp.join(format!("storm-{round}.jsonl"));
        let mut cmd = Command::new(&spawntrace);
        cmd.args(["-q", "-o"]).arg(&trace).arg("--").arg(&xtask).env_remove("LD_LIBRARY_PATH");
        let t = time(cmd.args(&storm_args))?;
        traced.push(t);
        let (execs, events, dropped) = trace_counts(&trace)?;
        if execs != count as u64 + 1 {
            bail!("round {round}: the trace holds {execs} execs, expected {}", count + 1);
        }
        drops += dropped;
        rates.push((events as f64 / t.as_secs_f64(), execs as f64 / t.as_secs_f64()));
        eprintln!(
            "round {}: untraced {:.2} s, traced {:.2} s, {} events, {} dropped",
            round + 1,
            untraced[round].as_secs_f64(),
            t.as_secs_f64(),
            events,
            dropped
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let (tm, ts) = mean_sd(&traced);
    let (um, us) = mean_sd(&untraced);
    let ev = rates.iter().map(|r| r.0).sum::<f64>() / rates.len() as f64;
    let ex = rates.iter().map(|r| r.1).sum::<f64>() / rates.len() as f64;
    println!(
        "bench tracer: exec storm of {count} × /bin/true, {rounds} rounds, traced and untraced alternating"
    );
    println!("  untraced wall  {um:.3} ± {us:.3} s");
    println!("  traced wall    {tm:.3} ± {ts:.3} s");
    println!("  traced/untraced wall ratio  {:.3}", tm / um);
    println!("  traced rate    {ex:.0} exec/s, {ev:.0} events/s");
    println!("  dropped events {drops}");
    Ok(())
}

fn time(cmd: &mut Command) -> Result<Duration> {
    let start = Instant::now();
    let status = cmd.status().with_context(|| format!("running {}", crate::util::show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", crate::util::show(cmd));
    }
    Ok(start.elapsed())
}

/// (execs, events, dropped events) from a trace file, via `spawntrace report --format json`.
fn trace_counts(trace: &Path) -> Result<(u64, u64, u64)> {
    let out = Command::new(root().join("target/release/spawntrace"))
        .args(["report", "--format", "json"])
        .arg(trace)
        .output()?;
    if !out.status.success() {
        bail!("report failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok((n("execs"), n("events"), n("dropped_events")))
}

pub fn mean_sd(xs: &[Duration]) -> (f64, f64) {
    let v: Vec<f64> = xs.iter().map(Duration::as_secs_f64).collect();
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    (m, var.sqrt())
}

/// A playbook with the benchmark's task count, every task a `debug`: Ansible's own floor.
fn floor_playbook(count: usize) -> String {
    format!(
        "- name: Controller floor\n  hosts: benchmark_targets\n  gather_facts: false\n  tasks:\n\
         \x20   - ansible.builtin.debug: {{msg: start}}\n\
         \x20   - ansible.builtin.debug: {{msg: \"{{{{ item }}}}\"}}\n      loop: \"{{{{ range({count}) | list }}}}\"\n\
         \x20   - ansible.builtin.debug: {{msg: \"{{{{ item }}}}\"}}\n      loop: \"{{{{ range({count}) | list }}}}\"\n\
         \x20   - ansible.builtin.debug: {{msg: end}}\n"
    )
}

/// `ansible_mitogen/plugins/strategy` in the environment, if Mitogen is installed there.
fn mitogen_strategy(env: &Path) -> Option<std::path::PathBuf> {
    let out = Command::new(env.join(".venv/bin/python"))
        .args(["-c", "import os, ansible_mitogen; print(os.path.dirname(ansible_mitogen.__file__))"])
        .output()
        .ok()?;
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("plugins/strategy");
    (out.status.success() && dir.is_dir()).then_some(dir)
}

/// A test host for `bench runner --ssh`: sshd in a network namespace (the tests' lab,
/// tests/lab), whose login user may sudo (to record the target); its error says what is
/// missing.
fn ssh_lab() -> Result<sshlab::Lab> {
    sshlab::Lab::start_with_sudo(1, "benchmark_targets")
}

/// A traced run of the benchmark with spawntrace `flags` and `vars`, written to `trace`: its
/// `report --format json`, or None when the run failed.
fn traced_report(
    spawntrace: &Path,
    flags: &[&str],
    vars: &[EnvVar],
    playbook: &Path,
    inv: &[std::ffi::OsString],
    extra: &str,
    trace: &Path,
) -> Result<Option<serde_json::Value>> {
    let mut cmd = Command::new(spawntrace);
    cmd.arg("-q").args(flags).arg("-o").arg(trace).arg("--").arg(playbook).args(inv);
    cmd.args(["playbooks/bench.yml", "-e", extra]).current_dir(root());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let status = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status();
    if !status.is_ok_and(|s| s.success()) {
        return Ok(None);
    }
    let out = Command::new(spawntrace).args(["report", "--format", "json"]).arg(trace).output()?;
    Ok(Some(serde_json::from_slice(&out.stdout)?))
}

/// An environment variable for a traced run.
type EnvVar = (&'static str, std::ffi::OsString);

/// `sh 4, python3 2` from an executable -> execs object, most first.
fn top_execs(by_exe: &serde_json::Value) -> String {
    let mut v: Vec<(&String, u64)> =
        by_exe.as_object().into_iter().flatten().map(|(k, n)| (k, n.as_u64().unwrap_or(0))).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v.iter().take(5).map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
}

/// The seed benchmark (`count` copy + `count` lineinfile) in each execution mode, interleaved
/// `runs` times: classic, persistent (isolation auto), in-process, fork, Mitogen, ansible-core's
/// bound and the controller floor; against
/// localhost, or with `ssh` against sshd in a network namespace.
pub fn runner(count: usize, runs: usize, ssh: bool) -> Result<()> {
    run(Command::new("cargo").args(["build", "--release", "-p", "tracer"]).current_dir(root()))?;
    if ssh {
        // what the traced runs ship to the target
        crate::install::install_static_build(&crate::install::dev_static_build()?)?;
    }
    let spawntrace = root().join("target/release/spawntrace");
    let env = crate::setup::default_env()?;
    let playbook = env.join(".venv/bin/ansible-playbook");
    let lab = if ssh { Some(ssh_lab()?) } else { None };
    let inventory = lab.as_ref().map(|l| l.inventory.clone());
    let target = match &lab {
        Some(l) => format!(
            "over ssh to {}@{} (sshd in network namespace {})",
            l.user, l.hosts[0].addr, l.hosts[0].netns
        ),
        None => "against localhost".to_owned(),
    };
    let tmp = std::env::temp_dir().join(format!("spawntrace-bench-runner-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let floor = tmp.join("floor.yml");
    std::fs::write(&floor, floor_playbook(count))?;
    let extra = format!("bench_count={count}");
    let inv: Vec<std::ffi::OsString> = match &inventory {
        Some(i) => vec!["-i".into(), i.clone().into_os_string()],
        None => Vec::new(),
    };
    // `ansible-playbook [-i inventory] PLAYBOOK -e bench_count=N` in the checkout, started through
    // `spawntrace ARGS...` when `through` is given
    let ansible = |through: Option<&[&str]>, pb: &Path| {
        let mut cmd = match through {
            Some(args) => {
                let mut c = Command::new(&spawntrace);
                c.args(args).arg(&playbook);
                c
            }
            None => Command::new(&playbook),
        };
        cmd.args(&inv).arg(pb).args(["-e", &extra]).current_dir(root());
        cmd
    };
    let bench_yml = Path::new("playbooks/bench.yml");
    let mut modes: Vec<(&str, Command)> = vec![
        ("classic", ansible(None, bench_yml)),
        ("persistent", ansible(Some(&["run", "--persistent", "--"]), bench_yml)),
        ("in-process", ansible(Some(&["run", "--persistent", "--isolation", "in-process", "--"]), bench_yml)),
        ("fork", ansible(Some(&["run", "--persistent", "--isolation", "fork", "--"]), bench_yml)),
    ];
    match mitogen_strategy(&env) {
        Some(dir) => {
            let mut m = ansible(None, bench_yml);
            m.env("ANSIBLE_STRATEGY_PLUGINS", dir).env("ANSIBLE_STRATEGY", "mitogen_linear");
            modes.push(("mitogen", m));
        }
        None => eprintln!("bench runner: Mitogen not installed in {}: skipped", env.display()),
    }
    // ansible-core's own work with every module answered at once (tracer/python/bench): the
    // least any runner behind a connection plugin can take
    let mut bound = ansible(None, bench_yml);
    bound.env("ANSIBLE_CONNECTION_PLUGINS", root().join("tracer/python/bench/connection"));
    modes.push(("bound", bound));
    modes.push(("floor", ansible(None, &floor)));

    let mut walls: Vec<Vec<Duration>> = vec![Vec::new(); modes.len()];
    let mut failed: Vec<Option<String>> = vec![None; modes.len()];
    for r in 0..runs {
        for (i, (name, cmd)) in modes.iter_mut().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
            match time(cmd) {
                Ok(t) => {
                    eprintln!("run {}/{runs}: {name} {:.2} s", r + 1, t.as_secs_f64());
                    walls[i].push(t);
                }
                Err(e) => {
                    eprintln!("bench runner: {name} failed, left out: {e:#}");
                    failed[i] = Some(format!("{e:#}"));
                }
            }
        }
    }
    println!("bench runner: {count} copy + {count} lineinfile {target}, {runs} interleaved run(s)");
    let mean = |i: usize| (!walls[i].is_empty()).then(|| mean_sd(&walls[i]).0);
    for (i, (name, _)) in modes.iter().enumerate() {
        match (mean(i), &failed[i]) {
            (Some(_), _) => {
                let (m, s) = mean_sd(&walls[i]);
                println!("  {name:<11} {m:8.2} ± {s:.2} s");
            }
            (None, Some(e)) => println!("  {name:<11} failed: {e}"),
            (None, None) => {}
        }
    }
    let by_name = |n: &str| modes.iter().position(|(m, _)| *m == n).and_then(mean);
    let ratio = |a: &str, b: &str| match (by_name(a), by_name(b)) {
        (Some(x), Some(y)) => format!("{:.2}", x / y),
        _ => "n/a".into(),
    };
    println!(
        "  classic/persistent {}   bound/floor {}",
        ratio("classic", "persistent"),
        ratio("bound", "floor")
    );
    // issue 12's targets (persistent: the default isolation, auto)
    for (a, b, target) in [
        ("persistent", "mitogen", 0.90),
        ("in-process", "mitogen", 0.75),
        ("fork", "mitogen", 1.0),
        ("persistent", "bound", 1.3),
    ] {
        println!("  {a}/{b} {}   (target ≤ {target:.2})", ratio(a, b));
    }
    // Execs per module task of a traced run of each mode, as the kernel saw them; over ssh, on
    // the target too (recorded there through the run's ControlMaster).
    let mut traced_modes: Vec<(&str, Vec<&str>, Vec<EnvVar>)> = vec![
        ("persistent", vec!["--persistent"], vec![]),
        ("in-process", vec!["--persistent", "--isolation", "in-process"], vec![]),
        ("fork", vec!["--persistent", "--isolation", "fork"], vec![]),
    ];
    if ssh {
        traced_modes.insert(0, ("classic", vec![], vec![]));
        if let Some(dir) = mitogen_strategy(&env) {
            traced_modes.push((
                "mitogen",
                vec![],
                vec![
                    ("ANSIBLE_STRATEGY_PLUGINS", dir.into_os_string()),
                    ("ANSIBLE_STRATEGY", "mitogen_linear".into()),
                ],
            ));
        }
    }
    for (name, flags, vars) in &traced_modes {
        let trace = tmp.join(format!("{name}.jsonl"));
        let Some(v) = traced_report(&spawntrace, flags, vars, &playbook, &inv, &extra, &trace)? else {
            println!("  {name} execs per task: the traced run failed");
            continue;
        };
        for t in v["tasks"].as_array().into_iter().flatten() {
            let on_target = match &t["target"] {
                serde_json::Value::Null => String::new(),
                target => format!(
                    "; on the target {} execs ({}), {:.1} ms CPU",
                    target["execs"],
                    top_execs(&target["execs_by_exe"]),
                    target["cpu_ms"].as_f64().unwrap_or(0.0)
                ),
            };
            println!(
                "  {name} execs in {:?} ({}): {} over {} item(s){on_target}",
                t["name"].as_str().unwrap_or(""),
                t["action"].as_str().unwrap_or(""),
                t["execs"],
                t["items"]
            );
        }
        // where each module task's worker time went (over ssh, the target's processes take over
        // from the ssh that carried them): the share in named categories, and the largest
        for t in v["categories"]["tasks"].as_array().into_iter().flatten() {
            let mut shares: Vec<(&str, f64)> = t["categories"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(c, s)| (c.as_str(), s["share"].as_f64().unwrap_or(0.0)))
                .collect();
            shares.sort_by(|a, b| b.1.total_cmp(&a.1));
            let other = shares.iter().find(|(c, _)| *c == "other").map_or(0.0, |(_, s)| *s);
            let top: Vec<String> =
                shares.iter().take(4).map(|(c, s)| format!("{c} {:.0}%", s * 100.0)).collect();
            println!(
                "  {name} wall time of {:?}: {:.1}% in named categories ({})",
                t["name"].as_str().unwrap_or(""),
                (1.0 - other) * 100.0,
                top.join(", ")
            );
        }
        println!("  {name} unattributed processes: {}", v["outside_tasks"]["unattributed"]);
        for t in v["targets"].as_array().into_iter().flatten() {
            match t["reason"].as_str() {
                Some(why) => {
                    println!("  {name} target {}: not recorded: {why}", t["target"].as_str().unwrap_or(""))
                }
                None => println!(
                    "  {name} target {}: {} processes ({} agent, {} unattributed), {} execs; recorder started in {:.2} s",
                    t["target"].as_str().unwrap_or(""),
                    t["processes"],
                    t["agent"],
                    t["unattributed"],
                    t["execs"],
                    t["recorder_start_ms"].as_f64().unwrap_or(0.0) / 1000.0
                ),
            }
        }
    }
    if ssh {
        // The target side's own cost: classic runs traced with and without the targets
        // recorded, interleaved; and the recorders' CPU.
        let mut with = Vec::new();
        let mut without = Vec::new();
        let mut recorder_cpu_ms = Vec::new();
        for r in 0..runs {
            for (targets, walls) in [("record", &mut with), ("skip", &mut without)] {
                let trace = tmp.join(format!("overhead-{targets}-{r}.jsonl"));
                let flags = ["--targets", targets];
                let start = Instant::now();
                let report = traced_report(&spawntrace, &flags, &[], &playbook, &inv, &extra, &trace)?;
                walls.push(start.elapsed());
                if let (Some(v), "record") = (report, targets) {
                    let cpu: f64 = v["targets"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|t| t["recorder_cpu_ms"].as_f64())
                        .sum();
                    recorder_cpu_ms.push(cpu);
                }
            }
        }
        let (w, _) = mean_sd(&with);
        let (wo, _) = mean_sd(&without);
        let cpu = recorder_cpu_ms.iter().sum::<f64>() / recorder_cpu_ms.len().max(1) as f64;
        println!(
            "  target recording (classic, traced): {w:.2} s with, {wo:.2} s without: {:.2}x; recorder CPU {cpu:.0} ms per run",
            w / wo
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// One run of a mode at inventory scale.
struct ScaleSample {
    wall: Duration,
    /// user + system seconds of ansible-playbook and every process it waited for (workers, ssh
    /// clients, and in classic local runs the modules; not the detached agents)
    controller_cpu: f64,
    /// user + system seconds of the whole machine (the targets' sshd, agents, modules too)
    machine_cpu: f64,
    /// peak total RSS of the long-lived runners: spawntrace agents (with their zygotes and
    /// runners) or Mitogen's contexts
    agents_rss: u64,
}

/// CPU seconds of the whole machine (all CPUs, busy states) since boot.
fn machine_cpu() -> Result<f64> {
    use procfs::CurrentSI as _;
    let t = procfs::KernelStats::current()?.total;
    let ticks =
        t.user + t.nice + t.system + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0) + t.steal.unwrap_or(0);
    Ok(ticks as f64 / procfs::ticks_per_second() as f64)
}

/// Total RSS of the processes whose command line names a spawntrace agent or Mitogen.
fn agents_rss() -> u64 {
    let page = procfs::page_size();
    let Ok(all) = procfs::process::all_processes() else { return 0 };
    all.flatten()
        .filter(|p| {
            p.cmdline()
                .is_ok_and(|c| c.iter().any(|a| a.contains("<spawntrace agent") || a.contains("mitogen")))
        })
        .filter_map(|p| p.statm().ok())
        .map(|m| m.resident * page)
        .sum()
}

fn children_cpu() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN);
    u.map(|u| {
        let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        s(u.user_time()) + s(u.system_time())
    })
    .unwrap_or(0.0)
}

fn measure_scale(cmd: &mut Command) -> Result<ScaleSample> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(agents_rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let (cpu0, machine0) = (children_cpu(), machine_cpu()?);
    let wall = time(cmd);
    let (cpu1, machine1) = (children_cpu(), machine_cpu()?);
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    Ok(ScaleSample {
        wall: wall?,
        controller_cpu: cpu1 - cpu0,
        machine_cpu: machine1 - machine0,
        agents_rss: peak.load(Ordering::Relaxed),
    })
}

/// Inventory scale: playbooks/bench.yml (`count` copies and edits per host) on `local_hosts`
/// local "hosts" (connection local, distinct inventory names) and on `ssh_hosts` hosts over ssh
/// (an sshd each in its own network namespace), forks 10, in classic, persistent and Mitogen
/// modes, interleaved `runs` times: wall, controller CPU, the machine's CPU and the agents'
/// peak total RSS.
pub fn scale(local_hosts: usize, ssh_hosts: usize, count: usize, runs: usize) -> Result<()> {
    run(Command::new("cargo").args(["build", "--release", "-p", "tracer"]).current_dir(root()))?;
    let spawntrace = root().join("target/release/spawntrace");
    let env = crate::setup::default_env()?;
    let playbook = env.join(".venv/bin/ansible-playbook");
    let mitogen = mitogen_strategy(&env);
    if mitogen.is_none() {
        eprintln!("bench scale: Mitogen not installed in {}: skipped", env.display());
    }
    let tmp = tempfile::tempdir()?;
    let mut inventories: Vec<(String, std::path::PathBuf)> = Vec::new();
    if local_hosts > 0 {
        let python = env.join(".venv/bin/python");
        let mut ini = String::from("[benchmark_targets]\n");
        for i in 1..=local_hosts {
            ini += &format!(
                "h{i:02} ansible_connection=local ansible_python_interpreter={}\n",
                python.display()
            );
        }
        let path = tmp.path().join("local.ini");
        std::fs::write(&path, ini)?;
        inventories.push((format!("{local_hosts} local hosts"), path));
    }
    let lab = if ssh_hosts > 0 { Some(sshlab::Lab::start(ssh_hosts, "benchmark_targets")?) } else { None };
    if let Some(lab) = &lab {
        inventories.push((format!("{ssh_hosts} hosts over ssh"), lab.inventory.clone()));
    }
    let extra = format!("bench_count={count}");
    for (what, inventory) in &inventories {
        let ansible = |through: Option<&[&str]>| {
            let mut cmd = match through {
                Some(args) => {
                    let mut c = Command::new(&spawntrace);
                    c.args(args).arg(&playbook);
                    c
                }
                None => Command::new(&playbook),
            };
            cmd.arg("-i").arg(inventory).args(["--forks", "10", "playbooks/bench.yml", "-e", &extra]);
            cmd.current_dir(root()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
            cmd
        };
        let mut modes: Vec<(&str, Command)> =
            vec![("classic", ansible(None)), ("persistent", ansible(Some(&["run", "--persistent", "--"])))];
        if let Some(dir) = &mitogen {
            let mut m = ansible(None);
            m.env("ANSIBLE_STRATEGY_PLUGINS", dir).env("ANSIBLE_STRATEGY", "mitogen_linear");
            modes.push(("mitogen", m));
        }
        let mut samples: Vec<Vec<ScaleSample>> = modes.iter().map(|_| Vec::new()).collect();
        for r in 0..runs {
            for (i, (name, cmd)) in modes.iter_mut().enumerate() {
                let s = measure_scale(cmd).with_context(|| format!("{what}: {name}"))?;
                eprintln!("{what}, run {}/{runs}: {name} {:.2} s", r + 1, s.wall.as_secs_f64());
                samples[i].push(s);
                // the agents end with the playbook: let them go before the next mode's sample
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        println!(
            "bench scale: {count} copy + {count} lineinfile per host, {what}, forks 10, {runs} interleaved run(s)"
        );
        println!(
            "  {:<11} {:>8} {:>16} {:>13} {:>17}",
            "mode", "wall s", "controller CPU s", "machine CPU s", "agents' RSS MiB"
        );
        let avg = |xs: &[ScaleSample], f: &dyn Fn(&ScaleSample) -> f64| {
            xs.iter().map(f).sum::<f64>() / xs.len() as f64
        };
        for ((name, _), xs) in modes.iter().zip(&samples) {
            println!(
                "  {name:<11} {:>8.2} {:>16.2} {:>13.2} {:>17.1}",
                avg(xs, &|s| s.wall.as_secs_f64()),
                avg(xs, &|s| s.controller_cpu),
                avg(xs, &|s| s.machine_cpu),
                avg(xs, &|s| s.agents_rss as f64 / (1 << 20) as f64),
            );
        }
        let wall = |n: &str| {
            modes.iter().position(|(m, _)| *m == n).map(|i| avg(&samples[i], &|s| s.wall.as_secs_f64()))
        };
        if let (Some(p), Some(m)) = (wall("persistent"), wall("mitogen")) {
            println!(
                "  persistent/mitogen {:.2}   classic/persistent {:.2}",
                p / m,
                wall("classic").unwrap_or(f64::NAN) / p
            );
        }
    }
    Ok(())
}
