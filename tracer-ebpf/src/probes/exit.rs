//! Exits: `sched_process_exit` fires for every thread; `group_dead` marks the process's end, when
//! it leaves the tracked set. Exit code and CPU time come from the task itself, so signalled
//! processes (which never call exit_group) are covered too.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tracer_common::{EXIT_CODE_UNAVAILABLE, EXIT_CPU_UNAVAILABLE, ExitEvent, kind};

use super::Record;
use crate::{
    maps::{TRACKED, current_ids, is_tracked},
    task,
};

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let (_, tid, tgid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    // SAFETY: `group_dead` at offset 32 (checked by userspace at load).
    let group_dead = unsafe { ctx.read_at::<u8>(32) }.unwrap_or(0) != 0;
    let code = task::exit_code();
    let cpu = task::cpu_ns();
    let mut flags = 0;
    if code.is_none() {
        flags |= EXIT_CODE_UNAVAILABLE;
    }
    if cpu.is_none() {
        flags |= EXIT_CPU_UNAVAILABLE;
    }
    if let Some(rec) = Record::<ExitEvent>::reserve(kind::EXIT, tid, tgid, flags) {
        // SAFETY: in-place writes to the reserved record.
        unsafe {
            (*rec.ptr).exit_code = code.unwrap_or(0);
            (*rec.ptr).group_dead = group_dead as u32;
            (*rec.ptr).cpu_ns = cpu.unwrap_or(0);
        }
        rec.submit();
    }
    if group_dead {
        let _ = TRACKED.remove(&tgid);
    }
    0
}
