//! Starting the traced command: as the invoking user when run through sudo, with signals that
//! were sent to the tracer passed on to it.
use std::{
    ffi::{CString, OsString},
    os::unix::process::CommandExt as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI32, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};
use nix::unistd::{Gid, Uid, User};

/// Who the command runs as, when not as the tracer's own (root) identity.
#[derive(Clone, Debug)]
pub struct RunAs {
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub name: String,
    pub home: String,
}

impl RunAs {
    /// The sudo caller (SUDO_UID/SUDO_GID) when we are root through sudo and `as_root` is off.
    pub fn from_sudo(as_root: bool) -> Result<Option<Self>> {
        if as_root || !Uid::effective().is_root() {
            return Ok(None);
        }
        let Some(uid) = std::env::var_os("SUDO_UID") else {
            return Ok(None);
        };
        let uid: u32 = uid.to_str().and_then(|s| s.parse().ok()).context("SUDO_UID is not a number")?;
        if uid == 0 {
            return Ok(None);
        }
        let user = User::from_uid(Uid::from_raw(uid))
            .context("looking up SUDO_UID")?
            .with_context(|| format!("SUDO_UID {uid} has no passwd entry"))?;
        let gid = match std::env::var("SUDO_GID").ok().and_then(|g| g.parse().ok()) {
            Some(g) => Gid::from_raw(g),
            None => user.gid,
        };
        let cname = CString::new(user.name.clone()).context("user name with NUL")?;
        let groups = nix::unistd::getgrouplist(&cname, gid).context("reading the user's groups")?;
        Ok(Some(Self {
            uid: user.uid,
            gid,
            groups,
            name: user.name,
            home: user.dir.to_string_lossy().into_owned(),
        }))
    }
}

impl RunAs {
    /// Makes `cmd` run as this user: groups, gid and uid set between fork and exec.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        // SAFETY: only async-signal-safe syscalls between fork and exec (nix's setgroups passes
        // the slice to libc as it is).
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
                Ok(())
            });
        }
    }
}

/// Why the command could not be started; maps to the shell's 126/127.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}: command not found")]
    NotFound(String),
    #[error("{0}: permission denied")]
    NotExecutable(String),
    #[error("{0}: {1}")]
    Other(String, std::io::Error),
}

impl SpawnError {
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::NotFound(_) => 127,
            _ => 126,
        }
    }
}

/// Makes `cmd` a helper spawntrace runs for the user (not the traced command): their
/// credentials (`run_as`), a session of its own (no terminal to stop it on, no signal sent to
/// spawntrace's process group), and none of spawntrace's ambient capabilities.
pub fn users_helper(cmd: &mut std::process::Command, run_as: Option<&RunAs>) {
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(r) = run_as {
        r.apply(cmd);
    }
}

/// The terminal the command may take over: stdin, when it is a terminal whose foreground
/// process group is ours (we were started in the foreground of an interactive shell).
pub fn foreground_terminal() -> Option<std::os::fd::BorrowedFd<'static>> {
    // SAFETY: fd 0 stays open for the life of the process.
    let stdin = unsafe { std::os::fd::BorrowedFd::borrow_raw(0) };
    let ours = nix::unistd::getpgrp();
    (nix::unistd::isatty(stdin).unwrap_or(false) && nix::unistd::tcgetpgrp(stdin).ok() == Some(ours))
        .then_some(stdin)
}

/// Starts `argv` as `run_as` (if given), in a process group of its own (so that signals reach
/// its whole tree); `terminal`: that group becomes the terminal's foreground group (Ctrl-C and
/// Ctrl-Z reach the command as they would without spawntrace; see [`SignalForwarder`] for
/// job control). Ambient capabilities are never passed on: a tracer given CAP_BPF and
/// CAP_PERFMON does not hand them to the command.
pub fn spawn(
    argv: &[OsString],
    run_as: Option<&RunAs>,
    env: &[(OsString, OsString)],
    log: Option<std::fs::File>,
    terminal: bool,
) -> Result<tokio::process::Child, SpawnError> {
    let name = || argv[0].to_string_lossy().into_owned();
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(r) = run_as {
        cmd.env("HOME", &r.home).env("USER", &r.name).env("LOGNAME", &r.name);
    }
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
            if terminal {
                take_terminal()?;
            }
            if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(r) = run_as {
        r.apply(&mut cmd);
    }
    if let Some(file) = log {
        let err = file.try_clone().map_err(|e| SpawnError::Other(name(), e))?;
        cmd.stdin(std::process::Stdio::null()).stdout(file).stderr(err);
    }
    let child = tokio::process::Command::from(cmd).spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SpawnError::NotFound(name()),
        std::io::ErrorKind::PermissionDenied => SpawnError::NotExecutable(name()),
        _ => SpawnError::Other(name(), e),
    })?;
    if let Some(pid) = child.id() {
        // Also from this side, so the group exists before we signal it (a no-op once exec'd).
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::unistd::setpgid(pid, pid);
    }
    Ok(child)
}

/// Makes the calling process's group the foreground group of the terminal on stdin; SIGTTOU,
/// which a background group gets for trying, is blocked meanwhile.
fn take_terminal() -> std::io::Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut ttou = SigSet::empty();
    ttou.add(Signal::SIGTTOU);
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&ttou), Some(&mut old))?;
    // SAFETY: fd 0 is the terminal (checked by the caller); tcsetpgrp is async-signal-safe.
    let r = unsafe { libc::tcsetpgrp(0, libc::getpgrp()) };
    let err = std::io::Error::last_os_error();
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
    if r != 0 { Err(err) } else { Ok(()) }
}

/// Passes SIGINT/SIGTERM/SIGHUP/SIGQUIT sent to the tracer on to the command's process group,
/// and ends the group with SIGKILL when it is still there the grace period later; the
/// tracer itself keeps running until the command has ended, so the trace is completed.
///
/// With a terminal the command's group is the foreground group, so Ctrl-C and Ctrl-Z reach it
/// directly. When it stops (Ctrl-Z), the tracer takes the terminal back and stops itself, so
/// the shell sees the job stopped; when continued (`fg`, `bg`) it continues the command and, in
/// the foreground, hands the terminal back.
pub struct SignalForwarder {
    shared: Arc<Shared>,
    handle: signal_hook::iterator::Handle,
}

#[derive(Default)]
struct Shared {
    /// The command's pid (= its process group), 0 before it starts.
    child: AtomicI32,
    interrupted: AtomicBool,
    terminal: AtomicBool,
    /// ms after the first forwarded signal at which what is left of the group is killed.
    grace_ms: std::sync::atomic::AtomicU64,
    /// The last signal to pass on, for one that came before the command started.
    pending: AtomicI32,
    /// The thread that does that (see [`kill_group_after`]).
    killer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Kills process group `pgid` with SIGKILL `grace` from now, unless it has emptied by then. A
/// group id is not reused while the group has a member, so polling it (signal 0) until the
/// deadline never hits a stranger's group.
fn kill_group_after(pgid: i32, grace: std::time::Duration) {
    use nix::sys::signal::{SIGKILL, killpg};
    let group = nix::unistd::Pid::from_raw(pgid);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if killpg(group, None).is_err() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50).min(grace));
    }
    let _ = killpg(group, SIGKILL);
    // Until they are gone (a second at most), so that their exits make the trace.
    for _ in 0..20 {
        if killpg(group, None).is_err() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl SignalForwarder {
    pub fn install(grace: std::time::Duration) -> Result<Self> {
        use signal_hook::{
            consts::{SIGCHLD, SIGCONT, SIGHUP, SIGINT, SIGQUIT, SIGTERM},
            iterator::{SignalsInfo, exfiltrator::WithOrigin},
        };
        let mut signals =
            SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGCHLD, SIGCONT])
                .context("installing signal handlers")?;
        let handle = signals.handle();
        let shared = Arc::new(Shared::default());
        shared.grace_ms.store(grace.as_millis() as u64, Ordering::SeqCst);
        let s = shared.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for origin in signals.forever() {
                    let pid = s.child.load(Ordering::SeqCst);
                    match origin.signal {
                        SIGCHLD => s.on_child_state(pid),
                        SIGCONT => {}
                        sig => {
                            s.interrupted.store(true, Ordering::SeqCst);
                            s.pending.store(sig, Ordering::SeqCst);
                            if pid <= 0 {
                                continue; // passed on by set_child
                            }
                            if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
                                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
                            }
                            let mut killer = s.killer.lock().unwrap_or_else(|e| e.into_inner());
                            if killer.is_none() {
                                let grace =
                                    std::time::Duration::from_millis(s.grace_ms.load(Ordering::SeqCst));
                                *killer = std::thread::Builder::new()
                                    .name("grace".into())
                                    .spawn(move || kill_group_after(pid, grace))
                                    .ok();
                            }
                        }
                    }
                }
            })
            .context("starting the signal thread")?;
        Ok(Self { shared, handle })
    }

    /// The command started (`terminal`: its group has the terminal).
    pub fn set_child(&self, pid: u32, terminal: bool) {
        self.shared.terminal.store(terminal, Ordering::SeqCst);
        self.shared.child.store(pid as i32, Ordering::SeqCst);
        // A signal that arrived while the command was being started is passed on now.
        let sig = self.shared.pending.load(Ordering::SeqCst);
        if sig > 0
            && let Ok(sig) = nix::sys::signal::Signal::try_from(sig)
        {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    pub fn interrupted(&self) -> bool {
        self.shared.interrupted.load(Ordering::SeqCst)
    }

    /// After a forwarded signal: waits until COMMAND's group has emptied, or has been killed at
    /// the end of the grace period (members that ignored the signal must not outlive the run).
    pub fn finish(&self) {
        let killer = self.shared.killer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(k) = killer {
            let _ = k.join();
        }
    }
}

impl Shared {
    /// Job control: the command's group stopped (Ctrl-Z, SIGSTOP): stop with it, continue it
    /// when we are continued.
    fn on_child_state(&self, pid: i32) {
        use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
        if pid <= 0 {
            return;
        }
        // WSTOPPED without WEXITED: this consumes stop reports only; exits stay for tokio's
        // reaper.
        let Ok(WaitStatus::Stopped(..)) =
            waitid(Id::Pid(nix::unistd::Pid::from_raw(pid)), WaitPidFlag::WSTOPPED | WaitPidFlag::WNOHANG)
        else {
            return;
        };
        let terminal = self.terminal.load(Ordering::SeqCst);
        if terminal {
            let _ = give_terminal(nix::unistd::getpgrp());
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGSTOP);
        // Continued: in the foreground again (fg) the command gets the terminal back.
        if terminal && foreground_terminal().is_some() {
            let _ = give_terminal(nix::unistd::Pid::from_raw(pid));
        }
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGCONT);
    }
}

/// Makes `pgrp` the foreground group of the terminal on stdin (SIGTTOU blocked on this thread).
fn give_terminal(pgrp: nix::unistd::Pid) -> Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut ttou = SigSet::empty();
    ttou.add(Signal::SIGTTOU);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&ttou), None)?;
    // SAFETY: fd 0 stays open for the life of the process.
    let stdin = unsafe { std::os::fd::BorrowedFd::borrow_raw(0) };
    let r = nix::unistd::tcsetpgrp(stdin, pgrp);
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&ttou), None)?;
    Ok(r?)
}

/// Takes the terminal back from the command's group once it has ended (when it had it).
pub fn restore_terminal(had_it: bool) {
    if had_it {
        let _ = give_terminal(nix::unistd::getpgrp());
    }
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        self.handle.close();
    }
}

/// Rejects an empty command line.
pub fn check_argv(argv: &[OsString]) -> Result<()> {
    if argv.is_empty() {
        bail!("no command given: usage `spawntrace [OPTIONS] -- COMMAND [ARGS...]`");
    }
    Ok(())
}
