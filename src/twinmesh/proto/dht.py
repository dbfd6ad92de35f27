"""Twin lookups (findDigitalTwinById): a Kademlia-style DHT over the NICs (sans-I/O).

Theory of operation
-------------------
*Ids and distance.* A node id is a NIC key, a record's key is the twin key; both are
32-byte ed25519 keys read as big-endian integers, and the distance between two ids
is their XOR (Kademlia). Every NIC keeps up to `k` contacts per bucket, bucket `i`
holding the NICs whose XOR distance to us has its highest bit at `i`; so a NIC knows
its own neighbourhood of the id space well and the far halves sparsely.

*Who holds a record.* A twin's signed location record (`proto.attach.Location`) is
stored on the `k` NICs closest to the twin key (the replicas). The twin's own NIC is
responsible for it: it stores it when the twin publishes, stores it again every
`republish_interval` (replicas change as NICs come and go), and *restores* it when
it sits on fewer than `k` replicas and we now know more contacts than we ever did
when a store of it started (a mesh that is still forming): a contact evicted and
learned again is churn, not growth, and moves nothing. Restores of one record are
at least `restore_interval` apart, the gap doubling up to `restore_max_interval`
(back to the start when a store reaches `k` replicas or the twin publishes): an
overloaded mesh, whose timeouts leave records thin and evict contacts, is not sent
ever more stores. A replica keeps only what verifies: signed by the twin key, not
expired, not expiring further out than `max_ttl`, and with a seqno above the one it
holds; anything else is refused with a reason (`Stored.reason`). A record of one of
our twins refused as `older` tells us the twin moved on: we stop republishing it.

*Lookups.* Iterative, as in Kademlia: start from the `k` contacts closest to the
target, keep `alpha` queries in flight to the closest not yet asked, merge the
contacts each answer brings (they are only candidates: a NIC enters our buckets when
it answers us, or when the NIC's routing table says it exists, so an answer cannot
fill our table with invented keys), and stop when the `k` closest candidates that did
not time out have all answered. A value lookup also stops as soon as `value_quorum`
NICs (ourselves included) have returned a valid record: the newest of those wins.
Close NICs that answered with no record or an older one get the newest stored back
(repair). Each query has its own timeout, so a dead NIC costs `query_timeout` on one
of the `alpha` paths, not the lookup; a lookup ends after `lookup_timeout` whatever
happens. *Rounds* are the length of the longest chain of answers the lookup waited
for (a contact learned from an answer of round r is asked in round r + 1): the
figure that grows like log N.

*Contacts.* Contacts come from the NIC (`add_contact`: neighbours and routes, which
exist only for keys whose owners signed their announcement), from NICs that answer
us, and from NICs that ask us. A full bucket keeps its old contacts (old contacts
are the ones likely to stay, Kademlia's observation) and holds newcomers in a
bounded replacement cache; a contact whose queries time out `max_failures` times in
a row, or that the NIC reports gone (`forget_contact`), leaves its bucket and the
newest replacement takes its place. Buckets nobody looked into for
`refresh_interval` are refreshed by a lookup for a random id in their range.

*Bounds.* At most `max_records` replica records (when full, the record farthest from
us goes first, if the newcomer is closer), `max_own` records of our twins,
`max_cached` lookup results (each kept `cache_ttl`), `max_lookups` lookups at once,
of which at most `max_store_lookups` store lookups (publishes, republishes and
restores beyond that wait in a queue of our twins, fresh publishes first, so finds
always have room), `CANDIDATES_PER_K` x `k` NICs considered per lookup, `k`
contacts per bucket and per replacement cache, `k` contacts read from any answer,
`MAX_MESSAGE` bytes per message, and requests from one source NIC limited by a
token bucket (`rate_per_source`, `burst_per_source`, for at most `max_sources`
sources).

*Time.* Every call takes `now` (the caller's clock; `wall_offset` turns it into unix
time for record expiry). The core returns outputs (`SendDht` bytes for a NIC,
`LookupDone`, `Violation`) and tells when it next needs `handle_timer` through
`get_timer()`. It never logs and never reads a clock. Remote input never raises:
malformed or hostile messages become a `Violation` output and a `stats` counter;
rate-limited requests and late answers are only counted.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from twinmesh.errors import DecodeError, LocalProtocolError
from twinmesh.identity.keys import KEY_SIZE, PublicKey
from twinmesh.proto.attach import Location
from twinmesh.wire import schemas

ID_BITS = KEY_SIZE * 8
MAX_MESSAGE = 8192  # a DHT message is at most a record and k keys: far below this
CANDIDATES_PER_K = 16  # a lookup considers at most this many times k NICs
_dht = schemas.dht


# ----------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class SendDht:
    """Send these DHT bytes to another NIC (over the overlay, best effort)."""

    nic: PublicKey
    data: bytes


@dataclass(frozen=True)
class LookupDone:
    """A lookup started with `find`, `find_node` or by the core itself finished."""

    lookup_id: int
    target: bytes  # the 32-byte id looked up (a twin key for `find`)
    location: Location | None  # value lookups: the newest valid record found
    rounds: int
    queried: int  # NICs asked
    elapsed: float  # seconds, on the caller's clock
    closest: tuple[PublicKey, ...]  # the closest NICs that answered, nearest first
    reason: str = ""  # "" | "timeout" (lookup_timeout) | "busy" (max_lookups running)


@dataclass(frozen=True)
class Violation:
    """A NIC sent something invalid (the shell logs it); counted in `stats` too."""

    source: PublicKey
    reason: str


@dataclass(frozen=True)
class DhtStatistics:
    """What the DHT holds and does right now (`Dht.statistics()`); counters are in
    `Dht.stats`."""

    contacts: int  # NICs in our buckets
    lookups_running: int  # all kinds, store lookups included
    store_lookups_running: int
    store_lookups_waiting: int  # our twins whose store waits for a free slot
    records: int  # held as a replica
    own: int  # records of twins attached here


Output = SendDht | LookupDone | Violation


# ------------------------------------------------------------------------ config


@dataclass(frozen=True)
class DhtConfig:
    k: int = 12  # bucket size, replicas per record, contacts per answer
    alpha: int = 3  # queries in flight per lookup
    value_quorum: int = 2  # NICs returning a record before a find may stop
    query_timeout: float = 1.0  # one query's answer (a dead NIC costs this much)
    lookup_timeout: float = 8.0
    max_lookups: int = 256
    max_records: int = 100_000  # records held as a replica
    max_own: int = 100_000  # records of twins attached here
    max_cached: int = 4096  # lookup results kept for `cached`
    cache_ttl: float = 30.0
    max_ttl: float = 2 * 86_400.0  # refuse records that expire further out
    republish_interval: float = 600.0
    refresh_interval: float = 900.0
    restore_delay: float = 0.2  # new contacts settle this long before thin records move
    restore_interval: float = 2.0  # a thin record's restores are at least this far apart,
    restore_max_interval: float = 120.0  # doubling up to this
    max_store_lookups: int = 16  # store lookups at once, fewer than max_lookups
    max_failures: int = 2  # query timeouts in a row before a contact leaves its bucket
    rate_per_source: float = 200.0  # requests per second from one NIC, sustained
    burst_per_source: float = 400.0
    max_sources: int = 4096


# ------------------------------------------------------------------ internals

_NEW, _ASKED, _ANSWERED, _FAILED = range(4)
_FIND_VALUE, _FIND_NODE, _STORE = "value", "node", "store"


@dataclass
class _Contact:
    last_seen: float
    failures: int = 0


@dataclass
class _Candidate:
    key: PublicKey
    distance: int
    depth: int
    state: int = _NEW
    seqno: int = -1  # the record seqno it answered with (-1: none)


@dataclass
class _Lookup:
    id: int
    kind: str
    target: bytes
    target_int: int
    started: float
    deadline: float
    candidates: dict[PublicKey, _Candidate] = field(default_factory=dict)
    best: Location | None = None
    holders: int = 0  # NICs that returned a valid record (ourselves included)
    rounds: int = 0
    queried: int = 0
    in_flight: int = 0
    known: int = 0  # contacts in our buckets when it started
    done: bool = False


@dataclass
class _Placement:
    """Where a record of one of our twins went, and when it may be restored."""

    backoff: float  # the wait after its next restore
    replicas: int = 0  # at its last store, ourselves included
    contacts: int = 0  # the most contacts we knew when a store of it started
    retry_at: float = -math.inf  # no restore before this


@dataclass
class _Request:
    peer: PublicKey
    lookup: int  # 0: a store we sent
    deadline: float
    twin: PublicKey | None = None  # stores: the record's twin


@dataclass
class _Bucket:
    tokens: float
    at: float


def _int(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _newest(*records: Location | None) -> Location | None:
    best: Location | None = None
    for record in records:
        if record is not None and record.newer_than(best):
            best = record
    return best


class Dht:
    """The DHT state of one NIC: buckets, records, lookups in progress."""

    def __init__(
        self,
        key: PublicKey,
        *,
        now: float,
        config: DhtConfig | None = None,
        wall_offset: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        """`wall_offset`: unix time = `now` + `wall_offset` (records expire on unix
        time). `rng` picks request ids and refresh targets (seed it for replays)."""
        self.key = key
        self.config = config or DhtConfig()
        if self.config.k < 1 or self.config.alpha < 1:
            raise LocalProtocolError("k and alpha must be at least 1")
        if not 1 <= self.config.max_store_lookups < self.config.max_lookups:
            raise LocalProtocolError(
                "max_store_lookups must be at least 1 and below max_lookups (room for finds)")
        if not 0 < self.config.restore_interval <= self.config.restore_max_interval:
            raise LocalProtocolError(
                "restore_interval must be positive and at most restore_max_interval")
        self.wall_offset = wall_offset
        self._rng = rng or random.Random()
        self._self_int = _int(key.raw)
        self._buckets: dict[int, OrderedDict[PublicKey, _Contact]] = {}
        self._replacements: dict[int, OrderedDict[PublicKey, None]] = {}
        self._bucket_used: dict[int, float] = {}
        self.records: dict[PublicKey, Location] = {}  # held as a replica
        self.own: dict[PublicKey, Location] = {}  # of twins attached here
        self._placements: dict[PublicKey, _Placement] = {}  # own twin -> its placement
        self._cache: OrderedDict[PublicKey, tuple[Location, float]] = OrderedDict()
        self._lookups: dict[int, _Lookup] = {}
        self._requests: dict[int, _Request] = {}
        self._timers: list[tuple[float, int, int]] = []  # (when, kind, id), lazy deletion
        self._next_request = self._rng.getrandbits(62) + 1
        self._next_lookup = 1
        self._waiting: OrderedDict[PublicKey, None] = OrderedDict()  # own twins to store
        self._storing: set[PublicKey] = set()  # own twins with a store lookup running
        self._draining = False  # `_drain` is on the stack (stores may end as they start)
        self._sources: OrderedDict[PublicKey, _Bucket] = OrderedDict()
        self._republish_at = now + self.config.republish_interval
        self._refresh_at = now + self.config.refresh_interval
        self._restore_at: float | None = None
        # Fewest contacts a thin record was stored with, as of the last restore pass:
        # while we know no more than this, new contacts cannot make a restore due.
        self._restore_floor = math.inf
        self._bootstrapped = False
        self.stats: dict[str, int] = {
            "messages_in": 0, "messages_out": 0, "malformed": 0, "rate_limited": 0,
            "unexpected_answers": 0, "bad_records": 0, "stores_accepted": 0,
            "stores_refused": 0, "queries_timed_out": 0, "lookups": 0,
            "lookups_found": 0, "contacts_evicted": 0, "records_evicted": 0,
            "candidates_ignored": 0, "store_lookups": 0, "restores": 0,
        }

    # ------------------------------------------------------------- contacts

    def add_contact(self, nic: PublicKey, now: float) -> list[Output]:
        """The NIC can route to `nic` (a neighbour, a route appeared): a contact.
        The first contacts start the bootstrap lookup (for our own id)."""
        out: list[Output] = []
        if self._learn(nic, now) and not self._bootstrapped:
            self._bootstrapped = True
            self._start(_FIND_NODE, self.key.raw, now, out)
        return out

    def forget_contact(self, nic: PublicKey) -> None:
        """The NIC lost its route to `nic`: out of its bucket (a replacement moves in)."""
        self._evict(nic)

    def contacts(self) -> list[PublicKey]:
        return [key for bucket in self._buckets.values() for key in bucket]

    def _contact_count(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def closest(self, target: bytes, count: int,
                exclude: PublicKey | None = None) -> list[PublicKey]:
        """Up to `count` contacts nearest to the 32-byte id `target`."""
        t = _int(target)
        keys = [key for bucket in self._buckets.values() for key in bucket if key != exclude]
        return sorted(keys, key=lambda key: _int(key.raw) ^ t)[:count]

    def _bucket_index(self, raw: bytes) -> int:
        return (_int(raw) ^ self._self_int).bit_length() - 1

    def _learn(self, nic: PublicKey, now: float) -> bool:
        """Note that `nic` is alive; True when it is new to our buckets."""
        index = self._bucket_index(nic.raw)
        if index < 0:
            return False  # ourselves
        bucket = self._buckets.setdefault(index, OrderedDict())
        contact = bucket.get(nic)
        if contact is not None:
            contact.last_seen, contact.failures = now, 0
            bucket.move_to_end(nic)
            return False
        if len(bucket) < self.config.k:
            bucket[nic] = _Contact(now)
            spare = self._replacements.get(index)
            if spare is not None:
                spare.pop(nic, None)
            self._contacts_grew(now)
            return True
        spare = self._replacements.setdefault(index, OrderedDict())
        spare[nic] = None
        spare.move_to_end(nic)
        while len(spare) > self.config.k:
            spare.popitem(last=False)
        return False

    def _evict(self, nic: PublicKey) -> None:
        index = self._bucket_index(nic.raw)
        bucket = self._buckets.get(index)
        if bucket is None or bucket.pop(nic, None) is None:
            self._replacements.get(index, OrderedDict()).pop(nic, None)
            return
        self.stats["contacts_evicted"] += 1
        spare = self._replacements.get(index)
        if spare:
            newcomer, _ = spare.popitem()
            bucket[newcomer] = _Contact(0.0)
        if not bucket:
            del self._buckets[index]

    def _failed(self, nic: PublicKey) -> None:
        bucket = self._buckets.get(self._bucket_index(nic.raw))
        contact = bucket.get(nic) if bucket is not None else None
        if contact is not None:
            contact.failures += 1
            if contact.failures >= self.config.max_failures:
                self._evict(nic)

    def _contacts_grew(self, now: float) -> None:
        # Records of our twins stored while we knew fewer NICs move to the right
        # replicas once the new contacts have settled.
        if self._contact_count() > self._restore_floor:
            self._schedule_restore(now)

    def _schedule_restore(self, now: float) -> None:
        at = now + self.config.restore_delay
        if self._restore_at is None or at < self._restore_at:
            self._restore_at = at

    # -------------------------------------------------------------- records

    def publish(self, location: Location, now: float) -> tuple[str, list[Output]]:
        """A twin attached here published its record: keep it and store it on its
        replicas. Returns ("", outputs), or (reason, []) when refused."""
        current = self.own.get(location.twin)
        reason = self._check(location, now, current)
        if reason:
            return reason, []
        if current is None and len(self.own) >= self.config.max_own:
            self._purge(now)
            if len(self.own) >= self.config.max_own:
                return "full", []
        self.own[location.twin] = location
        self._placements[location.twin] = _Placement(self.config.restore_interval)
        out: list[Output] = []
        self._store_lookup(location.twin, now, out, first=True)
        return "", out

    def cached(self, twin: PublicKey, now: float) -> Location | None:
        """The newest unexpired record this NIC holds for `twin` (its own twins,
        replicas, lookup results younger than `cache_ttl`), without asking anyone."""
        wall = now + self.wall_offset
        entry = self._cache.get(twin)
        cached = entry[0] if entry is not None and now - entry[1] < self.config.cache_ttl \
            else None
        best = _newest(self.own.get(twin), self.records.get(twin), cached)
        return best if best is not None and best.expires > wall else None

    def _held(self, twin: PublicKey, now: float) -> Location | None:
        best = _newest(self.own.get(twin), self.records.get(twin))
        return best if best is not None and best.expires > now + self.wall_offset else None

    def _check(self, location: Location, now: float, current: Location | None) -> str:
        wall = now + self.wall_offset
        if location.expires <= wall:
            return "expired"
        if location.expires > wall + self.config.max_ttl:
            return "ttl"
        if current is not None and not location.newer_than(current):
            return "" if location == current else "older"
        if not location.verify():
            return "signature"
        return ""

    def _accept(self, location: Location, now: float) -> str:
        """Keep `location` as a replica; "" or the reason it was refused."""
        held = self._held(location.twin, now)
        reason = self._check(location, now, held)
        if reason or location == held:
            return reason
        if location.twin not in self.records and len(self.records) >= self.config.max_records:
            self._purge(now)
            if len(self.records) >= self.config.max_records:
                farthest = max(self.records, key=lambda t: _int(t.raw) ^ self._self_int)
                if _int(farthest.raw) ^ self._self_int <= \
                        _int(location.twin.raw) ^ self._self_int:
                    return "full"
                del self.records[farthest]
                self.stats["records_evicted"] += 1
        self.records[location.twin] = location
        mine = self.own.get(location.twin)
        if mine is not None and location.newer_than(mine):
            self._drop_own(location.twin)  # the twin moved to another NIC
        return ""

    def _drop_own(self, twin: PublicKey) -> None:
        self.own.pop(twin, None)
        self._placements.pop(twin, None)
        self._waiting.pop(twin, None)

    def _purge(self, now: float) -> None:
        wall = now + self.wall_offset
        for twin in [t for t, loc in self.records.items() if loc.expires <= wall]:
            del self.records[twin]
        for twin in [t for t, loc in self.own.items() if loc.expires <= wall]:
            self._drop_own(twin)

    # -------------------------------------------------------------- lookups

    def find(self, twin: PublicKey, now: float) -> tuple[int, list[Output]]:
        """Start looking up `twin`'s newest record. Returns the lookup id (its
        `LookupDone` may already be among the outputs) and the outputs."""
        out: list[Output] = []
        return self._start(_FIND_VALUE, twin.raw, now, out), out

    def find_node(self, target: bytes, now: float) -> tuple[int, list[Output]]:
        """Start looking up the NICs closest to the 32-byte id `target`."""
        if len(target) != KEY_SIZE:
            raise LocalProtocolError(f"a DHT id is {KEY_SIZE} bytes, got {len(target)}")
        out: list[Output] = []
        return self._start(_FIND_NODE, target, now, out), out

    def lookups_running(self) -> int:
        return len(self._lookups)

    def statistics(self) -> DhtStatistics:
        """The gauges: contacts, lookups running and waiting, records held."""
        return DhtStatistics(
            contacts=self._contact_count(), lookups_running=len(self._lookups),
            store_lookups_running=len(self._storing),
            store_lookups_waiting=len(self._waiting), records=len(self.records),
            own=len(self.own))

    def _store_lookup(self, twin: PublicKey, now: float, out: list[Output],
                      first: bool = False) -> None:
        """Store our twin's record on its replicas, now or when a store slot frees up
        (`first`: ahead of the twins already waiting)."""
        if twin in self._storing:
            return  # the running store sends the newest record when it ends
        if len(self._storing) < self.config.max_store_lookups and \
                len(self._lookups) < self.config.max_lookups:
            self._start_store(twin, now, out)
            return
        self._waiting[twin] = None
        self._waiting.move_to_end(twin, last=not first)

    def _start_store(self, twin: PublicKey, now: float, out: list[Output]) -> None:
        self._storing.add(twin)
        self.stats["store_lookups"] += 1
        self._start(_STORE, twin.raw, now, out)

    def _drain(self, now: float, out: list[Output]) -> None:
        """Start the waiting stores that now have a slot."""
        if self._draining:
            return  # a store that ended as it started: the loop below goes on
        self._draining = True
        try:
            while self._waiting and len(self._storing) < self.config.max_store_lookups \
                    and len(self._lookups) < self.config.max_lookups:
                twin, _ = self._waiting.popitem(last=False)
                if twin in self.own and twin not in self._storing:
                    self._start_store(twin, now, out)
        finally:
            self._draining = False

    def _start(self, kind: str, target: bytes, now: float, out: list[Output]) -> int:
        lookup_id = self._next_lookup
        self._next_lookup += 1
        self.stats["lookups"] += 1
        lookup = _Lookup(lookup_id, kind, target, _int(target), now,
                         now + self.config.lookup_timeout, known=self._contact_count())
        if kind == _FIND_VALUE:
            lookup.best = self._held(PublicKey(target), now)
            lookup.holders = int(lookup.best is not None)
        if len(self._lookups) >= self.config.max_lookups:
            self._finish(lookup, now, out, reason="busy")
            return lookup_id
        self._bucket_used[self._bucket_index(target)] = now
        for key in self.closest(target, self.config.k):
            lookup.candidates[key] = _Candidate(key, _int(key.raw) ^ lookup.target_int, 1)
        self._lookups[lookup_id] = lookup
        heapq.heappush(self._timers, (lookup.deadline, 1, lookup_id))
        self._advance(lookup, now, out)
        return lookup_id

    def _advance(self, lookup: _Lookup, now: float, out: list[Output]) -> None:
        if lookup.kind == _FIND_VALUE and lookup.best is not None and \
                lookup.holders >= self.config.value_quorum:
            self._finish(lookup, now, out)
            return
        live = sorted((c for c in lookup.candidates.values() if c.state != _FAILED),
                      key=lambda c: c.distance)[: self.config.k]
        for candidate in live:
            if lookup.in_flight >= self.config.alpha:
                break
            if candidate.state == _NEW:
                self._ask(lookup, candidate, now, out)
        if lookup.in_flight == 0:
            self._finish(lookup, now, out)

    def _ask(self, lookup: _Lookup, candidate: _Candidate, now: float,
             out: list[Output]) -> None:
        candidate.state = _ASKED
        lookup.in_flight += 1
        lookup.queried += 1
        request_id = self._request(candidate.key, lookup.id, now)
        which = "findValue" if lookup.kind == _FIND_VALUE else "findNode"
        self._send(out, candidate.key, _encode(request_id, which, lookup.target))

    def _request(self, peer: PublicKey, lookup_id: int, now: float,
                 twin: PublicKey | None = None) -> int:
        request_id = self._next_request
        self._next_request = (self._next_request + 1) % (1 << 64) or 1
        deadline = now + self.config.query_timeout
        self._requests[request_id] = _Request(peer, lookup_id, deadline, twin)
        heapq.heappush(self._timers, (deadline, 0, request_id))
        return request_id

    def _send(self, out: list[Output], nic: PublicKey, data: bytes) -> None:
        self.stats["messages_out"] += 1
        out.append(SendDht(nic, data))

    def _answered(self, lookup: _Lookup, request: _Request, contacts: list[PublicKey],
                  record: Location | None, now: float, out: list[Output]) -> None:
        candidate = lookup.candidates.get(request.peer)
        if candidate is None or candidate.state != _ASKED:
            return
        candidate.state = _ANSWERED
        lookup.in_flight -= 1
        lookup.rounds = max(lookup.rounds, candidate.depth)
        if record is not None:
            candidate.seqno = record.seqno
            lookup.holders += 1
            if record.newer_than(lookup.best):
                lookup.best = record
        for key in contacts:
            if key == self.key:
                continue
            known = lookup.candidates.get(key)
            if known is None and len(lookup.candidates) >= CANDIDATES_PER_K * self.config.k:
                # NICs answering with ever new (perhaps invented) keys cannot make a
                # lookup grow: it goes on with the candidates it has.
                self.stats["candidates_ignored"] += 1
            elif known is None:
                lookup.candidates[key] = _Candidate(key, _int(key.raw) ^ lookup.target_int,
                                                    candidate.depth + 1)
            elif known.state == _NEW:
                known.depth = min(known.depth, candidate.depth + 1)
        self._advance(lookup, now, out)

    def _timed_out(self, lookup: _Lookup, request: _Request, now: float,
                   out: list[Output]) -> None:
        candidate = lookup.candidates.get(request.peer)
        if candidate is None or candidate.state != _ASKED:
            return
        candidate.state = _FAILED
        lookup.in_flight -= 1
        self._advance(lookup, now, out)

    def _finish(self, lookup: _Lookup, now: float, out: list[Output], reason: str = "") -> None:
        if lookup.done:
            return
        lookup.done = True
        self._lookups.pop(lookup.id, None)
        answered = sorted((c for c in lookup.candidates.values() if c.state == _ANSWERED),
                          key=lambda c: c.distance)
        closest = tuple(c.key for c in answered[: self.config.k])
        if lookup.kind == _STORE:
            self._storing.discard(PublicKey(lookup.target))
            self._store_at(lookup, answered, now, out)
        elif lookup.kind == _FIND_VALUE and lookup.best is not None:
            self.stats["lookups_found"] += 1
            self._remember(lookup.best, now)
            # Close NICs that lacked the newest record get it (replicas heal).
            for c in answered[: self.config.k]:
                if c.seqno < lookup.best.seqno:
                    self._send_store(c.key, lookup.best, now, out)
        out.append(LookupDone(lookup.id, lookup.target, lookup.best, lookup.rounds,
                              lookup.queried, now - lookup.started, closest, reason))
        self._drain(now, out)

    def _store_at(self, lookup: _Lookup, answered: list[_Candidate], now: float,
                  out: list[Output]) -> None:
        record = self.own.get(PublicKey(lookup.target))
        if record is None or record.expires <= now + self.wall_offset:
            return
        self_distance = self._self_int ^ lookup.target_int
        targets = [c.key for c in answered[: self.config.k]]
        replicas = len(targets)
        if len(targets) < self.config.k or \
                self_distance < answered[self.config.k - 1].distance:
            # We are among the k closest: keep a replica ourselves.
            replicas += 1
            self._accept(record, now)
        for key in targets[: self.config.k]:
            self._send_store(key, record, now, out)
        self._placed(record.twin, min(replicas, self.config.k), lookup.known, now)

    def _placed(self, twin: PublicKey, replicas: int, known: int, now: float) -> None:
        placement = self._placements.setdefault(
            twin, _Placement(self.config.restore_interval))
        placement.replicas = replicas
        placement.contacts = max(placement.contacts, known)
        if replicas >= self.config.k:
            placement.backoff = self.config.restore_interval
            placement.retry_at = -math.inf
        elif self._contact_count() > placement.contacts:
            self._schedule_restore(now)  # contacts came while it was being stored
        else:
            self._restore_floor = min(self._restore_floor, placement.contacts)

    def _send_store(self, nic: PublicKey, record: Location, now: float,
                    out: list[Output]) -> None:
        request_id = self._request(nic, 0, now, twin=record.twin)
        self._send(out, nic, _encode(request_id, "store", record))

    def _remember(self, location: Location, now: float) -> None:
        self._cache[location.twin] = (location, now)
        self._cache.move_to_end(location.twin)
        while len(self._cache) > self.config.max_cached:
            self._cache.popitem(last=False)

    # ------------------------------------------------------------- messages

    def receive(self, source: PublicKey, data: bytes, now: float) -> list[Output]:
        """A DHT message from NIC `source` (the overlay packet's source)."""
        out: list[Output] = []
        self.stats["messages_in"] += 1
        if len(data) > MAX_MESSAGE:
            return self._violation(source, f"DHT message of {len(data)} bytes", out)
        try:
            request_id, which, value = schemas.decode(
                _dht.DhtMessage, data, lambda r: _read(r, self.config.k))
        except DecodeError as exc:
            return self._violation(source, str(exc), out)
        if which in ("findNode", "findValue", "store"):
            if not self._admit(source, now):
                self.stats["rate_limited"] += 1
                return out
            self._learn(source, now)
            self._answer(source, request_id, which, value, now, out)
        elif which in ("nodes", "value", "stored"):
            self._answer_arrived(source, request_id, which, value, now, out)
        else:
            self._violation(source, f"DHT message {which!r} unknown to this version", out)
        return out

    def _violation(self, source: PublicKey, reason: str, out: list[Output]) -> list[Output]:
        self.stats["malformed"] += 1
        out.append(Violation(source, reason))
        return out

    def _admit(self, source: PublicKey, now: float) -> bool:
        bucket = self._sources.get(source)
        if bucket is None:
            bucket = _Bucket(self.config.burst_per_source, now)
            self._sources[source] = bucket
            if len(self._sources) > self.config.max_sources:
                self._sources.popitem(last=False)
        self._sources.move_to_end(source)
        bucket.tokens = min(self.config.burst_per_source,
                            bucket.tokens + (now - bucket.at) * self.config.rate_per_source)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _answer(self, source: PublicKey, request_id: int, which: str, value: Any,
                now: float, out: list[Output]) -> None:
        if which == "store":
            location = value
            reason = self._accept(location, now)
            self.stats["stores_refused" if reason else "stores_accepted"] += 1
            self._send(out, source, _encode(request_id, "stored", reason))
            return
        target: bytes = value
        contacts = self.closest(target, self.config.k, exclude=source)
        record = self._held(PublicKey(target), now) if which == "findValue" else None
        if record is not None:
            self._send(out, source, _encode(request_id, "value", (record, contacts)))
        else:
            self._send(out, source, _encode(request_id, "nodes", contacts))

    def _answer_arrived(self, source: PublicKey, request_id: int, which: str, value: Any,
                        now: float, out: list[Output]) -> None:
        request = self._requests.get(request_id)
        if request is None or request.peer != source:
            self.stats["unexpected_answers"] += 1  # late (timed out) or not ours
            return
        del self._requests[request_id]
        self._learn(source, now)
        if which == "stored":
            self._store_answered(request, value)
            return
        lookup = self._lookups.get(request.lookup)
        if lookup is None:
            return
        record: Location | None = None
        contacts: list[PublicKey] = value
        if which == "value":
            record, contacts = value
            reason = "not asked for" if lookup.kind != _FIND_VALUE else \
                "another twin's" if record.twin.raw != lookup.target else \
                self._check(record, now, None)
            if reason:
                # The contacts still count: only the record is refused.
                self.stats["bad_records"] += 1
                self._violation(source, f"answered with a record refused ({reason})", out)
                record = None
        self._answered(lookup, request, contacts, record, now, out)

    def _store_answered(self, request: _Request, reason: str) -> None:
        twin = request.twin
        if reason == "older" and twin is not None:
            self._drop_own(twin)  # a replica holds a newer record: the twin moved

    # ---------------------------------------------------------------- timers

    def get_timer(self) -> float:
        """When `handle_timer` must next be called."""
        due = min(self._republish_at, self._refresh_at)
        if self._restore_at is not None:
            due = min(due, self._restore_at)
        while self._timers and not self._live_timer(self._timers[0]):
            heapq.heappop(self._timers)
        if self._timers:
            due = min(due, self._timers[0][0])
        return due

    def _live_timer(self, entry: tuple[float, int, int]) -> bool:
        _, kind, ident = entry
        return ident in (self._requests if kind == 0 else self._lookups)

    def handle_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        while self._timers and self._timers[0][0] <= now:
            _, kind, ident = heapq.heappop(self._timers)
            if kind == 0:
                request = self._requests.pop(ident, None)
                if request is None:
                    continue
                self.stats["queries_timed_out"] += 1
                self._failed(request.peer)
                lookup = self._lookups.get(request.lookup)
                if lookup is not None:
                    self._timed_out(lookup, request, now, out)
            else:
                lookup = self._lookups.get(ident)
                if lookup is not None:
                    self._finish(lookup, now, out, reason="timeout")
        if self._restore_at is not None and now >= self._restore_at:
            self._restore_at = None
            self._restore(now, out)
        if now >= self._republish_at:
            self._republish_at = now + self.config.republish_interval
            self._purge(now)
            for twin in list(self.own):
                self._store_lookup(twin, now, out)
        if now >= self._refresh_at:
            self._refresh_at = now + self.config.refresh_interval
            self._refresh(now, out)
        return out

    def _restore(self, now: float, out: list[Output]) -> None:
        """Store again the thin records stored while we knew fewer contacts than now,
        each no sooner than its backoff allows; wake up again for those held back."""
        known = self._contact_count()
        due = math.inf
        self._restore_floor = math.inf  # stores ending during the pass lower it too
        for twin, placement in list(self._placements.items()):
            if placement.replicas >= self.config.k or twin not in self.own or \
                    twin in self._storing or twin in self._waiting:
                continue  # full, gone, or placed again when its store ends
            if known <= placement.contacts:
                self._restore_floor = min(self._restore_floor, placement.contacts)
            elif now < placement.retry_at:
                due = min(due, placement.retry_at)
            else:
                placement.retry_at = now + placement.backoff
                placement.backoff = min(2 * placement.backoff,
                                        self.config.restore_max_interval)
                self.stats["restores"] += 1
                self._store_lookup(twin, now, out)
        if due < math.inf:
            self._restore_at = due if self._restore_at is None else \
                min(self._restore_at, due)

    def _refresh(self, now: float, out: list[Output]) -> None:
        stale = now - self.config.refresh_interval
        for index in sorted(self._buckets):
            if self._bucket_used.get(index, -1e300) < stale and \
                    len(self._lookups) < self.config.max_lookups // 2:
                offset = (1 << index) | self._rng.getrandbits(index) if index else 1
                target = (self._self_int ^ offset).to_bytes(KEY_SIZE, "big")
                self._start(_FIND_NODE, target, now, out)


# ------------------------------------------------------------------ encoding


def _encode(request_id: int, which: str, value: Any) -> bytes:
    message = _dht.DhtMessage.new_message()
    message.requestId = request_id
    if which in ("findNode", "findValue"):
        setattr(message, which, value)
    elif which == "store":
        value.fill(message.init("store"))
    elif which == "nodes":
        _fill_keys(message.init("nodes", len(value)), value)
    elif which == "value":
        record, contacts = value
        answer = message.init("value")
        record.fill(answer.init("location"))
        _fill_keys(answer.init("contacts", len(contacts)), contacts)
    else:
        stored = message.init("stored")
        stored.accepted = not value
        stored.reason = value
    return bytes(message.to_bytes())


def _fill_keys(builder: Any, keys: list[PublicKey]) -> None:
    for i, key in enumerate(keys):
        builder[i] = key.raw


def _read_keys(reader: Any, limit: int) -> list[PublicKey]:
    # Only the first `limit` (k) are read: a longer list costs nothing more to ignore.
    keys = []
    for i in range(min(len(reader), limit)):
        raw = bytes(reader[i])
        if len(raw) != KEY_SIZE:
            raise DecodeError("DHT contact with a malformed key")
        keys.append(PublicKey(raw))
    return keys


def _read(reader: Any, limit: int) -> tuple[int, str, Any]:
    request_id = int(reader.requestId)
    which = str(reader.which())
    if which in ("findNode", "findValue"):
        target = bytes(getattr(reader, which))
        if len(target) != KEY_SIZE:
            raise DecodeError(f"{which} with a malformed id")
        return request_id, which, target
    if which == "store":
        return request_id, which, Location.read(reader.store)
    if which == "nodes":
        return request_id, which, _read_keys(reader.nodes, limit)
    if which == "value":
        return request_id, which, (Location.read(reader.value.location),
                                   _read_keys(reader.value.contacts, limit))
    if which == "stored":
        return request_id, which, "" if reader.stored.accepted else \
            str(reader.stored.reason)[:40] or "refused"
    return request_id, which, None
