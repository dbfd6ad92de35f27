"""The outbox under overload, loss and away twins, on a virtual clock: what a sender
notices is whether its messages arrive, and what they cost the network (copies sent)."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from dataclasses import dataclass, field

from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.proto.outbox import Outbox, OutboxConfig, Status, StatusChanged, Transmit

ALICE = Identity.generate().public
BOB = Identity.generate().public
CAROL = Identity.generate().public
FINAL = (Status.DELIVERED, Status.EXPIRED, Status.FAILED)


def token_of(n: int) -> bytes:
    return n.to_bytes(16, "big")


@dataclass
class Path:
    """The network and the destination twin: a FIFO that serves at most `capacity`
    copies per second; each way a copy is lost with probability `loss`; the twin acks
    every copy it gets (it dedups), or its NIC answers "offline" while it is away."""

    capacity: float
    latency: float = 0.01
    loss: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    away_until: float = 0.0
    down: tuple[float, float] = (0.0, 0.0)  # every copy sent in [start, end) is lost
    busy_until: float = 0.0
    received: set[bytes] = field(default_factory=set)

    def send(self, now: float, message_id: bytes) -> tuple[float, str] | None:
        """A copy leaves at `now`: when and what comes back (None: nothing)."""
        if self.rng.random() < self.loss or self.down[0] <= now < self.down[1]:
            return None
        self.busy_until = max(now, self.busy_until) + 1 / self.capacity
        if self.busy_until < self.away_until:
            return self.busy_until + self.latency, "offline"
        self.received.add(message_id)
        if self.rng.random() < self.loss:
            return None
        return self.busy_until + self.latency, "ack"


@dataclass
class Run:
    transmissions: int = 0
    sent_at: dict[bytes, float] = field(default_factory=dict)  # message id -> submitted
    finals: dict[bytes, list[tuple[float, Status]]] = field(default_factory=dict)
    transmit_times: list[float] = field(default_factory=list)
    end: float = 0.0

    def delivered(self) -> int:
        return sum(1 for f in self.finals.values() if [s for _, s in f] == [Status.DELIVERED])


def simulate(outbox: Outbox, path: Path, submit_times: list[float], *, ttl: float = 300.0,
             until: float = 2000.0) -> Run:
    """Submit a message at each of `submit_times`, carry out the outbox's outputs over
    `path`, until nothing is left to do (or `until`)."""
    run = Run()
    seq = itertools.count()
    events: list[tuple[float, int, str, int]] = [
        (at, next(seq), "submit", n) for n, at in enumerate(submit_times)]
    heapq.heapify(events)

    def apply(now: float, outputs: list[object]) -> None:
        for o in outputs:
            if isinstance(o, Transmit):
                run.transmissions += 1
                run.transmit_times.append(now)
                answer = path.send(now, o.id)
                if answer is not None:
                    heapq.heappush(events, (answer[0], next(seq), answer[1],
                                            int.from_bytes(o.id, "big")))
            elif isinstance(o, StatusChanged) and o.status in FINAL:
                run.finals[o.id].append((now, o.status))

    while True:
        timer = outbox.get_timer()
        at = min(timer if timer is not None else float("inf"),
                 events[0][0] if events else float("inf"))
        if at == float("inf") or at > until:
            break
        run.end = at
        if timer is not None and timer <= at:
            apply(at, outbox.handle_timer(at))
            continue
        _, _, kind, n = heapq.heappop(events)
        message_id = token_of(n)
        if kind == "submit":
            refused, out = outbox.submit(
                id=message_id, source=ALICE, destination=BOB, deadline=at + ttl,
                ack_hash=hashlib.blake2b(token_of(n), digest_size=16).digest(),
                envelope=b"sealed", payload_size=100, now=at)
            assert refused is None, refused
            run.sent_at[message_id] = at
            run.finals[message_id] = []
            apply(at, out)
        elif kind == "ack":
            apply(at, outbox.acked(message_id, token_of(n), at))
        else:
            apply(at, outbox.error(message_id, kind, at))
    return run


def test_at_two_and_a_half_times_capacity_retries_stay_within_the_budget() -> None:
    """A path that serves 100 msgs/s gets 250 msgs/s for 20 s. Every message still
    arrives (once: the twin dedups), but the copies sent per message stay within the
    retry budget instead of multiplying the overload (the old outbox sent ~2 each)."""
    config = OutboxConfig(max_per_destination=10_000)  # the path stands for many twins
    outbox = Outbox(config, rng=random.Random(7))
    path = Path(capacity=100.0)
    run = simulate(outbox, path, [n / 250 for n in range(5000)])
    assert run.delivered() == 5000 and len(outbox) == 0
    allowed = (5000 * (1 + config.retry_ratio) + config.retry_burst
               + config.retry_floor * run.end)
    assert run.transmissions <= allowed, (run.transmissions, allowed)
    assert outbox.held_retries > 0  # the budget, not luck, kept it there


def test_a_lossy_idle_path_still_delivers_everything() -> None:
    """30 % of copies and of acks lost, one message every 2 s: the floor of the budget
    pays for the retries, every message arrives before its deadline."""
    outbox = Outbox(OutboxConfig(), rng=random.Random(3))
    path = Path(capacity=1000.0, loss=0.3, rng=random.Random(5))
    run = simulate(outbox, path, [2.0 * n for n in range(300)])
    assert run.delivered() == 300
    assert all(run.finals[i][0][0] <= run.sent_at[i] + 300.0 for i in run.finals)


def test_after_an_outage_the_backlog_goes_at_once_not_at_the_budget_floor() -> None:
    """200 messages sent into a path that is down for 20 s, retried every second at
    most: retries into silence reach no busy receiver, so they do not drain the
    budget, and everything arrives within a few retry intervals of the path coming back
    (not at the floor of 1 retry/s: 200 s)."""
    outbox = Outbox(OutboxConfig(max_retry=1.0), rng=random.Random(4))
    path = Path(capacity=1000.0, down=(0.0, 20.0))
    run = simulate(outbox, path, [n / 100 for n in range(200)])
    assert run.delivered() == 200
    assert max(f[0][0] for f in run.finals.values()) <= 20.0 + 3 * 1.0


def test_an_away_twin_costs_one_probe_and_gets_everything_once_back() -> None:
    """1000 messages wait for a twin that is away for a minute: one message probes, at
    most one copy every `offline_retry`, and when the twin is back all 1000 arrive
    within a probe interval."""
    config = OutboxConfig()
    outbox = Outbox(config, rng=random.Random(2))
    path = Path(capacity=5000.0, away_until=60.0)
    run = simulate(outbox, path, [n / 1000 for n in range(1000)])
    assert run.delivered() == 1000
    retries_while_away = [t for t in run.transmit_times if 2.0 <= t < 60.0]
    assert len(retries_while_away) <= 58 / config.offline_retry * 1.5
    last_delivery = max(f[0][0] for f in run.finals.values())
    assert last_delivery <= 60.0 + config.offline_retry + 1.0
    assert outbox.away == 0 and outbox.parked == 0


_fresh = itertools.count(1 << 64)


def network_answers(outbox: Outbox, now: float) -> None:
    """Another message, acked at once: the network is answering (the budget applies;
    a silent network's retries are uncharged)."""
    message_id = token_of(next(_fresh))
    outbox.submit(id=message_id, source=ALICE, destination=CAROL, deadline=now + 100.0,
                  ack_hash=hashlib.blake2b(message_id, digest_size=16).digest(),
                  envelope=b"sealed", payload_size=10, now=now)
    outbox.acked(message_id, message_id, now)


def test_a_held_retry_keeps_its_turn_and_an_ack_of_the_first_copy_saves_it() -> None:
    """With the budget spent (one token, then one per second), retries wait in the
    order they fell due, keep their attempt numbers, and one whose first copy is acked
    meanwhile is never resent."""
    outbox = Outbox(OutboxConfig(jitter=0.0, retry_ratio=0.0, retry_floor=1.0,
                                 retry_burst=1))
    ids = [token_of(n) for n in range(3)]
    for message_id in ids:
        outbox.submit(id=message_id, source=ALICE, destination=BOB, deadline=100.0,
                      ack_hash=hashlib.blake2b(message_id, digest_size=16).digest(),
                      envelope=b"sealed", payload_size=10, now=0.0)

    def sends(until: float) -> list[tuple[float, bytes, int]]:
        seen = []
        while (timer := outbox.get_timer()) is not None and timer <= until:
            network_answers(outbox, timer)
            seen.extend((timer, o.id, o.attempt) for o in outbox.handle_timer(timer)
                        if isinstance(o, Transmit) and o.id in ids)
        return seen

    # All three fall due at 0.25: the token goes to the first, the floor pays 1/s.
    assert sends(2.2) == [(0.25, ids[0], 2), (1.25, ids[1], 2)]
    assert outbox.held == 3  # ids[2], then ids[0] and ids[1] again
    out = outbox.acked(ids[2], ids[2], now=2.2)  # its first copy was only slow
    assert StatusChanged(ids[2], ALICE, Status.DELIVERED, "") in out
    assert sends(3.0) == [(2.25, ids[0], 3)]  # ids[2]'s turn went to the next one


def test_a_held_message_ends_expired_exactly_once_at_its_deadline() -> None:
    """A budget that never refills: the held messages are not lost in the queue, they
    end `expired` at their deadline, once each."""
    outbox = Outbox(OutboxConfig(jitter=0.0, retry_ratio=0.0, retry_floor=0.0,
                                 retry_burst=1))
    finals: list[tuple[float, bytes, Status]] = []
    sends: list[tuple[float, int]] = []
    for n in range(2):
        outbox.submit(id=token_of(n), source=ALICE, destination=BOB, deadline=10.0,
                      ack_hash=b"h" * 16, envelope=b"sealed", payload_size=10, now=0.0)
    while (timer := outbox.get_timer()) is not None and timer < 200.0:
        network_answers(outbox, timer)
        for o in outbox.handle_timer(timer):
            if isinstance(o, Transmit) and o.id in (token_of(0), token_of(1)):
                sends.append((timer, o.attempt))
            elif isinstance(o, StatusChanged) and o.status in FINAL:
                finals.append((timer, o.id, o.status))
    assert sends == [(0.25, 2)]  # the one token; no floor, no deposits: nothing more
    assert sorted(finals) == [(10.0, token_of(0), Status.EXPIRED),
                              (10.0, token_of(1), Status.EXPIRED)]
    assert outbox.held == 0 and outbox.queued_for(BOB) == 0


def test_timeouts_back_the_timeout_off_until_a_fresh_sample() -> None:
    """As TCP: retries firing without answers double the timeout (once per timeout,
    however many messages time out together); an ack of a message sent after that
    brings the measured value back."""
    outbox = Outbox(OutboxConfig(initial_retry=0.25, max_retry=8.0, jitter=0.0))
    for n in range(100):
        outbox.submit(id=token_of(n), source=ALICE, destination=BOB, deadline=100.0,
                      ack_hash=hashlib.blake2b(token_of(n), digest_size=16).digest(),
                      envelope=b"sealed", payload_size=10, now=0.0)
    outbox.handle_timer(0.25)  # 100 messages time out together: one doubling
    assert outbox.retry_timeout() == 0.5 and outbox.rto_backoffs == 1
    outbox.acked(token_of(0), token_of(0), now=0.3)  # a retried one: no sample
    assert outbox.retry_timeout() == 0.5
    fresh = token_of(1000)
    outbox.submit(id=fresh, source=ALICE, destination=BOB, deadline=100.0,
                  ack_hash=hashlib.blake2b(fresh, digest_size=16).digest(),
                  envelope=b"sealed", payload_size=10, now=0.3)
    outbox.acked(fresh, fresh, now=0.35)
    assert outbox.retry_timeout() == 0.25


def _new_messages_for(outbox: Outbox, destination: PublicKey, count: int,
                      now: float) -> list[bytes]:
    ids = []
    for n in range(count):
        message_id = token_of(10_000 + n)
        outbox.submit(id=message_id, source=ALICE, destination=destination,
                      deadline=now + 100.0, ack_hash=b"h" * 16, envelope=b"sealed",
                      payload_size=10, now=now)
        ids.append(message_id)
    return ids


def test_when_the_probe_expires_the_oldest_parked_message_takes_over() -> None:
    outbox = Outbox(OutboxConfig(jitter=0.0))
    first, *others = _new_messages_for(outbox, BOB, 3, now=0.0)
    for message_id in [first, *others]:
        outbox.error(message_id, "offline", now=0.1)
    assert outbox.parked == 2 and outbox.away == 1
    outbox.error(first, "unknownTwin", now=0.2)  # the probe ends
    out = outbox.handle_timer(0.2)
    assert [o.id for o in out if isinstance(o, Transmit)] == [others[0]]
    assert outbox.parked == 1
