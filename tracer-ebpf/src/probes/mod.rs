//! One file per probe family; this module holds what they share: reserving a ring-buffer record
//! and reading strings straight into it (records are too large for the 512-byte BPF stack).
pub mod exec;
pub mod exit;
pub mod fork;
pub mod open;
pub mod syscalls;

use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_probe_read_kernel_str, bpf_probe_read_user, bpf_probe_read_user_str},
    },
    maps::ring_buf::RingBufEntry,
};
use tracer_common::{EventHeader, counter};

use crate::maps::{EVENTS, bump};

/// A reserved, header-filled ring-buffer record of type `T`; fill the rest through `ptr`, then
/// `submit`. Counts a drop when the ring buffer is full.
pub struct Record<T: 'static> {
    entry: RingBufEntry<T>,
    pub ptr: *mut T,
}

impl<T: 'static> Record<T> {
    /// `T` must start with an [`EventHeader`] (all `tracer_common` events do).
    #[inline(always)]
    pub fn reserve(kind: u32, pid: u32, tgid: u32, flags: u32) -> Option<Self> {
        let Some(mut entry) = EVENTS.reserve::<T>(0) else {
            bump(counter::RINGBUF_DROPS);
            return None;
        };
        let ptr = entry.as_mut_ptr();
        let header = EventHeader {
            kind,
            pid,
            tgid,
            flags,
            // SAFETY: helper without preconditions.
            ts_ns: unsafe { bpf_ktime_get_ns() },
        };
        // SAFETY: every event type is repr(C) with the header first; the entry is T-sized.
        unsafe { ptr.cast::<EventHeader>().write(header) };
        Some(Self { entry, ptr })
    }

    #[inline(always)]
    pub fn header(&self) -> *mut EventHeader {
        self.ptr.cast()
    }

    /// Commits the record. The reader is woken only once enough data has piled up (it also
    /// polls on a short timer), so a busy tree does not cost a wake-up per event.
    #[inline(always)]
    pub fn submit(self) {
        const BPF_RB_AVAIL_DATA: u64 = 0;
        const BPF_RB_NO_WAKEUP: u64 = 1;
        const BPF_RB_FORCE_WAKEUP: u64 = 2;
        const WAKEUP_BYTES: u64 = 512 * 1024;
        let flags = match EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
            true => BPF_RB_FORCE_WAKEUP,
            false => BPF_RB_NO_WAKEUP,
        };
        self.entry.submit(flags);
    }
}

/// Reads a NUL-terminated user string into `dst[..N]`; returns its length without the NUL,
/// or `None` (counted as a read failure) when the memory is unreadable.
#[inline(always)]
pub fn user_str<const N: usize>(dst: *mut [u8; N], src: u64) -> Option<u32> {
    // SAFETY: dst points at N writable bytes inside a reserved record; the helper faults safely.
    let n = unsafe { bpf_probe_read_user_str(dst.cast(), N as u32, src as *const _) };
    read_len(n)
}

/// As [`user_str`] for kernel memory.
#[inline(always)]
pub fn kernel_str<const N: usize>(dst: *mut [u8; N], src: *const u8) -> Option<u32> {
    // SAFETY: as above.
    let n = unsafe { bpf_probe_read_kernel_str(dst.cast(), N as u32, src.cast()) };
    read_len(n)
}

#[inline(always)]
fn read_len(n: i64) -> Option<u32> {
    if n <= 0 {
        bump(counter::READ_FAILURES);
        None
    } else {
        Some(n as u32 - 1)
    }
}

/// Copies `len` (at most `N`) bytes of user memory into `dst`; false on a fault.
#[inline(always)]
pub fn user_bytes<const N: usize>(dst: *mut [u8; N], src: u64, len: u64) -> bool {
    // Two constant-bounded branches keep the size provably within `dst` for the verifier.
    let ret = if len >= N as u64 {
        // SAFETY: N bytes fit in dst.
        unsafe { bpf_probe_read_user(dst.cast(), N as u32, src as *const _) }
    } else {
        let n = (len as u32) & (N as u32 - 1);
        // SAFETY: n < N.
        unsafe { bpf_probe_read_user(dst.cast(), n, src as *const _) }
    };
    if ret != 0 {
        bump(counter::READ_FAILURES);
    }
    ret == 0
}
