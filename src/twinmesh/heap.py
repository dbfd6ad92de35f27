"""Keep the C heap's freed memory for reuse instead of handing it back at once.

A daemon moving 64 KiB messages (pnicd, twind) allocates and frees buffers of 64 KiB
to a few hundred KiB many times a second (reads, frames, packets). With glibc's
defaults, freeing the top of the heap beyond 128 KiB gives it back to the kernel
(brk), and blocks over the mmap threshold get their own mapping: the next buffer
then faults in every page it touches afresh, zeroed by the kernel. Profiled, that
was a sixth of the destination NIC's CPU at 64 KiB (page faults and brk under
memmove).

Fixed thresholds also stop glibc's dynamic ones from moving. What this costs: up to
TRIM_THRESHOLD of freed memory stays mapped (bounded; it is reused by the next
buffers, and the queues that fill it are bounded themselves).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 16 << 20  # free memory at the top kept for reuse
TOP_PAD = 1 << 20  # extra grown at once, so the heap grows in few steps
MMAP_THRESHOLD = 4 << 20  # blocks from here on get their own mapping


def keep_heap() -> bool:
    """Set the thresholds above (glibc only); False where there is no glibc mallopt.
    Call once at process start, before the daemon allocates much."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, keep their defaults
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on a value it refuses.
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    ))
