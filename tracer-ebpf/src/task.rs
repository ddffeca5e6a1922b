//! Reads from the current `task_struct` through offsets userspace found in BTF (Rust eBPF has no
//! CO-RE relocations). Each read reports failure instead of guessing.
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::maps::OFFSETS;

#[inline(always)]
fn read_at<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel tolerates bad addresses and reports an error.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

fn current() -> u64 {
    // SAFETY: always valid in a tracepoint program.
    unsafe { bpf_get_current_task() }
}

/// `[arg_start, arg_end)` of the current process's argv in user memory.
#[inline(always)]
pub fn argv_range() -> Option<(u64, u64)> {
    let off = OFFSETS.load();
    let mm: u64 = read_at(current(), off.task_mm)?;
    let start: u64 = read_at(mm, off.mm_arg_start)?;
    let end: u64 = read_at(mm, off.mm_arg_end)?;
    (end >= start).then_some((start, end))
}

/// `task->exit_code` (wait status form).
#[inline(always)]
pub fn exit_code() -> Option<u32> {
    read_at::<i32>(current(), OFFSETS.load().task_exit_code).map(|c| c as u32)
}

/// CPU time the current thread has consumed, ns.
#[inline(always)]
pub fn cpu_ns() -> Option<u64> {
    read_at(current(), OFFSETS.load().task_sum_exec_runtime)
}
