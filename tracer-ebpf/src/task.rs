//! Reads from kernel structs (`task_struct`, `mm_struct`, `linux_binprm`, `pt_regs`) through
//! offsets userspace found in BTF. Each read reports failure instead of guessing.
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::maps::OFFSETS;

#[inline(always)]
pub fn read_at<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel tolerates bad addresses and reports an error.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

fn current() -> u64 {
    // SAFETY: always valid in a tracing program.
    unsafe { bpf_get_current_task() }
}

/// (pid, tgid) of a task.
#[inline(always)]
pub fn ids(task: u64) -> Option<(u32, u32)> {
    let off = OFFSETS.load();
    let pid: i32 = read_at(task, off.task_pid)?;
    let tgid: i32 = read_at(task, off.task_tgid)?;
    Some((pid as u32, tgid as u32))
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

/// `bprm->filename`, a kernel string.
#[inline(always)]
pub fn bprm_filename(bprm: u64) -> Option<u64> {
    read_at(bprm, OFFSETS.load().bprm_filename)
}

/// `task->exit_code` (wait status form) of the current task.
#[inline(always)]
pub fn exit_code() -> Option<u32> {
    read_at::<i32>(current(), OFFSETS.load().task_exit_code).map(|c| c as u32)
}

/// CPU time the current thread has consumed, ns.
#[inline(always)]
pub fn cpu_ns() -> Option<u64> {
    read_at(current(), OFFSETS.load().task_sum_exec_runtime)
}

/// Syscall argument `n` (0-based, < 4) from the saved user registers.
#[inline(always)]
pub fn syscall_arg(regs: u64, n: usize) -> Option<u64> {
    let off = OFFSETS.load();
    read_at(regs, *off.regs_arg.get(n)?)
}
