//! spawntrace: run a command under eBPF tracing and explain where its time went.
use std::{ffi::OsString, path::PathBuf, process::ExitCode, sync::LazyLock, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use spawntrace::{analysis::Analysis, record, report, trace};

/// Exit code for spawntrace's own failures while running a command (as timeout(1) and env(1)).
const EXIT_TOOL_FAILURE: u8 = 125;

/// `--version` names the trace format too, so a user can tell which traces this build reads.
/// Built from the format's constants (a u32 cannot go into `concat!`), once.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!("{} (trace format {} {})", env!("CARGO_PKG_VERSION"), trace::FORMAT, trace::VERSION)
});

#[derive(Parser, Debug)]
#[command(
    name = "spawntrace",
    version = VERSION.as_str(),
    about = "Trace every fork, exec, exit and open of a command's process tree with eBPF",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    record: RecordArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run COMMAND under the tracer (the default when no subcommand is given).
    Record(RecordArgs),
    /// Re-render the summary of a saved trace.
    Report {
        /// A trace written by `spawntrace -o`.
        trace: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        format: report::Format,
        /// Rows of the Ansible task table: per task, per task and host, or per loop item.
        #[arg(long, value_enum, default_value_t)]
        by: report::tasks::By,
        /// How many tasks the top-N lists show (text format).
        #[arg(long, default_value_t = 5)]
        top: usize,
    },
    /// Draw a flamegraph (SVG) of what a trace spawned, or with --diff of what changed
    /// between two traces.
    Flamegraph {
        /// One trace; two with --diff (before, after).
        #[arg(required = true, num_args = 1..=2)]
        traces: Vec<PathBuf>,
        /// Write the SVG (or with --folded, the folded stacks) here.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// What a frame's width measures.
        #[arg(long, value_enum, default_value_t)]
        weight: report::flamegraph::Weight,
        /// Order of the task and host frames in Ansible stacks.
        #[arg(long, value_enum, default_value_t)]
        by: report::flamegraph::FlameBy,
        /// Write folded stacks (`frame;frame N` lines) instead of an SVG.
        #[arg(long)]
        folded: bool,
        /// Differential flamegraph of the second trace against the first.
        #[arg(long)]
        diff: bool,
    },
    /// Run COMMAND without tracing (no root needed), with spawntrace's Ansible plugins.
    Run {
        /// Run Ansible's local and ssh connections through spawntrace's persistent agents.
        #[arg(long)]
        persistent: bool,
        /// With --persistent: which module runs share a runner process (default: auto, the
        /// builtin modules known to be safe in-process).
        #[arg(long, value_enum, requires = "persistent")]
        isolation: Option<spawntrace::ansible::Isolation>,
        /// The command, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Write a Chrome trace-event timeline (for Perfetto or chrome://tracing) of a trace.
    Timeline {
        trace: PathBuf,
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Run an Ansible command in several execution modes, traced, and write a side-by-side
    /// report with flamegraphs to DIR.
    Compare {
        /// Traced runs per mode.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Untraced warm-up runs per mode.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// Modes to run (comma-separated); those whose software is missing are skipped.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "classic,persistent,mitogen")]
        modes: Vec<spawntrace::compare::ExecutionMode>,
        /// Output directory.
        #[arg(short, long, value_name = "DIR")]
        output: PathBuf,
        /// Run the command as root even when spawntrace was started through sudo.
        #[arg(long)]
        as_root: bool,
        /// Ring-buffer size in MiB (a power of two).
        #[arg(long, default_value_t = 32, value_name = "MIB")]
        ring_buffer_mib: u32,
        /// The Ansible command, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Fail (exit 1) when TRACE execs more than BASELINE, in total or in any task.
    Check {
        trace: PathBuf,
        #[arg(long)]
        baseline: PathBuf,
        /// Allowed increase in percent (a finite number, at least 0).
        #[arg(long, default_value_t = 0.0, value_name = "PERCENT", value_parser = percent)]
        max_exec_increase: f64,
    },
}

/// Shell completions and man pages from this very CLI definition, for `cargo xtask install`.
/// Not a variant of [`Cmd`]: clap_complete would offer a hidden subcommand all the same, so
/// it is added beside the documented CLI (see [`cli`]).
#[derive(Subcommand, Debug)]
enum Generate {
    /// Print SHELL's completion script on stdout.
    Completions { shell: clap_complete::Shell },
    /// Write spawntrace.1 and one page per subcommand (spawntrace-report.1, ...) into DIR.
    Man { dir: PathBuf },
}

#[derive(Args, Debug, Clone)]
struct RecordArgs {
    /// Write the trace (JSON Lines) to FILE.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Run the command as root even when spawntrace was started through sudo.
    #[arg(long)]
    as_root: bool,
    /// Do not print the summary at exit.
    #[arg(short, long)]
    quiet: bool,
    /// Inject the Ansible callback plugin: when COMMAND runs ansible-playbook/ansible (auto),
    /// always, or never.
    #[arg(long = "ansible", value_name = "ANSIBLE", value_enum, default_value_t)]
    inject_callback: spawntrace::ansible::InjectCallback,
    /// Run Ansible's local and ssh connections through spawntrace's persistent agents.
    #[arg(long)]
    persistent: bool,
    /// With --persistent: which module runs share a runner process (default: auto, the builtin
    /// modules known to be safe in-process).
    #[arg(long, value_enum, requires = "persistent")]
    isolation: Option<spawntrace::ansible::Isolation>,
    /// For Ansible runs: also record what the run does on its SSH targets (a recorder started
    /// on each through the run's own ssh ControlMaster, as root there), or skip them.
    #[arg(long, value_enum, default_value_t)]
    targets: spawntrace::ansible::targets::Targets,
    /// Ring-buffer size in MiB (a power of two).
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    ring_buffer_mib: u32,
    /// Also measure the probes' own CPU time (kernel BPF statistics: two clock reads per probe
    /// run, on every syscall of the machine).
    #[arg(long)]
    probe_stats: bool,
    /// After COMMAND exits, keep recording what it left running (daemons) until all of it has
    /// ended or SECS have passed. By default recording stops with COMMAND: an ssh ControlMaster
    /// lives on for ControlPersist seconds, which is not the run's time.
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = seconds)]
    linger: Duration,
    /// After passing a signal on to COMMAND's process group, kill (SIGKILL) what is left of
    /// the group SECS later.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = seconds)]
    kill_after: Duration,
    /// The command to trace, after `--`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let matches = cli().get_matches();
    match matches.subcommand() {
        Some(("generate", m)) => {
            return done(Generate::from_arg_matches(m).map_err(Into::into).and_then(generate));
        }
        Some((TARGET_RECORD, _)) => {
            let code = match runtime() {
                Ok(rt) => rt.block_on(record::target::record()),
                Err(e) => return fail(&e, EXIT_TOOL_FAILURE),
            };
            // not waiting for the runtime's blocked read of stdin
            std::process::exit(code);
        }
        _ => {}
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cli()).exit());
    match cli.cmd {
        Some(Cmd::Record(args)) => run_record(args),
        None => run_record(cli.record),
        Some(Cmd::Report { trace, format, by, top }) => done(report_trace(&trace, format, by, top)),
        Some(Cmd::Flamegraph { traces, output, weight, by, folded, diff }) => {
            done(flamegraph(&traces, &output, weight, by, folded, diff))
        }
        Some(Cmd::Compare { runs, warmup, modes, output, as_root, ring_buffer_mib, command }) => {
            let opts = spawntrace::compare::Options {
                command,
                runs,
                warmup,
                modes,
                out: output,
                as_root,
                ring_mib: ring_buffer_mib,
            };
            done(runtime().and_then(|rt| rt.block_on(compare(opts))))
        }
        Some(Cmd::Timeline { trace, output }) => done(timeline(&trace, &output)),
        Some(Cmd::Run { persistent, isolation, command }) => {
            match runtime().and_then(|rt| rt.block_on(run(persistent, isolation, &command))) {
                Ok(code) => ExitCode::from(code),
                Err(e) => match e.downcast_ref::<record::LaunchFailed>() {
                    Some(l) => fail(&e, l.0.exit_code() as u8),
                    None => fail(&e, EXIT_TOOL_FAILURE),
                },
            }
        }
        Some(Cmd::Check { trace, baseline, max_exec_increase }) => {
            let owner = match record::launch::RunAs::from_sudo(false) {
                Ok(o) => o,
                Err(e) => return fail(&e, 2),
            };
            match spawntrace::compare::check(&trace, &baseline, max_exec_increase, owner.as_ref()) {
                Ok(r) if r.is_empty() => {
                    println!("check: no exec regression against {}", baseline.display());
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    for line in &r {
                        println!("regression: {line}");
                    }
                    ExitCode::FAILURE
                }
                Err(e) => fail(&e, 2),
            }
        }
    }
}

/// The hidden subcommand a controller's spawntrace runs on SSH targets (see
/// [`record::target`]); not for users.
const TARGET_RECORD: &str = "target-record";

/// The documented CLI plus the hidden `spawntrace generate` and `spawntrace target-record`.
fn cli() -> clap::Command {
    let generate = clap::Command::new("generate").hide(true).subcommand_required(true);
    Cli::command()
        .subcommand(Generate::augment_subcommands(generate))
        .subcommand(clap::Command::new(TARGET_RECORD).hide(true))
}

/// What `spawntrace generate` writes: it describes [`Cli`] only, without itself.
fn generate(what: Generate) -> Result<()> {
    let mut cmd = Cli::command();
    match what {
        Generate::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "spawntrace", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script).context("writing the completions")
        }
        Generate::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))
        }
    }
}

fn done(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, 1),
    }
}

fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("spawntrace: {e:#}");
    ExitCode::from(code)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

async fn compare(opts: spawntrace::compare::Options) -> Result<()> {
    let out = opts.out.clone();
    let report = spawntrace::compare::compare(opts).await?;
    print!("{}", spawntrace::compare::markdown(&report));
    println!("\nreport: {}", out.join("report.md").display());
    Ok(())
}

fn run_record(args: RecordArgs) -> ExitCode {
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => return fail(&e, EXIT_TOOL_FAILURE),
    };
    let opts = record::Options {
        output: args.output,
        as_root: args.as_root,
        ring_mib: args.ring_buffer_mib,
        inject_callback: args.inject_callback,
        persistent: args.persistent,
        record_targets: args.targets == spawntrace::ansible::targets::Targets::Record,
        env: isolation_env(args.isolation),
        probe_stats: args.probe_stats,
        linger: args.linger,
        kill_after: args.kill_after,
        ..record::Options::new(args.command)
    };
    match runtime.block_on(record::record(opts)) {
        Ok(rec) => {
            if !args.quiet {
                let r = report::Report::new(&rec.analysis, report::tasks::By::Task, report::Detail::Summary);
                match r.render(report::Format::Text, 5) {
                    Ok(text) => eprint!("{text}"),
                    Err(e) => eprintln!("spawntrace: rendering the summary: {e:#}"),
                }
                if let Some(p) = &rec.trace_path {
                    eprintln!("  trace written to {}", p.display());
                }
            }
            ExitCode::from(rec.footer().status.shell_code().clamp(0, 255) as u8)
        }
        Err(e) => match e.downcast_ref::<record::LaunchFailed>() {
            Some(l) => fail(&e, l.0.exit_code() as u8),
            None => fail(&e, EXIT_TOOL_FAILURE),
        },
    }
}

fn report_trace(
    path: &std::path::Path,
    format: report::Format,
    by: report::tasks::By,
    top: usize,
) -> Result<()> {
    let owner = record::launch::RunAs::from_sudo(false)?;
    let analysis = Analysis::read(path, owner.as_ref())?;
    print!("{}", report::Report::new(&analysis, by, report::Detail::Full).render(format, top)?);
    Ok(())
}

fn flamegraph(
    traces: &[PathBuf],
    output: &std::path::Path,
    weight: report::flamegraph::Weight,
    by: report::flamegraph::FlameBy,
    folded: bool,
    diff: bool,
) -> Result<()> {
    use report::flamegraph as fg;
    use std::io::Write as _;
    let owner = record::launch::RunAs::from_sudo(false)?;
    let owner = owner.as_ref();
    let analyses: Vec<Analysis> = traces.iter().map(|t| Analysis::read(t, owner)).collect::<Result<_>>()?;
    let stacks: Vec<Vec<String>> = analyses.iter().map(|a| fg::folded(a, weight, by)).collect();
    match (diff, stacks.as_slice()) {
        (false, [one]) => spawntrace::output::write_file(output, owner, |w| match folded {
            true => Ok(one.iter().try_for_each(|l| writeln!(w, "{l}"))?),
            false => fg::svg(&analyses[0], one, weight, w),
        }),
        (true, [before, after]) => {
            anyhow::ensure!(!folded, "--folded writes one trace's stacks; it does not combine with --diff");
            let title = format!("spawntrace diff: {} → {}", traces[0].display(), traces[1].display());
            spawntrace::output::write_file(output, owner, |w| fg::diff_svg(before, after, weight, &title, w))
        }
        (true, _) => anyhow::bail!("--diff needs two traces: BEFORE AFTER"),
        (false, _) => anyhow::bail!("two traces given: add --diff to compare them"),
    }
}

fn timeline(trace: &std::path::Path, output: &std::path::Path) -> Result<()> {
    let owner = record::launch::RunAs::from_sudo(false)?;
    let owner = owner.as_ref();
    let analysis = Analysis::read(trace, owner)?;
    spawntrace::output::write_file(output, owner, |w| report::timeline::write_timeline(&analysis, w))
}

/// The agents' isolation, when one was asked for.
fn isolation_env(
    isolation: Option<spawntrace::ansible::Isolation>,
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    isolation.map(|i| i.env()).into_iter().map(|(k, v)| (k.into(), v.into())).collect()
}

/// `spawntrace run`: the command with the plugins injected, untraced; returns its shell-style status.
async fn run(
    persistent: bool,
    isolation: Option<spawntrace::ansible::Isolation>,
    command: &[OsString],
) -> Result<u8> {
    use spawntrace::{ansible, record::launch};
    launch::check_argv(command)?;
    let inject = ansible::Plugins { callback: false, persistent, targets: false };
    let session = match persistent {
        true => Some(ansible::Session::start(None, inject)?.0),
        false => None,
    };
    let mut env = session.as_ref().map(|s| s.env.clone()).unwrap_or_default();
    env.extend(isolation_env(isolation));
    let terminal = launch::foreground_terminal().is_some();
    let mut child = launch::spawn(command, None, &env, None, terminal).map_err(record::LaunchFailed)?;
    let status = child.wait().await;
    launch::restore_terminal(terminal);
    let status = status?;
    use std::os::unix::process::ExitStatusExt as _;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)).clamp(0, 255) as u8)
}

/// A number of seconds (`1.5`), finite and not negative.
fn seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .ok_or_else(|| format!("{s:?} is not a number of seconds (a finite number, at least 0)"))
}

/// A percentage: finite, at least 0.
fn percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a percentage (a finite number, at least 0)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        cli().debug_assert();
    }

    #[test]
    fn version_names_the_trace_format() {
        let v = Cli::command().render_version();
        assert!(v.contains(&format!("(trace format {} {})", trace::FORMAT, trace::VERSION)), "{v}");
        assert!(v.starts_with(&format!("spawntrace {}", env!("CARGO_PKG_VERSION"))), "{v}");
    }
}
