//! Starting the traced command: as the invoking user when run through sudo, with signals that
//! were sent to the tracer passed on to it.
use std::{
    ffi::CString,
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

    /// Gives a file we created to this user.
    pub fn chown(&self, path: &std::path::Path) -> Result<()> {
        nix::unistd::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {}", path.display()))
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

/// Starts `argv` (inheriting stdio and process group) as `run_as`, if given.
pub fn spawn(
    argv: &[String],
    run_as: Option<&RunAs>,
    env: &[(std::ffi::OsString, std::ffi::OsString)],
    log: Option<&std::path::Path>,
) -> Result<tokio::process::Child, SpawnError> {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(r) = run_as {
        cmd.env("HOME", &r.home).env("USER", &r.name).env("LOGNAME", &r.name);
        let (uid, gid, groups) = (r.uid, r.gid, r.groups.clone());
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
                Ok(())
            });
        }
    }
    if let Some(log) = log {
        let file = std::fs::File::create(log).map_err(|e| SpawnError::Other(log.display().to_string(), e))?;
        let err = file.try_clone().map_err(|e| SpawnError::Other(log.display().to_string(), e))?;
        cmd.stdin(std::process::Stdio::null()).stdout(file).stderr(err);
    }
    tokio::process::Command::from(cmd).spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SpawnError::NotFound(argv[0].clone()),
        std::io::ErrorKind::PermissionDenied => SpawnError::NotExecutable(argv[0].clone()),
        _ => SpawnError::Other(argv[0].clone(), e),
    })
}

/// Passes SIGINT/SIGTERM/SIGHUP/SIGQUIT on to the child.
///
/// A signal the terminal generated (Ctrl-C) already reached the child, which shares our process
/// group, so only signals *sent* to the tracer (kill(1) and friends) are forwarded; either way
/// the tracer keeps running until the child exits, so the trace is completed.
pub struct SignalForwarder {
    child: Arc<AtomicI32>,
    interrupted: Arc<AtomicBool>,
    handle: signal_hook::iterator::Handle,
}

impl SignalForwarder {
    pub fn install() -> Result<Self> {
        use signal_hook::{
            consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM},
            iterator::{SignalsInfo, exfiltrator::WithOrigin},
            low_level::siginfo::Cause,
        };
        let mut signals = SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])
            .context("installing signal handlers")?;
        let handle = signals.handle();
        let child = Arc::new(AtomicI32::new(0));
        let interrupted = Arc::new(AtomicBool::new(false));
        let (c, i) = (child.clone(), interrupted.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for origin in signals.forever() {
                    i.store(true, Ordering::SeqCst);
                    let pid = c.load(Ordering::SeqCst);
                    let from_tty = matches!(origin.cause, Cause::Kernel);
                    if pid > 0
                        && !from_tty
                        && let Ok(sig) = nix::sys::signal::Signal::try_from(origin.signal)
                    {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                    }
                }
            })
            .context("starting the signal thread")?;
        Ok(Self { child, interrupted, handle })
    }

    pub fn set_child(&self, pid: u32) {
        self.child.store(pid as i32, Ordering::SeqCst);
    }

    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        self.handle.close();
    }
}

/// Rejects an empty command line.
pub fn check_argv(argv: &[String]) -> Result<()> {
    if argv.is_empty() {
        bail!("no command given: usage `spawntrace [OPTIONS] -- COMMAND [ARGS...]`");
    }
    Ok(())
}
