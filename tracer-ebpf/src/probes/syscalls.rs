//! The two syscall hooks (`raw_syscalls:sys_enter/sys_exit`): they see every syscall on the
//! machine, so sys_enter checks the syscall number first and only tracked processes go further;
//! sys_exit looks only at syscalls sys_enter stashed (one map lookup otherwise).
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use tracer_common::{counter, nr};

use super::{exec, open};
use crate::{
    maps::{PENDING, Pending, bump, current_ids, is_tracked},
    task,
};

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long id)
    let nr_ = ctx.arg::<u64>(1);
    let (path_arg, flags_arg) = match nr_ {
        nr::EXECVE => (0, None),
        nr::EXECVEAT => (1, None),
        nr::OPEN => (0, Some(1)),
        nr::CREAT => (0, None),
        nr::OPENAT | nr::OPENAT2 => (1, Some(2)),
        _ => return 0,
    };
    let (id, _, tgid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let regs = ctx.arg::<u64>(0);
    let pending = Pending {
        nr: nr_,
        path: task::syscall_arg(regs, path_arg).unwrap_or(0),
        flags_or_how: flags_arg.and_then(|a| task::syscall_arg(regs, a)).unwrap_or(0),
    };
    if PENDING.insert(id, pending, 0).is_err() {
        bump(counter::STASH_FAILURES);
    }
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long ret)
    let (id, _, _) = current_ids();
    // SAFETY: value copied out before removal.
    let Some(p) = (unsafe { PENDING.get(id).copied() }) else {
        return 0;
    };
    let _ = PENDING.remove(id);
    let ret = ctx.arg::<u64>(1) as i64;
    match p.nr {
        nr::EXECVE | nr::EXECVEAT => exec::failed(&p, ret),
        _ => open::exit(&p, ret),
    }
    0
}
