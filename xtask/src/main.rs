//! spawntrace's tasks: `cargo xtask setup | lint | test | demo | install | integration | bench tracer|runner`.
mod bench;
mod install;
mod integration;
mod setup;
mod util;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use util::{root, run};

#[derive(Parser)]
#[command(about = "spawntrace's set-up, tests, benchmarks and demo")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything a fresh machine needs (idempotent).
    Setup,
    /// The lint gate: rustfmt, clippy with warnings denied (default members, all targets, and
    /// the eBPF crate for its bpf target), ruff check and ruff format for the Python (the
    /// collection, its tests and the test lab).
    Lint,
    /// Set up, run the lint gate, then every test: Rust (default members, including eBPF and
    /// ansible-playbook ones), pytest, and ansible-core's integration targets classic vs
    /// persistent.
    Test,
    /// Set up, build, and compare classic, persistent and Mitogen runs of the benchmark
    /// playbook (the main job).
    Demo {
        /// Traced runs per mode.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Files per loop in playbooks/bench.yml.
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
    /// Build the release binary and install it as PREFIX/bin/spawntrace (where sudo finds it)
    /// with its bash, zsh and fish completions and man pages.
    Install {
        /// Where it goes: PREFIX/bin, PREFIX/share/man, PREFIX/share/<shell completions>.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Staging root put before every installed path (as make's DESTDIR), for packaging.
        #[arg(long)]
        destdir: Option<PathBuf>,
    },
    /// ansible-core's integration targets (copy, lineinfile, file, stat, command_shell,
    /// unarchive, find, slurp from its sdist) classic and persistent, side by side, each run on
    /// a throw-away root; fails when persistent ends differently.
    Integration {
        /// Environments (`core-2.16`, …) to run on instead of the oldest and the newest.
        #[arg(long = "env")]
        envs: Vec<String>,
        /// Targets to run instead of the default eight.
        targets: Vec<String>,
    },
    /// Benchmarks that print side-by-side ratios.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// (internal) The exec storm workload used by `bench tracer`.
    #[command(hide = true)]
    Storm {
        #[arg(long, default_value_t = 20000)]
        count: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// The seed playbook in classic, persistent (isolation auto), in-process, fork and Mitogen modes, its lower bound (every module answered at once) and the controller floor.
    Runner {
        /// Files per loop in playbooks/bench.yml.
        #[arg(long, default_value_t = 200)]
        count: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Against a real sshd in a network namespace instead of localhost.
        #[arg(long)]
        ssh: bool,
    },
    /// Inventory scale: the seed playbook on many local hosts and many hosts over ssh (forks 10), classic, persistent and Mitogen: wall, controller and machine CPU, the agents' RSS.
    Scale {
        /// Local "hosts" (connection local, distinct inventory names); 0 skips them.
        #[arg(long, default_value_t = 50)]
        local_hosts: usize,
        /// Hosts over ssh (an sshd each in its own network namespace); 0 skips them.
        #[arg(long, default_value_t = 20)]
        ssh_hosts: usize,
        /// Files per loop in playbooks/bench.yml, per host.
        #[arg(long, default_value_t = 10)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// Exec/exit storm traced vs untraced: events/s, drops, wall ratio.
    Tracer {
        #[arg(long, default_value_t = 20000)]
        count: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Lint => setup::setup().and_then(|()| lint()),
        Cmd::Test => test(),
        Cmd::Demo { runs, count } => demo(runs, count),
        Cmd::Install { prefix, destdir } => install::install(&prefix, destdir.as_deref()),
        Cmd::Integration { envs, targets } => integration::integration(&envs, &targets),
        Cmd::Bench { which: Bench::Tracer { count, rounds } } => bench::tracer(count, rounds),
        Cmd::Bench { which: Bench::Runner { count, runs, ssh } } => bench::runner(count, runs, ssh),
        Cmd::Bench { which: Bench::Scale { local_hosts, ssh_hosts, count, runs } } => {
            bench::scale(local_hosts, ssh_hosts, count, runs)
        }
        Cmd::Storm { count, threads } => bench::storm(count, threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The lint gate, before any test runs (CI runs it through `test`).
fn lint() -> Result<()> {
    run(Command::new("cargo").args(["fmt", "--all", "--check"]).current_dir(root()))?;
    run(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]).current_dir(root()))?;
    // the eBPF crate builds only for its own target (see the workspace's default-members)
    run(Command::new("cargo")
        .args([
            "+nightly",
            "clippy",
            "-p",
            "tracer-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--", "-D", "warnings"])
        .env("CARGO_TARGET_DIR", root().join("target/bpf-clippy"))
        .current_dir(root()))?;
    // the collection and its tests (tracer/python/ruff.toml), and the test lab (which extends it)
    let ruff = setup::default_env()?.join(".venv/bin/ruff");
    for check in [&["check"][..], &["format", "--check"]] {
        run(Command::new(&ruff)
            .args(check)
            .args(["--no-cache", "tracer/python", "tests/lab"])
            .current_dir(root()))?;
    }
    Ok(())
}

/// The README's test command.
fn test() -> Result<()> {
    setup::setup()?;
    lint()?;
    // what the tests' spawntrace ships to their SSH targets
    install::install_static_build(&install::dev_static_build()?)?;
    run(Command::new("cargo").arg("test").current_dir(root()))?;
    // The whole suite on the default environment; on the newest, all that goes through
    // ansible-core's plugin APIs (not the agent's own protocol and limits, the bench's bound
    // plugins or inventory scale, which no version changes); on the others, what differs
    // between ansible-core versions: the callback's and the connection plugins' APIs (the Rust
    // attribution tests run on every environment already). What is marked `once` (the
    // callback's transport, a wrong become password) runs on the default only. Every target
    // Python: on the oldest and the newest.
    let envs = setup::envs()?;
    let default = setup::default_env()?;
    for (i, env) in envs.iter().enumerate() {
        let oldest = i == 0;
        let newest = i + 1 == envs.len();
        let mut tests = vec![];
        if *env == default || newest {
            tests.push("tracer/python/tests");
            if *env != default {
                tests.extend(PYTEST_ON_THE_DEFAULT_ONLY);
                tests.extend(["-m", "not once"]);
            }
            if !(oldest || newest) {
                tests.push("--ignore=tracer/python/tests/test_target_pythons.py");
            }
        } else {
            tests.extend(PYTEST_ON_EVERY_VERSION);
            tests.extend(["-m", "not once"]);
            if oldest {
                tests.push("tracer/python/tests/test_target_pythons.py");
            }
        }
        run(Command::new(env.join(".venv/bin/python"))
            .args(["-m", "pytest", "-q"])
            .args(&tests)
            .current_dir(root()))
        .with_context(|| format!("pytest with {}", env.display()))?;
    }
    integration::integration(&[], &[])
}

/// What the default environment alone runs of the pytest suite (the newest runs the rest).
const PYTEST_ON_THE_DEFAULT_ONLY: [&str; 4] = [
    "--ignore=tracer/python/tests/test_agent_limits.py",
    "--ignore=tracer/python/tests/test_runner_scale.py",
    "--ignore=tracer/python/tests/test_runner_protocol.py",
    "--ignore=tracer/python/tests/test_bench_bound.py",
];

/// The pytest files every environment runs: the callback and the runner end to end.
const PYTEST_ON_EVERY_VERSION: [&str; 2] =
    ["tracer/python/tests/test_callback.py", "tracer/python/tests/test_runner_e2e.py"];

/// The README's main job.
fn demo(runs: usize, count: usize) -> Result<()> {
    setup::setup()?;
    run(Command::new("cargo").args(["build", "--release", "-p", "tracer"]).current_dir(root()))?;
    let env = setup::default_env()?;
    let out = root().join("results/demo");
    run(Command::new(root().join("target/release/spawntrace"))
        .args(["compare", "--runs", &runs.to_string(), "--modes", "classic,persistent,fork,mitogen", "-o"])
        .arg(&out)
        .arg("--")
        .arg(env.join(".venv/bin/ansible-playbook"))
        .args(["playbooks/bench.yml", "-e", &format!("bench_count={count}")])
        .current_dir(root()))?;
    println!("demo: report {}", out.join("report.md").display());
    println!("demo: flamegraphs {}", out.join("flamegraph-*.svg").display());
    Ok(())
}
