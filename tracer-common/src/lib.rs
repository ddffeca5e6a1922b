//! The event ABI between spawntrace's eBPF probes and its userspace reader.
//!
//! Every record the kernel writes into the ring buffer starts with an [`EventHeader`]; its `kind`
//! says which `#[repr(C)]` struct the record is. Both sides compile this one file, so a layout
//! change is a compile-time change on both sides. Timestamps are `bpf_ktime_get_ns()`, i.e.
//! `CLOCK_MONOTONIC` nanoseconds.
#![no_std]

/// Bytes of argv captured per exec. Longer command lines are cut and flagged with
/// [`ExecFlags::ARGV_TRUNCATED`]; [`ExecEvent::argv_total`] keeps the true length.
pub const ARGV_CAP: usize = 4096;
/// Bytes of a path (exec filename, open path) captured, including the trailing NUL.
/// Longer paths are cut and flagged.
pub const PATH_CAP: usize = 256;

/// Ring-buffer record kinds ([`EventHeader::kind`]).
pub mod kind {
    pub const FORK: u32 = 1;
    pub const EXEC: u32 = 2;
    pub const EXEC_FAILED: u32 = 3;
    pub const EXIT: u32 = 4;
    pub const OPEN: u32 = 5;
}

/// Indices of the per-CPU counter array (`COUNTERS` map).
pub mod counter {
    /// Records lost because the ring buffer was full.
    pub const RINGBUF_DROPS: u32 = 0;
    /// `bpf_probe_read_*` failures (a path or argv that could not be read is flagged on its event).
    pub const READ_FAILURES: u32 = 1;
    /// Processes that could not be added to the tracked set (map full): their descendants are lost.
    pub const TRACK_FAILURES: u32 = 2;
    /// Syscall entries whose arguments could not be stashed for the matching exit (map full).
    pub const STASH_FAILURES: u32 = 3;
    pub const COUNT: u32 = 4;
}

bitflags::bitflags! {
    /// [`EventHeader::flags`] of a [`ForkEvent`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ForkFlags: u32 {
        /// The new task is a thread (CLONE_THREAD) of the parent's process.
        const THREAD = 1 << 0;
        /// The parent is the tracer itself: the new process is a traced command's root.
        const ROOT = 1 << 1;
    }

    /// [`EventHeader::flags`] of an [`ExecEvent`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ExecFlags: u32 {
        /// argv was longer than [`ARGV_CAP`] and was cut; [`ExecEvent::argv_total`] keeps its
        /// true length.
        const ARGV_TRUNCATED = 1 << 0;
        /// argv could not be read at all (e.g. kernel struct offsets unknown).
        const ARGV_UNREADABLE = 1 << 1;
        /// The filename was longer than [`PATH_CAP`] and was cut.
        const PATH_TRUNCATED = 1 << 2;
        const PATH_UNREADABLE = 1 << 3;
    }

    /// [`EventHeader::flags`] of an [`ExecFailedEvent`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ExecFailedFlags: u32 {
        const PATH_TRUNCATED = 1 << 0;
        const PATH_UNREADABLE = 1 << 1;
    }

    /// [`EventHeader::flags`] of an [`ExitEvent`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ExitFlags: u32 {
        /// The CPU time could not be read.
        const CPU_UNAVAILABLE = 1 << 0;
        /// The exit code could not be read.
        const CODE_UNAVAILABLE = 1 << 1;
    }

    /// [`EventHeader::flags`] of an [`OpenEvent`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct OpenFlags: u32 {
        const PATH_TRUNCATED = 1 << 0;
        const PATH_UNREADABLE = 1 << 1;
    }
}

/// Which syscall an [`OpenEvent`] came from.
pub mod open_syscall {
    pub const OPEN: u32 = 1;
    pub const OPENAT: u32 = 2;
    pub const OPENAT2: u32 = 3;
    pub const CREAT: u32 = 4;
}

/// Which syscall an [`ExecFailedEvent`] came from.
pub mod exec_syscall {
    pub const EXECVE: u32 = 1;
    pub const EXECVEAT: u32 = 2;
}

/// Common prefix of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    pub kind: u32,
    /// Thread id of the task the event is about (the child, for forks).
    pub pid: u32,
    /// Process id (thread-group id) of that task.
    pub tgid: u32,
    /// Bits of the record kind's own flags type ([`ForkFlags`], [`ExecFlags`], …).
    pub flags: u32,
    pub ts_ns: u64,
}

/// `sched_process_fork`: a new process or thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    pub header: EventHeader,
    pub parent_pid: u32,
    pub parent_tgid: u32,
}

/// `sched_process_exec`: a successful exec, argv as NUL-separated bytes of the new image.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Thread id that called exec (differs from `header.pid` when a non-leader thread execs).
    pub old_pid: u32,
    pub filename_len: u32,
    /// Bytes of `argv` that are valid.
    pub argv_len: u32,
    /// Length of the whole argv area of the new image (`mm->arg_end - mm->arg_start`).
    pub argv_total: u32,
    pub filename: [u8; PATH_CAP],
    pub argv: [u8; ARGV_CAP],
}

/// `sys_exit_execve`/`sys_exit_execveat` with an error: an exec attempt that failed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecFailedEvent {
    pub header: EventHeader,
    pub syscall: u32,
    /// Positive errno.
    pub errno: i32,
    pub filename_len: u32,
    pub _pad: u32,
    pub filename: [u8; PATH_CAP],
}

/// `sched_process_exit`: a thread ended; `group_dead` marks the end of the whole process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    pub header: EventHeader,
    /// `task->exit_code` in wait(2) status form: `code << 8`, or the terminating signal.
    pub exit_code: u32,
    /// 1 when this was the last thread of the process.
    pub group_dead: u32,
    /// CPU time of this thread (`se.sum_exec_runtime`), ns.
    pub cpu_ns: u64,
}

/// `sys_exit_open*`: an open attempt with its result.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OpenEvent {
    pub header: EventHeader,
    pub syscall: u32,
    pub path_len: u32,
    /// open(2) flags (`O_*`); for openat2 the `how.flags` low bits.
    pub open_flags: u64,
    /// fd on success, `-errno` on failure.
    pub ret: i64,
    pub path: [u8; PATH_CAP],
}

/// Kernel struct member offsets, found in the running kernel's BTF by userspace and handed to the
/// probes as a global (Rust eBPF has no CO-RE relocations). A zero offset means "unknown": the
/// dependent field is flagged unavailable.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_mm: u32,
    pub task_exit_code: u32,
    /// Offset of `se.sum_exec_runtime` inside `task_struct`.
    pub task_sum_exec_runtime: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub bprm_filename: u32,
    /// `struct pt_regs` members holding syscall arguments 1–4 (x86_64: di, si, dx, r10).
    pub regs_arg: [u32; 4],
}

/// x86_64 syscall numbers the probes care about.
pub mod nr {
    pub const OPEN: u64 = 2;
    pub const EXECVE: u64 = 59;
    pub const CREAT: u64 = 85;
    pub const OPENAT: u64 = 257;
    pub const EXECVEAT: u64 = 322;
    pub const OPENAT2: u64 = 437;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data: repr(C), only integers, no padding with invalid values.
    unsafe impl aya::Pod for super::KernelOffsets {}
}

/// Size in bytes of each record kind, for the reader's bounds checks.
pub const fn record_size(kind: u32) -> Option<usize> {
    match kind {
        kind::FORK => Some(core::mem::size_of::<ForkEvent>()),
        kind::EXEC => Some(core::mem::size_of::<ExecEvent>()),
        kind::EXEC_FAILED => Some(core::mem::size_of::<ExecFailedEvent>()),
        kind::EXIT => Some(core::mem::size_of::<ExitEvent>()),
        kind::OPEN => Some(core::mem::size_of::<OpenEvent>()),
        _ => None,
    }
}
