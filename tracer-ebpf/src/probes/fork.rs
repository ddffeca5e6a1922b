//! Forks: `sched_process_fork` decides process vs thread from the clone flags stashed at the
//! clone/clone3/fork/vfork entry of the same thread, and extends the tracked set.
use aya_ebpf::{helpers::bpf_probe_read_user, macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::warn;
use tracer_common::{FORK_FLAGS_UNKNOWN, FORK_ROOT, FORK_THREAD, ForkEvent, counter, kind};

use super::Record;
use crate::maps::{CLONE_STASH, TRACER_TGID, TRACKED, bump, current_ids, is_tracked};

const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_THREAD: u64 = 0x10000;
const SIGCHLD: u64 = 17;

/// True for the callers whose forks we care about: the tracer and the traced tree.
#[inline(always)]
fn interesting(tgid: u32) -> bool {
    tgid == TRACER_TGID.load() || is_tracked(tgid)
}

#[inline(always)]
fn stash(flags: u64) {
    let (id, _, tgid) = current_ids();
    if interesting(tgid) && CLONE_STASH.insert(&id, &flags, 0).is_err() {
        bump(counter::STASH_FAILURES);
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_clone")]
pub fn sys_enter_clone(ctx: TracePointContext) -> u32 {
    // SAFETY: `clone_flags` is at offset 16 of this tracepoint (checked by userspace at load).
    if let Ok(flags) = unsafe { ctx.read_at::<u64>(16) } {
        stash(flags);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_clone3")]
pub fn sys_enter_clone3(ctx: TracePointContext) -> u32 {
    let (_, _, tgid) = current_ids();
    if !interesting(tgid) {
        return 0;
    }
    // SAFETY: `uargs` at offset 16; `struct clone_args` starts with the u64 flags.
    let flags = unsafe { ctx.read_at::<u64>(16) }
        .and_then(|uargs| unsafe { bpf_probe_read_user(uargs as *const u64) });
    match flags {
        Ok(flags) => stash(flags),
        Err(_) => bump(counter::READ_FAILURES),
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_fork")]
pub fn sys_enter_fork(_ctx: TracePointContext) -> u32 {
    stash(SIGCHLD);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_vfork")]
pub fn sys_enter_vfork(_ctx: TracePointContext) -> u32 {
    stash(CLONE_VFORK | CLONE_VM | SIGCHLD);
    0
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    // Runs in the parent, before the child is first scheduled.
    let (id, tid, tgid) = current_ids();
    let root = tgid == TRACER_TGID.load();
    if !root && !is_tracked(tgid) {
        return 0;
    }
    // SAFETY: `child_pid` at offset 20 (checked by userspace at load).
    let Ok(child_pid) = (unsafe { ctx.read_at::<i32>(20) }) else {
        return 0;
    };
    let child_pid = child_pid as u32;
    // SAFETY: value copied out before the entry is removed.
    let stashed = unsafe { CLONE_STASH.get(&id).copied() };
    let _ = CLONE_STASH.remove(&id);
    let mut flags = match stashed {
        Some(f) if f & CLONE_THREAD != 0 => FORK_THREAD,
        Some(_) => 0,
        None => FORK_FLAGS_UNKNOWN,
    };
    if root {
        // Only the tracer's child processes are roots; its own threads (and anything whose
        // flags we could not see) are not traced.
        if flags != 0 {
            return 0;
        }
        flags |= FORK_ROOT;
    }
    let thread = flags & FORK_THREAD != 0;
    let child_tgid = if thread { tgid } else { child_pid };
    if !thread && TRACKED.insert(&child_pid, &1, 0).is_err() {
        bump(counter::TRACK_FAILURES);
        warn!(
            &ctx,
            "tracked set full: pid {} and its descendants are lost", child_pid
        );
    }
    if let Some(rec) = Record::<ForkEvent>::reserve(kind::FORK, child_pid, child_tgid, flags) {
        // SAFETY: writing plain fields of the reserved record.
        unsafe {
            (*rec.ptr).parent_pid = tid;
            (*rec.ptr).parent_tgid = tgid;
            (*rec.ptr).clone_flags = stashed.unwrap_or(0);
        }
        rec.submit();
    }
    0
}
