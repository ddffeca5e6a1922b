//! Execs: successful ones at `sched_process_exec(task, old_pid, bprm)` (filename from the
//! binprm, argv from the new image's `mm->arg_start..arg_end`); failed attempts at the exit of
//! execve/execveat (dispatched from `syscalls`).
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use tracer_common::{
    ARGV_CAP, ExecEvent, ExecFailedEvent, ExecFailedFlags, ExecFlags, PATH_CAP, counter, exec_syscall, kind,
    nr,
};

use super::{Record, kernel_str, user_bytes, user_str};
use crate::{
    maps::{Pending, bump, current_ids, is_tracked},
    task,
};

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> i32 {
    let (_, tid, tgid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let Some(rec) = Record::<ExecEvent>::reserve(kind::EXEC, tid, tgid, 0) else {
        return 0;
    };
    let ev = rec.ptr;
    let mut flags = ExecFlags::empty();
    // SAFETY: fields of the reserved record are written in place; kernel pointers are read
    // through the faulting-safe helpers.
    unsafe {
        (*ev).old_pid = ctx.arg::<u64>(1) as u32;
        (*ev).filename_len = 0;
        match task::bprm_filename(ctx.arg::<u64>(2))
            .and_then(|f| kernel_str(&raw mut (*ev).filename, f as *const u8))
        {
            Some(n) => {
                (*ev).filename_len = n;
                if n as usize >= PATH_CAP - 1 {
                    flags |= ExecFlags::PATH_TRUNCATED;
                }
            }
            None => flags |= ExecFlags::PATH_UNREADABLE,
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
                        flags |= ExecFlags::ARGV_TRUNCATED;
                    }
                } else {
                    flags |= ExecFlags::ARGV_UNREADABLE;
                }
            }
            None => {
                bump(counter::READ_FAILURES);
                flags |= ExecFlags::ARGV_UNREADABLE;
            }
        }
        (*rec.header()).flags = flags.bits();
    }
    rec.submit();
    0
}

/// The end of an execve/execveat: report a failure with its errno (success was reported by
/// sched_process_exec).
#[inline(always)]
pub fn failed(p: &Pending, ret: i64) {
    if ret >= 0 {
        return;
    }
    let (_, tid, tgid) = current_ids();
    let Some(rec) = Record::<ExecFailedEvent>::reserve(kind::EXEC_FAILED, tid, tgid, 0) else {
        return;
    };
    let ev = rec.ptr;
    // SAFETY: in-place writes to the reserved record; the old image (and its filename string,
    // already faulted in by the kernel's getname) is still mapped after a failed exec.
    unsafe {
        (*ev).syscall = if p.nr == nr::EXECVEAT { exec_syscall::EXECVEAT } else { exec_syscall::EXECVE };
        (*ev).errno = (-ret) as i32;
        (*ev)._pad = 0;
        (*ev).filename_len = 0;
        let mut flags = ExecFailedFlags::empty();
        match user_str(&raw mut (*ev).filename, p.path) {
            Some(n) => {
                (*ev).filename_len = n;
                if n as usize >= PATH_CAP - 1 {
                    flags |= ExecFailedFlags::PATH_TRUNCATED;
                }
            }
            None => flags |= ExecFailedFlags::PATH_UNREADABLE,
        }
        (*rec.header()).flags = flags.bits();
    }
    rec.submit();
}
