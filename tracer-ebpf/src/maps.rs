//! Maps and load-time globals shared by the probes.
use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{KernelOffsets, counter};

/// Event transport to userspace. Userspace may resize it at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(32 * 1024 * 1024, 0);

/// Processes (tgids) of the traced tree. An entry lives from the fork to the exit of the last
/// thread, so a recycled pid is only tracked again if a tracked process forks it.
#[map]
pub static TRACKED: HashMap<u32, u8> = HashMap::with_max_entries(65536, 0);

/// Arguments of an in-flight exec or open of a tracked thread, keyed by pid_tgid, read back at
/// sys_exit. Its presence is also what makes sys_exit look further, so every other syscall
/// costs one lookup. LRU: an exec that succeeds in a non-leader thread never returns to its
/// old thread id.
#[map]
pub static PENDING: LruHashMap<u64, Pending> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU health counters, indexed by `tracer_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// The tracer's own tgid: the first processes it forks are the roots of the traced trees.
#[unsafe(no_mangle)]
pub static TRACER_TGID: Global<u32> = Global::new(0);

/// How many more of the tracer's forks are roots (userspace sets it at load: the command; what
/// the tracer starts later, such as the ssh to a target recorder, is not the run's).
#[map]
pub static ROOTS_LEFT: Array<u32> = Array::with_max_entries(1, 0);

/// Kernel struct offsets from the running kernel's BTF (zero = unknown).
#[unsafe(no_mangle)]
pub static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_pid: 0,
    task_tgid: 0,
    task_mm: 0,
    task_exit_code: 0,
    task_sum_exec_runtime: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    bprm_filename: 0,
    regs_arg: [0; 4],
});

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Pending {
    /// Syscall number.
    pub nr: u64,
    /// User pointer to the path (open) or filename (exec).
    pub path: u64,
    /// open flags, or for openat2 the user pointer to `struct open_how`.
    pub flags_or_how: u64,
}

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn is_tracked(tgid: u32) -> bool {
    // SAFETY: the value is only read for presence.
    unsafe { TRACKED.get(tgid).is_some() }
}

/// Current task's (pid_tgid, tid, tgid).
#[inline(always)]
pub fn current_ids() -> (u64, u32, u32) {
    let id = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    (id, id as u32, (id >> 32) as u32)
}
