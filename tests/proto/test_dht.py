"""The DHT core on a fake clock: records kept and refused, lookups, dead NICs, bounds.

`Mesh` joins cores directly (every message arrives `LATENCY` later unless its
destination is dead or it is lost, a `loss` fraction of them) and steps a virtual
clock through messages and `get_timer()`.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

import pytest

from twinmesh.errors import LocalProtocolError
from twinmesh.identity.keys import KEY_SIZE, Identity, PublicKey
from twinmesh.proto.attach import Location
from twinmesh.proto.dht import Dht, DhtConfig, LookupDone, Output, SendDht, Violation
from twinmesh.wire import schemas

WALL = 1_800_000_000.0
LATENCY = 0.01
CONFIG = DhtConfig(k=4, alpha=2, value_quorum=2, query_timeout=0.5, lookup_timeout=5.0)


class Mesh:
    def __init__(self, size: int, *, seed: int = 1, config: DhtConfig = CONFIG,
                 loss: float = 0.0) -> None:
        rng = random.Random(seed)
        self.loss = loss
        self._loss_rng = random.Random(seed)
        self.keys = [Identity(rng.randbytes(KEY_SIZE)).public for _ in range(size)]
        self.cores = [Dht(key, now=0.0, config=config, wall_offset=WALL,
                          rng=random.Random(i)) for i, key in enumerate(self.keys)]
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.now = 0.0
        self.dead: set[int] = set()
        self.done: dict[tuple[int, int], LookupDone] = {}
        self.violations: list[tuple[int, Violation]] = []
        self.sent = 0
        self._queue: list[tuple[float, int, int, int, bytes]] = []
        self._seq = 0

    def handle(self, node: int, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, SendDht):
                self.sent += 1
                if self.loss and self._loss_rng.random() < self.loss:
                    continue
                self._seq += 1
                heapq.heappush(self._queue, (self.now + LATENCY, self._seq, node,
                                             self.index[output.nic], output.data))
            elif isinstance(output, LookupDone):
                self.done[(node, output.lookup_id)] = output
            else:
                self.violations.append((node, output))

    def link(self, a: int, b: int) -> None:
        self.handle(a, self.cores[a].add_contact(self.keys[b], self.now))
        self.handle(b, self.cores[b].add_contact(self.keys[a], self.now))

    def run(self, seconds: float, budget: float = float("inf")) -> None:
        """Run `seconds` of virtual time, or until `budget` messages were sent."""
        until = self.now + seconds
        while self.sent <= budget:
            live = [i for i in range(len(self.cores)) if i not in self.dead]
            timer = min(self.cores[i].get_timer() for i in live)
            message = self._queue[0][0] if self._queue else float("inf")
            when = min(timer, message)
            if when > until:
                break
            self.now = max(self.now, when)
            if message <= timer:
                _, _, source, target, data = heapq.heappop(self._queue)
                if target not in self.dead:
                    self.handle(target, self.cores[target].receive(
                        self.keys[source], data, self.now))
            else:
                for i in live:
                    if self.cores[i].get_timer() <= self.now:
                        self.handle(i, self.cores[i].handle_timer(self.now))
        self.now = until

    def publish(self, node: int, record: Location) -> str:
        reason, outputs = self.cores[node].publish(record, self.now)
        self.handle(node, outputs)
        return reason

    def find(self, node: int, twin: PublicKey) -> LookupDone:
        lookup_id, outputs = self.cores[node].find(twin, self.now)
        self.handle(node, outputs)
        self.run(CONFIG.lookup_timeout + 1)
        return self.done[(node, lookup_id)]

    def holders(self, twin: PublicKey) -> list[int]:
        return [i for i, core in enumerate(self.cores)
                if i not in self.dead and core.cached(twin, self.now) is not None]


def connected_mesh(size: int, seed: int = 1) -> Mesh:
    """Each NIC starts knowing the next one (a ring) and two random others."""
    mesh = Mesh(size, seed=seed)
    rng = random.Random(seed)
    for i in range(size):
        mesh.link(i, (i + 1) % size)
        for j in rng.sample(range(size), 2):
            if j != i:
                mesh.link(i, j)
    mesh.run(10.0)
    return mesh


def record(twin: Identity, nic: PublicKey, seqno: int, expires: float = WALL + 3600,
           ) -> Location:
    return Location.sign(twin, nic, seqno, expires)


def store_message(location: Location, request_id: int = 9) -> bytes:
    message = schemas.dht.DhtMessage.new_message()
    message.requestId = request_id
    location.fill(message.init("store"))
    return bytes(message.to_bytes())


def stored_reason(outputs: list[Output]) -> str:
    (answer,) = [o for o in outputs if isinstance(o, SendDht)]
    with schemas.dht.DhtMessage.from_bytes(answer.data) as reader:
        assert reader.which() == "stored"
        return "" if reader.stored.accepted else str(reader.stored.reason)


# ------------------------------------------------------------------- records


@pytest.fixture
def replica() -> Dht:
    return Dht(Identity.generate().public, now=0.0, config=CONFIG, wall_offset=WALL)


NIC = Identity.generate().public
OTHER_NIC = Identity.generate().public


def test_a_valid_record_is_kept_and_a_newer_one_replaces_it(replica: Dht) -> None:
    twin = Identity.generate()
    assert stored_reason(replica.receive(NIC, store_message(record(twin, NIC, 5)), 1.0)) == ""
    newer = record(twin, OTHER_NIC, 6)
    assert stored_reason(replica.receive(NIC, store_message(newer), 2.0)) == ""
    assert replica.cached(twin.public, 2.0) == newer


@pytest.mark.parametrize(("make", "reason"), [
    (lambda twin, mallory: Location(twin.public, NIC, 9, WALL + 3600,
                                    record(mallory, NIC, 9).signature), "signature"),
    (lambda twin, mallory: record(twin, NIC, 4), "older"),
    (lambda twin, mallory: record(twin, NIC, 9, expires=WALL + 0.5), "expired"),
    (lambda twin, mallory: record(twin, NIC, 9, expires=WALL + 10 * 86_400), "ttl"),
])
def test_forged_older_and_expired_records_are_refused(
    replica: Dht, make: Callable[[Identity, Identity], Location], reason: str,
) -> None:
    twin, mallory = Identity.generate(), Identity.generate()
    held = record(twin, NIC, 5)
    replica.receive(NIC, store_message(held), 1.0)
    assert stored_reason(replica.receive(NIC, store_message(make(twin, mallory)), 1.0)) == reason
    assert replica.cached(twin.public, 1.0) == held
    assert replica.stats["stores_refused"] == 1


def test_a_record_is_dropped_when_it_expires(replica: Dht) -> None:
    twin = Identity.generate()
    replica.receive(NIC, store_message(record(twin, NIC, 1, expires=WALL + 60)), 1.0)
    assert replica.cached(twin.public, 59.0) is not None
    assert replica.cached(twin.public, 61.0) is None


def test_a_twin_may_publish_only_what_verifies(replica: Dht) -> None:
    twin, mallory = Identity.generate(), Identity.generate()
    forged = Location(twin.public, NIC, 3, WALL + 3600, record(mallory, NIC, 3).signature)
    assert replica.publish(forged, 1.0) == ("signature", [])
    assert replica.own == {}


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, b"garbage" * 40, b"\xff" * 9000])
def test_malformed_messages_are_violations_not_crashes(replica: Dht, data: bytes) -> None:
    outputs = replica.receive(NIC, data, 1.0)
    assert [type(o) for o in outputs] == [Violation]
    assert replica.stats["malformed"] == 1


# ------------------------------------------------------------------- lookups


def test_a_lookup_finds_the_record_from_anywhere_in_the_mesh() -> None:
    mesh = connected_mesh(40)
    twin = Identity.generate()
    location = record(twin, mesh.keys[0], 1)
    assert mesh.publish(0, location) == ""
    mesh.run(5.0)
    assert len(mesh.holders(twin.public)) >= CONFIG.k
    for source in (7, 19, 33):
        done = mesh.find(source, twin.public)
        assert done.location == location
        assert done.rounds >= 1 and done.queried >= 1
        assert done.reason == ""
    assert mesh.violations == []


def test_a_lookup_for_a_twin_nobody_published_ends_empty() -> None:
    mesh = connected_mesh(20)
    done = mesh.find(3, Identity.generate().public)
    assert done.location is None
    assert done.reason == ""
    # It asked until the k closest NICs had all answered.
    assert len(done.closest) == CONFIG.k


def test_the_newest_record_wins_after_a_twin_moves() -> None:
    mesh = connected_mesh(30)
    twin = Identity.generate()
    mesh.publish(2, record(twin, mesh.keys[2], 1))
    mesh.run(5.0)
    moved = record(twin, mesh.keys[20], 2)
    mesh.publish(20, moved)
    mesh.run(5.0)
    assert mesh.find(11, twin.public).location == moved
    # The old NIC learns from the replicas that the twin moved, and stops republishing.
    mesh.run(CONFIG.republish_interval + 5)
    assert twin.public not in mesh.cores[2].own


def test_dead_nics_time_out_without_stalling_the_lookup() -> None:
    mesh = connected_mesh(40)
    twin = Identity.generate()
    location = record(twin, mesh.keys[5], 1)
    mesh.publish(5, location)
    mesh.run(5.0)
    # Kill half of the replicas (and so some of the NICs every lookup asks first).
    holders = [h for h in mesh.holders(twin.public) if h != 5]
    mesh.dead.update(holders[: len(holders) // 2])
    source = next(i for i in range(40) if i not in mesh.dead and i != 5)
    done = mesh.find(source, twin.public)
    assert done.location == location
    assert done.reason == ""  # ended by answers, not by lookup_timeout
    assert done.elapsed < CONFIG.lookup_timeout
    assert sum(core.stats["queries_timed_out"] for core in mesh.cores) > 0


def test_a_lookup_with_every_contact_dead_ends_by_its_timeouts() -> None:
    mesh = Mesh(4)
    for other in (1, 2, 3):
        mesh.link(0, other)
    mesh.run(2.0)
    mesh.dead.update({1, 2, 3})
    done = mesh.find(0, Identity.generate().public)
    assert done.location is None
    assert done.closest == ()
    assert len(mesh.cores[0].contacts()) == 3  # one timeout may be bad luck
    # Contacts that time out `max_failures` times in a row leave their buckets.
    mesh.find(0, Identity.generate().public)
    assert mesh.cores[0].contacts() == []


def test_a_record_stored_before_the_mesh_formed_moves_to_its_replicas() -> None:
    mesh = Mesh(12)
    twin = Identity.generate()
    location = record(twin, mesh.keys[0], 1)
    mesh.publish(0, location)  # NIC 0 knows nobody yet: only it holds the record
    assert mesh.holders(twin.public) == [0]
    for i in range(12):
        mesh.link(i, (i + 1) % 12)
    mesh.run(5.0)
    assert len(mesh.holders(twin.public)) >= CONFIG.k


def test_republish_restores_replicas_that_lost_the_record() -> None:
    mesh = connected_mesh(20)
    twin = Identity.generate()
    mesh.publish(4, record(twin, mesh.keys[4], 1))
    mesh.run(5.0)
    for i, core in enumerate(mesh.cores):
        if i != 4:
            core.records.clear()
    assert mesh.holders(twin.public) == [4]
    mesh.run(CONFIG.republish_interval + 5)
    assert len(mesh.holders(twin.public)) >= CONFIG.k


def test_bootstrap_from_one_contact_learns_the_neighbourhood() -> None:
    mesh = connected_mesh(30)
    newcomer = Mesh(1, seed=99)
    # Join a fresh NIC to the mesh through NIC 0 only.
    mesh.keys.append(newcomer.keys[0])
    mesh.cores.append(newcomer.cores[0])
    mesh.index[newcomer.keys[0]] = 30
    mesh.link(30, 0)
    mesh.run(5.0)
    assert len(mesh.cores[30].contacts()) > 3


# -------------------------------------------------------------------- bounds


def test_the_record_store_is_bounded_and_keeps_the_closest() -> None:
    me = Identity.generate().public
    core = Dht(me, now=0.0, config=DhtConfig(max_records=3), wall_offset=WALL)
    twins = [Identity.generate() for _ in range(8)]
    for i, twin in enumerate(twins):
        core.receive(NIC, store_message(record(twin, NIC, 1), i + 1), 1.0 + i / 100)
    assert len(core.records) == 3
    me_int = int.from_bytes(me.raw, "big")
    closest = sorted(twins, key=lambda t: int.from_bytes(t.public.raw, "big") ^ me_int)[:3]
    assert set(core.records) == {t.public for t in closest}


def test_requests_from_one_nic_are_rate_limited() -> None:
    config = DhtConfig(rate_per_source=10.0, burst_per_source=20.0)
    core = Dht(Identity.generate().public, now=0.0, config=config, wall_offset=WALL)
    message = schemas.dht.DhtMessage.new_message()
    message.findNode = Identity.generate().public.raw
    data = message.to_bytes()
    answered = sum(len(core.receive(NIC, data, 1.0)) for _ in range(100))
    assert answered == 20
    assert core.stats["rate_limited"] == 80
    # Another NIC is not held back by the first one's flood.
    assert len(core.receive(OTHER_NIC, data, 1.0)) == 1


def test_buckets_hold_at_most_k_contacts() -> None:
    core = Dht(Identity.generate().public, now=0.0, config=CONFIG, wall_offset=WALL)
    for _ in range(300):
        core.add_contact(Identity.generate().public, 0.0)
    contacts = core.contacts()
    # Half of all ids fall in the farthest bucket, a quarter in the next...: each of
    # those buckets is full at k, and the total is far below 300.
    assert len(contacts) < 300
    by_bucket: dict[int, int] = {}
    mine = int.from_bytes(core.key.raw, "big")
    for key in contacts:
        index = (int.from_bytes(key.raw, "big") ^ mine).bit_length()
        by_bucket[index] = by_bucket.get(index, 0) + 1
    assert max(by_bucket.values()) == CONFIG.k


def test_answers_from_a_nic_that_was_not_asked_are_ignored() -> None:
    mesh = connected_mesh(10)
    twin = Identity.generate()
    _, outputs = mesh.cores[0].find(twin.public, mesh.now)
    query = next(o for o in outputs if isinstance(o, SendDht))
    with schemas.dht.DhtMessage.from_bytes(query.data) as reader:
        request_id = reader.requestId
    fake = schemas.dht.DhtMessage.new_message()
    fake.requestId = request_id
    record(twin, NIC, 50).fill(fake.init("value").init("location"))
    stranger = next(k for k in mesh.keys if k != query.nic and k != mesh.keys[0])
    assert mesh.cores[0].receive(stranger, fake.to_bytes(), mesh.now) == []
    assert mesh.cores[0].stats["unexpected_answers"] == 1


def test_find_node_wants_a_full_size_id(replica: Dht) -> None:
    with pytest.raises(LocalProtocolError):
        replica.find_node(b"short", 0.0)


def test_nics_answering_with_endless_new_keys_cannot_grow_a_lookup() -> None:
    """Every NIC asked answers with k keys nobody has seen, each closer than the last
    (what a set of colluding NICs could do): the lookup still ends, having asked a
    bounded number of NICs."""
    core = Dht(Identity.generate().public, now=0.0, config=CONFIG, wall_offset=WALL)
    twin = Identity.generate()
    core.add_contact(NIC, 0.0)
    core.handle_timer(CONFIG.lookup_timeout + 1)  # the bootstrap lookup ends unanswered
    core.add_contact(NIC, 10.0)
    _, outputs = core.find(twin.public, 10.0)
    now, done = 10.0, None
    target = int.from_bytes(twin.public.raw, "big")
    distance = 1 << 200
    while done is None:
        now += 0.001
        assert now < 10.0 + CONFIG.lookup_timeout + 1
        replies: list[Output] = []
        for output in outputs:
            if isinstance(output, LookupDone):
                done = output
            elif isinstance(output, SendDht):
                with schemas.dht.DhtMessage.from_bytes(output.data) as reader:
                    request_id = reader.requestId
                answer = schemas.dht.DhtMessage.new_message()
                answer.requestId = request_id
                keys = answer.init("nodes", CONFIG.k)
                for i in range(CONFIG.k):
                    distance -= 1
                    keys[i] = (target ^ distance).to_bytes(KEY_SIZE, "big")
                replies += core.receive(output.nic, answer.to_bytes(), now)
        outputs = replies + core.handle_timer(now)
    assert done.location is None
    assert done.queried <= 16 * CONFIG.k
    assert core.stats["candidates_ignored"] > 0


# ------------------------------------------------------------------ overload


def restores_allowed(config: DhtConfig, seconds: float) -> int:
    """How many restores of one record the backoff lets start within `seconds`."""
    attempts, at, wait = 0, config.restore_delay, config.restore_interval
    while at <= seconds:
        attempts += 1
        at += wait
        wait = min(2 * wait, config.restore_max_interval)
    return attempts


def test_lost_messages_and_flapping_routes_do_not_multiply_stores() -> None:
    """An overloaded mesh: 30% of the DHT messages are lost (queries time out, stores
    end on fewer than k replicas, contacts are evicted and learned again), routes
    flap, and contacts are still arriving while 100 twins publish. Store lookups are
    publishes plus restores spaced by the backoff, so the DHT's traffic stays within
    what they cost; it used to grow without end (every contact learned again
    re-stored every thin record)."""
    config = DhtConfig()  # k = 12: in 20 NICs, stores that lose messages end thin
    size, seconds = 20, 180.0
    mesh = Mesh(size, seed=5, config=config, loss=0.3)
    rng = random.Random(5)
    pairs = [(i, j) for i in range(size) for j in range(i + 1, size)]
    rng.shuffle(pairs)
    later = pairs[: len(pairs) // 2]  # the other half comes up during the first
    for pair in pairs[len(pairs) // 2:]:  # minute, one link per step
        mesh.link(*pair)
    twins = [Identity(rng.randbytes(KEY_SIZE)) for _ in range(5 * size)]
    for n, twin in enumerate(twins):
        assert mesh.publish(n % size, record(twin, mesh.keys[n % size], 1)) == ""
    lookups = size + len(twins) * (1 + restores_allowed(config, seconds))  # bootstraps too
    # A store lookup asks at most the other NICs and stores on k; each message answered.
    budget = lookups * 2 * (size - 1 + config.k)
    flapped: tuple[int, int] | None = None
    while mesh.now < seconds and mesh.sent <= budget:
        if later:
            mesh.link(*later.pop())
        if flapped is not None:
            mesh.handle(flapped[0], mesh.cores[flapped[0]].add_contact(
                mesh.keys[flapped[1]], mesh.now))
        a, b = rng.sample(range(size), 2)
        mesh.cores[a].forget_contact(mesh.keys[b])  # the route went away ...
        flapped = (a, b)  # ... and comes back at the next step
        mesh.run(0.5, budget)
    assert sum(core.stats["lookups"] for core in mesh.cores) <= lookups
    assert mesh.sent <= budget
    assert sum(core.stats["queries_timed_out"] for core in mesh.cores) > 0
    assert sum(core.stats["contacts_evicted"] for core in mesh.cores) > 0


def test_a_record_stored_while_few_nics_were_known_reaches_k_replicas_as_nics_join() -> None:
    mesh = Mesh(16)
    twin = Identity.generate()
    mesh.link(0, 1)
    mesh.run(1.0)
    mesh.publish(0, record(twin, mesh.keys[0], 1))
    mesh.run(1.0)
    assert len(mesh.holders(twin.public)) < CONFIG.k  # NICs 0 and 1 only
    for i in range(2, 16):  # one NIC joins every few seconds, next to the last one
        mesh.link(i - 1, i)
        mesh.run(4.0)
    mesh.run(CONFIG.restore_max_interval + 5)
    # Long before a republish (`republish_interval`): the restores moved it.
    assert len(mesh.holders(twin.public)) >= CONFIG.k


def test_lookups_run_while_many_stores_wait_their_turn() -> None:
    config = DhtConfig(k=4, alpha=2, max_lookups=8, max_store_lookups=2)
    mesh = Mesh(10, config=config)
    for i in range(10):
        mesh.link(i, (i + 1) % 10)
    mesh.run(10.0)
    known = Identity.generate()
    mesh.publish(3, record(known, mesh.keys[3], 1))
    mesh.run(5.0)
    core = mesh.cores[0]
    twins = [Identity.generate() for _ in range(40)]
    for twin in twins:
        mesh.publish(0, record(twin, mesh.keys[0], 1))
    state = core.statistics()
    assert state.store_lookups_running == 2
    assert state.store_lookups_waiting == 38
    # A find started now is not refused as busy: it asks NICs at once.
    lookup_id, outputs = core.find(known.public, mesh.now)
    assert any(isinstance(o, SendDht) for o in outputs)
    mesh.handle(0, outputs)
    mesh.run(10.0)
    assert mesh.done[(0, lookup_id)].location is not None
    assert mesh.done[(0, lookup_id)].reason == ""
    # The waiting stores all ran in the end.
    assert core.statistics().store_lookups_waiting == 0
    assert all(len(mesh.holders(t.public)) >= 2 for t in twins)


def test_store_lookups_must_leave_room_for_finds() -> None:
    with pytest.raises(LocalProtocolError):
        Dht(NIC, now=0.0, config=DhtConfig(max_lookups=4, max_store_lookups=4))
