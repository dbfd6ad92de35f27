"""One direction of an impaired TCP stream: a delay line (sans-I/O; the caller owns time).

    line = DelayLine(delay=0.02, loss=0.01, rng=random.Random())
    line.feed(data, now)            # bytes read from one side
    line.take_due(now)              # -> bytes to write to the other side now
    line.get_timer()                # -> when bytes fall due next (None: nothing held)

Theory of operation. On loopback there are no packets to drop: a lab link between
two local NICs is a TCP stream, and a relay in the middle may only delay bytes, never
lose or reorder them. So the line reproduces what TCP makes of a lossy path: every
chunk arrives `delay` seconds after it was read; a chunk "lost" (probability `loss`)
is retransmitted one retransmission timeout later (Linux's 200 ms floor plus a round
trip), and everything read after it waits behind it, as TCP's in-order delivery does
(head-of-line blocking). A netns lab applies real packet loss instead (testing/netns).

Bounded: `buffered` counts bytes held; the shell stops reading while it is at
`max_buffered`, which pushes back on the sender through TCP's own flow control.
"""

from __future__ import annotations

import random
from collections import deque

MIN_RTO = 0.2  # Linux TCP_RTO_MIN
DEFAULT_MAX_BUFFERED = 4 << 20


class DelayLine:
    """Bytes in, the same bytes out in order, each chunk `delay` (or a retransmission) later."""

    def __init__(
        self,
        delay: float,
        loss: float = 0.0,
        *,
        rng: random.Random | None = None,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        if delay < 0 or not 0 <= loss < 1:
            raise ValueError("need delay >= 0 and 0 <= loss < 1")
        if max_buffered < 1:
            raise ValueError("max_buffered must be positive")
        self.delay = delay
        self.loss = loss
        self.max_buffered = max_buffered
        self.buffered = 0
        self.retransmits = 0  # chunks that took the retransmission path
        self._rng = rng or random.Random()
        self._held: deque[tuple[float, bytes]] = deque()
        self._last_due = float("-inf")

    @property
    def retransmit_timeout(self) -> float:
        return MIN_RTO + 2 * self.delay

    @property
    def full(self) -> bool:
        """True while the shell must not read more from the sending side."""
        return self.buffered >= self.max_buffered

    def feed(self, data: bytes, now: float) -> None:
        """Hold `data`, read at `now`, until it falls due. Feeding while `full` is a bug."""
        if not data:
            return
        if self.full:
            raise RuntimeError("DelayLine is full: stop reading until take_due() frees room")
        due = now + self.delay
        if self.loss and self._rng.random() < self.loss:
            due += self.retransmit_timeout
            self.retransmits += 1
        # In-order stream: nothing overtakes a chunk that is still held.
        due = max(due, self._last_due)
        self._last_due = due
        self._held.append((due, bytes(data)))
        self.buffered += len(data)

    def take_due(self, now: float) -> bytes:
        """Every held byte due at `now`, in order (b"" when none is)."""
        out = []
        while self._held and self._held[0][0] <= now:
            out.append(self._held.popleft()[1])
        data = b"".join(out)
        self.buffered -= len(data)
        return data

    def get_timer(self) -> float | None:
        """When the next held chunk falls due; None when nothing is held."""
        return self._held[0][0] if self._held else None
