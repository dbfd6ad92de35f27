"""Where a power-safe commit (one that ends in an fsync) runs: on the event loop, or
in a worker thread. Used by the NIC's outbox commits and the twin's fsync rounds
(`twinmesh.group_sync`).

In a worker thread a commit costs about 0.1-0.3 ms of CPU for the hand-off alone
(futex wake-ups, trio's wake-up socket, naming the thread), several times what a
quick fsync takes; on the event loop it costs nothing extra, but every session and
link of the daemon waits until it is done. So commits run on the loop while they are quick, and in a
thread after a slow one (a slow disk, a big batch) until a probe finds them quick
again. `CommitPlacement` decides (plain, takes times); `StallClock` measures.

Time spent waiting for a CPU is not the commit's doing: on a busy machine it stalls
the loop just the same wherever the commit runs. `StallClock` leaves it out, so a
commit counts as slow for what it takes itself: its CPU and the disk's wait.
"""

from __future__ import annotations

import os
import time

# A commit on the loop may take this long. It stalls every session and link of the
# NIC for as long, and 2 ms is about one scheduling round of a busy NIC anyway: far
# below any timeout, and a few dozen items in a twin's mailbox at most. A quick
# commit (an SSD's fsync and a few rows) takes 0.1-1 ms.
INLINE_COMMIT_BOUND = 0.002
# After a slow commit the next ones go to a thread for this many times its duration,
# then one probes on the loop: slow commits hold the loop at most 1% of the time and
# never twice in a row. At most MAX_PROBE_INTERVAL, so a disk that was stuck for a
# while (seconds) is found quick again within a minute.
# Only a commit of at most this many items (messages, files) runs on the loop: a
# bigger one pays the hand-off once for all of them (an eighth of it each, or less)
# and would stall the loop longer. Measured in the bus bench (batches of ~20): all
# commits inline left n1 no cheaper and the pipeline slower than threads for those.
INLINE_MAX_ITEMS = 8
PROBE_STALL_RATIO = 100.0
MAX_PROBE_INTERVAL = 60.0


class CommitPlacement:
    """Whether the next power-safe commit runs on the loop ("inline") or in a thread.

    Inline until an inline commit takes longer than `bound`; then threads until the
    probe time, when one commit runs inline again and decides anew. Plain: the caller
    passes `now` and the durations, measured with one clock (`StallClock`).
    """

    def __init__(self, bound: float = INLINE_COMMIT_BOUND,
                 max_items: int = INLINE_MAX_ITEMS) -> None:
        self.bound = bound  # immutable after construction
        self.max_items = max_items  # immutable after construction
        # None: inline; else threads until then. Only the caller's task changes it.
        self.next_probe: float | None = None

    def inline(self, now: float, items: int = 1) -> bool:
        """Whether the commit of `items` about to start should run on the loop."""
        return items <= self.max_items and (self.next_probe is None or now >= self.next_probe)

    def inline_took(self, duration: float, now: float) -> None:
        """An inline commit took `duration` seconds, ending at `now`."""
        if duration <= self.bound:
            self.next_probe = None
        else:
            self.next_probe = now + min(MAX_PROBE_INTERVAL, duration * PROBE_STALL_RATIO)


class StallClock:
    """Seconds, minus the time the calling thread spent waiting for a CPU (from Linux
    `/proc/thread-self/schedstat`; plain `time.perf_counter` where there is none).

    Call it from one thread only (the event loop's): the file is that of the thread
    that first calls. `close()` when done.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._available = True

    def __call__(self) -> float:
        now = time.perf_counter()
        if not self._available:
            return now
        try:
            if self._fd is None:
                self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            # "<ns on a CPU> <ns waiting for a CPU> <time slices>"
            waited = int(os.pread(self._fd, 128, 0).split()[1])
        except (OSError, IndexError, ValueError):
            self.close()
            self._available = False
            return now
        return now - waited / 1e9

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:  # an owner that never closes it (a GroupSync) leaks no fd
        self.close()
