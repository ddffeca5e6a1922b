//! The two syscall hooks (`raw_syscalls:sys_enter/sys_exit`): they see every syscall on the
//! machine, so the syscall number is checked first and only tracked processes go further.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use tracer_common::nr;

use super::{exec, open};
use crate::{
    maps::{current_ids, is_tracked},
    task,
};

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long id)
    let nr_ = ctx.arg::<u64>(1);
    let is_exec = nr_ == nr::EXECVE || nr_ == nr::EXECVEAT;
    let is_open = matches!(nr_, nr::OPEN | nr::OPENAT | nr::OPENAT2 | nr::CREAT);
    if !is_exec && !is_open {
        return 0;
    }
    let (id, _, tgid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let regs = ctx.arg::<u64>(0);
    if is_exec {
        exec::enter(id, nr_, regs);
    } else {
        open::enter(id, nr_, regs);
    }
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long ret)
    let (id, _, tgid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let Some(nr_) = task::syscall_nr(ctx.arg::<u64>(0)) else {
        return 0;
    };
    let ret = ctx.arg::<u64>(1) as i64;
    match nr_ {
        nr::EXECVE | nr::EXECVEAT => exec::exit(id, nr_, ret),
        nr::OPEN | nr::OPENAT | nr::OPENAT2 | nr::CREAT => open::exit(id, ret),
        _ => {}
    }
    0
}
