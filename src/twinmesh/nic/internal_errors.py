"""Bugs contained at the NIC's per-packet, per-frame and per-step boundaries.

A daemon must outlive its own bugs. Where one unit of work starts (a link packet handed
to the overlay, a frame a twin sent, one timer step of a core), the shell wraps it in
`try: ... except Exception as exc: errors.record(WHERE, exc)`: the unit is dropped, the
link, the twin's connection and the NIC keep running. Only `Exception` is caught:
`trio.Cancelled`, KeyboardInterrupt and other BaseExceptions pass (a `try` costs
nothing in CPython 3.11 while nothing raises).

Each error is counted (`twinmesh_internal_errors_total{where}`) and logged as one
line with the exception's type and message, at most one line per `where` per
LOG_INTERVAL (the lines held back are counted in the next one), and with the
traceback only the first time a site (where, type, raising line) is seen.
"""

from __future__ import annotations

import collections
import time
import traceback
from collections.abc import Callable
from typing import Any

import structlog

from twinmesh.nic.health import Metric

# The boundaries, shown in /metrics even while nothing went wrong there.
LINK_PACKET = "link_packet"  # a packet a link delivered (overlay, bus, DHT handlers)
LINK_EVENT = "link_event"  # a link coming up or going down (routing)
LINK_CORE = "link_core"  # the link core itself (bytes or a timer): that link closes
OVERLAY_TIMER = "overlay_timer"
TWIN_FRAME = "twin_frame"  # a frame a twin sent on twins.sock
TWIN_PUMP = "twin_pump"  # frames written to a twin
OUTBOX_TIMER = "outbox_timer"
OUTBOX_COMMIT = "outbox_commit"  # answering a group commit's submissions
TRANSMIT = "transmit"  # the bus sender handing packets to the overlay
DHT_TIMER = "dht_timer"
WHERE = (LINK_PACKET, LINK_EVENT, LINK_CORE, OVERLAY_TIMER, TWIN_FRAME, TWIN_PUMP,
         OUTBOX_TIMER, OUTBOX_COMMIT, TRANSMIT, DHT_TIMER)

LOG_INTERVAL = 1.0  # seconds between two lines for one `where`
MAX_SITES = 256  # distinct sites remembered (for the traceback-once rule)
# A timer step that failed waits this long before the next: a core whose timer stays
# due would otherwise fail in a tight loop.
TIMER_ERROR_PAUSE = 0.1


class InternalErrors:
    """Counts and logs the exceptions contained at the NIC's boundaries. Not thread
    safe: used from trio's thread only."""

    def __init__(self, log: Any = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log if log is not None else structlog.get_logger("twinmesh.nic")
        self.counts: collections.Counter[str] = collections.Counter()
        self._clock = clock
        self._next_line: dict[str, float] = {}
        self._held_back: collections.Counter[str] = collections.Counter()
        self._sites: set[tuple[str, str, str, int]] = set()

    def record(self, where: str, exc: Exception) -> None:
        """Count `exc`, contained at `where`, and log it (rate limited)."""
        self.counts[where] += 1
        now = self._clock()
        if now < self._next_line.get(where, float("-inf")):
            self._held_back[where] += 1
            return
        self._next_line[where] = now + LOG_INTERVAL
        site = _site(where, exc)
        first = site not in self._sites
        if first and len(self._sites) < MAX_SITES:
            self._sites.add(site)
        self.log.error("internal error contained", where=where, error=type(exc).__name__,
                       message=str(exc)[:300], held_back=self._held_back.pop(where, 0),
                       exc_info=exc if first else None)

    def metrics(self) -> list[Metric]:
        wheres = (*WHERE, *sorted(set(self.counts) - set(WHERE)))
        return [Metric("twinmesh_internal_errors_total", "counter",
                       "Unexpected errors (bugs) contained by dropping one packet, frame "
                       "or timer step, by where they happened.",
                       [({"where": where}, float(self.counts[where])) for where in wheres])]


def _site(where: str, exc: Exception) -> tuple[str, str, str, int]:
    frames = collections.deque(traceback.walk_tb(exc.__traceback__), maxlen=1)
    if not frames:
        return (where, type(exc).__name__, "", 0)
    frame, lineno = frames[0]
    return (where, type(exc).__name__, frame.f_code.co_filename, lineno)
