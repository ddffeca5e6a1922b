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
