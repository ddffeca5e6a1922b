//! `spawntrace target-record`: the recorder on an SSH target. The controller's spawntrace starts
//! it as root through the run's own ssh connection (the ControlMaster Ansible's commands share),
//! so its nearest `sshd` ancestor is the session that serves every command this run sends to the
//! host: that session and everything it starts is recorded, nothing else on the machine (not
//! other users' or other runs' sessions, each of which is an sshd process of its own).
//!
//! It speaks on its stdio (the ssh channel), one JSON line each way:
//! - out: the lines of a trace (header once the probes are attached and the session tracked,
//!   events, footer at the end), [`Pong`]s, or one [`Unavailable`] line when it cannot record;
//! - in: [`Ping`]s, for the controller to map this host's clock onto its own; the end of its
//!   stdin (the controller is done, or gone) ends the recording.
use std::io::Write as _;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};

use super::{
    AbortOnDrop, POLL_INTERVAL, Sink, btf, monotonic_ns, own_cpu_ns, preflight, probes::Probes, readable,
};
use crate::{
    analysis::Analysis,
    trace::{Footer, Header, Status, TraceWriter},
};

/// The exit status of a recorder that could not record (its [`Unavailable`] line says why).
pub const EXIT_UNAVAILABLE: i32 = 3;

/// Ring buffer of a target recorder, MiB: a target runs one task's commands at a time.
const RING_MIB: u32 = 16;

/// The longest line a recorder reads from the controller.
const MAX_PING_LINE: usize = 256;

/// A clock ping from the controller.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ping {
    pub ping: u64,
}

/// The answer: the target's `CLOCK_MONOTONIC` when the ping was read.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pong {
    #[serde(rename = "type")]
    pub ty: PongTag,
    pub seq: u64,
    pub ts: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PongTag {
    Pong,
}

/// Why this host cannot be recorded (one line, then the recorder exits with
/// [`EXIT_UNAVAILABLE`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct Unavailable {
    #[serde(rename = "type")]
    pub ty: UnavailableTag,
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnavailableTag {
    Unavailable,
}

/// Runs the recorder until its stdin ends or the session it records has ended; returns the
/// process exit status.
pub async fn record() -> i32 {
    let mut out = std::io::stdout();
    let session = match ready() {
        Ok(session) => session,
        Err(e) => {
            let line = Unavailable { ty: UnavailableTag::Unavailable, reason: format!("{e:#}") };
            let _ = serde_json::to_writer(&mut out, &line).map(|()| writeln!(out));
            let _ = out.flush();
            return EXIT_UNAVAILABLE;
        }
    };
    match record_session(session).await {
        Ok(()) => 0,
        Err(e) => {
            // The trace stops here; the controller sees it without its footer (incomplete).
            eprintln!("spawntrace target-record: {e:#}");
            1
        }
    }
}

/// The next line from the controller (bounded before it is read: a longer one is skipped),
/// None at the end.
async fn ping_line(stdin: &mut BufReader<tokio::io::Stdin>) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        let mut line = Vec::new();
        let n = (&mut *stdin).take(MAX_PING_LINE as u64).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() == Some(&b'\n') {
            return Ok(Some(line));
        }
        // longer than a ping: skip to its end
        let mut rest = Vec::new();
        while !rest.ends_with(b"\n") {
            rest.clear();
            if (&mut *stdin).take(MAX_PING_LINE as u64).read_until(b'\n', &mut rest).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// What a recorder needs before it can record: root, the kernel's BTF, and the sshd session
/// it runs in.
fn ready() -> Result<u32> {
    preflight::privileges()?;
    preflight::btf()?;
    sshd_session(std::process::id()).context("not started through ssh: no sshd session among its ancestors")
}

/// The nearest `sshd` (or OpenSSH 9.8+'s `sshd-session`) ancestor of `pid`: the process that runs
/// each command of the ssh connection as a child of its own.
fn sshd_session(pid: u32) -> Option<u32> {
    let mut cur = procfs::process::Process::new(pid as i32).ok()?.stat().ok()?.ppid;
    while cur > 1 {
        let stat = procfs::process::Process::new(cur).ok()?.stat().ok()?;
        if stat.comm == "sshd" || stat.comm == "sshd-session" {
            return Some(cur as u32);
        }
        cur = stat.ppid;
    }
    None
}

async fn record_session(session: u32) -> Result<()> {
    let cpu_at_start = own_cpu_ns();
    let offsets = btf::kernel_offsets()?;
    let mut probes = Probes::load(std::process::id(), offsets, RING_MIB << 20, false)?;
    let _logger = match probes.logger() {
        Some(logger) => Some(AbortOnDrop(super::spawn_logger(logger)?)),
        None => None,
    };
    let mut ring = readable(probes.events()?).context("polling the ring buffer")?;
    // Tracked from here on: every command the connection runs from now is a child of it.
    probes.track(session)?;
    let start_ns = monotonic_ns();
    let mut writer = TraceWriter::stream(std::io::stdout());
    writer.header(&header(session, start_ns))?;
    let mut sink = Sink {
        model: Analysis::new_model(),
        plugin_messages: Vec::new(),
        targets: Vec::new(),
        writer: Some(&mut writer),
        events: 0,
        decode_failures: 0,
        progress: None,
    };
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            line = ping_line(&mut stdin) => match line {
                Ok(Some(line)) => {
                    if let Ok(Ping { ping }) = serde_json::from_slice(&line) {
                        let pong = Pong { ty: PongTag::Pong, seq: ping, ts: monotonic_ns() };
                        if let Some(w) = sink.writer.as_deref_mut() {
                            w.line(&pong)?;
                            w.flush()?;
                        }
                    }
                }
                // the controller is done (or gone): end the recording
                Ok(_) | Err(_) => break,
            },
            guard = ring.readable_mut() => sink.drain_ready(guard)?,
            _ = tick.tick() => {
                sink.tick(ring.get_mut())?;
                // the connection is gone: nothing more can come
                if nix::sys::signal::kill(nix::unistd::Pid::from_raw(session as i32), None).is_err() {
                    break;
                }
            }
        }
    }
    sink.drain(ring.get_mut())?;
    let mut counters = probes.counters().unwrap_or_default();
    counters.decode_failures = sink.decode_failures;
    let footer = Footer {
        end_ns: monotonic_ns(),
        status: Status::Unknown,
        events: sink.events,
        counters,
        tracer_cpu_ns: own_cpu_ns().saturating_sub(cpu_at_start),
        probe_cpu_ns: None,
        interrupted: false,
        malformed_messages: 0,
    };
    drop(sink);
    writer.finish(&footer)?;
    Ok(())
}

fn header(session: u32, start_ns: u64) -> Header {
    // the session runs as the login user: its /proc directory is theirs
    let owner = std::fs::metadata(format!("/proc/{session}")).ok();
    let ids = owner.map_or((0, 0), |m| {
        (std::os::unix::fs::MetadataExt::uid(&m), std::os::unix::fs::MetadataExt::gid(&m))
    });
    super::header(vec!["(sshd session)".into()], session, ids, start_ns)
}
