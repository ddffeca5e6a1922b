//! Forks: `sched_process_fork(parent, child)` tells process from thread by the child's tgid and
//! extends the tracked set.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use aya_log_ebpf::warn;
use tracer_common::{ForkEvent, ForkFlags, counter, kind};

use super::Record;
use crate::{
    maps::{TRACER_TGID, TRACKED, bump, current_ids, is_tracked},
    task,
};

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    // Runs in the parent, before the child is first scheduled.
    let (_, tid, tgid) = current_ids();
    let root = tgid == TRACER_TGID.load();
    if !root && !is_tracked(tgid) {
        return 0;
    }
    let Some((child_pid, child_tgid)) = task::ids(ctx.arg::<u64>(1)) else {
        bump(counter::READ_FAILURES);
        return 0;
    };
    let thread = child_tgid == tgid;
    let flags = match (thread, root) {
        // The tracer's own threads are not traced.
        (true, true) => return 0,
        (true, false) => ForkFlags::THREAD,
        (false, true) => ForkFlags::ROOT,
        (false, false) => ForkFlags::empty(),
    };
    if !thread && TRACKED.insert(child_tgid, 1, 0).is_err() {
        bump(counter::TRACK_FAILURES);
        warn!(&ctx, "tracked set full: pid {} and its descendants are lost", child_tgid);
    }
    if let Some(rec) = Record::<ForkEvent>::reserve(kind::FORK, child_pid, child_tgid, flags.bits()) {
        // SAFETY: writing plain fields of the reserved record.
        unsafe {
            (*rec.ptr).parent_pid = tid;
            (*rec.ptr).parent_tgid = tgid;
        }
        rec.submit();
    }
    0
}
