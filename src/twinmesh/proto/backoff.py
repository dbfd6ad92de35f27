"""Capped exponential backoff with jitter, shared by every retry loop."""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int, *, initial: float, cap: float, jitter: float, rng: random.Random
) -> float:
    """The wait before retry number `attempt` (1 = the first retry): `initial` doubled
    per attempt, capped at `cap`, spread by +/- `jitter` (a fraction) so that peers that
    failed together do not retry together, and never above `cap`."""
    base = min(cap, initial * 2 ** min(max(attempt - 1, 0), 32))
    spread = base * jitter
    return float(max(0.0, min(cap, base + rng.uniform(-spread, spread))))
