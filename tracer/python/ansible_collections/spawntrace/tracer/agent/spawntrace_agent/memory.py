# Memory prefaulting for spare runners: a fresh fork's copy-on-write faults are taken before its
# module run starts, not during it (see prefault).
from __future__ import absolute_import

import errno
import os
import struct

PAGE = 4096


def _heap_ranges():
    """The [heap] (brk) mappings of this process: [(start, end)]."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                out.append((lo, hi))
    return out


class HotPages(object):
    """The heap pages module runners write, learnt from the runners themselves: a bitmap (page
    offset from the heap's start) in memory shared by the agent's zygote and all its runners.
    A runner that ends marks the heap pages it holds privately (/proc/self/pagemap: present and
    mapped once: copied on write, or new); a new spare copies just those pages in advance. The
    heap holds the interpreter's large objects (dict tables, code): copying all of it per runner
    costs more than its faults, the few hundred pages a module writes cost less."""

    LEARN_RUNS = 64  # runners that report; later ones add little

    def __init__(self, pages=1 << 16):
        import mmap

        self.map = mmap.mmap(-1, 8 + pages // 8, flags=mmap.MAP_SHARED)
        self.pages = pages
        heap = _heap_ranges()
        self.base = heap[0][0] if heap else None

    def _count(self):
        return struct.unpack_from("!Q", self.map, 0)[0]

    def learn(self):
        """In a runner that is done: marks the heap pages it holds privately."""
        if self.base is None or self._count() >= self.LEARN_RUNS:
            return
        struct.pack_into("!Q", self.map, 0, self._count() + 1)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            for lo, hi in _heap_ranges():
                first = (lo - self.base) // PAGE
                n = min((hi - lo) // PAGE, self.pages - first)
                if first < 0 or n <= 0:
                    continue
                data = os.pread(fd, n * 8, (lo // PAGE) * 8)
                for i, (entry,) in enumerate(struct.iter_unpack("=Q", data)):
                    # bit 63: present, bit 56: mapped exclusively (Linux 4.2+)
                    if entry >> 63 and (entry >> 56) & 1:
                        k = first + i
                        b = 8 + k // 8
                        self.map[b] |= 1 << (k % 8)
        finally:
            os.close(fd)

    def ranges(self):
        """(start, length) of the runs of hot pages."""
        if self.base is None:
            return []
        bits = self.map[8:]
        out = []
        start = None
        for i, byte in enumerate(bits):
            if byte == 0 and start is None:
                continue
            for j in range(8):
                on = (byte >> j) & 1
                k = i * 8 + j
                if on and start is None:
                    start = k
                elif not on and start is not None:
                    out.append((self.base + start * PAGE, (k - start) * PAGE))
                    start = None
        if start is not None:
            out.append((self.base + start * PAGE, (len(bits) * 8 - start) * PAGE))
        return out


def prefault(hot=None):
    """Copies this (freshly forked) process's private writable memory now, with
    madvise(MADV_POPULATE_WRITE) (Linux 5.14+), so that the module run that follows does not take
    a copy-on-write fault per page it writes (about a thousand for a small module: milliseconds
    on some VMs); of the heap, only the pages runners were seen to write (`hot`, a HotPages).
    A spare runner does this while it waits for work."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        budget = 512 << 20
        ranges = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                perms = parts[1]
                if perms[1] != "w" or perms[3] != "p" or (len(parts) > 5 and parts[5].startswith("[")):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi - lo))
        heap = _heap_ranges()
        for lo, n in hot.ranges() if hot is not None else []:
            # within the heap as it is now (it may have shrunk)
            for hlo, hhi in heap:
                a, b = max(lo, hlo), min(lo + n, hhi)
                if a < b:
                    ranges.append((a, b - a))
        for lo, n in ranges:
            if n > budget:
                break
            if madvise(lo, n, 23) != 0:  # MADV_POPULATE_WRITE
                if ctypes.get_errno() == errno.EINVAL:
                    return  # kernel without it
                continue
            budget -= n
    except Exception:
        pass
