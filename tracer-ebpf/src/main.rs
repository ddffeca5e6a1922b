//! spawntrace's kernel side, on raw tracepoints only: this kernel has no kprobes and refuses
//! fentry, and raw tracepoints detach without the synchronous RCU wait that perf-based
//! tracepoint events pay per event (~40 ms each here).
//!
//! Only the traced command's process tree is recorded: the first process the tracer forks is its
//! root, and every process forked by a tracked process is tracked too (see `maps::TRACKED`).
#![no_std]
#![no_main]

#[cfg(not(bpf_target_arch = "x86_64"))]
compile_error!("the syscall numbers and pt_regs use of these probes are x86_64's");

mod maps;
mod probes;
mod task;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: `bpf_probe_read_user` and friends need it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
