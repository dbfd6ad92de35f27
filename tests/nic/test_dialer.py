import random

import pytest

from twinmesh.nic.config import ReconnectConfig
from twinmesh.nic.dialer import backoff


def test_backoff_doubles_then_caps_without_jitter() -> None:
    config = ReconnectConfig(initial=0.5, max=8.0, jitter=0.0)
    rng = random.Random(1)
    delays = [backoff(n, config, rng) for n in range(1, 9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]


def test_jitter_spreads_delays_within_bounds() -> None:
    config = ReconnectConfig(initial=1.0, max=30.0, jitter=0.25)
    rng = random.Random(7)
    delays = [backoff(3, config, rng) for _ in range(500)]
    assert all(3.0 <= d <= 5.0 for d in delays)
    # Peers restarting together must not retry in lockstep.
    assert len({round(d, 3) for d in delays}) > 100


def test_jitter_never_exceeds_the_cap() -> None:
    config = ReconnectConfig(initial=1.0, max=4.0, jitter=0.5)
    rng = random.Random(3)
    assert max(backoff(50, config, rng) for _ in range(500)) <= 4.0


def test_huge_failure_counts_do_not_overflow() -> None:
    config = ReconnectConfig(initial=0.5, max=30.0, jitter=0.0)
    assert backoff(10_000, config, random.Random()) == 30.0


@pytest.mark.parametrize(("initial", "maximum", "jitter"), [(0, 1, 0), (2, 1, 0), (1, 2, 1.5)])
def test_invalid_reconnect_settings_are_refused(
    initial: float, maximum: float, jitter: float
) -> None:
    from twinmesh.errors import ConfigError

    with pytest.raises(ConfigError):
        ReconnectConfig(initial=initial, max=maximum, jitter=jitter)
