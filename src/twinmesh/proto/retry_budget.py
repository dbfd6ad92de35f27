"""A retry budget: retransmissions may be at most a fraction of first sends (sans-I/O).

A token bucket in the manner of gRPC's retry throttling and Finagle's `RetryBudget`:
every first transmission deposits `ratio` of a token, time deposits `floor` tokens per
second (so a lossy path that carries little traffic still recovers), the bucket holds
at most `burst`, and a retransmission takes one whole token. So over any interval of T
seconds, retransmissions <= burst + floor * T + ratio * (first sends): retries can no
longer multiply the load of a path that is already saturated.

Finagle counts deposits in a sliding window instead; a bucket gives the same bound with
O(1) state and tells exactly when the next token will be there (`ready_at`), which is
what a core answering `get_timer()` needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Tolerance for a token refilled over exactly `ready_at() - now` seconds: float rounding
# must not leave it at 0.9999999 and its caller waking again and again for nothing.
_EPSILON = 1e-9


@dataclass
class RetryBudget:
    ratio: float  # tokens per first send
    floor: float  # tokens per second, whatever the traffic
    burst: float  # the most the bucket holds (it starts full)
    tokens: float = field(init=False)
    _at: float | None = field(default=None, init=False)  # last refill, None: never

    def __post_init__(self) -> None:
        if self.ratio < 0 or self.floor < 0 or self.burst < 1:
            raise ValueError("a retry budget needs ratio >= 0, floor >= 0 and burst >= 1")
        self.tokens = float(self.burst)

    def deposit(self, now: float) -> None:
        """A first transmission went out: it earns `ratio` of a retry."""
        self._refill(now)
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def try_withdraw(self, now: float) -> bool:
        """Take one token for a retransmission; False (and nothing taken) if none."""
        self._refill(now)
        if self.tokens < 1.0 - _EPSILON:
            return False
        self.tokens -= 1.0
        return True

    def ready_at(self) -> float | None:
        """When a withdrawal will next succeed without further deposits (None: never,
        the floor is 0 and the bucket is empty). Already passed if there is a token."""
        if self.tokens >= 1.0 - _EPSILON:
            return self._at if self._at is not None else float("-inf")
        if not self.floor or self._at is None:
            return None
        return self._at + (1.0 - self.tokens) / self.floor

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.floor)
        if self._at is None or now > self._at:  # a clock that steps back earns nothing
            self._at = now
