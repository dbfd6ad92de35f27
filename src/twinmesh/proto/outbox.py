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
from collections import Counter
from dataclasses import dataclass, field

from twinmesh.identity.keys import PublicKey
from twinmesh.proto.backoff import backoff_delay

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
class Outbox:
    config: OutboxConfig = field(default_factory=OutboxConfig)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._entries: dict[bytes, Entry] = {}
        self._timers: list[tuple[float, bytes]] = []  # (when, id); stale items skipped
        self._per_destination: Counter[PublicKey] = Counter()
        self._per_source: Counter[PublicKey] = Counter()
        # id -> (status, code, until), oldest first.
        self._finished: dict[bytes, tuple[Status, str, float]] = {}
        self._srtt: float | None = None  # smoothed ack delay, seconds
        self._rttvar = 0.0

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
        if self._per_destination[destination] >= self.config.max_per_destination:
            return Refused("overloaded", f"{self.config.max_per_destination} messages "
                                         f"already queued for {destination.short}"), []
        if self._per_source[source] >= self.config.max_per_source:
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
        if entry.attempts == 1:  # an ack of a retried message could answer any attempt
            self._sample(now - entry.first_sent)
        return self._finish(entry, Status.DELIVERED, "", now)

    def error(self, message_id: bytes, code: str, now: float) -> list[Output]:
        """The destination side answered with an error code (or the route failed)."""
        entry = self._entries.get(message_id)
        if entry is None:
            return []
        entry.code = code
        if code in FINAL_CODES or (entry.fail_fast and code in ("offline", "noRoute")):
            return self._finish(entry, Status.FAILED, code, now)
        if code == "offline":
            # The twin is away: keep trying, but not rarely, so it gets mail soon.
            delay = min(self._delay(entry.attempts), self.config.offline_retry)
            self._schedule(entry, now + delay)
        return []

    # ------------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        while self._timers and self._stale(self._timers[0]):
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        while self._timers and self._timers[0][0] <= now:
            when, message_id = heapq.heappop(self._timers)
            entry = self._entries.get(message_id)
            if entry is None or entry.next_try != when:
                continue
            if entry.deadline + self.config.ack_grace <= now:
                out.extend(self._finish(entry, Status.EXPIRED, entry.code, now))
            elif entry.deadline <= now:
                # No more attempts; wait for an ack still in the air, then expire.
                entry.next_try = entry.deadline + self.config.ack_grace
                heapq.heappush(self._timers, (entry.next_try, entry.id))
            else:
                out.extend(self._attempt(entry, now))
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
            self._remove(entry)

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
        return self._per_destination[destination]

    def destination(self, message_id: bytes) -> PublicKey | None:
        """The destination twin of a message still in the outbox (None otherwise)."""
        entry = self._entries.get(message_id)
        return None if entry is None else entry.destination

    # -------------------------------------------------------------- internals

    def _add(self, entry: Entry) -> None:
        self._entries[entry.id] = entry
        self._per_destination[entry.destination] += 1
        self._per_source[entry.source] += 1

    def retry_timeout(self) -> float:
        """The wait before a first retry: `initial_retry`, or the ack delay seen
        lately plus four deviations when that is longer (at most `max_retry`)."""
        config = self.config
        if self._srtt is None:
            return config.initial_retry
        return min(config.max_retry, max(config.initial_retry,
                                          self._srtt + 4 * self._rttvar))

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
        entry.attempts += 1
        out: list[Output] = [Transmit(entry.id, entry.destination, entry.envelope,
                                      entry.attempts)]
        if entry.status is Status.QUEUED:
            entry.status = Status.SENT
            out.append(StatusChanged(entry.id, entry.source, Status.SENT))
        self._schedule(entry, now + self._delay(entry.attempts))
        return out

    def _delay(self, attempts: int) -> float:
        config = self.config
        return backoff_delay(attempts, initial=self.retry_timeout(), cap=config.max_retry,
                             jitter=config.jitter, rng=self.rng)

    def _schedule(self, entry: Entry, when: float) -> None:
        # Never retry past the deadline: the last timer is the deadline itself.
        entry.next_try = min(when, entry.deadline)
        heapq.heappush(self._timers, (entry.next_try, entry.id))

    def _stale(self, item: tuple[float, bytes]) -> bool:
        entry = self._entries.get(item[1])
        return entry is None or entry.next_try != item[0]

    def _remove(self, entry: Entry) -> None:
        del self._entries[entry.id]
        self._per_destination[entry.destination] -= 1
        if not self._per_destination[entry.destination]:
            del self._per_destination[entry.destination]
        self._per_source[entry.source] -= 1
        if not self._per_source[entry.source]:
            del self._per_source[entry.source]

    def _finish(self, entry: Entry, status: Status, code: str, now: float) -> list[Output]:
        self._remove(entry)
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
