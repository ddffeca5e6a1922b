//! Opens: open/openat/openat2/creat (dispatched from `syscalls`). Arguments are stashed at entry;
//! the path is read at exit, when the kernel has already faulted it in (a tracepoint cannot take
//! page faults).
use aya_ebpf::helpers::bpf_probe_read_user;
use tracer_common::{
    OpenEvent, PATH_CAP, PATH_TRUNCATED, PATH_UNREADABLE, counter, kind, nr, open_syscall,
};

use super::{Record, user_str};
use crate::{
    maps::{OPEN_STASH, OpenArgs, bump, current_ids},
    task,
};

/// creat(2) is open(O_CREAT|O_WRONLY|O_TRUNC).
const CREAT_FLAGS: u64 = 0o100 | 0o1 | 0o1000;

#[inline(always)]
pub fn enter(id: u64, nr_: u64, regs: u64) {
    // (syscall, path argument, flags argument (or openat2's `how` pointer))
    let (syscall, path_arg, flags_arg) = match nr_ {
        nr::OPEN => (open_syscall::OPEN, 0, Some(1)),
        nr::CREAT => (open_syscall::CREAT, 0, None),
        nr::OPENAT2 => (open_syscall::OPENAT2, 1, Some(2)),
        _ => (open_syscall::OPENAT, 1, Some(2)),
    };
    let path = task::syscall_arg(regs, path_arg).unwrap_or(0);
    let flags_or_how = match flags_arg {
        Some(a) => task::syscall_arg(regs, a).unwrap_or(0),
        None => CREAT_FLAGS,
    };
    let args = OpenArgs {
        path,
        flags_or_how,
        syscall,
        _pad: 0,
    };
    if OPEN_STASH.insert(&id, &args, 0).is_err() {
        bump(counter::STASH_FAILURES);
    }
}

#[inline(always)]
pub fn exit(id: u64, ret: i64) {
    let (_, tid, tgid) = current_ids();
    // SAFETY: value copied out before removal.
    let Some(args) = (unsafe { OPEN_STASH.get(&id).copied() }) else {
        return;
    };
    let _ = OPEN_STASH.remove(&id);
    let Some(rec) = Record::<OpenEvent>::reserve(kind::OPEN, tid, tgid, 0) else {
        return;
    };
    let ev = rec.ptr;
    // SAFETY: in-place writes to the reserved record.
    unsafe {
        (*ev).syscall = args.syscall;
        (*ev).ret = ret;
        (*ev).open_flags = if args.syscall == open_syscall::OPENAT2 {
            // `struct open_how` starts with the u64 flags.
            bpf_probe_read_user(args.flags_or_how as *const u64).unwrap_or_else(|_| {
                bump(counter::READ_FAILURES);
                0
            })
        } else {
            args.flags_or_how
        };
        (*ev).path_len = 0;
        let mut flags = 0;
        match user_str(&raw mut (*ev).path, args.path) {
            Some(n) => {
                (*ev).path_len = n;
                if n as usize >= PATH_CAP - 1 {
                    flags |= PATH_TRUNCATED;
                }
            }
            None => flags |= PATH_UNREADABLE,
        }
        (*rec.header()).flags = flags;
    }
    rec.submit();
}
