//! Recording the SSH targets (controller side). Before a worker's first command to a target, the
//! ssh connection plugin asks here (a Unix stream socket in the run's private directory) with
//! the ssh command Ansible itself would run there. The first ask for a target starts a recorder
//! on it (`spawntrace target-record`, see [`crate::record::target`]) through that ssh command,
//! run as the user the playbook runs as — so through the ControlMaster that every later command
//! of the run shares (spawntrace's ssh may be the one that opens it); the recorder there records
//! that sshd session and what it starts. The answer (recording, or why not) goes back once the
//! recorder records, so nothing the worker's first command starts is missed.
//!
//! spawntrace's own binary (its static build when one is installed, [`STATIC_BUILD`]) is
//! shipped to the target the first time (content-addressed under
//! `/var/cache/spawntrace/bin/<sha256>`, root's alone, checked against its hash before every
//! start, in the root shell that starts it). What comes back is a trace of the target, read line
//! by line within a bound, written into the run's trace as [`TargetRecord`]s, with the target's
//! clock mapped onto ours. Every bound the traced command or a target could push on is a
//! constant here.
use std::{
    collections::{HashMap, VecDeque},
    os::unix::{fs::OpenOptionsExt as _, net::UnixListener as StdListener},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    process::{Child, ChildStdin, ChildStdout, Command},
    sync::{Semaphore, mpsc, watch},
    task::JoinHandle,
};

use crate::{
    record::{
        launch::{RunAs, users_helper},
        monotonic_ns,
        target::Pong,
    },
    report::labels::printable,
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

/// Longest request a plugin may send (the worker's environment included).
const MAX_REQUEST: usize = 256 * 1024;
/// Longest ssh command a request may carry, and longest target name.
const MAX_ARGS: usize = 512;
const MAX_TARGET_NAME: usize = 1024;
/// Targets one run records at most, and plugin connections served at once.
const MAX_TARGETS: usize = 256;
const MAX_CONNECTIONS: usize = 64;
/// Records waiting to be written into the trace (recorders wait beyond that).
const RECORDS_QUEUE: usize = 4096;
/// Longest line taken from a recorder: with its envelope and the target's name it stays within
/// a trace's own line limit.
const MAX_TARGET_LINE: usize = MAX_LINE - 2 * MAX_TARGET_NAME - 256;
/// Bytes of trace kept from one target, and from all of a run's targets together, as charged by
/// [`Budget`]: past either, that target's recording ends there (its trace is incomplete). A
/// target's trace is held in memory until the run ends.
const MAX_TARGET_BYTES: u64 = 256 << 20;
const MAX_TARGETS_BYTES: u64 = 1 << 30;
/// Longest reason (a target's or ssh's own words) kept.
const MAX_REASON: usize = 512;
/// Bytes of an ssh's stderr kept (its last error).
const STDERR_TAIL: usize = 4096;
/// How long a plugin has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a recorder may take to start (shipping the binary included).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long mapping a target's clock may take.
const CLOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a recorder has, once told to stop, to send the rest of its trace.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Clock pings per target; the one with the shortest round trip is kept.
const PINGS: u64 = 8;

/// A plugin's request: record `target`, reached with `argv` (ssh without its remote command).
#[derive(Debug, Deserialize)]
struct Request {
    target: String,
    /// None when the connection's ssh command cannot be run by anyone else (password
    /// authentication: sshpass, or Mitogen typing it).
    argv: Option<Vec<String>>,
    /// Whether the ssh command shares a ControlMaster: without one every command of the run is
    /// a session of its own, which the recorder (recording its own session) would not see.
    control_master: bool,
    /// The worker's environment (the user's own: its ssh agent, Kerberos cache, PATH…).
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
    /// Not recorded, for `reason` (escaped and clipped: it may be a target's own words).
    fn unavailable(reason: impl AsRef<str>) -> Self {
        let reason: String = printable(reason.as_ref()).chars().take(MAX_REASON).collect();
        Self { recording: false, reason: Some(reason) }
    }
}

/// The controller side of target recording for one run. Dropping it ends every recorder.
pub struct TargetRecording {
    records: mpsc::Receiver<TargetRecord>,
    stop: watch::Sender<bool>,
    /// Serves the socket (it holds what the requests share: ended first when finishing).
    acceptor: JoinHandle<()>,
    tasks: Tasks,
}

/// Every task of a [`TargetRecording`] (the acceptor, each request, each recorder): aborted
/// when it is dropped.
#[derive(Clone, Default)]
struct Tasks(Arc<Mutex<Vec<JoinHandle<()>>>>);

impl Tasks {
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.0.lock().expect("not poisoned");
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(task));
    }

    fn abort(&self) {
        self.0.lock().expect("not poisoned").drain(..).for_each(|t| t.abort());
    }
}

impl Drop for TargetRecording {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.tasks.abort();
    }
}

/// What the plugins' requests share.
struct Shared {
    run_as: Option<RunAs>,
    records: mpsc::Sender<TargetRecord>,
    stop: watch::Receiver<bool>,
    /// Each target's answer, once known (a recorder being started: None).
    targets: Mutex<HashMap<String, watch::Receiver<Option<Answer>>>>,
    binary: Mutex<Option<Arc<Binary>>>,
    tasks: Tasks,
    /// Bytes of trace lines taken from every target so far.
    kept: Arc<AtomicU64>,
}

/// spawntrace's own executable, as shipped to targets.
struct Binary {
    bytes: Vec<u8>,
    sha256: String,
}

impl TargetRecording {
    /// Serves `listener` (bound in the run's private directory); recorders run as `run_as`.
    /// Start it once the command runs: spawntrace's own children before it would be taken for
    /// the command (see the probes' `ROOTS_LEFT`).
    pub fn start(listener: StdListener, run_as: Option<RunAs>) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(listener).context("serving the target socket")?;
        let (tx, records) = mpsc::channel(RECORDS_QUEUE);
        let (stop, stop_rx) = watch::channel(false);
        let tasks = Tasks::default();
        let shared = Arc::new(Shared {
            run_as,
            records: tx,
            stop: stop_rx,
            targets: Mutex::new(HashMap::new()),
            binary: Mutex::new(None),
            tasks: tasks.clone(),
            kept: Arc::new(AtomicU64::new(0)),
        });
        let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let acceptor = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => match connections.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let shared2 = shared.clone();
                            shared.tasks.spawn(async move {
                                serve(conn, shared2).await;
                                drop(permit);
                            })
                        }
                        Err(_) => {
                            log::debug!("target socket: {MAX_CONNECTIONS} requests at once, one refused")
                        }
                    },
                    // e.g. out of file descriptors for a moment: not a reason to stop serving
                    Err(e) => {
                        log::warn!("target socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(Self { records, stop, acceptor, tasks })
    }

    /// The next record to write into the trace (pending until one comes).
    pub async fn next(&mut self) -> Option<TargetRecord> {
        self.records.recv().await
    }

    /// Stops every recorder and hands each record still to come to `write`, until all have
    /// ended (at most [`STOP_TIMEOUT`] after their stop; what is still running then is ended).
    pub async fn finish(mut self, mut write: impl FnMut(TargetRecord) -> Result<()>) -> Result<()> {
        // no new request; the requests under way and the recorders end on their own
        self.acceptor.abort();
        let _ = (&mut self.acceptor).await;
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.records.recv()).await {
                Ok(Some(record)) => write(record)?,
                // every sender is gone: every recorder and request has ended
                Ok(None) => return Ok(()),
                Err(_) => {
                    log::warn!("target recorders did not end in time");
                    self.tasks.abort();
                    // what they had queued is still the run's
                    while let Ok(record) = self.records.try_recv() {
                        write(record)?;
                    }
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
    let answer = match request {
        Some(r) if r.target.len() > MAX_TARGET_NAME => Answer::unavailable("the target's name is too long"),
        Some(r) if r.argv.as_ref().is_some_and(|a| a.is_empty() || a.len() > MAX_ARGS) => {
            Answer::unavailable("the ssh command is empty or too long")
        }
        Some(r) => ask(r, worker_pid, &shared).await,
        None => Answer::unavailable("not a request of the protocol"),
    };
    let mut line = serde_json::to_vec(&answer).expect("serializable");
    line.push(b'\n');
    let _ = write.write_all(&line).await;
}

/// The worker's request: the record of its reaching the target, the target's recorder started
/// if this is the first ask, its answer.
async fn ask(request: Request, worker_pid: u32, shared: &Arc<Shared>) -> Answer {
    let target = request.target.clone();
    let mut answer_rx = {
        let mut targets = shared.targets.lock().expect("not poisoned");
        match targets.get(&target) {
            Some(rx) => rx.clone(),
            None if targets.len() >= MAX_TARGETS => {
                return Answer::unavailable(format!("more than {MAX_TARGETS} targets: not recorded"));
            }
            None => {
                let (tx, rx) = watch::channel(None);
                targets.insert(target.clone(), rx.clone());
                shared.tasks.spawn(record_target(request, shared.clone(), tx));
                rx
            }
        }
    };
    let user = TargetRecord::TargetUser { target, worker_pid, ts: monotonic_ns() };
    let _ = shared.records.send(user).await;
    match tokio::time::timeout(START_TIMEOUT, answer_rx.wait_for(Option::is_some)).await {
        Ok(Ok(answer)) => (*answer).clone().expect("waited for"),
        _ => Answer::unavailable("the recorder did not start in time"),
    }
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
        (None, _) => Err(anyhow::anyhow!("password authentication: no ssh command spawntrace could run")),
        (Some(_), false) => Err(anyhow::anyhow!(
            "no shared connection (ControlMaster or ControlPersist off): each command of the run is an ssh session of its own"
        )),
        (Some(_), true) => tokio::time::timeout(START_TIMEOUT, start(&request, &shared))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the recorder did not start in time"))),
    };
    let recorder = match started {
        Ok(recorder) => recorder,
        Err(e) => {
            let a = Answer::unavailable(format!("{e:#}"));
            let _ = shared.records.send(state(&a)).await;
            let _ = answer.send(Some(a));
            return;
        }
    };
    let a = Answer { recording: true, reason: None };
    let _ = shared.records.send(state(&a)).await;
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

/// What the root script on the target says first.
enum Bootstrap {
    Started(Box<Recorder>),
    /// The binary is missing (or not the right one).
    NeedsBinary,
}

async fn start(request: &Request, shared: &Shared) -> Result<Box<Recorder>> {
    let binary = own_binary(shared)?;
    match bootstrap(request, shared, &binary).await? {
        Bootstrap::Started(r) => Ok(r),
        Bootstrap::NeedsBinary => {
            upload(request, shared, &binary).await?;
            match bootstrap(request, shared, &binary).await? {
                Bootstrap::Started(r) => Ok(r),
                Bootstrap::NeedsBinary => bail!("the binary shipped to the target did not check out"),
            }
        }
    }
}

/// Where a static build of spawntrace is installed, from this executable's directory: it runs
/// on any Linux of this architecture, where this build needs the controller's glibc or newer.
pub const STATIC_BUILD: &str = "../lib/spawntrace/spawntrace-static";

/// The binary shipped to targets: the static build when one is installed ([`STATIC_BUILD`]),
/// read as root once it is checked to be as much root's (the installer's) as this executable;
/// else this executable, read as the user (what a target receives is what they could read).
fn own_binary(shared: &Shared) -> Result<Arc<Binary>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut slot = shared.binary.lock().expect("not poisoned");
    if let Some(b) = slot.as_ref() {
        return Ok(b.clone());
    }
    let exe = std::fs::read_link("/proc/self/exe").context("locating spawntrace's own binary")?;
    let bytes = match static_build(&exe)? {
        Some((path, owner)) => {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // what was opened is what was checked
            let m = file.metadata()?;
            if !m.is_file() || m.uid() != owner || m.mode() & 0o022 != 0 {
                bail!("{} changed while it was opened: not shipped to targets", path.display());
            }
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes)?;
            bytes
        }
        None => crate::output::as_user(shared.run_as.as_ref(), || Ok(std::fs::read("/proc/self/exe")?))
            .context("spawntrace's own binary is not readable by the user: not shipped")?,
    };
    let sha256 = format!("{:x}", Sha256::digest(&bytes));
    let b = Arc::new(Binary { bytes, sha256 });
    *slot = Some(b.clone());
    Ok(b)
}

/// The static build installed with `exe`, if any, and `exe`'s owner. What root ships to run as
/// root on every target must be no one else's to change: it, and the two directories it is in,
/// must be owned by `exe`'s owner, writable by no one else, and no symbolic links.
pub fn static_build(exe: &std::path::Path) -> Result<Option<(std::path::PathBuf, u32)>> {
    use std::os::unix::fs::MetadataExt as _;
    let Some(dir) = exe.parent() else { return Ok(None) };
    // (replaced since it started: `… (deleted)`; then it is shipped itself)
    let owner = match std::fs::metadata(exe) {
        Ok(m) => m.uid(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}", exe.display())),
    };
    let path = dir.join(STATIC_BUILD);
    let lib = path.parent().expect("a file in a directory");
    for p in [lib.parent().expect("a directory in a directory"), lib, &path] {
        match std::fs::symlink_metadata(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("{}", p.display())),
            Ok(m) if m.file_type().is_symlink() || m.uid() != owner || m.mode() & 0o022 != 0 => {
                bail!("{} is a link, or not uid {owner}'s alone: not shipped to targets", p.display())
            }
            Ok(_) => {}
        }
    }
    Ok(Some((path, owner)))
}

/// What runs as root on the target (`sh -c SCRIPT spawntrace SHA start|upload`): the cache
/// directory checked (root's alone, no link), then either the binary checked against its hash
/// and run — in this one shell, so nothing can change it between the two — or the binary read
/// from stdin into a temporary file, checked, and renamed into place.
const ROOT_SCRIPT: &str = r#"
ok() { [ -n "$(find "$1" -maxdepth 0 -user 0 ! -perm /022 ! -type l 2>/dev/null)" ]; }
umask 077
d=/var/cache/spawntrace; b=$d/bin; bin=$b/$1
for p in / /var /var/cache; do ok $p || { echo "spawntrace-unavailable: $p is not root's alone"; exit 3; }; done
[ -e $d ] || mkdir $d; [ -e $b ] || mkdir $b
for p in $d $b; do ok $p || { echo "spawntrace-unavailable: $p is not root's alone"; exit 3; }; done
case $2 in
upload)
  t=$(mktemp $b/.upload.XXXXXX) || exit 1
  trap 'rm -f "$t"' EXIT HUP INT TERM PIPE
  cat > "$t" && echo "$1  $t" | sha256sum -c --status && chmod 700 "$t" && mv -f "$t" "$bin" || exit 1
  trap - EXIT
  exit 0;;
start)
  { ok "$bin" && echo "$1  $bin" | sha256sum -c --status; } 2>/dev/null || { echo spawntrace-needs-binary; exit 4; }
  exec "$bin" target-record;;
esac
exit 2
"#;

/// The remote command: as the login user, the architecture and a way to root checked, then
/// [`ROOT_SCRIPT`] as root (`sudo -n` unless the login is root). The root script travels in
/// base64, so that no quoting can go wrong; this part has no single quote.
fn remote_command(sha256: &str, mode: &str) -> String {
    let root_script = base64::engine::general_purpose::STANDARD.encode(ROOT_SCRIPT);
    format!(
        "sh -c 'm=$(uname -m); [ \"$m\" = {arch} ] || {{ echo \"spawntrace-unavailable: another architecture ($m)\"; exit 3; }}; \
         if [ \"$(id -u)\" = 0 ]; then root=; else root=\"sudo -n\"; fi; \
         $root true 2>/dev/null </dev/null || {{ echo \"spawntrace-unavailable: no root there (sudo -n refused)\"; exit 3; }}; \
         exec $root sh -c \"$(echo {root_script} | base64 -d)\" spawntrace {sha256} {mode}'",
        arch = std::env::consts::ARCH,
    )
}

/// Runs the recorder on the target if its binary is there and checks out; the scripts print one
/// line when they cannot, else the recorder speaks.
async fn bootstrap(request: &Request, shared: &Shared, binary: &Binary) -> Result<Bootstrap> {
    let (mut child, stderr) = ssh(request, shared, &remote_command(&binary.sha256, "start"))?;
    let overhead = (request.target.len() + std::mem::size_of::<TargetRecord>()) as u64;
    let budget =
        Budget { own: MAX_TARGET_BYTES, all: MAX_TARGETS_BYTES, kept: shared.kept.clone(), overhead };
    let mut lines = Lines::new(child.stdout.take().expect("piped"), budget);
    let first = match lines.next(MAX_TARGET_LINE).await {
        Ok(Some(Ok(first))) => first,
        Ok(Some(Err(refused))) => {
            let _ = child.kill().await;
            bail!("the target recorder's first line: {refused}");
        }
        Ok(None) | Err(_) => {
            let status = child.wait().await?;
            bail!("ssh to the target failed ({status}): {}", stderr.last_line());
        }
    };
    if let Some(reason) = first.strip_prefix("spawntrace-unavailable: ") {
        let _ = child.wait().await;
        bail!("{reason}");
    }
    if first == "spawntrace-needs-binary" {
        let _ = child.wait().await;
        return Ok(Bootstrap::NeedsBinary);
    }
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

/// Ships the binary to the target, into root's cache there.
async fn upload(request: &Request, shared: &Shared, binary: &Arc<Binary>) -> Result<()> {
    let (mut child, stderr) = ssh(request, shared, &remote_command(&binary.sha256, "upload"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let bytes = binary.clone();
    let writing = tokio::spawn(async move {
        let written = stdin.write_all(&bytes.bytes).await;
        drop(stdin);
        written
    });
    let mut stdout = String::new();
    let _ = child.stdout.take().expect("piped").take(MAX_REASON as u64).read_to_string(&mut stdout).await;
    let status = child.wait().await?;
    let _ = writing.await;
    if let Some(reason) = stdout.lines().find_map(|l| l.strip_prefix("spawntrace-unavailable: ")) {
        bail!("{reason}");
    }
    if !status.success() {
        bail!("shipping spawntrace to the target failed ({status}): {}", stderr.last_line());
    }
    Ok(())
}

/// The request's ssh command with `remote` as its remote command, as the run's user's helper
/// ([`users_helper`]) with the worker's environment, from `/`, no tty requested; stdin and
/// stdout piped, stderr's tail kept.
fn ssh(request: &Request, shared: &Shared, remote: &str) -> Result<(Child, StderrTail)> {
    let argv = request.argv.as_ref().expect("checked");
    let mut cmd = std::process::Command::new(&argv[0]);
    // ssh takes an option's first value: this one wins over the user's configuration
    cmd.args(["-o", "RequestTTY=no"])
        .args(&argv[1..])
        .arg(remote)
        .env_clear()
        .envs(&request.env)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !request.env.contains_key("PATH") {
        cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    }
    users_helper(&mut cmd, shared.run_as.as_ref());
    let mut child =
        Command::from(cmd).kill_on_drop(true).spawn().with_context(|| format!("starting {}", argv[0]))?;
    let tail = StderrTail::default();
    let stderr = child.stderr.take().expect("piped");
    shared.tasks.spawn(tail.clone().drain(stderr));
    Ok((child, tail))
}

/// The last bytes an ssh wrote on its stderr, drained as they come (a ControlMaster keeps the
/// stderr of the ssh that opened it: a pipe nobody read would end up stopping it).
#[derive(Clone, Default)]
struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

impl StderrTail {
    async fn drain(self, mut stderr: impl AsyncRead + Unpin) {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut buf).await {
            let mut tail = self.0.lock().expect("not poisoned");
            tail.extend(&buf[..n]);
            let excess = tail.len().saturating_sub(STDERR_TAIL);
            tail.drain(..excess);
        }
    }

    /// Its last non-empty line, escaped for a terminal.
    fn last_line(&self) -> String {
        let bytes: Vec<u8> = self.0.lock().expect("not poisoned").iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        printable(line).chars().take(MAX_REASON).collect()
    }
}

/// One line of at most `max` bytes (None at EOF before a newline).
async fn read_line(r: impl AsyncRead + Unpin, max: usize) -> Result<Option<String>> {
    let mut line = Vec::new();
    let mut r = BufReader::new(r).take(max as u64 + 1);
    r.read_until(b'\n', &mut line).await?;
    if line.last() != Some(&b'\n') || line.len() > max {
        return Ok(None);
    }
    line.pop();
    Ok(Some(String::from_utf8(line)?))
}

/// A line a recorder sent that is not taken.
#[derive(Debug, PartialEq, thiserror::Error)]
enum Refused {
    #[error("a line over {MAX_TARGET_LINE} bytes")]
    TooLong,
    #[error("over {} MiB of trace from this target", MAX_TARGET_BYTES >> 20)]
    OverOwnBudget,
    #[error("over {} MiB of trace from the run's targets", MAX_TARGETS_BYTES >> 20)]
    OverRunBudget,
}

/// How many bytes a recorder's [`Lines`] may take: `own` from it, `all` counted in `kept` with
/// every other target's. A line is charged what it costs once kept: twice its size (the line,
/// then what it is parsed into) plus `overhead` (its record, with the target's name).
struct Budget {
    own: u64,
    all: u64,
    kept: Arc<AtomicU64>,
    overhead: u64,
}

/// A recorder's stdout, line by line, each line bounded before it is read into memory and
/// charged to its [`Budget`].
struct Lines<R = ChildStdout> {
    reader: BufReader<R>,
    budget: Budget,
    kept: u64,
}

impl<R: AsyncRead + Unpin> Lines<R> {
    fn new(stdout: R, budget: Budget) -> Self {
        Self { reader: BufReader::new(stdout), budget, kept: 0 }
    }

    /// The next line (without its newline), or why it is refused (past `max` bytes, or past
    /// the budget: then every later one is too); None at the end.
    async fn next(&mut self, max: usize) -> std::io::Result<Option<Result<String, Refused>>> {
        let mut line = Vec::new();
        let n = (&mut self.reader).take(max as u64 + 1).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') {
            // cut short by the bound (or by the end: an unfinished last line)
            return Ok(if line.len() > max { Some(Err(Refused::TooLong)) } else { None });
        }
        let n = 2 * n as u64 + self.budget.overhead;
        if self.kept + n > self.budget.own {
            self.kept = self.budget.own;
            return Ok(Some(Err(Refused::OverOwnBudget)));
        }
        let all = self.budget.all;
        if self
            .budget
            .kept
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |k| (k + n <= all).then_some(k + n))
            .is_err()
        {
            return Ok(Some(Err(Refused::OverRunBudget)));
        }
        self.kept += n;
        line.pop();
        Ok(Some(Ok(String::from_utf8_lossy(&line).into_owned())))
    }
}

impl Recorder {
    /// Maps the target's clock, then forwards every line of its trace until it ends (told to
    /// stop: its stdin closed, then what it still sends, for at most [`STOP_TIMEOUT`]).
    async fn stream(mut self, target: &str, shared: &Shared) {
        let records = shared.records.clone();
        let record = |line: TargetLine| TargetRecord::TargetLine { target: target.to_owned(), line };
        if records.send(record(self.header.clone())).await.is_err() {
            return;
        }
        let mut stop = shared.stop.clone();
        let mut early = Vec::new();
        let clock = tokio::select! {
            clock = tokio::time::timeout(CLOCK_TIMEOUT, self.clock(&mut early)) => clock.ok().flatten(),
            () = async { drop(stop.wait_for(|s| *s).await) } => None,
        };
        if let Some((offset_ns, error_ns)) = clock {
            let _ = records
                .send(TargetRecord::TargetClock { target: target.to_owned(), offset_ns, error_ns })
                .await;
        }
        for line in early {
            let _ = records.send(record(line)).await;
        }
        let mut deadline = None;
        loop {
            let next = async {
                match deadline {
                    Some(d) => {
                        tokio::time::timeout_at(d, self.lines.next(MAX_TARGET_LINE)).await.unwrap_or(Ok(None))
                    }
                    None => self.lines.next(MAX_TARGET_LINE).await,
                }
            };
            tokio::select! {
                line = next => match line {
                    Ok(Some(Ok(line))) => match parse(&line) {
                        Some(Parsed::Line(l)) => {
                            if records.send(record(l)).await.is_err() {
                                break;
                            }
                        }
                        Some(Parsed::Pong(_)) => {}
                        None => log::debug!("target {}: a line that is not a trace line", printable(target)),
                    },
                    Ok(Some(Err(refused))) => {
                        log::warn!("target {}: {refused}: its recording ends here (incomplete)", printable(target));
                        break;
                    }
                    _ => break,
                },
                // (the watch's guard dropped at once: it must not live across the awaits above)
                () = async { drop(stop.wait_for(|s| *s).await) }, if deadline.is_none() => {
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
    /// are kept in `early`.
    async fn clock(&mut self, early: &mut Vec<TargetLine>) -> Option<(i64, u64)> {
        let mut best: Option<(u64, i64)> = None;
        for seq in 0..PINGS {
            let stdin = self.stdin.as_mut()?;
            let sent = monotonic_ns();
            stdin.write_all(format!("{{\"ping\":{seq}}}\n").as_bytes()).await.ok()?;
            loop {
                let line = self.lines.next(MAX_TARGET_LINE).await.ok()??.ok()?;
                match parse(&line)? {
                    Parsed::Pong(p) if p.seq == seq => {
                        let received = monotonic_ns();
                        let rtt = received.saturating_sub(sent);
                        let middle = (sent / 2 + received / 2) as i128;
                        let offset = i64::try_from(p.ts as i128 - middle).ok()?;
                        if best.is_none_or(|(r, _)| rtt < r) {
                            best = Some((rtt, offset));
                        }
                        break;
                    }
                    Parsed::Pong(_) => {}
                    Parsed::Line(l) => early.push(l),
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

/// A line from a recorder: one of a trace's, or a pong.
fn parse(line: &str) -> Option<Parsed> {
    if line.starts_with("{\"type\":\"pong\"") {
        return serde_json::from_str(line).ok().map(Parsed::Pong);
    }
    serde_json::from_str(line).ok().map(Parsed::Line)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorder that sends `count` lines of 100 bytes (newline included).
    fn sender(count: u32) -> Child {
        Command::new("sh")
            .args(["-c", &format!("for i in $(seq {count}); do printf '%099d\\n' $i; done")])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("sh")
    }

    async fn taken(lines: &mut Lines) -> (usize, Option<Refused>) {
        let mut n = 0;
        loop {
            match lines.next(MAX_TARGET_LINE).await.expect("read") {
                Some(Ok(_)) => n += 1,
                Some(Err(refused)) => return (n, Some(refused)),
                None => return (n, None),
            }
        }
    }

    #[test]
    fn a_static_build_is_shipped_only_when_no_one_else_can_change_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().unwrap();
        let (bin, lib) = (root.path().join("bin"), root.path().join("lib/spawntrace"));
        std::fs::create_dir_all(&bin).unwrap();
        let exe = bin.join("spawntrace");
        std::fs::write(&exe, b"exe").unwrap(); // safe: a test's own private temporary directory
        let mode = |p: &std::path::Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode(root.path(), 0o755);
        // none installed: the binary itself
        assert_eq!(static_build(&exe).unwrap(), None);
        std::fs::create_dir_all(&lib).unwrap();
        let built = lib.join("spawntrace-static");
        std::fs::write(&built, b"static").unwrap(); // safe: a test's own private temporary directory
        for p in [root.path().join("lib").as_path(), &lib] {
            mode(p, 0o755);
        }
        mode(&built, 0o755);
        assert_eq!(
            static_build(&exe).unwrap().map(|(p, _)| std::fs::read(p).unwrap()),
            Some(b"static".to_vec())
        );
        // writable by others, at any of the three levels: refused
        for p in [root.path().join("lib").as_path(), &lib, &built] {
            mode(p, 0o777);
            assert!(static_build(&exe).is_err(), "{}", p.display());
            mode(p, 0o755);
        }
        // someone else's (when we can give it away), or a link: refused
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::lchown(&built, Some(65534), None).unwrap();
            assert!(static_build(&exe).is_err());
            std::os::unix::fs::lchown(&built, Some(0), None).unwrap();
        }
        std::fs::rename(&built, lib.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(lib.join("elsewhere"), &built).unwrap();
        assert!(static_build(&exe).is_err());
    }

    #[tokio::test]
    async fn a_target_is_cut_at_its_budget_and_the_run_at_its_own() {
        let kept = Arc::new(AtomicU64::new(0));
        // 100-byte lines, charged 2 × 100 + 50
        let budget = || Budget { own: 2500, all: 3750, kept: kept.clone(), overhead: 50 };
        let mut a = sender(20);
        let mut lines = Lines::new(a.stdout.take().unwrap(), budget());
        assert_eq!(taken(&mut lines).await, (10, Some(Refused::OverOwnBudget)));
        // and so is every later line
        assert_eq!(lines.next(MAX_TARGET_LINE).await.unwrap(), Some(Err(Refused::OverOwnBudget)));
        let mut b = sender(20);
        let mut lines = Lines::new(b.stdout.take().unwrap(), budget());
        assert_eq!(taken(&mut lines).await, (5, Some(Refused::OverRunBudget)));
        assert_eq!(kept.load(Ordering::Relaxed), 3750);
        // within both: every line, then the end
        let kept = Arc::new(AtomicU64::new(0));
        let mut c = sender(3);
        let mut lines =
            Lines::new(c.stdout.take().unwrap(), Budget { own: 600, all: 600, kept, overhead: 0 });
        assert_eq!(taken(&mut lines).await, (3, None));
    }
}
