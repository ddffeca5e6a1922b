//! Exits: `sched_process_exit(task, group_dead)` fires for every thread; `group_dead` marks the
//! process's end, when it leaves the tracked set. Exit code and CPU time come from the task
//! itself, so signalled processes (which never call exit_group) are covered too.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use tracer_common::{ExitEvent, ExitFlags, kind};

use super::Record;
use crate::{
    maps::{TRACKED, current_ids, is_tracked},
    task,
};

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(ctx: RawTracePointContext) -> i32 {
    let (_, tid, tgid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let group_dead = ctx.arg::<u64>(1) & 0xff != 0;
    let code = task::exit_code();
    let cpu = task::cpu_ns();
    let mut flags = ExitFlags::empty();
    flags.set(ExitFlags::CODE_UNAVAILABLE, code.is_none());
    flags.set(ExitFlags::CPU_UNAVAILABLE, cpu.is_none());
    if let Some(rec) = Record::<ExitEvent>::reserve(kind::EXIT, tid, tgid, flags.bits()) {
        // SAFETY: in-place writes to the reserved record.
        unsafe {
            (*rec.ptr).exit_code = code.unwrap_or(0);
            (*rec.ptr).group_dead = group_dead as u32;
            (*rec.ptr).cpu_ns = cpu.unwrap_or(0);
        }
        rec.submit();
    }
    if group_dead {
        let _ = TRACKED.remove(tgid);
    }
    0
}
