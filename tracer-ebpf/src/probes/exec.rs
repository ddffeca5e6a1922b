//! Execs: successful ones at `sched_process_exec` (filename from the tracepoint, argv from the
//! new image's `mm->arg_start..arg_end`), failed attempts at `sys_exit_execve(at)`.
use aya_ebpf::{EbpfContext as _, macros::tracepoint, programs::TracePointContext};
use tracer_common::{
    ARGV_CAP, EXEC_ARGV_TRUNCATED, EXEC_ARGV_UNREADABLE, ExecEvent, ExecFailedEvent, PATH_CAP,
    PATH_TRUNCATED, PATH_UNREADABLE, counter, exec_syscall, kind,
};

use super::{Record, kernel_str, user_bytes, user_str};
use crate::{
    maps::{EXEC_STASH, bump, current_ids, is_tracked},
    task,
};

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let (_, tid, tgid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let Some(rec) = Record::<ExecEvent>::reserve(kind::EXEC, tid, tgid, 0) else {
        return 0;
    };
    let ev = rec.ptr;
    let mut flags = 0;
    // SAFETY: fixed tracepoint layout (checked by userspace at load): `__data_loc filename` at 8,
    // `old_pid` at 16. Fields of the reserved record are written in place.
    unsafe {
        (*ev).old_pid = ctx.read_at::<i32>(16).unwrap_or(0) as u32;
        (*ev).filename_len = 0;
        if let Ok(loc) = ctx.read_at::<u32>(8) {
            let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
            match kernel_str(&raw mut (*ev).filename, src) {
                Some(n) => (*ev).filename_len = n,
                None => flags |= PATH_UNREADABLE,
            }
            if (loc >> 16) as usize > PATH_CAP {
                flags |= PATH_TRUNCATED;
            }
        }
        (*ev).argv_len = 0;
        (*ev).argv_total = 0;
        match task::argv_range() {
            Some((start, end)) => {
                let total = end - start;
                (*ev).argv_total = total as u32;
                if user_bytes(&raw mut (*ev).argv, start, total) {
                    (*ev).argv_len = total.min(ARGV_CAP as u64) as u32;
                    if total > ARGV_CAP as u64 {
                        flags |= EXEC_ARGV_TRUNCATED;
                    }
                } else {
                    flags |= EXEC_ARGV_UNREADABLE;
                }
            }
            None => {
                bump(counter::READ_FAILURES);
                flags |= EXEC_ARGV_UNREADABLE;
            }
        }
        (*rec.header()).flags = flags;
    }
    rec.submit();
    0
}

#[inline(always)]
fn enter(ctx: &TracePointContext, filename_offset: usize) -> u32 {
    let (id, _, tgid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    // SAFETY: fixed tracepoint layout (checked by userspace at load).
    if let Ok(filename) = unsafe { ctx.read_at::<u64>(filename_offset) } {
        if EXEC_STASH.insert(&id, &filename, 0).is_err() {
            bump(counter::STASH_FAILURES);
        }
    }
    0
}

#[inline(always)]
fn exit(ctx: &TracePointContext, syscall: u32) -> u32 {
    let (id, tid, tgid) = current_ids();
    // SAFETY: value copied out before removal.
    let Some(filename) = (unsafe { EXEC_STASH.get(&id).copied() }) else {
        return 0;
    };
    let _ = EXEC_STASH.remove(&id);
    // SAFETY: `ret` at offset 16 of sys_exit_*.
    let ret = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(0);
    if ret >= 0 {
        return 0; // success was reported by sched_process_exec
    }
    let Some(rec) = Record::<ExecFailedEvent>::reserve(kind::EXEC_FAILED, tid, tgid, 0) else {
        return 0;
    };
    let ev = rec.ptr;
    // SAFETY: in-place writes to the reserved record; the old image (and its filename string,
    // already faulted in by the kernel's getname) is still mapped after a failed exec.
    unsafe {
        (*ev).syscall = syscall;
        (*ev).errno = (-ret) as i32;
        (*ev)._pad = 0;
        (*ev).filename_len = 0;
        let mut flags = 0;
        match user_str(&raw mut (*ev).filename, filename) {
            Some(n) => {
                (*ev).filename_len = n;
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

#[tracepoint(category = "syscalls", name = "sys_enter_execve")]
pub fn sys_enter_execve(ctx: TracePointContext) -> u32 {
    enter(&ctx, 16)
}

#[tracepoint(category = "syscalls", name = "sys_enter_execveat")]
pub fn sys_enter_execveat(ctx: TracePointContext) -> u32 {
    enter(&ctx, 24)
}

#[tracepoint(category = "syscalls", name = "sys_exit_execve")]
pub fn sys_exit_execve(ctx: TracePointContext) -> u32 {
    exit(&ctx, exec_syscall::EXECVE)
}

#[tracepoint(category = "syscalls", name = "sys_exit_execveat")]
pub fn sys_exit_execveat(ctx: TracePointContext) -> u32 {
    exit(&ctx, exec_syscall::EXECVEAT)
}
