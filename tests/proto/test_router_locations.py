"""Location records flooded by the router (a stand-in for the DHT lookup)."""

from __future__ import annotations

import collections

from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.proto.attach import Location
from twinmesh.proto.router import Output, Router, SendTo


class Line:
    """Routers in a line, messages delivered synchronously in order."""

    def __init__(self, size: int) -> None:
        self.ids = [Identity.generate() for _ in range(size)]
        self.keys = [i.public for i in self.ids]
        self.routers = {i.public: Router(i, now=0.0, seqno=1, wall_offset=1000.0)
                        for i in self.ids}
        self.queue: collections.deque[tuple[PublicKey, SendTo]] = collections.deque()
        self.now = 0.0
        for left, right in zip(self.keys, self.keys[1:], strict=False):
            self.push(left, self.routers[left].neighbor_up(right, 0.0))
            self.push(right, self.routers[right].neighbor_up(left, 0.0))
        self.settle()

    def push(self, source: PublicKey, outputs: list[Output] | None) -> None:
        for output in outputs or []:
            if isinstance(output, SendTo):
                self.queue.append((source, output))

    def settle(self, seconds: float = 1.0) -> None:
        end = self.now + seconds
        while True:
            while self.queue:
                source, send = self.queue.popleft()
                self.push(send.peer, self.routers[send.peer].receive(source, send.data, self.now))
            due = min(r.get_timer() for r in self.routers.values())
            if due > end:
                self.now = end
                return
            self.now = max(self.now, due)
            for key, router in self.routers.items():
                if router.get_timer() <= self.now:
                    self.push(key, router.handle_timer(self.now))


def test_a_published_location_reaches_the_far_end_and_a_move_replaces_it() -> None:
    line = Line(4)
    twin = Identity.generate()
    first, last = line.keys[0], line.keys[-1]
    record = Location.sign(twin, first, seqno=1, expires=1000.0 + 3600)
    line.push(first, line.routers[first].publish_location(record, line.now))
    line.settle()
    assert all(r.locate(twin.public, line.now) == first for r in line.routers.values())
    moved = Location.sign(twin, last, seqno=2, expires=1000.0 + 3600)
    line.push(last, line.routers[last].publish_location(moved, line.now))
    line.settle()
    assert all(r.locate(twin.public, line.now) == last for r in line.routers.values())


def test_refused_records_are_not_flooded() -> None:
    line = Line(3)
    twin = Identity.generate()
    expired = Location.sign(twin, line.keys[0], seqno=1, expires=500.0)  # wall clock is 1000+
    assert line.routers[line.keys[0]].publish_location(expired, line.now) is None
    good = Location.sign(twin, line.keys[0], seqno=1, expires=5000.0)
    forged = Location(twin.public, line.keys[2], 9, 5000.0, good.signature)
    assert line.routers[line.keys[0]].publish_location(forged, line.now) is None
    line.settle()
    assert all(r.locate(twin.public, line.now) is None for r in line.routers.values())


def test_a_new_neighbour_hears_every_location_in_the_full_dump() -> None:
    line = Line(2)
    twin = Identity.generate()
    a, b = line.keys
    line.push(a, line.routers[a].publish_location(
        Location.sign(twin, a, 1, 1000.0 + 3600), line.now))
    line.settle()
    late = Identity.generate()
    router = Router(late, now=line.now, seqno=1, wall_offset=1000.0)
    line.routers[late.public] = router
    line.push(b, line.routers[b].neighbor_up(late.public, line.now))
    line.push(late.public, router.neighbor_up(b, line.now))
    line.settle()
    assert router.locate(twin.public, line.now) == a


def test_routine_full_dumps_resend_records_only_at_the_location_refresh() -> None:
    line = Line(2)
    a, b = line.keys
    twin = Identity.generate()
    line.push(a, line.routers[a].publish_location(
        Location.sign(twin, a, 1, 1000.0 + 3600), line.now))
    line.settle()
    line.routers[b].directory.records.clear()  # as if b had missed the flood
    refresh = line.routers[a].config.location_refresh_interval
    line.settle(refresh - 10.0)  # many routine full dumps (routes only) meanwhile
    assert line.routers[b].locate(twin.public, line.now) is None
    line.settle(20.0)
    assert line.routers[b].locate(twin.public, line.now) == a
