//! `spawntrace record`: load the probes, start the command, stream events into the process model
//! (and the trace file), and summarise when the command exits.
pub mod btf;
pub mod launch;
pub mod preflight;
pub mod probes;
pub mod reader;
pub mod target;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{
    analysis::Analysis,
    ansible::{
        self,
        messages::{PluginEvent, Received},
    },
    model::Model,
    trace::{self, Counters, Event, Footer, Header, Status, TargetRecord, TraceWriter},
};
use launch::{RunAs, SignalForwarder};
use probes::Probes;

/// How often the ring buffer is drained when the probes did not wake us.
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// What to record and where.
#[derive(Clone, Debug)]
pub struct Options {
    pub command: Vec<std::ffi::OsString>,
    pub output: Option<PathBuf>,
    /// Keep root instead of dropping to the sudo caller.
    pub as_root: bool,
    /// Ring buffer size in MiB (power of two).
    pub ring_mib: u32,
    /// Whether to inject the Ansible callback plugin.
    pub inject_callback: ansible::InjectCallback,
    /// Inject the persistent-agent connection plugins.
    pub persistent: bool,
    /// With the callback: also record what the run does on its SSH targets.
    pub record_targets: bool,
    /// More environment for the command.
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// Send the command's stdout and stderr to this file instead of ours.
    pub log: Option<PathBuf>,
    /// Live counters for a progress display.
    pub progress: Option<std::sync::Arc<Progress>>,
    /// Measure the probes' own CPU time (costs two clock reads per probe run, machine-wide).
    pub probe_stats: bool,
    /// After the command has exited, keep recording until every process of its tree has ended
    /// or this much time has passed (daemons it left behind).
    pub linger: std::time::Duration,
    /// After a signal was passed on to the command's group, how long it has before what is
    /// left of the group is killed.
    pub kill_after: std::time::Duration,
}

impl Options {
    /// Recording `command` with the defaults of `spawntrace record`.
    pub fn new(command: Vec<std::ffi::OsString>) -> Self {
        Self {
            command,
            output: None,
            as_root: false,
            ring_mib: 32,
            inject_callback: ansible::InjectCallback::Auto,
            persistent: false,
            record_targets: true,
            env: Vec::new(),
            log: None,
            progress: None,
            probe_stats: false,
            linger: std::time::Duration::ZERO,
            kill_after: DEFAULT_KILL_AFTER,
        }
    }
}

/// Default of `--kill-after`.
pub const DEFAULT_KILL_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// What a recording has seen so far, for progress displays.
#[derive(Debug, Default)]
pub struct Progress {
    pub events: std::sync::atomic::AtomicU64,
    /// Name of the last task the callback plugin announced.
    pub task: std::sync::Mutex<String>,
}

/// A finished recording: its analysis (complete: it has its footer), and the trace file.
pub struct Recording {
    pub analysis: Analysis,
    pub trace_path: Option<PathBuf>,
}

impl Recording {
    pub fn footer(&self) -> &Footer {
        self.analysis.footer.as_ref().expect("a recording ends with its footer")
    }
}

/// A recording that could not start the command at all.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct LaunchFailed(#[from] pub launch::SpawnError);

/// Runs the whole recording. Errors before the command starts leave nothing behind.
pub async fn record(opts: Options) -> Result<Recording> {
    launch::check_argv(&opts.command)?;
    // Installed first: a signal during set-up must not kill us with a half-written file.
    let signals = SignalForwarder::install(opts.kill_after)?;
    let run_as = RunAs::from_sudo(opts.as_root)?;
    let mut writer = match &opts.output {
        Some(path) => Some(TraceWriter::create(path, run_as.as_ref())?),
        None => None,
    };
    let result = record_into(&opts, &signals, run_as.as_ref(), writer.as_mut()).await;
    match (result, writer) {
        (Ok(mut rec), Some(w)) => {
            rec.trace_path = w.finish(rec.footer())?;
            Ok(rec)
        }
        (Ok(rec), None) => Ok(rec),
        (Err(e), w) => {
            if let Some(w) = w {
                w.discard();
            }
            Err(e)
        }
    }
}

async fn record_into(
    opts: &Options,
    signals: &SignalForwarder,
    run_as: Option<&RunAs>,
    mut writer: Option<&mut TraceWriter>,
) -> Result<Recording> {
    preflight::privileges()?;
    preflight::btf()?;
    let offsets = btf::kernel_offsets()?;
    let ring_bytes = opts
        .ring_mib
        .checked_mul(1 << 20)
        .filter(|b| b.is_power_of_two())
        .context("--ring-buffer-mib must be a power of two below 4096")?;

    let cpu_at_start = own_cpu_ns();
    let mut probes = Probes::load(std::process::id(), offsets, ring_bytes, opts.probe_stats)?;
    // Ends with this recording (a compare records many): dropping the handle would not.
    let _logger = match probes.logger() {
        Some(logger) => Some(AbortOnDrop(spawn_logger(logger)?)),
        None => None,
    };
    let mut ring = readable(probes.events()?).context("polling the ring buffer")?;

    // Kept alive (its directory holds the plugins and the socket) until the command has ended.
    let callback = opts.inject_callback.enabled(&opts.command);
    let inject =
        ansible::Plugins { callback, persistent: opts.persistent, targets: callback && opts.record_targets };
    let (_session, mut channel, target_socket, mut env) = match inject.callback || inject.persistent {
        true => {
            let (session, sockets) = ansible::Session::start(run_as, inject)?;
            let env = session.env.clone();
            let channel =
                sockets.channel.map(readable).transpose().context("polling the attribution socket")?;
            (Some(session), channel, sockets.targets, env)
        }
        false => (None, None, None, Vec::new()),
    };
    env.extend(opts.env.iter().cloned());

    if signals.interrupted() {
        anyhow::bail!("interrupted before the command was started");
    }
    let log = match &opts.log {
        Some(path) => Some(crate::output::open_log(path, run_as)?),
        None => None,
    };
    let terminal = log.is_none() && launch::foreground_terminal().is_some();
    let start_ns = monotonic_ns();
    let mut child = launch::spawn(&opts.command, run_as, &env, log, terminal).map_err(|e| {
        launch::restore_terminal(terminal);
        LaunchFailed(e)
    })?;
    let root_pid = child.id().unwrap_or(0);
    signals.set_child(root_pid, terminal);
    // Served from now on: what spawntrace starts for a target must not be taken for the command.
    let mut targets =
        target_socket.map(|l| ansible::targets::TargetRecording::start(l, run_as.cloned())).transpose()?;

    let header =
        Header { callback_injected: inject.callback, ..make_header(opts, run_as, root_pid, start_ns) };
    if let Some(w) = writer.as_deref_mut() {
        w.header(&header)?;
    }
    let mut sink = Sink {
        model: Analysis::new_model(),
        plugin_messages: Vec::new(),
        targets: Vec::new(),
        writer,
        events: 0,
        decode_failures: 0,
        progress: opts.progress.clone(),
    };
    // The probes wake us only when much data has piled up; this tick collects the rest.
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = None;
    // Set once the command has exited: recording goes on until its whole tree has ended or
    // this instant (--linger) has passed.
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            exit = child.wait(), if status.is_none() => {
                status = Some(exit.context("waiting for the command")?);
                launch::restore_terminal(terminal);
                // The command's exit was committed to the ring (and its messages queued on the
                // socket) before wait() returned: one more drain collects everything up to it.
                sink.drain(ring.get_mut())?;
                if let Some(ch) = channel.as_mut() {
                    sink.drain_channel(ch.get_mut())?;
                }
                linger_until = Some(tokio::time::Instant::now() + opts.linger);
            }
            guard = ring.readable_mut() => sink.drain_ready(guard)?,
            _ = tick.tick() => sink.tick(ring.get_mut())?,
            guard = async { channel.as_mut().expect("guarded").readable_mut().await }, if channel.is_some() => {
                let mut guard = guard.context("polling the attribution socket")?;
                sink.drain_channel(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            // (pending, never None, while the recording runs: it ends with `finish` below)
            Some(record) = async { targets.as_mut().expect("guarded").next().await }, if targets.is_some() => {
                sink.target(record)?;
            }
        }
        if let Some(until) = linger_until
            && (tokio::time::Instant::now() >= until || sink.model.still_running().next().is_none())
        {
            break;
        }
    }
    let status = status.expect("the loop ends after the command's exit");
    if signals.interrupted() {
        // What is left of COMMAND's group after a forwarded signal ends with the grace period.
        tokio::task::block_in_place(|| signals.finish());
        sink.drain(ring.get_mut())?;
    }
    if let Some(ch) = channel.as_mut() {
        sink.drain_channel(ch.get_mut())?;
    }
    // The target recorders end with the command: what they still send is the run's.
    if let Some(t) = targets.take() {
        t.finish(|record| sink.target(record)).await?;
    }
    let malformed_messages = channel.as_ref().map_or(0, |ch| ch.get_ref().malformed);
    let end_ns = monotonic_ns();
    let mut counters = probes.counters().unwrap_or_else(|e| {
        log::warn!("reading probe counters: {e:#}");
        Counters::default()
    });
    counters.decode_failures = sink.decode_failures;
    let footer = Footer {
        end_ns,
        status: exit_status(status),
        events: sink.events,
        counters,
        tracer_cpu_ns: own_cpu_ns().saturating_sub(cpu_at_start),
        probe_cpu_ns: probes.cpu_ns(),
        interrupted: signals.interrupted(),
        malformed_messages,
    };
    let analysis = Analysis::new(header, Some(footer), sink.model, &sink.plugin_messages, &sink.targets);
    Ok(Recording { analysis, trace_path: None })
}

/// Where decoded events and plugin messages go: the model (and the messages, for the
/// attribution at the end), and the trace file if any.
struct Sink<'w> {
    model: Model,
    plugin_messages: Vec<Received>,
    targets: Vec<TargetRecord>,
    writer: Option<&'w mut TraceWriter>,
    events: u64,
    decode_failures: u64,
    progress: Option<std::sync::Arc<Progress>>,
}

impl Sink<'_> {
    /// Drains the ring buffer its wake-up said was readable.
    fn drain_ready(
        &mut self,
        guard: std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>>,
    ) -> Result<()> {
        let mut guard = guard.context("polling the ring buffer")?;
        self.drain(guard.get_inner_mut())?;
        guard.clear_ready();
        Ok(())
    }

    /// The periodic drain (records below the wake-up threshold) and the trace's timed flush.
    fn tick(&mut self, ring: &mut RingBuf<MapData>) -> Result<()> {
        self.drain(ring)?;
        if let Some(w) = self.writer.as_deref_mut() {
            w.flush_if_due()?;
        }
        Ok(())
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Result<()> {
        while let Some(item) = ring.next() {
            match reader::decode(&item) {
                Ok(ev) => self.push(ev)?,
                Err(e) => {
                    self.decode_failures += 1;
                    log::warn!("undecodable ring-buffer record: {e}");
                }
            }
        }
        Ok(())
    }

    fn drain_channel(&mut self, channel: &mut ansible::channel::Channel) -> Result<()> {
        let from = self.plugin_messages.len();
        channel.drain(&mut self.plugin_messages)?;
        let new = &self.plugin_messages[from..];
        if let Some(w) = self.writer.as_deref_mut() {
            for r in new {
                w.plugin_message(r)?;
            }
        }
        if let Some(p) = &self.progress {
            let last = new.iter().rev().find_map(|r| match r.event() {
                PluginEvent::TaskStart { name, .. } => Some(name),
                _ => None,
            });
            if let (Some(name), Ok(mut task)) = (last, p.task.lock()) {
                name.clone_into(&mut task);
            }
        }
        Ok(())
    }

    fn target(&mut self, record: TargetRecord) -> Result<()> {
        if let Some(w) = self.writer.as_deref_mut() {
            w.target(&record)?;
        }
        self.targets.push(record);
        Ok(())
    }

    fn push(&mut self, ev: Event) -> Result<()> {
        self.events += 1;
        if let Some(p) = &self.progress {
            p.events.store(self.events, std::sync::atomic::Ordering::Relaxed);
        }
        self.model.apply(&ev);
        if let Some(w) = self.writer.as_deref_mut() {
            w.event(&ev)?;
        }
        Ok(())
    }
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Result<tokio::task::JoinHandle<()>> {
    let mut fd = readable(logger)?;
    Ok(tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// Aborts a task (and so frees what it holds, here the log ring buffer) when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Registers an fd-owning object with tokio for readability.
fn readable<T: std::os::fd::AsRawFd>(inner: T) -> Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd (aya map / logger) for as long as the AsyncFd holds it.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering with tokio: {e}"))
}

fn make_header(opts: &Options, run_as: Option<&RunAs>, root_pid: u32, start_ns: u64) -> Header {
    let command = opts.command.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let uid = run_as.map(|r| r.uid.as_raw()).unwrap_or_else(|| nix::unistd::getuid().as_raw());
    let gid = run_as.map(|r| r.gid.as_raw()).unwrap_or_else(|| nix::unistd::getgid().as_raw());
    header(command, root_pid, (uid, gid), start_ns)
}

/// The header of a trace recorded on this machine (a command's, or a target's session's): what
/// the machine and this build are, with the recording's own facts.
fn header(command: Vec<String>, root_pid: u32, (uid, gid): (u32, u32), start_ns: u64) -> Header {
    let uname = nix::sys::utsname::uname().ok();
    let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uname.as_ref().map(|u| f(u).to_string_lossy().into_owned()).unwrap_or_default()
    };
    let realtime = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
        .unwrap_or(0);
    Header {
        format: trace::FORMAT.into(),
        version: trace::VERSION,
        minor_version: trace::MINOR_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        kernel: field(|u| u.release()),
        hostname: field(|u| u.nodename()),
        clock: "CLOCK_MONOTONIC".into(),
        realtime_offset_ns: realtime - monotonic_ns() as i64,
        boot_time_s: procfs::boot_time_secs().unwrap_or(0),
        command,
        root_pid,
        uid,
        gid,
        start_ns,
        argv_cap: tracer_common::ARGV_CAP,
        path_cap: tracer_common::PATH_CAP,
        callback_injected: false,
    }
}

/// `CLOCK_MONOTONIC` now, ns: the probes' clock.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn exit_status(status: std::process::ExitStatus) -> Status {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => Status::Exited(c),
        (None, Some(s)) => Status::Signaled(s),
        _ => Status::Unknown,
    }
}

/// User + system CPU time of this process so far, ns.
fn own_cpu_ns() -> u64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t =
                |tv: nix::sys::time::TimeVal| tv.tv_sec() as u64 * 1_000_000_000 + tv.tv_usec() as u64 * 1000;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0)
}
