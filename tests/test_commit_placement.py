"""Where power-safe commits run: small ones on the loop while quick, in a thread after
a slow one, back on the loop once a probe is quick again; big ones in a thread."""

from __future__ import annotations

import os
import time

import pytest

from twinmesh.commit_placement import (
    INLINE_COMMIT_BOUND,
    INLINE_MAX_ITEMS,
    MAX_PROBE_INTERVAL,
    PROBE_STALL_RATIO,
    CommitPlacement,
    StallClock,
)


def test_commits_stay_on_the_loop_while_quick() -> None:
    placement = CommitPlacement()
    for now in range(100):
        assert placement.inline(float(now))
        placement.inline_took(INLINE_COMMIT_BOUND, float(now))


def test_a_big_commit_goes_to_a_thread_even_while_commits_are_quick() -> None:
    # It pays the hand-off once for many items, and would stall the loop the longest.
    placement = CommitPlacement()
    assert placement.inline(0.0, INLINE_MAX_ITEMS)
    assert not placement.inline(0.0, INLINE_MAX_ITEMS + 1)
    assert placement.inline(0.0, 1)  # and the small ones after it stay on the loop


def test_after_a_slow_commit_threads_until_a_probe_decides_anew() -> None:
    placement = CommitPlacement()
    slow = INLINE_COMMIT_BOUND * 2
    placement.inline_took(slow, 10.0)
    probe = 10.0 + slow * PROBE_STALL_RATIO
    assert not placement.inline(10.0)
    assert not placement.inline(probe - 0.001)
    assert placement.inline(probe)
    placement.inline_took(INLINE_COMMIT_BOUND / 2, probe)  # quick: back on the loop
    assert placement.inline(probe)


def test_slow_commits_hold_the_loop_a_small_share_of_the_time() -> None:
    placement = CommitPlacement()
    now, stalled = 0.0, 0.0
    while now < 600.0:  # a disk where every commit takes 0.2 s
        if placement.inline(now):
            placement.inline_took(0.2, now + 0.2)
            stalled += 0.2
        now += 0.2
    assert stalled <= 600.0 / PROBE_STALL_RATIO + 0.2


def test_a_disk_stuck_for_long_is_probed_again_within_the_cap() -> None:
    placement = CommitPlacement()
    placement.inline_took(30.0, 100.0)
    assert placement.inline(100.0 + MAX_PROBE_INTERVAL)


def test_the_stall_clock_never_goes_back() -> None:
    clock = StallClock()
    readings = []
    for _ in range(1000):
        readings.append(clock())
        sum(range(100))
    clock.close()
    readings.append(clock())  # usable again after close
    clock.close()
    assert readings == sorted(readings)


def test_without_schedstat_the_stall_clock_is_wall_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(path: str, flags: int) -> int:
        raise FileNotFoundError(path)

    monkeypatch.setattr(os, "open", missing)
    clock = StallClock()
    before = time.perf_counter()
    reading = clock()
    assert before <= reading <= time.perf_counter()
    clock.close()
