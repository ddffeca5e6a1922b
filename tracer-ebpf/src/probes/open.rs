//! Opens: open/openat/openat2/creat. Arguments are stashed at sys_enter; the path is read at
//! sys_exit, when the kernel has already faulted it in (a tracepoint cannot take page faults).
use aya_ebpf::{helpers::bpf_probe_read_user, macros::tracepoint, programs::TracePointContext};
use tracer_common::{
    OpenEvent, PATH_CAP, PATH_TRUNCATED, PATH_UNREADABLE, counter, kind, open_syscall,
};

use super::{Record, user_str};
use crate::maps::{OPEN_STASH, OpenArgs, bump, current_ids, is_tracked};

/// Stash the path pointer at `path_off` and the flags at `flags_off` (None: creat's implied
/// `O_CREAT|O_WRONLY|O_TRUNC`).
#[inline(always)]
fn enter(ctx: &TracePointContext, syscall: u32, path_off: usize, flags_off: Option<usize>) -> u32 {
    const CREAT_FLAGS: u64 = 0o100 | 0o1 | 0o1000;
    let (id, _, tgid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    // SAFETY: fixed tracepoint layouts (checked by userspace at load).
    let path = unsafe { ctx.read_at::<u64>(path_off) }.unwrap_or(0);
    let flags_or_how = match flags_off {
        Some(off) => unsafe { ctx.read_at::<u64>(off) }.unwrap_or(0),
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
    0
}

#[inline(always)]
fn exit(ctx: &TracePointContext) -> u32 {
    let (id, tid, tgid) = current_ids();
    // SAFETY: value copied out before removal.
    let Some(args) = (unsafe { OPEN_STASH.get(&id).copied() }) else {
        return 0;
    };
    let _ = OPEN_STASH.remove(&id);
    let Some(rec) = Record::<OpenEvent>::reserve(kind::OPEN, tid, tgid, 0) else {
        return 0;
    };
    let ev = rec.ptr;
    // SAFETY: in-place writes to the reserved record; `ret` at offset 16 of sys_exit_*.
    unsafe {
        (*ev).syscall = args.syscall;
        (*ev).ret = ctx.read_at::<i64>(16).unwrap_or(0);
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
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_open")]
pub fn sys_enter_open(ctx: TracePointContext) -> u32 {
    enter(&ctx, open_syscall::OPEN, 16, Some(24))
}

#[tracepoint(category = "syscalls", name = "sys_enter_openat")]
pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
    enter(&ctx, open_syscall::OPENAT, 24, Some(32))
}

#[tracepoint(category = "syscalls", name = "sys_enter_openat2")]
pub fn sys_enter_openat2(ctx: TracePointContext) -> u32 {
    enter(&ctx, open_syscall::OPENAT2, 24, Some(32))
}

#[tracepoint(category = "syscalls", name = "sys_enter_creat")]
pub fn sys_enter_creat(ctx: TracePointContext) -> u32 {
    enter(&ctx, open_syscall::CREAT, 16, None)
}

#[tracepoint(category = "syscalls", name = "sys_exit_open")]
pub fn sys_exit_open(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_openat")]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_openat2")]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_creat")]
pub fn sys_exit_creat(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}
