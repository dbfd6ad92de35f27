"""The outbox core on a fake clock: admission, retry schedule, acks, expiry, bounds."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.proto.outbox import (
    MAX_PAYLOAD,
    Entry,
    Forget,
    Outbox,
    OutboxConfig,
    Persist,
    Status,
    StatusChanged,
    Transmit,
)

ALICE = Identity.generate().public
BOB = Identity.generate().public
CAROL = Identity.generate().public
NO_JITTER = OutboxConfig(jitter=0.0)


def message(
    outbox: Outbox, now: float = 0.0, *, ttl: float = 60.0, destination: PublicKey = BOB,
    source: PublicKey = ALICE, **kwargs: object,
) -> tuple[bytes, bytes, list[object]]:
    token = os.urandom(16)
    message_id = os.urandom(16)
    refused, out = outbox.submit(
        id=message_id, source=source, destination=destination, deadline=now + ttl,
        ack_hash=hashlib.blake2b(token, digest_size=16).digest(), envelope=b"sealed",
        payload_size=100, now=now, **kwargs,  # type: ignore[arg-type]
    )
    assert refused is None
    return message_id, token, list(out)


def run(outbox: Outbox, until: float) -> list[tuple[float, object]]:
    """Advance the fake clock timer by timer up to `until`; returns (time, output)."""
    seen: list[tuple[float, object]] = []
    while (timer := outbox.get_timer()) is not None and timer <= until:
        seen.extend((timer, o) for o in outbox.handle_timer(timer))
    return seen


def test_accepted_message_is_persisted_then_sent_at_once() -> None:
    outbox = Outbox(NO_JITTER)
    message_id, _, out = message(outbox)
    assert isinstance(out[0], Persist) and out[0].entry.id == message_id
    assert Transmit(message_id, BOB, b"sealed") in out
    assert StatusChanged(message_id, ALICE, Status.SENT) in out
    assert outbox.status(message_id) == (Status.SENT, "")


def test_retries_back_off_exponentially_and_stop_at_the_deadline() -> None:
    outbox = Outbox(OutboxConfig(initial_retry=0.25, max_retry=2.0, jitter=0.0))
    message_id, _, _ = message(outbox, ttl=6.0)
    seen = run(outbox, 100.0)
    sends = [t for t, o in seen if isinstance(o, Transmit)]
    # 0 (at submit), then +0.25, +0.5, +1, +2, +2 ... capped at 2 s, never past 6 s.
    assert sends == [0.25, 0.75, 1.75, 3.75, 5.75]
    assert seen[-1] == (6.0, StatusChanged(message_id, ALICE, Status.EXPIRED, ""))
    hold = OutboxConfig().status_hold
    assert Forget(message_id, Status.EXPIRED, "", 6.0 + hold) in [o for _, o in seen]
    assert outbox.status(message_id) == (Status.EXPIRED, "") and len(outbox) == 0


def test_jitter_spreads_retries_within_bounds() -> None:
    # A budget big enough for 200 retries at once: here only the spread is in question.
    outbox = Outbox(OutboxConfig(initial_retry=1.0, max_retry=8.0, jitter=0.25,
                                 retry_burst=1000), rng=random.Random(4))
    for _ in range(200):
        message(outbox)
    first_retries = [t for t, o in run(outbox, 1.3) if isinstance(o, Transmit)]
    assert len(first_retries) == 200
    assert all(0.75 <= t <= 1.25 for t in first_retries)
    assert len({round(t, 4) for t in first_retries}) > 150


def test_a_matching_ack_delivers_and_stops_retries() -> None:
    outbox = Outbox(NO_JITTER)
    message_id, token, _ = message(outbox)
    out = outbox.acked(message_id, token, now=0.1)
    assert out == [Forget(message_id, Status.DELIVERED, "", 0.1 + NO_JITTER.status_hold),
                   StatusChanged(message_id, ALICE, Status.DELIVERED, "")]
    assert not [o for _, o in run(outbox, 100.0) if isinstance(o, Transmit)]
    assert outbox.status(message_id) == (Status.DELIVERED, "")
    # A duplicate ack changes nothing.
    assert outbox.acked(message_id, token, now=0.2) == []


def test_an_ack_with_the_wrong_token_is_ignored() -> None:
    outbox = Outbox(NO_JITTER)
    message_id, _, _ = message(outbox)
    assert outbox.acked(message_id, os.urandom(16), now=0.1) == []
    assert outbox.status(message_id) == (Status.SENT, "")


def test_final_errors_fail_at_once_and_offline_keeps_retrying_often() -> None:
    outbox = Outbox(OutboxConfig(initial_retry=1.0, max_retry=30.0, offline_retry=2.0,
                                 jitter=0.0))
    failed, _, _ = message(outbox)
    out = outbox.error(failed, "rejectedSchema", now=0.1)
    assert StatusChanged(failed, ALICE, Status.FAILED, "rejectedSchema") in out
    away, _, _ = message(outbox, ttl=100.0)
    for _ in range(6):  # let the backoff grow past the offline cap
        run(outbox, (outbox.get_timer() or 0.0))
    now = outbox.get_timer() or 0.0
    outbox.error(away, "offline", now=now)
    assert (outbox.get_timer() or 0.0) - now <= 2.0
    assert outbox.status(away) == (Status.SENT, "offline")


def test_admission_bounds_say_overloaded_instead_of_growing() -> None:
    outbox = Outbox(OutboxConfig(max_per_destination=3, max_total=5, max_per_source=4))
    for _ in range(3):
        message(outbox, destination=BOB)
    refused, out = outbox.submit(
        id=os.urandom(16), source=ALICE, destination=BOB, deadline=60, ack_hash=b"h" * 16,
        envelope=b"x", payload_size=10, now=0,
    )
    assert refused is not None and refused.code == "overloaded" and out == []
    message(outbox, destination=CAROL)
    refused, _ = outbox.submit(
        id=os.urandom(16), source=ALICE, destination=CAROL, deadline=60, ack_hash=b"h" * 16,
        envelope=b"x", payload_size=10, now=0,
    )
    assert refused is not None and "too many" in refused.message
    message(outbox, destination=CAROL, source=BOB)
    refused, _ = outbox.submit(
        id=os.urandom(16), source=CAROL, destination=ALICE, deadline=60,
        ack_hash=b"h" * 16, envelope=b"x", payload_size=10, now=0,
    )
    assert refused is not None and "outbox is full" in refused.message
    assert len(outbox) == 5


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"payload_size": MAX_PAYLOAD + 1}, "tooLarge"),
        ({"deadline": -1.0}, "expired"),
        ({"routable": False, "fail_fast": True}, "noRoute"),
    ],
)
def test_refusals_name_the_reason(kwargs: dict[str, object], code: str) -> None:
    args: dict[str, object] = dict(
        id=os.urandom(16), source=ALICE, destination=BOB, deadline=60.0,
        ack_hash=b"h" * 16, envelope=b"x", payload_size=10, now=0.0,
    )
    args.update(kwargs)
    refused, out = Outbox().submit(**args)  # type: ignore[arg-type]
    assert refused is not None and refused.code == code and out == []


def test_a_resubmitted_id_is_not_queued_twice() -> None:
    outbox = Outbox(NO_JITTER)
    message_id, token, _ = message(outbox)
    refused, out = outbox.submit(
        id=message_id, source=ALICE, destination=BOB, deadline=60.0,
        ack_hash=hashlib.blake2b(token, digest_size=16).digest(), envelope=b"sealed",
        payload_size=100, now=0.5,
    )
    assert refused is None and out == [] and len(outbox) == 1


def test_restored_entries_are_retried_or_expired() -> None:
    outbox = Outbox(NO_JITTER)
    live = Entry(b"l" * 16, ALICE, BOB, 100.0, b"h" * 16, b"sealed", attempts=3)
    dead = Entry(b"d" * 16, ALICE, BOB, 5.0, b"h" * 16, b"sealed")
    assert outbox.restore(live, now=10.0)[0] == Transmit(live.id, BOB, b"sealed", attempt=4)
    assert outbox.restore(dead, now=10.0) == [
        Forget(dead.id, Status.EXPIRED, "", 10.0 + NO_JITTER.status_hold),
        StatusChanged(dead.id, ALICE, Status.EXPIRED)]
    assert len(outbox) == 1


def test_finished_statuses_come_back_from_storage_until_their_hold_ends() -> None:
    outbox = Outbox(NO_JITTER)
    kept = Entry(b"k" * 16, ALICE, BOB, 5.0, b"h" * 16, b"", next_try=50.0,
                 status=Status.FAILED, code="unknownTwin")
    gone = Entry(b"g" * 16, ALICE, BOB, 5.0, b"h" * 16, b"", next_try=9.0,
                 status=Status.DELIVERED)
    assert outbox.restore(kept, now=10.0) == [] and outbox.restore(gone, now=10.0) == []
    assert outbox.status(kept.id) == (Status.FAILED, "unknownTwin")
    assert outbox.status(gone.id) is None
    assert len(outbox) == 0  # nothing to send
    outbox.handle_timer(100.0)
    assert outbox.status(kept.id) is None  # its hold ended


def test_finished_statuses_are_bounded_in_number() -> None:
    outbox = Outbox(OutboxConfig(jitter=0.0, max_finished=3))
    ids = []
    for n in range(5):
        message_id, token, _ = message(outbox)
        outbox.acked(message_id, token, now=0.1 * n)
        ids.append(message_id)
    assert [outbox.status(i) for i in ids[:2]] == [None, None]  # the oldest went first
    assert all(outbox.status(i) == (Status.DELIVERED, "") for i in ids[2:])


def test_the_first_retry_waits_longer_once_acks_show_a_slow_path() -> None:
    outbox = Outbox(OutboxConfig(initial_retry=0.25, max_retry=8.0, jitter=0.0))
    assert outbox.retry_timeout() == 0.25
    for n in range(20):  # acks take 0.5 s at the first attempt
        message_id, token, _ = message(outbox, now=float(n))
        outbox.acked(message_id, token, now=n + 0.5)
    assert 0.5 <= outbox.retry_timeout() <= 1.0
    timeout = outbox.retry_timeout()
    message(outbox, now=100.0)
    first_retry = min(t for t, o in run(outbox, 200.0) if isinstance(o, Transmit))
    assert first_retry == 100.0 + timeout
    # Acks of retried messages say nothing about the path (which attempt do they answer?).
    retried, token, _ = message(outbox, now=300.0)
    assert any(isinstance(o, Transmit) and o.attempt > 1 for _, o in run(outbox, 320.0))
    before = outbox.retry_timeout()
    outbox.acked(retried, token, now=320.0)
    assert outbox.retry_timeout() == before


@settings(max_examples=100, deadline=None)
@given(
    plan=st.lists(
        st.tuples(st.floats(0, 30), st.sampled_from(["ack", "offline", "final", "none"]),
                  st.sampled_from([BOB, CAROL])),
        min_size=1, max_size=30,
    ),
    seed=st.integers(0, 1000),
    tight_budget=st.booleans(),
)
def test_every_message_ends_exactly_once(
    plan: list[tuple[float, str, PublicKey]], seed: int, tight_budget: bool
) -> None:
    """Whatever answers arrive and whenever, each accepted message ends in exactly one
    final status (delivered, failed or expired), and nothing is transmitted after it;
    also when retries are held for budget or parked behind an away twin's probe, which
    never skips an attempt number."""
    budget = {"retry_ratio": 0.0, "retry_floor": 0.2, "retry_burst": 1} if tight_budget \
        else {}
    outbox = Outbox(OutboxConfig(max_retry=4.0, ack_grace=2.0, **budget),  # type: ignore[arg-type]
                    rng=random.Random(seed))
    finals: dict[bytes, list[Status]] = {}
    attempts: dict[bytes, list[int]] = {}
    after_final: list[bytes] = []
    events: list[tuple[float, bytes, str, bytes]] = []
    for at, answer, destination in plan:
        message_id, token, out = message(outbox, now=0.0, ttl=20.0, destination=destination)
        finals[message_id] = []
        attempts[message_id] = [o.attempt for o in out if isinstance(o, Transmit)]
        events.append((at, message_id, answer, token))
    events.sort(key=lambda e: e[0])

    def record(outputs: list[tuple[float, object]]) -> None:
        for at, o in outputs:
            if isinstance(o, StatusChanged) and o.status in (
                    Status.DELIVERED, Status.FAILED, Status.EXPIRED):
                finals[o.id].append(o.status)
            if isinstance(o, Transmit):
                attempts[o.id].append(o.attempt)
                if finals[o.id] or at >= 20.0:  # the deadline
                    after_final.append(o.id)

    for at, message_id, answer, token in events:
        record(run(outbox, at))
        if answer == "ack":
            record([(at, o) for o in outbox.acked(message_id, token, at)])
        elif answer in ("offline", "final"):
            record([(at, o) for o in outbox.error(message_id, "offline" if answer == "offline"
                                                  else "unknownTwin", at)])
    record(run(outbox, 1000.0))
    assert all(len(statuses) == 1 for statuses in finals.values()), finals
    assert not after_final and len(outbox) == 0
    assert all(sent == list(range(1, len(sent) + 1)) for sent in attempts.values())
    assert outbox.held == outbox.parked == outbox.away == 0


def test_a_dropped_entry_is_gone_without_a_status() -> None:
    outbox = Outbox(NO_JITTER)
    message_id, _, _ = message(outbox)
    outbox.drop(message_id)
    assert outbox.status(message_id) is None and len(outbox) == 0
    assert outbox.queued_for(BOB) == 0
    assert not [o for _, o in run(outbox, 100.0) if isinstance(o, Transmit)]


def test_an_ack_within_the_grace_after_the_deadline_still_counts() -> None:
    outbox = Outbox(OutboxConfig(initial_retry=1.0, max_retry=1.0, jitter=0.0,
                                 ack_grace=2.0))
    late, late_token, _ = message(outbox, ttl=3.0)
    lost, _, _ = message(outbox, ttl=3.0)
    seen = run(outbox, 4.0)
    # No attempt after the deadline, and no verdict yet inside the grace.
    assert all(t <= 3.0 for t, o in seen if isinstance(o, Transmit))
    assert not [o for _, o in seen if isinstance(o, StatusChanged)
                and o.status is Status.EXPIRED]
    assert StatusChanged(late, ALICE, Status.DELIVERED, "") in outbox.acked(
        late, late_token, now=4.5)
    seen = run(outbox, 10.0)
    assert (5.0, StatusChanged(lost, ALICE, Status.EXPIRED, "")) in seen


def test_fail_fast_messages_fail_at_the_first_offline_answer() -> None:
    outbox = Outbox(NO_JITTER)
    patient, _, _ = message(outbox)
    hasty, _, _ = message(outbox, fail_fast=True)
    assert outbox.error(patient, "offline", now=0.1) == []
    assert StatusChanged(hasty, ALICE, Status.FAILED, "offline") in outbox.error(
        hasty, "offline", now=0.1)
    assert outbox.status(patient) == (Status.SENT, "offline")
