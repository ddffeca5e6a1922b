//! Decodes ring-buffer records (the `tracer_common` ABI) into trace [`Event`]s.
use tracer_common::{
    EventHeader, ExecEvent, ExecFailedEvent, ExecFailedFlags, ExecFlags, ExitEvent, ExitFlags, ForkEvent,
    ForkFlags, OpenEvent, OpenFlags, exec_syscall, kind, open_syscall, record_size,
};

use crate::trace::{Event, Status, errno_name};

/// Why a record could not be decoded (counted, never fatal).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown record kind {0}")]
    Kind(u32),
    #[error("record kind {kind} has {got} bytes, expected {want}")]
    Size { kind: u32, got: usize, want: usize },
}

fn read<T: Copy>(bytes: &[u8]) -> T {
    debug_assert!(bytes.len() >= size_of::<T>());
    // SAFETY: length checked by the caller against record_size; T is repr(C) plain data.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

fn text(bytes: &[u8], len: u32) -> String {
    let len = (len as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

/// NUL-separated argv bytes into arguments (a cut-off last argument is kept as is).
pub fn split_argv(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let h: EventHeader = read(bytes);
    let want = record_size(h.kind).ok_or(DecodeError::Kind(h.kind))?;
    if bytes.len() < want {
        return Err(DecodeError::Size { kind: h.kind, got: bytes.len(), want });
    }
    let (ts, pid, tgid) = (h.ts_ns, h.pid, h.tgid);
    Ok(match h.kind {
        kind::FORK => {
            let e: ForkEvent = read(bytes);
            let flags = ForkFlags::from_bits_retain(h.flags);
            Event::Fork {
                ts,
                pid,
                tgid,
                ppid: e.parent_pid,
                ptgid: e.parent_tgid,
                thread: flags.contains(ForkFlags::THREAD),
                root: flags.contains(ForkFlags::ROOT),
            }
        }
        kind::EXEC => {
            let e: Box<ExecEvent> = Box::new(read(bytes));
            let flags = ExecFlags::from_bits_retain(h.flags);
            let argv_len = (e.argv_len as usize).min(e.argv.len());
            Event::Exec {
                ts,
                pid,
                tgid,
                old_pid: e.old_pid,
                filename: text(&e.filename, e.filename_len),
                argv: split_argv(&e.argv[..argv_len]),
                argv_bytes: e.argv_total,
                argv_truncated: flags.contains(ExecFlags::ARGV_TRUNCATED),
                argv_unreadable: flags.contains(ExecFlags::ARGV_UNREADABLE),
                filename_truncated: flags.contains(ExecFlags::PATH_TRUNCATED),
            }
        }
        kind::EXEC_FAILED => {
            let e: ExecFailedEvent = read(bytes);
            Event::ExecFailed {
                ts,
                pid,
                tgid,
                syscall: match e.syscall {
                    exec_syscall::EXECVEAT => "execveat",
                    _ => "execve",
                }
                .into(),
                errno: e.errno,
                error: errno_name(e.errno),
                filename: text(&e.filename, e.filename_len),
                filename_truncated: ExecFailedFlags::from_bits_retain(h.flags)
                    .contains(ExecFailedFlags::PATH_TRUNCATED),
            }
        }
        kind::EXIT => {
            let e: ExitEvent = read(bytes);
            let flags = ExitFlags::from_bits_retain(h.flags);
            Event::Exit {
                ts,
                pid,
                tgid,
                group_dead: e.group_dead != 0,
                status: if flags.contains(ExitFlags::CODE_UNAVAILABLE) {
                    Status::Unknown
                } else {
                    Status::from_wait(e.exit_code)
                },
                cpu_ns: (!flags.contains(ExitFlags::CPU_UNAVAILABLE)).then_some(e.cpu_ns),
            }
        }
        kind::OPEN => {
            let e: OpenEvent = read(bytes);
            Event::Open {
                ts,
                pid,
                tgid,
                syscall: match e.syscall {
                    open_syscall::OPEN => "open",
                    open_syscall::OPENAT2 => "openat2",
                    open_syscall::CREAT => "creat",
                    _ => "openat",
                }
                .into(),
                path: text(&e.path, e.path_len),
                flags: e.open_flags,
                ret: e.ret,
                path_truncated: OpenFlags::from_bits_retain(h.flags).contains(OpenFlags::PATH_TRUNCATED),
            }
        }
        other => return Err(DecodeError::Kind(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: test-only view of a repr(C) value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn argv_splitting() {
        assert_eq!(split_argv(b"sh\0-c\0echo hi\0"), vec!["sh", "-c", "echo hi"]);
        assert_eq!(split_argv(b"sh\0-c\0ech"), vec!["sh", "-c", "ech"]);
        assert_eq!(split_argv(b"a\0\0b\0"), vec!["a", "", "b"]);
        assert!(split_argv(b"").is_empty());
    }

    #[test]
    fn decodes_exec_with_truncation_flag() {
        let mut e = ExecEvent {
            header: EventHeader {
                kind: kind::EXEC,
                pid: 5,
                tgid: 5,
                flags: ExecFlags::ARGV_TRUNCATED.bits(),
                ts_ns: 9,
            },
            old_pid: 5,
            filename_len: 9,
            argv_len: 8,
            argv_total: 9000,
            filename: [0; tracer_common::PATH_CAP],
            argv: [0; tracer_common::ARGV_CAP],
        };
        e.filename[..9].copy_from_slice(b"/bin/true");
        e.argv[..8].copy_from_slice(b"true\0abc");
        match decode(&as_bytes(&e)).unwrap() {
            Event::Exec { filename, argv, argv_truncated, argv_bytes, .. } => {
                assert_eq!(filename, "/bin/true");
                assert_eq!(argv, vec!["true", "abc"]);
                assert!(argv_truncated);
                assert_eq!(argv_bytes, 9000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert_eq!(decode(&[0; 4]), Err(DecodeError::Short(4)));
        let h = EventHeader { kind: 99, ..Default::default() };
        assert_eq!(decode(&as_bytes(&h)), Err(DecodeError::Kind(99)));
        let h = EventHeader { kind: kind::EXEC, ..Default::default() };
        assert!(matches!(decode(&as_bytes(&h)), Err(DecodeError::Size { .. })));
    }
}
