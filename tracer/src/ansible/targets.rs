//! Recording the SSH targets (controller side). Before a worker's first command to a target, the
//! ssh connection plugin asks here (a Unix stream socket in the run's private directory) with
//! the ssh command Ansible itself would run there. The first ask for a target starts a recorder
//! on it (`spawntrace target-record`, see [`crate::record::target`]) through that ssh command,
//! run as the user the playbook runs as — so through the ControlMaster that every later command
//! of the run shares; the recorder there records that sshd session and what it starts. The
//! answer (recording, or why not) goes back once the recorder records, so nothing the worker's
//! first command starts is missed.
//!
//! spawntrace's own binary is shipped to the target the first time (content-addressed under
//! `/var/cache/spawntrace/bin/<sha256>`, root's, checked against its hash before every start).
//! What comes back is a trace of the target, bounded line by line, written into the run's trace
//! as [`TargetRecord`]s, with the target's clock mapped onto ours.
use std::{
    collections::HashMap,
    os::unix::net::UnixListener as StdListener,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    process::{Child, ChildStdin, Command},
    sync::{mpsc, watch},
};

use crate::{
    record::{launch::RunAs, monotonic_ns, target::Pong},
    trace::{MAX_LINE, TargetLine, TargetRecord},
};

/// Whether an Ansible run's SSH targets are recorded (`--targets`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Targets {
    #[default]
    Record,
    Skip,
}

/// The environment variable naming the socket, for the connection plugins.
pub const SOCKET_ENV: &str = "SPAWNTRACE_TARGET_SOCKET";

/// Longest request a plugin may send.
const MAX_REQUEST: usize = 64 * 1024;
/// Longest ssh command a request may carry.
const MAX_ARGS: usize = 512;
/// How long a plugin has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a recorder may take to start (shipping the binary included).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a recorder has, once told to stop, to send the rest of its trace.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Clock pings per target; the one with the shortest round trip is kept.
const PINGS: u64 = 8;
/// Where the binary lives on a target.
const REMOTE_DIR: &str = "/var/cache/spawntrace/bin";

/// A plugin's request: record `target`, reached with `argv` (ssh without its remote command).
#[derive(Debug, Deserialize)]
struct Request {
    target: String,
    /// None when Ansible's ssh command cannot be run by anyone else (a password through sshpass).
    argv: Option<Vec<String>>,
    /// Whether the ssh command shares a ControlMaster: without one every command of the run is
    /// a session of its own, which the recorder (recording its own session) would not see.
    control_master: bool,
    #[serde(default)]
    env: HashMap<String, String>,
}

/// The answer to a plugin.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct Answer {
    recording: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl Answer {
    fn unavailable(reason: impl Into<String>) -> Self {
        Self { recording: false, reason: Some(reason.into()) }
    }
}

/// The controller side of target recording for one run.
pub struct TargetRecording {
    records: mpsc::UnboundedReceiver<TargetRecord>,
    stop: watch::Sender<bool>,
    acceptor: tokio::task::JoinHandle<()>,
}

/// What the plugins' requests share.
struct Shared {
    run_as: Option<RunAs>,
    records: mpsc::UnboundedSender<TargetRecord>,
    stop: watch::Receiver<bool>,
    /// Each target's answer, once known (a recorder being started: None).
    targets: Mutex<HashMap<String, watch::Receiver<Option<Answer>>>>,
    binary: Mutex<Option<Arc<Binary>>>,
}

/// spawntrace's own executable, as shipped to targets.
struct Binary {
    bytes: Vec<u8>,
    sha256: String,
}

impl TargetRecording {
    /// Serves `listener` (bound in the run's private directory); recorders run as `run_as`.
    pub fn start(listener: StdListener, run_as: Option<RunAs>) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(listener).context("serving the target socket")?;
        let (tx, records) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            run_as,
            records: tx,
            stop: stop_rx,
            targets: Mutex::new(HashMap::new()),
            binary: Mutex::new(None),
        });
        let acceptor = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, shared.clone()));
            }
        });
        Ok(Self { records, stop, acceptor })
    }

    /// The next record to write into the trace (pending until one comes).
    pub async fn next(&mut self) -> Option<TargetRecord> {
        self.records.recv().await
    }

    /// Stops every recorder and hands each record still to come to `write`, until all have
    /// ended (at most [`STOP_TIMEOUT`] after their stop).
    pub async fn finish(mut self, mut write: impl FnMut(TargetRecord) -> Result<()>) -> Result<()> {
        self.acceptor.abort();
        let _ = self.acceptor.await;
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.records.recv()).await {
                Ok(Some(record)) => write(record)?,
                // every sender is gone: every recorder and request has ended
                Ok(None) => return Ok(()),
                Err(_) => {
                    log::warn!("target recorders did not end in time");
                    return Ok(());
                }
            }
        }
    }
}

/// One plugin connection: its request, the record of its worker, the answer.
async fn serve(conn: UnixStream, shared: Arc<Shared>) {
    let worker_pid = conn.peer_cred().ok().and_then(|c| c.pid()).unwrap_or(0) as u32;
    let (read, mut write) = conn.into_split();
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_line(read, MAX_REQUEST)).await {
        Ok(Ok(Some(line))) => serde_json::from_str::<Request>(&line).ok(),
        _ => None,
    };
    let Some(request) =
        request.filter(|r| r.argv.as_ref().is_none_or(|a| a.len() <= MAX_ARGS && !a.is_empty()))
    else {
        return; // not a request of the protocol: no answer
    };
    let target = request.target.clone();
    let _ = shared.records.send(TargetRecord::TargetUser {
        target: target.clone(),
        worker_pid,
        ts: monotonic_ns(),
    });
    let mut answer_rx = {
        let mut targets = shared.targets.lock().expect("not poisoned");
        match targets.get(&target) {
            Some(rx) => rx.clone(),
            None => {
                let (tx, rx) = watch::channel(None);
                targets.insert(target.clone(), rx.clone());
                tokio::spawn(record_target(request, shared.clone(), tx));
                rx
            }
        }
    };
    let answer = match tokio::time::timeout(START_TIMEOUT, answer_rx.wait_for(Option::is_some)).await {
        Ok(Ok(answer)) => (*answer).clone().expect("waited for"),
        _ => Answer::unavailable("the recorder did not start in time"),
    };
    let mut line = serde_json::to_vec(&answer).expect("serializable");
    line.push(b'\n');
    let _ = write.write_all(&line).await;
}

/// Starts the recorder on the request's target, answers through `answer`, and streams its
/// records until it is stopped.
async fn record_target(request: Request, shared: Arc<Shared>, answer: watch::Sender<Option<Answer>>) {
    let target = request.target.clone();
    let asked = monotonic_ns();
    let state = |answer: &Answer| TargetRecord::TargetState {
        target: target.clone(),
        recording: answer.recording,
        reason: answer.reason.clone(),
        start_ns: monotonic_ns().saturating_sub(asked),
    };
    let started = match (&request.argv, request.control_master) {
        (None, _) => Err(anyhow::anyhow!("password authentication (sshpass): no ssh command to share")),
        (Some(_), false) => Err(anyhow::anyhow!(
            "no ControlMaster (ControlPersist off): each command of the run is an ssh session of its own"
        )),
        (Some(_), true) => tokio::time::timeout(START_TIMEOUT, start(&request, &shared))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the recorder did not start in time"))),
    };
    let recorder = match started {
        Ok(recorder) => recorder,
        Err(e) => {
            let a = Answer::unavailable(format!("{e:#}"));
            let _ = shared.records.send(state(&a));
            let _ = answer.send(Some(a));
            return;
        }
    };
    let a = Answer { recording: true, reason: None };
    let _ = shared.records.send(state(&a));
    let _ = answer.send(Some(a));
    recorder.stream(&target, &shared).await;
}

/// A recorder that has sent its header: it records.
struct Recorder {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines,
    header: TargetLine,
}

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// What the first line of the bootstrap says.
enum Bootstrap {
    Started(Box<Recorder>),
    /// The binary is missing (or not the right one); `root`: how to become root there.
    NeedsBinary {
        root: String,
    },
}

async fn start(request: &Request, shared: &Shared) -> Result<Box<Recorder>> {
    let binary = own_binary(shared)?;
    match bootstrap(request, shared, &binary).await? {
        Bootstrap::Started(r) => Ok(r),
        Bootstrap::NeedsBinary { root } => {
            upload(request, shared, &binary, &root).await?;
            match bootstrap(request, shared, &binary).await? {
                Bootstrap::Started(r) => Ok(r),
                Bootstrap::NeedsBinary { .. } => bail!("the binary shipped to the target did not check out"),
            }
        }
    }
}

fn own_binary(shared: &Shared) -> Result<Arc<Binary>> {
    let mut slot = shared.binary.lock().expect("not poisoned");
    if let Some(b) = slot.as_ref() {
        return Ok(b.clone());
    }
    let bytes = std::fs::read("/proc/self/exe").context("reading spawntrace's own binary")?;
    let sha256 = format!("{:x}", Sha256::digest(&bytes));
    let b = Arc::new(Binary { bytes, sha256 });
    *slot = Some(b.clone());
    Ok(b)
}

/// The machine name of this build's architecture, as `uname -m` says it.
fn machine() -> &'static str {
    std::env::consts::ARCH
}

/// Runs the recorder on the target if its binary is there and checks out; the script prints one
/// line when it cannot, else the recorder speaks.
async fn bootstrap(request: &Request, shared: &Shared, binary: &Binary) -> Result<Bootstrap> {
    // No single quote inside: it travels in one.
    let script = format!(
        "m=$(uname -m); [ \"$m\" = {arch} ] || {{ echo \"spawntrace-unavailable: another architecture ($m)\"; exit 3; }}; \
         if [ \"$(id -u)\" = 0 ]; then root=; else root=\"sudo -n\"; fi; \
         $root true 2>/dev/null </dev/null || {{ echo \"spawntrace-unavailable: no root there (sudo -n refused)\"; exit 3; }}; \
         bin={dir}/{sha}; \
         $root sh -c \"echo {sha}\\ \\ $bin | sha256sum -c --status\" 2>/dev/null </dev/null || {{ echo \"spawntrace-needs-binary ${{root:-root}}\"; exit 4; }}; \
         exec $root $bin target-record",
        arch = machine(),
        dir = REMOTE_DIR,
        sha = binary.sha256,
    );
    let mut child = ssh(request, shared, &format!("sh -c '{script}'"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next_line().await.context("reading the target recorder")?;
    let Some(first) = first else {
        let status = child.wait().await?;
        bail!("ssh to the target failed ({status}): {}", stderr_of(&mut child).await);
    };
    if let Some(reason) = first.strip_prefix("spawntrace-unavailable: ") {
        let _ = child.wait().await;
        bail!("{reason}");
    }
    if let Some(root) = first.strip_prefix("spawntrace-needs-binary ") {
        let _ = child.wait().await;
        return Ok(Bootstrap::NeedsBinary { root: root.to_owned() });
    }
    anyhow::ensure!(first.len() <= MAX_LINE, "the target recorder's first line is too long");
    match serde_json::from_str::<TargetLine>(&first) {
        Ok(header @ TargetLine::Bookend(crate::trace::Bookend::Header(_))) => {
            let stdin = child.stdin.take();
            Ok(Bootstrap::Started(Box::new(Recorder { child, stdin, lines, header })))
        }
        _ => {
            let _ = child.kill().await;
            match serde_json::from_str::<crate::record::target::Unavailable>(&first) {
                Ok(u) => bail!("{}", u.reason),
                Err(_) => bail!("the target recorder said something else than its header"),
            }
        }
    }
}

/// Ships the binary to the target (as root there: `root` is `root` or how to become it).
async fn upload(request: &Request, shared: &Shared, binary: &Binary, root: &str) -> Result<()> {
    let root = match root {
        "root" => "",
        "sudo -n" => "sudo -n ",
        other => bail!("the target asked for the binary oddly ({other:?})"),
    };
    let script = format!(
        "umask 077; d={dir}; mkdir -p $d && t=$(mktemp $d/.upload.XXXXXX) || exit 1; \
         if cat > $t && echo {sha}\\ \\ $t | sha256sum -c --status && chmod 700 $t; then mv -f $t $d/{sha}; \
         else rm -f $t; exit 1; fi",
        dir = REMOTE_DIR,
        sha = binary.sha256,
    );
    let mut child = ssh(request, shared, &format!("{root}sh -c '{script}'"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let bytes = binary.bytes.clone();
    let writing = tokio::spawn(async move {
        let written = stdin.write_all(&bytes).await;
        drop(stdin);
        written
    });
    let status = child.wait().await?;
    let _ = writing.await;
    if !status.success() {
        bail!("shipping spawntrace to the target failed ({status}): {}", stderr_of(&mut child).await);
    }
    Ok(())
}

/// The request's ssh command with `remote` as its remote command, run as the run's user with
/// the plugin's ssh environment; stdin and stdout piped (stderr kept for errors).
fn ssh(request: &Request, shared: &Shared, remote: &str) -> Result<Child> {
    let argv = request.argv.as_ref().expect("checked");
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .arg(remote)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir("/")
        .kill_on_drop(true);
    for (k, v) in request.env.iter().filter(|(k, _)| k.as_str() == "SSH_AUTH_SOCK") {
        cmd.env(k, v);
    }
    if let Some(user) = &shared.run_as {
        cmd.env("HOME", &user.home).env("USER", &user.name).env("LOGNAME", &user.name);
        user.apply(cmd.as_std_mut());
    } else if let Some(home) = std::env::var_os("HOME") {
        cmd.env("HOME", home);
    }
    cmd.spawn().with_context(|| format!("starting {}", argv[0]))
}

/// The last line of a finished child's stderr (ssh's own error), bounded.
async fn stderr_of(child: &mut Child) -> String {
    let Some(stderr) = child.stderr.take() else { return String::new() };
    let text = read_line_all(stderr, 4096).await;
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned()
}

async fn read_line_all(r: impl AsyncRead + Unpin, max: usize) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let _ = r.take(max as u64).read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// One line of at most `max` bytes (None at EOF before a newline).
async fn read_line(r: impl AsyncRead + Unpin, max: usize) -> Result<Option<String>> {
    use tokio::io::AsyncReadExt as _;
    let mut line = Vec::new();
    let mut r = BufReader::new(r).take(max as u64 + 1);
    r.read_until(b'\n', &mut line).await?;
    if line.last() != Some(&b'\n') || line.len() > max {
        return Ok(None);
    }
    line.pop();
    Ok(Some(String::from_utf8(line)?))
}

impl Recorder {
    /// Maps the target's clock, then forwards every line of its trace until it ends (told to
    /// stop: its stdin closed, then what it still sends, for at most [`STOP_TIMEOUT`]).
    async fn stream(mut self, target: &str, shared: &Shared) {
        let send = |line: TargetLine| {
            let _ = shared.records.send(TargetRecord::TargetLine { target: target.to_owned(), line });
        };
        send(self.header.clone());
        if let Some((offset_ns, error_ns)) = self.clock(&send).await {
            let _ = shared.records.send(TargetRecord::TargetClock {
                target: target.to_owned(),
                offset_ns,
                error_ns,
            });
        }
        let mut stop = shared.stop.clone();
        let mut deadline = None;
        loop {
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, self.lines.next_line()).await.unwrap_or(Ok(None)),
                    None => self.lines.next_line().await,
                }
            };
            tokio::select! {
                line = next => match line {
                    Ok(Some(line)) => match parse(&line) {
                        Some(Parsed::Line(l)) => send(l),
                        Some(Parsed::Pong(_)) => {}
                        None => log::debug!("target {target}: a line that is not a trace line"),
                    },
                    _ => break,
                },
                _ = stop.wait_for(|s| *s), if deadline.is_none() => {
                    // the end of its stdin ends the recording
                    self.stdin = None;
                    deadline = Some(tokio::time::Instant::now() + STOP_TIMEOUT);
                }
            }
        }
        let _ = self.child.kill().await;
    }

    /// Pings the recorder [`PINGS`] times; the offset of the target's clock from ours and its
    /// error bound, from the ping with the shortest round trip. Trace lines that come meanwhile
    /// go to `send`.
    async fn clock(&mut self, send: &impl Fn(TargetLine)) -> Option<(i64, u64)> {
        let mut best: Option<(u64, i64)> = None;
        for seq in 0..PINGS {
            let stdin = self.stdin.as_mut()?;
            let sent = monotonic_ns();
            stdin.write_all(format!("{{\"ping\":{seq}}}\n").as_bytes()).await.ok()?;
            loop {
                let line = tokio::time::timeout(Duration::from_secs(5), self.lines.next_line())
                    .await
                    .ok()?
                    .ok()??;
                match parse(&line)? {
                    Parsed::Pong(p) if p.seq == seq => {
                        let received = monotonic_ns();
                        let rtt = received.saturating_sub(sent);
                        let offset = p.ts as i64 - (sent / 2 + received / 2) as i64;
                        if best.is_none_or(|(r, _)| rtt < r) {
                            best = Some((rtt, offset));
                        }
                        break;
                    }
                    Parsed::Pong(_) => {}
                    Parsed::Line(l) => send(l),
                }
            }
        }
        best.map(|(rtt, offset)| (offset, rtt.div_ceil(2)))
    }
}

enum Parsed {
    Line(TargetLine),
    Pong(Pong),
}

/// A line from a recorder: bounded, and one of a trace's or a pong.
fn parse(line: &str) -> Option<Parsed> {
    if line.len() > MAX_LINE {
        return None;
    }
    if line.starts_with("{\"type\":\"pong\"") {
        return serde_json::from_str(line).ok().map(Parsed::Pong);
    }
    serde_json::from_str(line).ok().map(Parsed::Line)
}
