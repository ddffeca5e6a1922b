//! Output files: written whole or not at all, never through a link, and under sudo as the user.
//!
//! A file is written to `NAME.partial` beside the target, created `O_CREAT|O_EXCL|O_NOFOLLOW`,
//! and renamed into place once complete. Under sudo every step that touches a path (the checks,
//! the create, the rename, the clean-up) runs with the invoking user's filesystem credentials
//! (their fsuid, fsgid and groups, on a thread of its own: [`as_user`]), so the files are theirs
//! without any chown, and a directory they cannot write is refused exactly as if they had run
//! the write themselves. An existing target that is not a regular file (a directory, device,
//! FIFO, socket or symlink) is refused, before the command starts and again at the rename.
use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::record::launch::RunAs;

/// `dir/NAME.partial` for `dir/NAME`.
pub fn partial_path(path: &Path) -> Result<PathBuf> {
    let mut name = path.file_name().context("output path has no file name")?.to_owned();
    name.push(".partial");
    Ok(path.with_file_name(name))
}

/// Runs `f` with `user`'s filesystem identity (or ours when `None`).
///
/// Linux keeps credentials per thread: the raw `setgroups`, `setfsgid` and `setfsuid` calls below
/// change only the short-lived thread `f` runs on (glibc's wrappers would change every thread),
/// and a non-zero fsuid drops root's file capabilities there (DAC override, chown, fowner).
pub fn as_user<T: Send>(user: Option<&RunAs>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let Some(user) = user else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_fs_identity(user)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("a file operation as uid {} panicked", user.uid))
    })
}

fn enter_fs_identity(user: &RunAs) -> Result<()> {
    // x86_64 only (as the probes' BTF offsets): elsewhere SYS_setgroups may be the 16-bit call.
    let groups: Vec<libc::gid_t> = user.groups.iter().map(|g| g.as_raw()).collect();
    // SAFETY: plain syscalls on this thread's credentials; `groups` outlives the call.
    let ok = unsafe {
        libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) == 0 && {
            libc::setfsgid(user.gid.as_raw());
            libc::setfsuid(user.uid.as_raw());
            // Both return the previous value; an invalid id (-1) changes nothing and tells the
            // current one, so this checks that the switch took effect.
            libc::setfsgid(u32::MAX) as u32 == user.gid.as_raw()
                && libc::setfsuid(u32::MAX) as u32 == user.uid.as_raw()
        }
    };
    anyhow::ensure!(
        ok,
        "cannot take uid {}'s file credentials: {}",
        user.uid,
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Refuses an existing `path` that is not a regular file: replacing it would replace a device
/// (`-o /dev/null`), a FIFO, a directory or a symlink with our file.
pub fn check_target(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => {
            bail!("refusing to write {}: it exists and is {}, not a regular file", path.display(), kind(&m))
        }
    }
}

fn kind(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let t = m.file_type();
    match () {
        _ if t.is_dir() => "a directory",
        _ if t.is_symlink() => "a symbolic link",
        _ if t.is_fifo() => "a FIFO",
        _ if t.is_socket() => "a socket",
        _ if t.is_char_device() || t.is_block_device() => "a device",
        _ => "not a regular file",
    }
}

/// Creates `path` anew (`O_EXCL|O_NOFOLLOW`): a stale regular file or symlink of that name, left
/// by an earlier run, is removed first (the link itself, never what it points to).
fn create_new(path: &Path) -> std::io::Result<File> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() || m.file_type().is_symlink() => std::fs::remove_file(path)?,
        _ => {}
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// An output file being written: `NAME.partial` until [`Partial::commit`].
pub struct Partial {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
    owner: Option<RunAs>,
}

impl Partial {
    /// Checks the target and creates `NAME.partial` as `owner`; nothing exists yet at `path`.
    pub fn create(path: &Path, owner: Option<&RunAs>) -> Result<Self> {
        let tmp = partial_path(path)?;
        let file = as_user(owner, || {
            check_target(path)?;
            create_new(&tmp).with_context(|| format!("cannot write {}", path.display()))
        })?;
        Ok(Self { file: Some(file), tmp, path: path.to_owned(), owner: owner.cloned() })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until commit or discard")
    }

    /// Where the data goes until commit.
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// Renames the (flushed) partial file into place; returns the final path.
    pub fn commit(mut self) -> Result<PathBuf> {
        let file = self.file.take().expect("open until commit");
        file.sync_data().with_context(|| format!("writing {}", self.tmp.display()))?;
        drop(file);
        let (tmp, path) = (self.tmp.clone(), self.path.clone());
        as_user(self.owner.as_ref(), || {
            check_target(&path)?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        })?;
        Ok(std::mem::take(&mut self.path))
    }

    /// Removes the partial file.
    pub fn discard(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        if self.file.take().is_some() {
            let tmp = self.tmp.clone();
            let _ = as_user(self.owner.as_ref(), || Ok(std::fs::remove_file(&tmp)?));
        }
    }
}

/// Writes `path` with `fill` as `owner`; on any error the partial file is removed and `path` is
/// untouched.
pub fn write_file(
    path: &Path,
    owner: Option<&RunAs>,
    fill: impl FnOnce(&mut BufWriter<&mut File>) -> Result<()>,
) -> Result<()> {
    let mut out = Partial::create(path, owner)?;
    let tmp = out.tmp().to_owned();
    let filled = {
        let mut w = BufWriter::new(out.file());
        fill(&mut w).and_then(|()| w.flush().with_context(|| format!("writing {}", tmp.display())))
    };
    match filled {
        Ok(()) => out.commit().map(drop),
        Err(e) => {
            out.discard();
            Err(e)
        }
    }
}

/// Creates a log file anew as `owner` (like [`Partial::create`], without the rename: a log is
/// useful while it is written), refusing a target that is not a regular file.
pub fn open_log(path: &Path, owner: Option<&RunAs>) -> Result<File> {
    as_user(owner, || {
        check_target(path)?;
        create_new(path).with_context(|| format!("cannot write {}", path.display()))
    })
}

/// Creates directory `path` (and its parents) as `owner`. An existing one must be a directory
/// (not a link) of the writing user: files are put into it by name, and its owner could swap
/// what is inside for links meanwhile.
pub fn create_dir(path: &Path, owner: Option<&RunAs>) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let uid = owner.map_or_else(|| nix::unistd::geteuid().as_raw(), |o| o.uid.as_raw());
    as_user(owner, || {
        std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
        let m =
            std::fs::symlink_metadata(path).with_context(|| format!("cannot create {}", path.display()))?;
        if !m.is_dir() {
            bail!("refusing to write into {}: it is {}, not a directory", path.display(), kind(&m));
        }
        if m.uid() != uid {
            bail!("refusing to write into {}: it belongs to uid {}, not {uid}", path.display(), m.uid());
        }
        Ok(())
    })
}

/// Opens `path` for reading as `owner`: under sudo, only what the user could read themselves
/// (a trace of root's is not theirs to render).
pub fn open_read(path: &Path, owner: Option<&RunAs>) -> Result<File> {
    as_user(owner, || File::open(path).with_context(|| format!("cannot open {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.svg");
        let err = write_file(&p, None, |w| {
            w.write_all(b"half")?;
            anyhow::bail!("boom")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_file(&p, None, |w| Ok(w.write_all(b"whole")?)).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "whole");
        assert!(write_file(Path::new("/nonexistent-dir/x"), None, |_| Ok(())).is_err());
    }

    #[test]
    fn links_and_special_files_are_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap(); // safe: test fixture in a private tempdir
        // A planted NAME.partial link is removed, not followed.
        let out = dir.path().join("out.jsonl");
        std::os::unix::fs::symlink(&victim, partial_path(&out).unwrap()).unwrap();
        write_file(&out, None, |w| Ok(w.write_all(b"trace")?)).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "trace");
        // A target that is a link, a directory or a device is refused up front.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        for (target, what) in
            [(link.as_path(), "symbolic link"), (dir.path(), "directory"), (fifo.as_path(), "FIFO")]
        {
            let err = Partial::create(target, None)
                .err()
                .unwrap_or_else(|| panic!("{} not refused", target.display()));
            assert!(format!("{err:#}").contains(what), "{err:#}");
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!partial_path(&link).unwrap().exists());
    }
}
