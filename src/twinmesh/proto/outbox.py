"""The source NIC's outbox: accept, retry, expire, report status (sans-I/O).

Theory of operation
-------------------
A twin submits a sealed envelope (see docs/BUS.md). The outbox admits it or refuses it
at once (`overloaded`, `too-large`, `expired`, `no-route` with fail-fast), and from
then on owns it until one of three things happens: a matching ack arrives
(`delivered`), the destination twin's NIC answers with an error that retrying cannot
fix (`failed(code)`), or the deadline passes (`expired`). Until then every attempt
(`Transmit`) is followed by a retry at an exponentially growing, jittered delay, never
past the deadline. Once the deadline has passed nothing is sent any more, but an ack
may still be on its way (the destination twin accepts a message until its deadline);
so `expired` is only declared `ack_grace` seconds later, and an ack arriving in
between still makes it `delivered`: a message is never reported both.

The outbox never writes to disk: it returns `Persist`/`Forget` outputs and the shell
applies them (one sqlite transaction per batch) before telling the twin "accepted".
After a restart the shell feeds the persisted entries back with `restore()`; they
are retried at once, and a message acked before the crash is simply acked again by
the destination twin, whose dedup store keeps it from being delivered twice.

The first retry waits `initial_retry`, or longer once acks show that the path is
slower (queues under load): the retransmission timeout follows the ack delays of
messages acked at their first attempt (smoothed as TCP does: srtt + 4 rttvar, Karn's
rule), so a busy NIC does not resend what is merely queued.

Overload: retries must not multiply the load of a saturated path
------------------------------------------------------------------
Measured with 1000 twins on 20 NICs: at saturation the outbox sent each message 1.7
to 2.3 times. Queues grew faster than the estimate could follow, and Karn's rule makes
that worse: only messages acked before their first retry give a sample, so the samples
never exceed the timeout they should raise. The retries then add load, the queues grow
more. Three mechanisms bound it:

1. **RTO backoff (RFC 6298, 5.5-5.7).** A retry that fires without an answer (a
   timeout, not an "offline" notice) doubles the retransmission timeout, at most once
   per current timeout (TCP has one timer per connection; we have one per message, and
   a thousand messages timing out together are one congestion signal, not a thousand).
   The doubled timeout applies to every message's next wait and stays until a valid
   sample arrives from a message first sent after the last doubling (samples of
   messages sent before it describe the old queue). It lets the samples reach the real
   ack delay again, capped at `max_retry`. A single message's schedule is unchanged:
   its own exponential backoff doubles in step.
2. **Retry budget** (`proto.retry_budget`, as gRPC's retry throttling and Finagle's
   `RetryBudget`). Each first send earns `retry_ratio` of a retry, time earns
   `retry_floor` per second (so a lossy path with little traffic still recovers), the
   bucket holds `retry_burst`. Over any T seconds retransmissions <= retry_burst +
   retry_floor * T + retry_ratio * first sends, however wrong the timeout is. A retry
   due without a token is *held*: queued in order of when it fell due, not sent, not
   counted as an attempt, and sent as soon as a token is there; it keeps its deadline
   (a held message still ends `delivered` or `expired`, exactly one of them), and an
   ack of its earlier copy ends it without any retransmission, which is the common
   case on a queue that is merely slow. Defaults: 10 % and 1/s, not Finagle's 20 % and
   10/s, because a NIC carries 10-60 msgs/s here, where a floor of 10/s would be no
   bound at all; the burst of 100 lets a short outage recover at once.
   Not budgeted: the first send, sends after a restart (`restore`, the first of
   this process), and retries while the network is silent (no ack or answer within
   the current retransmission timeout): those reach no busy receiver (the problem
   the budget is for) and are already bounded by each message's own backoff, and
   they must not drain the budget during an outage, or the backlog would trickle out
   at `retry_floor` after it (tests/nic/test_bus_reliability.py saw 40 messages
   expire after a 4 s partition).
3. **One probe per away twin.** After an "offline" notice for a destination, one
   message (the *probe*) goes on retrying every `offline_retry` (budgeted); the
   destination's other messages are *parked* without a timer until it is back. Any ack
   from that twin (the probe's or a new message's) sends all parked ones at once and
   unbudgeted: their last copy was answered "offline", so they are not duplicates, and
   the ack has just shown the path works. A probe that ends otherwise (expired, failed)
   hands the role to the oldest parked message. So a thousand messages for an away
   twin cost one retry per 2 s, not five hundred per second.

The shell can export `held_retries`, `parked_total`, `rto_backoffs` (counters) and
`held`, `parked`, `away`, `retry_tokens`, `retry_timeout()` (gauges).

An ack is accepted only when its delivery token hashes to the message's `ack_hash`
(`ack_matches`), so no NIC on the path can stop the retries of a message it could not
read. Status is kept for finished messages for `status_hold` seconds (the newest
`max_finished` of them) so a twin can still ask "what became of id X?": the `Forget`
of a finished entry carries its final status, which the shell keeps in durable storage
for as long, so the answer survives a restart (`restore` takes such entries back as
finished statuses).
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import random
from dataclasses import dataclass, field

from twinmesh.identity.keys import PublicKey
from twinmesh.proto.backoff import backoff_delay
from twinmesh.proto.retry_budget import RetryBudget

MAX_PAYLOAD = 64 * 1024
# What a NIC waits past a deadline for an ack already on its way before it says
# "expired" (an ack's one-way trip, with room for queues and clock skew).
ACK_GRACE = 2.0


class Status(enum.Enum):
    QUEUED = "queued"  # accepted, not yet handed to the network
    SENT = "sent"  # transmitted at least once, no ack yet
    DELIVERED = "delivered"
    EXPIRED = "expired"
    FAILED = "failed"


# Error codes that end a message at once; the others ("offline", "noRoute") are retried.
FINAL_CODES = frozenset({"unknownTwin", "rejectedSchema", "tooLarge", "unauthorized"})


@dataclass(frozen=True)
class OutboxConfig:
    initial_retry: float = 0.25
    max_retry: float = 8.0
    offline_retry: float = 2.0  # cap after an "offline" answer: the twin may come back
    jitter: float = 0.25
    max_per_destination: int = 1000
    max_total: int = 100_000
    max_per_source: int = 10_000  # per submitting twin: beyond it, "overloaded"
    status_hold: float = 7200.0  # how long a finished status is kept (memory and disk)
    max_finished: int = 100_000  # at most this many finished statuses (oldest go first)
    ack_grace: float = 0.0  # 0: expire at the deadline itself; the NIC uses ACK_GRACE
    # Retry budget (see the module docstring): retries per first send, retries per
    # second whatever the traffic, and the most saved up.
    retry_ratio: float = 0.1
    retry_floor: float = 1.0
    retry_burst: float = 100.0


@dataclass
class Entry:
    id: bytes
    source: PublicKey
    destination: PublicKey
    deadline: float
    ack_hash: bytes
    envelope: bytes
    attempts: int = 0
    next_try: float = 0.0
    status: Status = Status.QUEUED
    code: str = ""  # the last error code heard for it
    # Fail at the first "offline"/"noRoute" instead of waiting. Not persisted: after a
    # restart the message is retried like any other (the twin asked fast, it got
    # nothing yet, so it is still better delivered than lost).
    fail_fast: bool = False
    first_sent: float = 0.0  # when the first attempt went out (not persisted)
    # The last attempt was answered ("offline", "noRoute"): its retry is no timeout,
    # says nothing about congestion (not persisted).
    answered: bool = False


@dataclass(frozen=True)
class Transmit:
    """Send this envelope towards its destination twin now."""

    id: bytes
    destination: PublicKey
    envelope: bytes
    attempt: int = 1  # 1 for the first send, more for retries


@dataclass(frozen=True)
class Persist:
    """Store this entry durably (before the submitting twin hears "accepted")."""

    entry: Entry


@dataclass(frozen=True)
class Forget:
    """The entry is finished: drop its envelope from durable storage. With a `status`,
    keep that final status (and its code) there until `until` (unix seconds); without
    one, remove every trace of it."""

    id: bytes
    status: Status | None = None
    code: str = ""
    until: float = 0.0


@dataclass(frozen=True)
class StatusChanged:
    """Tell the source twin (if attached) what became of its message."""

    id: bytes
    source: PublicKey
    status: Status
    code: str = ""


Output = Transmit | Persist | Forget | StatusChanged


@dataclass(frozen=True)
class Refused:
    code: str  # "overloaded" | "tooLarge" | "expired" | "noRoute"
    message: str


FINAL = frozenset({Status.DELIVERED, Status.EXPIRED, Status.FAILED})


@dataclass
class _Away:
    """A destination twin that answered "offline": the one message retrying for it, and
    the others waiting for that one's ack (ids, oldest first)."""

    probe: bytes | None = None
    parked: dict[bytes, None] = field(default_factory=dict)


@dataclass
class Outbox:
    config: OutboxConfig = field(default_factory=OutboxConfig)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._entries: dict[bytes, Entry] = {}
        self._timers: list[tuple[float, bytes]] = []  # (when, id); stale items skipped
        # Keyed by the keys' raw bytes (whose hash is cached in C): a PublicKey's
        # hash is a Python call, and these are touched several times per message.
        self._per_destination: dict[bytes, int] = {}
        self._per_source: dict[bytes, int] = {}
        # id -> (status, code, until), oldest first.
        self._finished: dict[bytes, tuple[Status, str, float]] = {}
        self._srtt: float | None = None  # smoothed ack delay, seconds
        self._rttvar = 0.0
        self._backoff = 1.0  # RTO multiplier since the last timeout, reset by a sample
        self._backed_off_at = float("-inf")
        self._answered_at = float("-inf")  # the last ack or notice from the network
        config = self.config
        self._budget = RetryBudget(config.retry_ratio, config.retry_floor,
                                   config.retry_burst)
        # Retries due but without budget, in the order they fell due. Their timer is
        # their deadline; so is that of parked messages.
        self._held: dict[bytes, None] = {}
        self._away: dict[bytes, _Away] = {}  # by destination (raw)
        # Counters for the shell's metrics (only ever grow).
        self.held_retries = 0  # retries postponed for lack of budget
        self.parked_total = 0  # messages parked behind their destination's probe
        self.rto_backoffs = 0  # doublings of the retransmission timeout

    # ------------------------------------------------------------------ admit

    def submit(
        self,
        *,
        id: bytes,
        source: PublicKey,
        destination: PublicKey,
        deadline: float,
        ack_hash: bytes,
        envelope: bytes,
        payload_size: int,
        now: float,
        routable: bool = True,
        fail_fast: bool = False,
    ) -> tuple[Refused | None, list[Output]]:
        """Admit a sealed envelope. Returns (None, outputs) when accepted (apply the
        Persist before answering the twin), or (Refused, []) with the reason."""
        if payload_size > MAX_PAYLOAD:
            return Refused("tooLarge", f"payload of {payload_size} bytes exceeds "
                                       f"{MAX_PAYLOAD}"), []
        if deadline <= now:
            return Refused("expired", "the deadline has already passed"), []
        if id in self._entries or id in self._finished:
            # The twin resubmitted (e.g. after reconnecting): same id, same message.
            return None, []
        if fail_fast and not routable:
            return Refused("noRoute", f"no route to {destination.text} and fail-fast set"), []
        if len(self._entries) >= self.config.max_total:
            return Refused("overloaded", "the NIC outbox is full; try again later"), []
        if self._per_destination.get(destination.raw, 0) >= self.config.max_per_destination:
            return Refused("overloaded", f"{self.config.max_per_destination} messages "
                                         f"already queued for {destination.short}"), []
        if self._per_source.get(source.raw, 0) >= self.config.max_per_source:
            return Refused("overloaded", "this twin has too many messages in flight"), []
        entry = Entry(id, source, destination, deadline, ack_hash, envelope, next_try=now,
                      fail_fast=fail_fast)
        self._add(entry)
        return None, [Persist(entry), *self._attempt(entry, now)]

    def restore(self, entry: Entry, now: float) -> list[Output]:
        """Re-admit an entry read back from durable storage after a restart. A finished
        one (a final status, kept until `entry.next_try`) only answers status queries."""
        if entry.id in self._entries or entry.id in self._finished:
            return []
        if entry.status in FINAL:
            if entry.next_try > now:
                self._remember(entry.id, entry.status, entry.code, entry.next_try)
            return []
        if entry.deadline <= now:
            until = now + self.config.status_hold
            self._remember(entry.id, Status.EXPIRED, entry.code, until)
            return [Forget(entry.id, Status.EXPIRED, entry.code, until),
                    StatusChanged(entry.id, entry.source, Status.EXPIRED)]
        entry.next_try = now
        self._add(entry)
        return self._attempt(entry, now)

    # ------------------------------------------------------------ answers

    def acked(self, message_id: bytes, token: bytes, now: float) -> list[Output]:
        """An ack for `message_id` carrying `token` arrived from the destination."""
        entry = self._entries.get(message_id)
        if entry is None or not token_matches(token, entry.ack_hash):
            return []
        self._answered_at = max(self._answered_at, now)
        if entry.attempts == 1:  # an ack of a retried message could answer any attempt
            self._sample(now - entry.first_sent)
            if entry.first_sent >= self._backed_off_at:  # sent under the backed-off RTO
                self._backoff = 1.0
        out = self._finish(entry, Status.DELIVERED, "", now)
        away = self._away.pop(entry.destination.raw, None)
        if away is not None:
            # The twin is back: what waited behind the probe goes now, unbudgeted (its
            # last copy was answered "offline", so none of these is a duplicate).
            for message_id in away.parked:
                out.extend(self._attempt(self._entries[message_id], now))
        return out

    def error(self, message_id: bytes, code: str, now: float) -> list[Output]:
        """The destination side answered with an error code (or the route failed)."""
        entry = self._entries.get(message_id)
        if entry is None:
            return []
        entry.code = code
        if code in FINAL_CODES or (entry.fail_fast and code in ("offline", "noRoute")):
            return self._finish(entry, Status.FAILED, code, now)
        entry.answered = True
        if code == "offline":
            self._answered_at = max(self._answered_at, now)
            self._held.pop(entry.id, None)
            away = self._away.setdefault(entry.destination.raw, _Away())
            if away.probe is None:
                away.probe = entry.id
            if away.probe == entry.id:
                # The twin is away: keep trying, but not rarely, so it gets mail soon.
                delay = min(self._delay(entry.attempts), self.config.offline_retry)
                self._schedule(entry, now + delay)
            elif entry.id not in away.parked:
                self._park(entry, away)
        return []

    # ------------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        while self._timers and self._stale(self._timers[0]):
            heapq.heappop(self._timers)
        when = self._timers[0][0] if self._timers else None
        if self._held:
            # Wake when the budget has a token for the first held retry, or when the
            # network has been silent long enough for held retries to go uncharged.
            ready = self._answered_at + self.retry_timeout()
            token = self._budget.ready_at()
            if token is not None:
                ready = min(ready, token)
            when = ready if when is None else min(when, ready)
        return when

    def handle_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        self._release_held(now, out)
        while self._timers and self._timers[0][0] <= now:
            when, message_id = heapq.heappop(self._timers)
            entry = self._entries.get(message_id)
            if entry is None or entry.next_try != when:
                continue
            if entry.deadline + self.config.ack_grace <= now:
                out.extend(self._finish(entry, Status.EXPIRED, entry.code, now))
            elif entry.deadline <= now:
                # No more attempts; wait for an ack still in the air, then expire.
                self._detach(entry, now)
                entry.next_try = entry.deadline + self.config.ack_grace
                heapq.heappush(self._timers, (entry.next_try, entry.id))
            else:
                self._retry(entry, now, out)
        # Finished statuses are held for the same time each, so the dict (in insertion
        # order) expires from its front: stop at the first one still held.
        while self._finished:
            message_id, (_, _, until) = next(iter(self._finished.items()))
            if until > now:
                break
            del self._finished[message_id]
        return out

    def drop(self, message_id: bytes) -> None:
        """Forget an entry without a status: its commit failed, so the twin was told
        "overloaded" and never heard "accepted"."""
        entry = self._entries.get(message_id)
        if entry is not None:
            self._remove(entry, entry.next_try)

    # ---------------------------------------------------------------- status

    def status(self, message_id: bytes) -> tuple[Status, str] | None:
        entry = self._entries.get(message_id)
        if entry is not None:
            return entry.status, entry.code
        finished = self._finished.get(message_id)
        if finished is not None:
            return finished[0], finished[1]
        return None

    def __len__(self) -> int:
        return len(self._entries)

    def queued_for(self, destination: PublicKey) -> int:
        return self._per_destination.get(destination.raw, 0)

    def destination(self, message_id: bytes) -> PublicKey | None:
        """The destination twin of a message still in the outbox (None otherwise)."""
        entry = self._entries.get(message_id)
        return None if entry is None else entry.destination

    @property
    def held(self) -> int:
        """Retries due now but waiting for the retry budget."""
        return len(self._held)

    @property
    def parked(self) -> int:
        """Messages waiting for an away twin's probe to be acked."""
        return sum(len(away.parked) for away in self._away.values())

    @property
    def away(self) -> int:
        """Destination twins that answered "offline" and have not acked since."""
        return len(self._away)

    @property
    def retry_tokens(self) -> float:
        """Retries the budget allows right now (as of the last call)."""
        return self._budget.tokens

    # -------------------------------------------------------------- internals

    def _add(self, entry: Entry) -> None:
        self._entries[entry.id] = entry
        per_destination, per_source = self._per_destination, self._per_source
        destination, source = entry.destination.raw, entry.source.raw
        per_destination[destination] = per_destination.get(destination, 0) + 1
        per_source[source] = per_source.get(source, 0) + 1

    def retry_timeout(self) -> float:
        """The wait before a first retry: `initial_retry`, or the ack delay seen
        lately plus four deviations when that is longer, doubled per timeout since the
        last valid sample (at most `max_retry`)."""
        return min(self.config.max_retry, self._measured_timeout() * self._backoff)

    def _measured_timeout(self) -> float:
        config = self.config
        if self._srtt is None:
            return config.initial_retry
        return max(config.initial_retry, self._srtt + 4 * self._rttvar)

    def _timed_out(self, now: float) -> None:
        """A retry fires without any answer to the last attempt: back the timeout off,
        once per current timeout whatever the number of messages timing out."""
        timeout = self.retry_timeout()
        if timeout < self.config.max_retry and now - self._backed_off_at >= timeout:
            self._backoff *= 2
            self._backed_off_at = now
            self.rto_backoffs += 1

    def _retry(self, entry: Entry, now: float, out: list[Output]) -> None:
        """A retry fell due: send it, park it behind its destination's probe, or hold
        it until the budget allows (held retries keep their turn)."""
        away = self._must_park(entry)
        if away is not None:
            self._park(entry, away)
        elif self._held or not self._may_retry(now):
            self._held[entry.id] = None
            self.held_retries += 1
            self._schedule(entry, entry.deadline)
        else:
            self._retransmit(entry, now, out)

    def _release_held(self, now: float, out: list[Output]) -> None:
        while self._held:
            entry = self._entries[next(iter(self._held))]
            away = self._must_park(entry)
            if away is None and not self._may_retry(now):
                return
            del self._held[entry.id]
            if away is not None:
                self._park(entry, away)
            else:
                self._retransmit(entry, now, out)

    def _may_retry(self, now: float) -> bool:
        """A retry goes now if the network is silent (uncharged) or the budget pays."""
        silent = now >= self._answered_at + self.retry_timeout()  # as in get_timer
        return silent or self._budget.try_withdraw(now)

    def _retransmit(self, entry: Entry, now: float, out: list[Output]) -> None:
        if not entry.answered:
            self._timed_out(now)
        out.extend(self._attempt(entry, now))

    def _must_park(self, entry: Entry) -> _Away | None:
        """The away record to park `entry` in; None if its destination is not away or
        it is (or becomes) the destination's probe."""
        away = self._away.get(entry.destination.raw)
        if away is None:
            return None
        if away.probe is None:
            away.probe = entry.id
        return None if away.probe == entry.id else away

    def _park(self, entry: Entry, away: _Away) -> None:
        away.parked[entry.id] = None
        self.parked_total += 1
        self._schedule(entry, entry.deadline)  # no retry; the deadline still counts

    def _detach(self, entry: Entry, now: float) -> None:
        """Take `entry` out of the held queue and its destination's away record; a
        probe hands its role to the oldest parked message, which is retried at `now`."""
        if self._held:
            self._held.pop(entry.id, None)
        if not self._away:
            return
        away = self._away.get(entry.destination.raw)
        if away is None:
            return
        away.parked.pop(entry.id, None)
        if away.probe == entry.id:
            away.probe = None
            if away.parked:
                successor = self._entries[next(iter(away.parked))]
                del away.parked[successor.id]
                away.probe = successor.id
                self._schedule(successor, now)
        if away.probe is None and not away.parked:
            del self._away[entry.destination.raw]

    def _sample(self, delay: float) -> None:
        if delay < 0:
            return
        if self._srtt is None:
            self._srtt, self._rttvar = delay, delay / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - delay)
            self._srtt = 0.875 * self._srtt + 0.125 * delay

    def _attempt(self, entry: Entry, now: float) -> list[Output]:
        if not entry.attempts:
            entry.first_sent = now
            self._budget.deposit(now)
        entry.attempts += 1
        entry.answered = False
        out: list[Output] = [Transmit(entry.id, entry.destination, entry.envelope,
                                      entry.attempts)]
        if entry.status is Status.QUEUED:
            entry.status = Status.SENT
            out.append(StatusChanged(entry.id, entry.source, Status.SENT))
        self._schedule(entry, now + self._delay(entry.attempts))
        return out

    def _delay(self, attempts: int) -> float:
        """The wait after attempt number `attempts`: the measured timeout doubled per
        attempt of this message, and never shorter than the backed-off timeout."""
        config = self.config
        measured = self._measured_timeout()
        own = measured * 2 ** min(max(attempts - 1, 0), 32)
        # min(max_retry, measured * backoff) is `retry_timeout()`, without the calls.
        initial = max(own, min(config.max_retry, measured * self._backoff))
        return backoff_delay(1, initial=initial, cap=config.max_retry,
                             jitter=config.jitter, rng=self.rng)

    def _schedule(self, entry: Entry, when: float) -> None:
        # Never retry past the deadline: the last timer is the deadline itself.
        entry.next_try = min(when, entry.deadline)
        heapq.heappush(self._timers, (entry.next_try, entry.id))

    def _stale(self, item: tuple[float, bytes]) -> bool:
        entry = self._entries.get(item[1])
        return entry is None or entry.next_try != item[0]

    def _remove(self, entry: Entry, now: float) -> None:
        self._detach(entry, now)
        del self._entries[entry.id]
        per_destination, per_source = self._per_destination, self._per_source
        destination, source = entry.destination.raw, entry.source.raw
        left = per_destination[destination] - 1
        if left:
            per_destination[destination] = left
        else:
            del per_destination[destination]
        left = per_source[source] - 1
        if left:
            per_source[source] = left
        else:
            del per_source[source]

    def _finish(self, entry: Entry, status: Status, code: str, now: float) -> list[Output]:
        self._remove(entry, now)
        entry.status = status
        until = now + self.config.status_hold
        self._remember(entry.id, status, code, until)
        return [Forget(entry.id, status, code, until),
                StatusChanged(entry.id, entry.source, status, code)]

    def _remember(self, message_id: bytes, status: Status, code: str, until: float) -> None:
        self._finished[message_id] = (status, code, until)
        while len(self._finished) > self.config.max_finished:
            del self._finished[next(iter(self._finished))]


def token_matches(token: bytes, ack_hash: bytes) -> bool:
    """BLAKE2b-128 of the delivery token equals the hash the message carried."""
    return len(ack_hash) == 16 and hashlib.blake2b(token, digest_size=16).digest() == ack_hash
