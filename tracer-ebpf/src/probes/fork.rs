//! Forks: `sched_process_fork(parent, child)` tells process from thread by the child's tgid and
//! extends the tracked set.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use aya_log_ebpf::warn;
use tracer_common::{ForkEvent, ForkFlags, counter, kind};

use super::Record;
use crate::{
    maps::{ROOTS_LEFT, TRACER_TGID, TRACKED, bump, current_ids, is_tracked},
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
    if root && !thread && !take_root() {
        return 0; // a process the tracer starts for itself
    }
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

/// Whether one more of the tracer's forks may be a root, counting it. Not atomic: the tracer
/// forks its command before anything else, never two processes at once.
#[inline(always)]
fn take_root() -> bool {
    let Some(left) = ROOTS_LEFT.get_ptr_mut(0) else { return false };
    // SAFETY: the map's one slot, valid while the program runs.
    unsafe {
        if *left == 0 {
            return false;
        }
        *left -= 1;
    }
    true
}
