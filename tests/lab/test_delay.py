"""The delay line: same bytes, same order, each chunk late by the delay or a retransmission."""

from __future__ import annotations

import random

import pytest

from twinmesh.lab.delay import MIN_RTO, DelayLine


def test_bytes_come_out_after_the_delay_in_order() -> None:
    line = DelayLine(0.05)
    line.feed(b"ab", now=1.0)
    line.feed(b"cd", now=1.01)
    assert line.get_timer() == pytest.approx(1.05)
    assert line.take_due(1.04) == b""
    assert line.take_due(1.05) == b"ab"
    assert line.take_due(2.0) == b"cd"
    assert line.get_timer() is None and line.buffered == 0


def test_a_lost_chunk_is_retransmitted_and_holds_back_what_follows() -> None:
    class AlwaysLose(random.Random):
        def random(self) -> float:
            return 0.0

    line = DelayLine(0.01, loss=0.5, rng=AlwaysLose())
    line.feed(b"first", now=0.0)
    line.loss = 0.0  # the next chunk is not lost, but must wait behind the first
    line.feed(b"second", now=0.001)
    rto = MIN_RTO + 2 * 0.01
    assert line.retransmits == 1
    assert line.take_due(0.02) == b""
    assert line.take_due(0.01 + rto) == b"firstsecond"


def test_loss_never_drops_or_reorders_bytes() -> None:
    line = DelayLine(0.002, loss=0.3, rng=random.Random(7))
    sent = [bytes([i]) * (i + 1) for i in range(200)]
    received = bytearray()
    now = 0.0
    for chunk in sent:
        line.feed(chunk, now)
        now += 0.001
        received += line.take_due(now)
    received += line.take_due(now + 100)
    assert bytes(received) == b"".join(sent)
    assert 20 < line.retransmits < 120  # about 30% of 200 took the retransmission path


def test_the_line_is_bounded() -> None:
    line = DelayLine(1.0, max_buffered=10)
    line.feed(b"x" * 10, now=0.0)
    assert line.full
    with pytest.raises(RuntimeError, match="full"):
        line.feed(b"y", now=0.0)
    assert line.take_due(1.0) == b"x" * 10
    assert not line.full


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        DelayLine(-1)
    with pytest.raises(ValueError):
        DelayLine(0.1, loss=1.0)
