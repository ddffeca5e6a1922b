//! The trace file: JSON Lines, one header, one record per event, one footer.
//!
//! Times are `CLOCK_MONOTONIC` nanoseconds (the clock of `bpf_ktime_get_ns` and Python's
//! `time.monotonic_ns`); `Header::realtime_offset_ns` converts them to wall-clock time.
use std::{
    fs::File,
    io::{BufRead, BufReader, Read as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::ansible::messages::Received;

/// Format name in the header; anything else is not a spawntrace trace.
pub const FORMAT: &str = "spawntrace-trace";
/// Bumped on incompatible changes; readers refuse newer versions.
pub const VERSION: u32 = 1;
/// Bumped when records are added that older readers may skip (they keep unknown record types
/// aside): 1 added the SSH targets' `target_*` records.
pub const MINOR_VERSION: u32 = 1;

/// First line of a trace.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Header {
    pub format: String,
    pub version: u32,
    /// What this trace may hold beyond `version`'s records ([`MINOR_VERSION`]; 0 before it).
    #[serde(default)]
    pub minor_version: u32,
    pub tool_version: String,
    pub kernel: String,
    pub hostname: String,
    /// Always "CLOCK_MONOTONIC"; all `ts` fields are ns on that clock.
    pub clock: String,
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC` at start: add to a `ts` for Unix-epoch ns.
    pub realtime_offset_ns: i64,
    /// Boot time (Unix seconds) from /proc/stat.
    pub boot_time_s: u64,
    pub command: Vec<String>,
    /// Pid of the traced command (the root of the traced tree).
    pub root_pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub start_ns: u64,
    /// Capture limits: argv bytes per exec and bytes per path.
    pub argv_cap: usize,
    pub path_cap: usize,
    /// The Ansible callback plugin was injected into the run (an Ansible run: its tables are
    /// shown even when no message arrived).
    #[serde(default, rename = "ansible")]
    pub callback_injected: bool,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Exited(i32),
    Signaled(i32),
    /// The kernel's exit code could not be read.
    Unknown,
}

impl Status {
    /// From a wait(2)-style status word.
    pub fn from_wait(raw: u32) -> Self {
        let sig = (raw & 0x7f) as i32;
        if sig == 0 { Status::Exited(((raw >> 8) & 0xff) as i32) } else { Status::Signaled(sig) }
    }

    /// Shell-style exit code: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            Status::Exited(c) => c,
            Status::Signaled(s) => 128 + s,
            Status::Unknown => 255,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Exited(c) => write!(f, "exit {c}"),
            Status::Signaled(s) => write!(f, "signal {s} ({})", signal_name(*s)),
            Status::Unknown => f.write_str("unknown"),
        }
    }
}

/// `SIGKILL`-style name of a signal number.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("SIG{sig}"))
}

/// `ENOENT`-style name of an errno.
pub fn errno_name(errno: i32) -> String {
    let e = nix::errno::Errno::from_raw(errno);
    if e == nix::errno::Errno::UnknownErrno { format!("E{errno}") } else { format!("{e:?}") }
}

/// One traced event. `pid` is the thread id, `tgid` the process id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Fork {
        ts: u64,
        pid: u32,
        tgid: u32,
        ppid: u32,
        ptgid: u32,
        /// A new thread of `ptgid` rather than a new process.
        thread: bool,
        /// Forked by the tracer: the root of a traced tree.
        #[serde(default, skip_serializing_if = "is_false")]
        root: bool,
    },
    Exec {
        ts: u64,
        pid: u32,
        tgid: u32,
        old_pid: u32,
        filename: String,
        argv: Vec<String>,
        /// Size of the whole argv of the new image; more than was captured when truncated.
        argv_bytes: u32,
        #[serde(default, skip_serializing_if = "is_false")]
        argv_truncated: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        argv_unreadable: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        filename_truncated: bool,
    },
    ExecFailed {
        ts: u64,
        pid: u32,
        tgid: u32,
        syscall: String,
        errno: i32,
        error: String,
        filename: String,
        #[serde(default, skip_serializing_if = "is_false")]
        filename_truncated: bool,
    },
    Exit {
        ts: u64,
        pid: u32,
        tgid: u32,
        /// The last thread: the process is gone.
        group_dead: bool,
        status: Status,
        /// CPU time of this thread, ns; None when unreadable.
        cpu_ns: Option<u64>,
    },
    Open {
        ts: u64,
        pid: u32,
        tgid: u32,
        syscall: String,
        path: String,
        flags: u64,
        /// fd, or -errno.
        ret: i64,
        #[serde(default, skip_serializing_if = "is_false")]
        path_truncated: bool,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Event {
    pub fn ts(&self) -> u64 {
        match self {
            Event::Fork { ts, .. }
            | Event::Exec { ts, .. }
            | Event::ExecFailed { ts, .. }
            | Event::Exit { ts, .. }
            | Event::Open { ts, .. } => *ts,
        }
    }
}

/// A plugin message as a trace line: `{"type":"ansible","sender_pid":…, …message}`.
#[derive(Serialize)]
struct TaggedMessage<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(flatten)]
    received: &'a Received,
}

/// Health counters summed over CPUs at the end of a recording.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Events lost because the ring buffer was full.
    pub ringbuf_drops: u64,
    pub read_failures: u64,
    /// Processes that could not be tracked (their subtree is missing).
    pub track_failures: u64,
    pub stash_failures: u64,
    /// Records userspace could not decode.
    pub decode_failures: u64,
}

impl Counters {
    /// Events that never reached the trace.
    pub fn dropped_events(&self) -> u64 {
        self.ringbuf_drops + self.decode_failures
    }
}

/// Last line of a complete trace.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Footer {
    pub end_ns: u64,
    /// The traced command's exit.
    pub status: Status,
    pub events: u64,
    pub counters: Counters,
    /// CPU time of the tracer process (user + system), ns.
    pub tracer_cpu_ns: u64,
    /// CPU time spent in the probes themselves (kernel BPF stats), ns, when available.
    pub probe_cpu_ns: Option<u64>,
    /// Set when the recording was interrupted (a signal reached the tracer).
    #[serde(default)]
    pub interrupted: bool,
    /// Datagrams on the attribution socket that were not messages of the protocol (not JSON,
    /// missing or mistyped fields, unknown events): dropped, counted here.
    #[serde(default)]
    pub malformed_messages: u64,
}

/// The first and the last line of a trace.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Bookend {
    Header(Header),
    Footer(Footer),
}

/// What a run recorded of its SSH targets (`target`: `user@host:port`, as the run's ssh
/// connection reached it): the controller's records about each target and, wrapped, every line
/// of each target recorder's own trace, in the order they came.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TargetRecord {
    /// An Ansible worker (its pid vouched for by the kernel) reaches this target.
    TargetUser { target: String, worker_pid: u32, ts: u64 },
    /// Whether the target is recorded and, if not, why; how long its recorder took to start
    /// (the worker that first reached the target waited that long).
    TargetState {
        target: String,
        recording: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default)]
        start_ns: u64,
    },
    /// The target's `CLOCK_MONOTONIC` minus ours (add it to our time to get theirs), and the
    /// bound of that estimate's error (half the best ping's round trip).
    TargetClock { target: String, offset_ns: i64, error_ns: u64 },
    /// A line of the target recorder's trace; its times are on the target's clock.
    TargetLine { target: String, line: TargetLine },
}

impl TargetRecord {
    pub fn target(&self) -> &str {
        match self {
            TargetRecord::TargetUser { target, .. }
            | TargetRecord::TargetState { target, .. }
            | TargetRecord::TargetClock { target, .. }
            | TargetRecord::TargetLine { target, .. } => target,
        }
    }
}

/// A line of a target recorder's trace: its header, an event, its footer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetLine {
    Event(Event),
    Bookend(Bookend),
}

/// Longest line a trace may hold (bytes, without the newline). The tracer's own lines stay far
/// below it (argv is capped at 4 KiB, a plugin datagram at 64 KiB): a longer line is not a trace
/// (`report /dev/zero`), and is refused before it is read into memory.
pub const MAX_LINE: usize = 1 << 20;

/// The writer flushes whole lines at least this often, so a tracer killed with SIGKILL leaves a
/// trace that ends at most this much before its death.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// ... or as soon as this much is pending.
const FLUSH_BYTES: usize = 256 * 1024;

/// Writes a trace to `FILE.partial` and renames it to `FILE` on [`TraceWriter::finish`], so a
/// trace at the final path is always complete; or to a stream (a target recorder's stdout).
/// Lines are buffered whole and written whole, at least every [`FLUSH_INTERVAL`]: the partial
/// file of a killed tracer is readable up to its last flush (its last line torn at worst, which
/// readers skip).
pub struct TraceWriter {
    out: Destination,
    buf: Vec<u8>,
    last_flush: std::time::Instant,
}

enum Destination {
    File(crate::output::Partial),
    Stream(Box<dyn std::io::Write + Send>),
}

impl TraceWriter {
    /// Creates the file now, as `owner` (see [`crate::output`]), so an unwritable path fails
    /// before anything is run.
    pub fn create(path: &Path, owner: Option<&crate::record::launch::RunAs>) -> Result<Self> {
        Ok(Self::to(Destination::File(crate::output::Partial::create(path, owner)?)))
    }

    /// Writes the trace to `out` (whole lines, flushed as a file would be).
    pub fn stream(out: impl std::io::Write + Send + 'static) -> Self {
        Self::to(Destination::Stream(Box::new(out)))
    }

    fn to(out: Destination) -> Self {
        Self { out, buf: Vec::with_capacity(2 * FLUSH_BYTES), last_flush: std::time::Instant::now() }
    }

    /// The header is flushed at once: even a trace killed right after the start says what ran.
    pub fn header(&mut self, h: &Header) -> Result<()> {
        self.line(&Bookend::Header(h.clone()))?;
        self.flush()
    }

    pub fn event(&mut self, e: &Event) -> Result<()> {
        self.line(e)
    }

    pub fn plugin_message(&mut self, received: &Received) -> Result<()> {
        self.line(&TaggedMessage { ty: "ansible", received })
    }

    pub fn target(&mut self, record: &TargetRecord) -> Result<()> {
        self.line(record)
    }

    /// Any other line of the format (a target's records, a target recorder's answers).
    pub fn line<T: Serialize>(&mut self, v: &T) -> Result<()> {
        serde_json::to_writer(&mut self.buf, v)?;
        self.buf.push(b'\n');
        if self.buf.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what is pending when the last flush is [`FLUSH_INTERVAL`] old (call it often).
    pub fn flush_if_due(&mut self) -> Result<()> {
        match self.last_flush.elapsed() >= FLUSH_INTERVAL {
            true => self.flush(),
            false => Ok(()),
        }
    }

    /// Writes what is pending now.
    pub fn flush(&mut self) -> Result<()> {
        self.last_flush = std::time::Instant::now();
        if self.buf.is_empty() {
            return Ok(());
        }
        match &mut self.out {
            Destination::File(partial) => {
                let tmp = partial.tmp().display().to_string();
                partial.file().write_all(&self.buf).with_context(|| format!("writing {tmp}"))?;
            }
            Destination::Stream(out) => {
                out.write_all(&self.buf).and_then(|()| out.flush()).context("writing the trace")?
            }
        }
        self.buf.clear();
        Ok(())
    }

    /// Writes the footer; a file is renamed into place (its final path is returned).
    pub fn finish(mut self, f: &Footer) -> Result<Option<PathBuf>> {
        self.line(&Bookend::Footer(f.clone()))?;
        self.flush()?;
        match self.out {
            Destination::File(partial) => partial.commit().map(Some),
            Destination::Stream(_) => Ok(None),
        }
    }

    /// Removes the partial file (recording failed before anything useful was written).
    pub fn discard(self) {
        if let Destination::File(partial) = self.out {
            partial.discard();
        }
    }
}

/// A trace read back from disk.
#[derive(Debug, Default)]
pub struct Trace {
    pub header: Header,
    /// The events, unless read with [`Trace::read_file`] (which hands them out instead).
    pub events: Vec<Event>,
    /// Messages from the Ansible plugins, in arrival order.
    pub plugin_messages: Vec<Received>,
    /// Lines of record types this version does not know, kept raw.
    pub extra: Vec<serde_json::Value>,
    /// None when the trace has no footer (the tracer was killed): the trace is incomplete, and
    /// what it lost is unknown.
    pub footer: Option<Footer>,
    /// The last line was cut short (the tracer died while writing it) and was skipped.
    pub torn_tail: bool,
    /// Plugin message lines that are not messages of the protocol (traces written before the
    /// tracer checked what it stored): skipped.
    pub skipped_plugin_messages: u64,
    /// What was recorded of the SSH targets, in order.
    pub targets: Vec<TargetRecord>,
}

impl Trace {
    /// Reads a trace file; errors name the file and line.
    pub fn read(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut events = Vec::new();
        let mut t = Self::read_file(file, path, |e| events.push(e))?;
        t.events = events;
        Ok(t)
    }

    /// Reads the trace open as `file` (named `path` in errors), handing each event to `on_event`
    /// instead of keeping it (memory stays with what the caller keeps).
    pub fn read_file(file: File, path: &Path, on_event: impl FnMut(Event)) -> Result<Self> {
        Self::from_reader_with(BufReader::new(file), on_event)
            .with_context(|| format!("{} is not a readable spawntrace trace", path.display()))
    }

    /// Whether the trace ends with its footer.
    pub fn complete(&self) -> bool {
        self.footer.is_some()
    }

    pub fn from_reader(r: impl BufRead) -> Result<Self> {
        let mut events = Vec::new();
        let mut t = Self::from_reader_with(r, |e| events.push(e))?;
        t.events = events;
        Ok(t)
    }

    pub fn from_reader_with(mut r: impl BufRead, mut on_event: impl FnMut(Event)) -> Result<Self> {
        let mut buf = Vec::new();
        let mut n = 0usize;
        // (line number, text, ended with a newline)
        let mut next_line = |buf: &mut Vec<u8>| -> Result<Option<(usize, bool)>> {
            buf.clear();
            n += 1;
            let got = (&mut r)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', buf)
                .with_context(|| format!("line {n}"))?;
            if got == 0 {
                return Ok(None);
            }
            let ended = buf.last() == Some(&b'\n');
            if ended {
                buf.pop();
            }
            if buf.len() > MAX_LINE {
                bail!("line {n} is longer than {MAX_LINE} bytes");
            }
            Ok(Some((n, ended)))
        };
        let header = match next_line(&mut buf)? {
            None => bail!("file is empty"),
            Some((_, ended)) => {
                let value: serde_json::Value = match serde_json::from_slice(&buf) {
                    Ok(v) => v,
                    Err(_) if !ended => bail!("line 1 is cut short: the header was never completely written"),
                    Err(e) => return Err(e).context("line 1 is not JSON"),
                };
                if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
                    bail!("line 1 is not a spawntrace header");
                }
                let v = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
                if v > VERSION as u64 {
                    bail!("trace format version {v} is newer than this spawntrace reads ({VERSION})");
                }
                match serde_json::from_value::<Bookend>(value).context("line 1: bad header")? {
                    Bookend::Header(h) => h,
                    Bookend::Footer(_) => bail!("line 1 is a footer"),
                }
            }
        };
        let mut t = Trace { header, ..Default::default() };
        while let Some((n, ended)) = next_line(&mut buf)? {
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if t.footer.is_some() {
                bail!("line {n}: data after the footer");
            }
            let value: serde_json::Value = match serde_json::from_slice(&buf) {
                Ok(v) => v,
                // The writer ends every line it writes: a last line without its newline is one
                // the tracer was killed while writing.
                Err(_) if !ended => {
                    t.torn_tail = true;
                    break;
                }
                Err(e) => return Err(e).with_context(|| format!("line {n} is not JSON")),
            };
            match value.get("type").and_then(|t| t.as_str()) {
                Some("footer") => match serde_json::from_value::<Bookend>(value) {
                    Ok(Bookend::Footer(f)) => t.footer = Some(f),
                    Ok(Bookend::Header(_)) => unreachable!("tagged footer"),
                    Err(e) => bail!("line {n}: bad footer: {e}"),
                },
                Some("header") => bail!("line {n}: a second header"),
                Some("fork" | "exec" | "exec_failed" | "exit" | "open") => {
                    on_event(serde_json::from_value(value).with_context(|| format!("line {n}: bad event"))?)
                }
                Some("ansible") => {
                    let mut value = value;
                    if let Some(o) = value.as_object_mut() {
                        o.remove("type");
                    }
                    match serde_json::from_value(value) {
                        Ok(received) => t.plugin_messages.push(received),
                        Err(_) => t.skipped_plugin_messages += 1,
                    }
                }
                Some("target_user" | "target_state" | "target_clock" | "target_line") => t.targets.push(
                    serde_json::from_value(value).with_context(|| format!("line {n}: bad target record"))?,
                ),
                Some(_) => t.extra.push(value),
                None => bail!("line {n}: record without a type"),
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn header() -> Header {
        fixtures::header(&["true"])
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut w = TraceWriter::create(&path, None).unwrap();
        assert!(!path.exists(), "final path appears only when complete");
        w.header(&header()).unwrap();
        let ev = Event::Exit {
            ts: 7,
            pid: 10,
            tgid: 10,
            group_dead: true,
            status: Status::Signaled(9),
            cpu_ns: Some(3),
        };
        w.event(&ev).unwrap();
        let rec: Received = serde_json::from_str(
            r#"{"sender_pid":4,"v":1,"ts":6,"pid":4,"ev":"task_start","uuid":"u","name":"n","action":"a"}"#,
        )
        .unwrap();
        w.plugin_message(&rec).unwrap();
        let footer = Footer {
            end_ns: 9,
            status: Status::Exited(0),
            events: 1,
            counters: Counters::default(),
            tracer_cpu_ns: 1,
            probe_cpu_ns: None,
            interrupted: false,
            malformed_messages: 2,
        };
        w.finish(&footer).unwrap();
        let t = Trace::read(&path).unwrap();
        assert_eq!(t.header, header());
        assert_eq!(t.events, vec![ev]);
        assert_eq!(t.plugin_messages, vec![rec]);
        assert_eq!(t.footer, Some(footer));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        for (text, want) in
            [("", "empty"), ("hello\n", "not JSON"), ("{\"type\":\"header\"}\n", "not a spawntrace header")]
        {
            let err = Trace::from_reader(text.as_bytes()).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{text:?}: {err:#}");
        }
        let mut good = serde_json::to_string(&Bookend::Header(header())).unwrap();
        good.push_str("\n{\"type\":\"exec\",\"ts\":\"x\"}\n");
        let err = Trace::from_reader(good.as_bytes()).unwrap_err();
        assert!(format!("{err:#}").contains("line 2: bad event"), "{err:#}");
    }

    #[test]
    fn an_older_traces_header_and_stray_plugin_lines_still_read() {
        let mut header = serde_json::to_value(Bookend::Header(header())).unwrap();
        header["ansible"] = true.into();
        let text = [
            header.to_string(),
            // stored by older tracers, which kept any JSON object from the socket
            r#"{"type":"ansible","sender_pid":9,"ev":"task_start","ts":1}"#.to_owned(),
            r#"{"type":"ansible","sender_pid":9,"v":1,"ts":2,"pid":9,"ev":"playbook_end"}"#.to_owned(),
        ]
        .join("\n");
        let t = Trace::from_reader(text.as_bytes()).unwrap();
        assert!(t.header.callback_injected);
        assert_eq!((t.plugin_messages.len(), t.skipped_plugin_messages), (1, 1));
        assert!(!t.complete());
    }

    #[test]
    fn wait_status_decoding() {
        assert_eq!(Status::from_wait(3 << 8), Status::Exited(3));
        assert_eq!(Status::from_wait(9), Status::Signaled(9));
        assert_eq!(Status::from_wait(0x80 | 11), Status::Signaled(11));
        assert_eq!(Status::Signaled(9).shell_code(), 137);
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(errno_name(2), "ENOENT");
    }
}
