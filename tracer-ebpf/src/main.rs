//! spawntrace's kernel side. Tracepoints only: this kernel has no kprobes and refuses fentry.
//!
//! Only the traced command's process tree is recorded: the first process the tracer forks is its
//! root, and every process forked by a tracked process is tracked too (see `maps::TRACKED`).
#![no_std]
#![no_main]

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
