//! Opens: open/openat/openat2/creat. `syscalls` stashes the arguments at entry; the path is read
//! here at exit, when the kernel has already faulted it in (a tracepoint cannot take page
//! faults).
use aya_ebpf::helpers::bpf_probe_read_user;
use tracer_common::{OpenEvent, OpenFlags, PATH_CAP, counter, kind, nr, open_syscall};

use super::{Record, user_str};
use crate::maps::{Pending, bump, current_ids};

/// creat(2) is open(O_CREAT|O_WRONLY|O_TRUNC).
const CREAT_FLAGS: u64 = 0o100 | 0o1 | 0o1000;

#[inline(always)]
pub fn exit(p: &Pending, ret: i64) {
    let (_, tid, tgid) = current_ids();
    let syscall = match p.nr {
        nr::OPEN => open_syscall::OPEN,
        nr::CREAT => open_syscall::CREAT,
        nr::OPENAT2 => open_syscall::OPENAT2,
        _ => open_syscall::OPENAT,
    };
    let Some(rec) = Record::<OpenEvent>::reserve(kind::OPEN, tid, tgid, 0) else {
        return;
    };
    let ev = rec.ptr;
    // SAFETY: in-place writes to the reserved record.
    unsafe {
        (*ev).syscall = syscall;
        (*ev).ret = ret;
        (*ev).open_flags = match syscall {
            // `struct open_how` starts with the u64 flags.
            open_syscall::OPENAT2 => bpf_probe_read_user(p.flags_or_how as *const u64).unwrap_or_else(|_| {
                bump(counter::READ_FAILURES);
                0
            }),
            open_syscall::CREAT => CREAT_FLAGS,
            _ => p.flags_or_how,
        };
        (*ev).path_len = 0;
        let mut flags = OpenFlags::empty();
        match user_str(&raw mut (*ev).path, p.path) {
            Some(n) => {
                (*ev).path_len = n;
                if n as usize >= PATH_CAP - 1 {
                    flags |= OpenFlags::PATH_TRUNCATED;
                }
            }
            None => flags |= OpenFlags::PATH_UNREADABLE,
        }
        (*rec.header()).flags = flags.bits();
    }
    rec.submit();
}
