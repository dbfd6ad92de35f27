"""The routing core (twinmesh.proto.router), driven synchronously.

A `Mesh` joins named routers; `settle()` hands every `SendTo` to its peer's `receive`
in order and fires timers on an explicit clock: no I/O, no sleeps. Hostile input is
built by hand with the route schema (`routing()`, `packet()`): forged and replayed
announcements, oversized batches, unsigned seqno requests, packets out of hops.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from collections.abc import Iterable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.proto.router import (
    ANNOUNCE_CONTEXT,
    HOP_LIMIT,
    MAX_SEQNO,
    Delivered,
    Output,
    PongReceived,
    Router,
    RouterConfig,
    SendTo,
    Unreachable,
    Violation,
    _read_overlay,
    encode_payload_packet,
    encode_ping_packet,
    read_flat_packet,
)
from twinmesh.wire import schemas

Update = tuple[PublicKey, int, bytes, int]  # origin, seqno, signature, metric


def identity(name: str) -> Identity:
    return Identity(hashlib.sha256(name.encode()).digest())


def signature(who: Identity, seqno: int) -> bytes:
    return bytes(who.sign(ANNOUNCE_CONTEXT + who.public.raw + struct.pack(">Q", seqno)))


def routing(
    updates: Iterable[Update] = (),
    retractions: Iterable[PublicKey] = (),
    requests: Iterable[tuple[PublicKey, int, int]] = (),
) -> bytes:
    """An overlay routing message, built by hand."""
    updates, retractions, requests = list(updates), list(retractions), list(requests)
    message = schemas.route.Overlay.new_message()
    body = message.init("routing")
    for item, (origin, seqno, sig, metric) in zip(
        body.init("updates", len(updates)), updates, strict=True
    ):
        item.announcement.origin = origin.raw
        item.announcement.seqno = seqno
        item.announcement.signature = sig
        item.metric = metric
    gone = body.init("retractions", len(retractions))
    for i, origin in enumerate(retractions):
        gone[i] = origin.raw
    for item, (origin, seqno, hop_limit) in zip(
        body.init("requests", len(requests)), requests, strict=True
    ):
        item.origin = origin.raw
        item.seqno = seqno
        item.hopLimit = hop_limit
    return bytes(message.to_bytes())


def packet(source: PublicKey, destination: PublicKey, hop_limit: int, kind: str,
           value: Any = b"") -> bytes:
    message = schemas.route.Overlay.new_message()
    p = message.init("packet")
    p.source = source.raw
    p.destination = destination.raw
    p.hopLimit = hop_limit
    if kind == "payload":
        p.body.payload = value
    elif kind in ("ping", "pong"):
        ping = p.body.init(kind)
        ping.id, ping.sentAt, ping.hops = value
    else:
        code, about = value
        unreachable = p.body.init("unreachable")
        unreachable.code = code
        unreachable.destination = about.raw
    return bytes(message.to_bytes())


def read(data: bytes) -> dict[str, Any]:
    """What a routing message carries: updates as (origin, seqno, metric), retractions
    and requests as (origin, seqno)."""

    def extract(reader: Any) -> dict[str, Any]:
        assert reader.which() == "routing"
        r = reader.routing
        return {
            "updates": [(PublicKey(bytes(u.announcement.origin)), int(u.announcement.seqno),
                         int(u.metric)) for u in r.updates],
            "retractions": [PublicKey(bytes(x)) for x in r.retractions],
            "requests": [(PublicKey(bytes(q.origin)), int(q.seqno)) for q in r.requests],
        }

    decoded: dict[str, Any] = schemas.decode(schemas.route.Overlay, data, extract)
    return decoded


def entries(data: bytes) -> int:
    message = read(data)
    return sum(len(message[k]) for k in ("updates", "retractions", "requests"))


def sends(outputs: Iterable[Output], peer: PublicKey | None = None) -> list[SendTo]:
    return [o for o in outputs if isinstance(o, SendTo) and (peer is None or o.peer == peer)]


def updates_in(outputs: Iterable[Output], peer: PublicKey) -> list[tuple[PublicKey, int, int]]:
    return [u for s in sends(outputs, peer) if s.control for u in read(s.data)["updates"]]


def retractions_in(outputs: Iterable[Output], peer: PublicKey) -> list[PublicKey]:
    return [r for s in sends(outputs, peer) if s.control for r in read(s.data)["retractions"]]


def requests_in(outputs: Iterable[Output], peer: PublicKey | None = None) -> list[Any]:
    return [q for s in sends(outputs, peer) if s.control for q in read(s.data)["requests"]]


class Mesh:
    """Named routers joined by links; messages are delivered in the order sent."""

    def __init__(self, names: str, links: Iterable[str] = (), *,
                 config: RouterConfig | None = None) -> None:
        self.ids = {n: identity(n) for n in names}
        self.key = {n: i.public for n, i in self.ids.items()}
        self.name = {k: n for n, k in self.key.items()}
        self.r = {n: Router(i, now=0.0, seqno=1, config=config) for n, i in self.ids.items()}
        self.up: set[frozenset[str]] = set()
        self.queue: collections.deque[tuple[str, SendTo]] = collections.deque()
        self.events: dict[str, list[Output]] = {n: [] for n in names}
        self.now = 0.0
        for link in links:
            self.link(link[0], link[1])
        self.settle()

    def push(self, source: str, outputs: Iterable[Output] | None) -> None:
        for output in outputs or []:
            if isinstance(output, SendTo):
                if frozenset((source, self.name[output.peer])) in self.up:
                    self.queue.append((source, output))
            else:
                self.events[source].append(output)

    def link(self, a: str, b: str) -> None:
        self.up.add(frozenset((a, b)))
        self.push(a, self.r[a].neighbor_up(self.key[b], self.now))
        self.push(b, self.r[b].neighbor_up(self.key[a], self.now))

    def cut(self, a: str, b: str) -> None:
        self.up.discard(frozenset((a, b)))
        self.queue = collections.deque(
            (s, o) for s, o in self.queue if {s, self.name[o.peer]} != {a, b})
        self.push(a, self.r[a].neighbor_down(self.key[b], self.now))
        self.push(b, self.r[b].neighbor_down(self.key[a], self.now))

    def deliver_all(self) -> None:
        while self.queue:
            source, send = self.queue.popleft()
            target = self.name[send.peer]
            self.push(target, self.r[target].receive(self.key[source], send.data, self.now))

    def settle(self, seconds: float = 1.0) -> None:
        end = self.now + seconds
        while True:
            self.deliver_all()
            due = min(r.get_timer() for r in self.r.values())
            if due > end:
                self.now = end
                return
            self.now = max(self.now, due)
            for n, router in self.r.items():
                if router.get_timer() <= self.now:
                    self.push(n, router.handle_timer(self.now))

    def hop(self, at: str, to: str) -> str | None:
        nxt = self.r[at].next_hop(self.key[to])
        return None if nxt is None else self.name[nxt]

    def path(self, source: str, destination: str) -> str:
        path, node = source, source
        while node != destination:
            nxt = self.hop(node, destination)
            assert nxt is not None, f"{path}: no route to {destination}"
            assert nxt not in path, f"{path}{nxt}: loop"
            path += nxt
            node = nxt
        return path


def run_timers(router: Router, until: float) -> list[Output]:
    """Fire every timer of `router` due up to `until`; all the outputs."""
    outputs: list[Output] = []
    while router.get_timer() <= until:
        outputs += router.handle_timer(router.get_timer())
    return outputs


def lone_router(name: str = "n", *, config: RouterConfig | None = None,
                neighbors: str = "ab") -> tuple[Router, dict[str, PublicKey]]:
    """A router `name` with the given neighbours up, for hand-made input."""
    router = Router(identity(name), now=0.0, seqno=1, config=config)
    keys = {n: identity(n).public for n in neighbors}
    for key in keys.values():
        router.neighbor_up(key, 0.0)
    return router, keys


# ------------------------------------------------------------------ convergence


def test_a_line_converges_with_hop_count_metrics() -> None:
    mesh = Mesh("abcd", ["ab", "bc", "cd"])
    assert mesh.path("a", "d") == "abcd"
    assert mesh.path("d", "a") == "dcba"
    row = mesh.r["a"].lookup(mesh.key["d"], mesh.now)
    assert row is not None and row.metric == 3 and row.next_hop == mesh.key["b"]
    assert not any(isinstance(e, Violation) for events in mesh.events.values() for e in events)


def test_the_shortest_of_two_paths_wins_and_the_other_is_a_feasible_alternative() -> None:
    # a-b-d and a-c-x-d: a reaches d through b (2 hops) and keeps c as an alternative.
    mesh = Mesh("abcdx", ["ab", "bd", "ac", "cx", "xd"])
    assert mesh.path("a", "d") == "abd"
    row = next(r for r in mesh.r["a"].routes(mesh.now) if r.destination == mesh.key["d"])
    assert row.metric == 2
    assert row.feasible_alternatives == 0  # c advertises 2, not below a's FD of 2
    mesh.cut("b", "d")
    mesh.settle(1.0)
    assert mesh.path("a", "d") == "acxd"


def test_refreshing_the_selected_route_keeps_it_and_asks_for_nothing() -> None:
    # Regression: feasibility compared the metric through the link (reported + cost)
    # with FD, so the route a node had advertised became infeasible as soon as its next
    # hop refreshed it (every full dump): routes vanished and every origin re-signed.
    mesh = Mesh("abc", ["ab", "bc"])
    seqnos = {n: r.seqno for n, r in mesh.r.items()}
    mesh.settle(2.5 * mesh.r["a"].config.full_update_interval)  # two full dumps
    assert mesh.path("a", "c") == "abc"
    assert {n: r.seqno for n, r in mesh.r.items()} == seqnos
    # And directly: the same update again from the next hop changes nothing.
    c, b, a = mesh.r["c"], mesh.key["b"], mesh.ids["a"]
    outputs = c.receive(b, routing([(a.public, 1, signature(a, 1), 1)]), mesh.now)
    assert outputs == []
    assert c.next_hop(a.public) == b


# -------------------------------------------------------------- announcements


def test_a_forged_announcement_is_refused_and_counted() -> None:
    router, keys = lone_router()
    victim, liar = identity("victim"), identity("liar")
    forged = (victim.public, 5, signature(liar, 5), 1)  # signed by the wrong key
    outputs = router.receive(keys["a"], routing([forged]), 1.0)
    assert [type(o) for o in outputs] == [Violation]
    assert isinstance(outputs[0], Violation) and "bad signature" in outputs[0].reason
    assert router.stats["bad_signatures"] == 1
    assert router.next_hop(victim.public) is None
    # A signature over another seqno is just as bad.
    outputs = router.receive(keys["a"], routing([(victim.public, 6, signature(victim, 5), 1)]),
                             1.0)
    assert [type(o) for o in outputs] == [Violation]
    assert router.stats["bad_signatures"] == 2


def test_malformed_keys_and_signatures_are_violations() -> None:
    router, keys = lone_router()
    origin = identity("o")
    bad = [
        routing([(origin.public, 1, signature(origin, 1)[:10], 1)]),
    ]
    message = schemas.route.Overlay.new_message()
    message.init("routing").init("retractions", 1)[0] = b"short"
    bad.append(message.to_bytes())
    message = schemas.route.Overlay.new_message()
    request = message.init("routing").init("requests", 1)[0]
    request.origin = b"x" * 31
    bad.append(message.to_bytes())
    for data in bad:
        outputs = router.receive(keys["a"], data, 1.0)
        assert outputs and all(isinstance(o, Violation) for o in outputs)
    stranger = identity("stranger").public
    assert isinstance(router.receive(stranger, routing(), 1.0)[0], Violation)


def test_a_replayed_old_seqno_never_wins_over_a_newer_one() -> None:
    router, keys = lone_router(neighbors="ab")
    origin = identity("o")
    router.receive(keys["a"], routing([(origin.public, 7, signature(origin, 7), 3)]), 1.0)
    run_timers(router, 1.1)  # the route is advertised: FD = (7, 4)
    assert router.next_hop(origin.public) == keys["a"]
    # b replays an old announcement with a metric that would win, then a plain one.
    for metric in (0, 1, 10):
        outputs = router.receive(
            keys["b"], routing([(origin.public, 6, signature(origin, 6), metric)]), 2.0)
        assert not [o for o in outputs if isinstance(o, Violation)]
        assert router.next_hop(origin.public) == keys["a"]
        row = router.lookup(origin.public, 2.0)
        assert row is not None and row.seqno == 7
    # Even when the current route is lost, the old seqno is not taken: a request goes out.
    outputs = router.neighbor_down(keys["a"], 3.0)
    assert router.next_hop(origin.public) is None
    assert requests_in(outputs, keys["b"]) == [(origin.public, 8)]
    # The origin's newer seqno, through b, is taken.
    router.receive(keys["b"], routing([(origin.public, 8, signature(origin, 8), 5)]), 3.1)
    assert router.next_hop(origin.public) == keys["b"]


def test_a_retraction_removes_the_route_and_is_passed_on() -> None:
    router, keys = lone_router(neighbors="ab")
    origin = identity("o")
    router.receive(keys["a"], routing([(origin.public, 1, signature(origin, 1), 1)]), 1.0)
    outputs = run_timers(router, 1.5)
    assert updates_in(outputs, keys["b"]) == [(origin.public, 1, 2)]
    router.receive(keys["a"], routing(retractions=[origin.public]), 2.0)
    assert router.next_hop(origin.public) is None
    outputs = run_timers(router, 2.5)
    assert retractions_in(outputs, keys["b"]) == [origin.public]
    # A retraction for a route we do not have, or from a non-next-hop, changes nothing.
    assert router.receive(keys["b"], routing(retractions=[origin.public]), 3.0) == []
    assert router.receive(keys["b"], routing(retractions=[identity("x").public]), 3.0) == []


def test_an_infinite_metric_is_a_retraction() -> None:
    router, keys = lone_router()
    origin = identity("o")
    router.receive(keys["a"], routing([(origin.public, 1, signature(origin, 1), 1)]), 1.0)
    router.receive(keys["a"], routing([(origin.public, 1, signature(origin, 1), 0xFFFF)]), 2.0)
    assert router.next_hop(origin.public) is None


def test_poisoned_reverse_tells_the_next_hop_a_retraction() -> None:
    router, keys = lone_router(neighbors="ab")
    origin = identity("o")
    router.receive(keys["a"], routing([(origin.public, 1, signature(origin, 1), 1)]), 1.0)
    outputs = run_timers(router, 1.5)
    assert retractions_in(outputs, keys["a"]) == [origin.public]
    assert updates_in(outputs, keys["a"]) == []
    assert updates_in(outputs, keys["b"]) == [(origin.public, 1, 2)]
    # And in a full dump, such as a re-opened link gets.
    outputs = router.neighbor_up(keys["a"], 2.0)
    assert origin.public in retractions_in(outputs, keys["a"])
    assert [u[0] for u in updates_in(outputs, keys["a"])] == [router.key]


def test_messages_never_exceed_max_batch_entries() -> None:
    # Regression: a full dump put up to max_batch updates *and* max_batch retractions in
    # one message; the receiver counts both and dropped the whole message.
    config = RouterConfig(max_batch=3)
    router, keys = lone_router(config=config, neighbors="abc")
    origins = [identity(f"o{i}") for i in range(8)]
    for i, origin in enumerate(origins):
        via = keys["a"] if i % 2 else keys["b"]
        router.receive(via, routing([(origin.public, 1, signature(origin, 1), 1)]), 1.0)
    for peer in keys.values():
        outputs = router.neighbor_up(peer, 2.0)
        assert outputs
        assert all(entries(s.data) <= 3 for s in sends(outputs))
        assert sum(entries(s.data) for s in sends(outputs)) == 9  # 8 origins and itself
    # What it sends, a router with the same config accepts.
    other = Router(identity("a"), now=0.0, seqno=1, config=config)
    other.neighbor_up(router.key, 2.0)
    for send in sends(router.neighbor_up(keys["a"], 3.0)):
        assert not [o for o in other.receive(router.key, send.data, 3.0)
                    if isinstance(o, Violation)]


# ------------------------------------------------------------ seqno requests


def test_the_origin_answers_a_seqno_request_with_a_higher_seqno() -> None:
    router, keys = lone_router("o", neighbors="ab")
    me = router.key
    assert router.seqno == 1
    outputs = router.receive(keys["a"], routing(requests=[(me, 2, 10)]), 1.0)
    assert router.seqno == 2
    outputs += run_timers(router, 1.5)
    assert (me, 2, 0) in updates_in(outputs, keys["a"])
    assert (me, 2, 0) in updates_in(outputs, keys["b"])
    # A request for what we already announced re-sends it without re-signing.
    router.receive(keys["b"], routing(requests=[(me, 2, 10)]), 2.0)
    assert router.seqno == 2
    outputs = run_timers(router, 2.5)
    assert (me, 2, 0) in updates_in(outputs, keys["b"])


def test_requests_move_our_seqno_by_one_only_and_never_overflow() -> None:
    # Regression: requests are unsigned; one asking for 2**64-1 set our seqno to it,
    # and the next re-announcement raised struct.error from handle_timer.
    router, keys = lone_router("o")
    router.receive(keys["a"], routing(requests=[(router.key, MAX_SEQNO, 10)]), 1.0)
    assert router.seqno == 2
    for t in (1.5, 61.0, 122.0, 183.0):  # re-announcements, full dumps, sweeps
        router.handle_timer(t)
    assert router.seqno == 5
    # Many requests within min_reannounce sign once.
    signed = router.seqno
    for i in range(50):
        router.receive(keys["a"], routing(requests=[(router.key, MAX_SEQNO, 10)]), 200.0 + i / 1e4)
    assert router.seqno <= signed + 1


def test_an_origin_at_the_last_seqno_does_not_break_its_neighbours() -> None:
    # Regression: a NIC may sign its own announcement with seqno 2**64-1; a router
    # that then needed a newer one asked for 2**64 and raised OverflowError.
    mesh = Mesh("abcxm", ["ab", "bm", "ac", "cx", "xm"])
    mallory = identity("m")
    top = mesh.r["m"] = Router(mallory, now=mesh.now, seqno=MAX_SEQNO)
    for n in "bx":
        mesh.push("m", top.neighbor_up(mesh.key[n], mesh.now))
        mesh.push(n, mesh.r[n].neighbor_up(mesh.key["m"], mesh.now))
    mesh.settle()
    assert mesh.path("a", "m") == "abm"
    mesh.cut("b", "m")
    mesh.settle(5.0)  # requests for MAX_SEQNO, retried; nothing raises
    assert top.seqno == MAX_SEQNO


def test_a_lost_route_with_only_infeasible_alternatives_is_healed_by_a_request() -> None:
    # a-b-d and a-c-x-d: c's route (metric 2) is not feasible for a (FD 2). When b-d
    # goes, a asks d for a newer seqno through c; d answers; a takes the long way.
    mesh = Mesh("abcdx", ["ab", "bd", "ac", "cx", "xd"])
    seqno = mesh.r["d"].seqno
    mesh.cut("b", "d")
    mesh.settle(0.5)
    assert mesh.r["d"].seqno == seqno + 1
    assert mesh.path("a", "d") == "acxd"
    assert mesh.path("b", "d") == "bacxd"


def test_a_lost_seqno_request_is_sent_again_after_request_hold() -> None:
    # Regression: a request's dedup entry outlived request_hold (until the first
    # sweep, route_hold after start) and nothing asked again, so a lost request left
    # the route missing until the origin's next periodic re-announcement.
    router, keys = lone_router(neighbors="ab")
    origin = identity("o")
    router.receive(keys["a"], routing([(origin.public, 1, signature(origin, 1), 1)]), 0.1)
    router.receive(keys["b"], routing([(origin.public, 1, signature(origin, 1), 1)]), 0.1)
    run_timers(router, 0.15)  # advertised: FD = (1, 2)
    router.receive(keys["b"], routing([(origin.public, 1, signature(origin, 1), 2)]), 0.2)
    outputs = router.receive(keys["a"], routing(retractions=[origin.public]), 0.3)
    assert requests_in(outputs) == [(origin.public, 2)]  # lost
    hold = router.config.request_hold
    outputs = router.receive(keys["b"], routing([(origin.public, 1, signature(origin, 1), 2)]),
                             0.4)
    assert requests_in(outputs) == []  # within request_hold: deduplicated
    asked = []
    now = 0.4
    while now < 0.3 + 2 * hold:
        now = router.get_timer()
        asked += [(now, r) for r in requests_in(router.handle_timer(now))]
    sweep = min(router.config.route_hold / 4, hold)
    first, request = asked[0]
    assert request == (origin.public, 2)
    assert 0.3 + hold <= first <= 0.3 + hold + sweep
    # Answered at last: no more asking.
    router.receive(keys["b"], routing([(origin.public, 2, signature(origin, 2), 2)]), now)
    assert router.next_hop(origin.public) == keys["b"]
    assert requests_in(run_timers(router, now + 3 * hold)) == []


def test_intermediate_nodes_answer_or_forward_requests() -> None:
    router, keys = lone_router(neighbors="ab")
    origin = identity("o")
    router.receive(keys["a"], routing([(origin.public, 5, signature(origin, 5), 1)]), 1.0)
    # b asks for seqno 5: we have it, b is not our next hop: answered directly.
    outputs = router.receive(keys["b"], routing(requests=[(origin.public, 5, 10)]), 1.1)
    assert updates_in(outputs, keys["b"]) == [(origin.public, 5, 2)]
    # b asks for 6: forwarded towards the origin with one hop less.
    outputs = router.receive(keys["b"], routing(requests=[(origin.public, 6, 10)]), 1.2)
    assert [read(s.data)["requests"] for s in sends(outputs, keys["a"])] == [[(origin.public, 6)]]
    # The same request again is deduplicated; one out of hops is dropped.
    assert router.receive(keys["b"], routing(requests=[(origin.public, 6, 10)]), 1.3) == []
    assert router.receive(keys["b"], routing(requests=[(origin.public, 7, 1)]), 1.3) == []


# ------------------------------------------------------------------- bounds


def test_over_max_batch_is_a_violation_and_nothing_is_applied() -> None:
    config = RouterConfig(max_batch=4)
    router, keys = lone_router(config=config)
    origins = [identity(f"o{i}") for i in range(5)]
    message = routing([(o.public, 1, signature(o, 1), 1) for o in origins])
    outputs = router.receive(keys["a"], message, 1.0)
    assert [type(o) for o in outputs] == [Violation]
    assert router.stats["rate_limited"] == 1
    assert router.table_size() == 0


def test_the_rate_limit_drops_with_a_violation_and_refills_over_time() -> None:
    config = RouterConfig(rate_per_neighbor=10.0, burst_per_neighbor=20.0)
    router, keys = lone_router(config=config)
    origin = identity("o")
    update = routing([(origin.public, 1, signature(origin, 1), 1)])
    results = [router.receive(keys["a"], update, 1.0) for _ in range(25)]
    assert not any(isinstance(o, Violation) for r in results[:20] for o in r)
    assert all(isinstance(r[0], Violation) for r in results[20:])
    assert router.stats["rate_limited"] == 5
    assert router.receive(keys["a"], update, 2.0) == []  # ten tokens back after 1 s
    # Another neighbour has its own bucket.
    assert router.receive(keys["b"], update, 1.0) == []


def test_max_routes_bounds_the_table() -> None:
    router, keys = lone_router(config=RouterConfig(max_routes=3))
    origins = [identity(f"o{i}") for i in range(5)]
    router.receive(keys["a"], routing([(o.public, 1, signature(o, 1), 1) for o in origins]), 1.0)
    assert router.table_size() == 3
    assert router.stats["routes_refused"] == 2
    assert sum(router.next_hop(o.public) is not None for o in origins) == 3


def test_a_route_not_refreshed_expires_after_route_hold_then_is_forgotten() -> None:
    router, keys = lone_router()
    origin = identity("o")
    router.receive(keys["a"], routing([(origin.public, 1, signature(origin, 1), 1)]), 1.0)
    hold = router.config.route_hold
    now = 1.0
    while now < 1.0 + hold - 1:
        now = router.get_timer()
        router.handle_timer(now)
        if now < 1.0 + hold - 1:
            assert router.next_hop(origin.public) == keys["a"]
    while now < 1.0 + hold + 3:
        now = router.get_timer()
        router.handle_timer(now)
    assert router.next_hop(origin.public) is None
    assert router.table_size() == 1  # the feasibility distance is still kept
    while now < 1.0 + 2 * hold + 5:
        now = router.get_timer()
        router.handle_timer(now)
    assert router.table_size() == 0


def test_timers_always_move_forward() -> None:
    router, _ = lone_router()
    now = 0.0
    for _ in range(200):
        due = router.get_timer()
        assert due > now
        now = due
        router.handle_timer(now)
    assert now > 300


# ------------------------------------------------------------------- packets


@given(payload=st.binary(min_size=1, max_size=3000), hop_limit=st.integers(0, 255))
def test_a_payload_packet_is_encoded_as_pycapnp_builds_it(payload: bytes, hop_limit: int) -> None:
    a, d = identity("a").public, identity("d").public
    assert encode_payload_packet(a.raw, d.raw, hop_limit, payload) == packet(
        a, d, hop_limit, "payload", payload)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(max_size=200), data=st.data())
def test_the_packet_shortcut_reads_what_pycapnp_reads_or_steps_aside(
    payload: bytes, data: st.DataObject
) -> None:
    damaged = bytearray(packet(identity("a").public, identity("d").public, 9, "payload",
                               payload))
    for _ in range(data.draw(st.integers(0, 4))):
        position = data.draw(st.integers(0, min(len(damaged) - 1, 120)))
        damaged[position] = data.draw(st.integers(0, 255))
    fast = read_flat_packet(bytes(damaged))
    if fast is None:
        return
    value, hop_at = fast
    assert schemas.decode(schemas.route.Overlay, bytes(damaged), _read_overlay) == (
        "packet", value)
    assert damaged[hop_at] == value[2]


def test_a_forwarded_packet_changes_only_its_hop_limit() -> None:
    mesh = Mesh("abc", ["ab", "bc"])
    a, c = mesh.key["a"], mesh.key["c"]
    for kind, value in (("payload", b"through b"), ("ping", (7, 1.5, 0)),
                        ("pong", (7, 1.5, 2)), ("unreachable", ("noRoute", a))):
        sent = packet(a, c, 9, kind, value)
        assert mesh.r["b"].receive(a, sent, mesh.now) == [
            SendTo(c, packet(a, c, 8, kind, value), control=False)]
    # Payloads, pings and pongs take the flat shortcut; an unreachable is decoded by
    # pycapnp and built again, with the same result on the wire.
    assert read_flat_packet(packet(a, c, 9, "ping", (7, 1.5, 0))) is not None
    assert read_flat_packet(packet(a, c, 9, "unreachable", ("noRoute", a))) is None


def bits(value: Any) -> Any:
    """`value` with every float as its bytes, so a NaN equals the same NaN."""
    if isinstance(value, float):
        return struct.pack("<d", value)
    if isinstance(value, tuple | list):
        return type(value)(bits(item) for item in value)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


EDGE_PINGS = [
    (ping_id, sent_at, hops)
    for ping_id in (0, 1, 2**63, 2**64 - 1)
    for sent_at in (0.0, -0.0, -1.5, 1.7e9, 1e308, -1e308, 5e-324, float("inf"),
                    float("-inf"), float("nan"), struct.unpack("<d", bytes(7) + b"\xff")[0])
    for hops in (0, 1, 255)
]


def test_ping_and_pong_packets_at_the_edges_are_encoded_as_pycapnp_builds_them() -> None:
    a, d = identity("a").public, identity("d").public
    for kind in ("ping", "pong"):
        for hop_limit in (0, 1, HOP_LIMIT, 255):
            for ping in EDGE_PINGS:
                assert encode_ping_packet(a.raw, d.raw, hop_limit, kind, ping) == packet(
                    a, d, hop_limit, kind, ping), (kind, hop_limit, ping)


@given(kind=st.sampled_from(["ping", "pong"]), ping_id=st.integers(0, 2**64 - 1),
       sent_at=st.floats(), hops=st.integers(0, 255), hop_limit=st.integers(0, 255),
       source=st.binary(min_size=1, max_size=40), destination=st.binary(min_size=1, max_size=40))
def test_a_ping_or_pong_packet_is_encoded_as_pycapnp_builds_it(
    kind: str, ping_id: int, sent_at: float, hops: int, hop_limit: int, source: bytes,
    destination: bytes,
) -> None:
    message = schemas.route.Overlay.new_message()
    p = message.init("packet")
    p.source, p.destination, p.hopLimit = source, destination, hop_limit
    ping = p.body.init(kind)
    ping.id, ping.sentAt, ping.hops = ping_id, sent_at, hops
    assert encode_ping_packet(source, destination, hop_limit, kind, (ping_id, sent_at, hops)) \
        == message.to_bytes()


def test_ping_and_pong_at_the_edges_read_back_as_pycapnp_reads_them() -> None:
    a, d = identity("a").public, identity("d").public
    for kind in ("ping", "pong"):
        for ping in EDGE_PINGS:
            data = packet(a, d, 7, kind, ping)
            fast = read_flat_packet(memoryview(data))
            assert fast is not None
            value, hop_at = fast
            assert bits(value) == bits(
                schemas.decode(schemas.route.Overlay, data, _read_overlay)[1])
            assert bits(value) == (a.raw, d.raw, 7, (kind, bits(ping)))
            assert data[hop_at] == 7


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["ping", "pong"]), ping=st.sampled_from(EDGE_PINGS),
       data=st.data())
def test_the_ping_shortcut_reads_what_pycapnp_reads_or_steps_aside(
    kind: str, ping: tuple[int, float, int], data: st.DataObject
) -> None:
    damaged = bytearray(packet(identity("a").public, identity("d").public, 9, kind, ping))
    for _ in range(data.draw(st.integers(0, 4))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del damaged[data.draw(st.integers(0, len(damaged))):]
    fast = read_flat_packet(bytes(damaged))
    if fast is None:
        return
    value, hop_at = fast
    # Never accepts what pycapnp refuses (decode raises DecodeError then).
    assert bits(schemas.decode(schemas.route.Overlay, bytes(damaged), _read_overlay)) == (
        "packet", bits(value))
    assert damaged[hop_at] == value[2]


def test_a_truncated_ping_is_a_violation() -> None:
    router, keys = lone_router()
    data = packet(keys["a"], router.key, HOP_LIMIT, "ping", (5, 1.0, 0))
    for end in range(len(data)):
        (violation,) = router.receive(keys["a"], data[:end], 0.0)
        assert isinstance(violation, Violation)
        assert violation.reason and "\n" not in violation.reason
    assert router.stats["packets_delivered"] == 0


def _resized_ping(data: bytes, data_words: int) -> bytes:
    """`data` (a flat ping packet, Ping last) with its Ping grown or shrunk to
    `data_words` words, as a newer or older writer would send it."""
    words = len(data) // 8 - 1 - 3 + data_words
    grown = (data[:-24] + data[-24:] + bytes(8 * data_words))[: (words + 1) * 8]
    (pointer,) = struct.unpack_from("<Q", grown, 56)
    pointer = pointer & ~(0xFFFF << 32) | data_words << 32
    return struct.pack("<II", 0, words) + grown[8:56] + struct.pack("<Q", pointer) + grown[64:]


def test_a_ping_of_another_size_is_left_to_pycapnp_and_still_answered() -> None:
    mesh = Mesh("ab", ["ab"])
    a, b = mesh.key["a"], mesh.key["b"]
    canonical = packet(a, b, HOP_LIMIT, "ping", (11, 2.5, 0))
    for data_words, answer in ((4, (11, 2.5, 1)), (2, (11, 2.5, 1)), (1, (11, 0.0, 1))):
        data = _resized_ping(canonical, data_words)
        assert read_flat_packet(data) is None
        assert mesh.r["b"].receive(a, data, mesh.now) == [
            SendTo(a, packet(b, a, HOP_LIMIT, "pong", answer), control=False)]


def test_a_ping_is_answered_with_the_pong_pycapnp_would_build() -> None:
    mesh = Mesh("abc", ["ab", "bc"])
    a, b, c = mesh.key["a"], mesh.key["b"], mesh.key["c"]
    (sent,) = mesh.r["a"].ping(c, 2**64 - 1, -3.25)
    assert sent == SendTo(b, packet(a, c, HOP_LIMIT, "ping", (2**64 - 1, -3.25, 0)),
                          control=False)
    (forwarded,) = mesh.r["b"].receive(a, sent.data, 0.0)
    assert forwarded == SendTo(c, packet(a, c, HOP_LIMIT - 1, "ping", (2**64 - 1, -3.25, 0)),
                               control=False)
    assert mesh.r["c"].receive(b, forwarded.data, 0.0) == [
        SendTo(b, packet(c, a, HOP_LIMIT, "pong", (2**64 - 1, -3.25, 2)), control=False)]
    # A ping that claims 255 hops already is answered with the hops it made, not those.
    late = packet(a, c, HOP_LIMIT - 1, "ping", (1, 0.0, 255))
    assert mesh.r["c"].receive(b, late, 0.0) == [
        SendTo(b, packet(c, a, HOP_LIMIT, "pong", (1, 0.0, 2)), control=False)]


def test_packet_counters_say_what_became_of_each_packet() -> None:
    mesh = Mesh("abcd", ["ab", "bc"])
    mesh.push("a", mesh.r["a"].send_payload(mesh.key["c"], b"to c", mesh.now))
    mesh.push("a", mesh.r["a"].send_payload(mesh.key["d"], b"nowhere", mesh.now))
    mesh.deliver_all()
    a, b, c = (mesh.r[n].stats for n in "abc")
    assert (a["packets_sent"], a["packets_no_route"], a["packets_delivered"]) == (1, 1, 0)
    assert (b["packets_forwarded"], b["packets_delivered"]) == (1, 0)
    assert (c["packets_delivered"], c["packets_sent"]) == (1, 0)


def test_a_payload_is_delivered_with_its_hop_count() -> None:
    mesh = Mesh("abcd", ["ab", "bc", "cd"])
    mesh.push("a", mesh.r["a"].send_payload(mesh.key["d"], b"hello", mesh.now))
    mesh.deliver_all()
    assert mesh.events["d"] == [Delivered(mesh.key["a"], b"hello", 3)]
    assert mesh.r["b"].stats["packets_forwarded"] == 1
    # To ourselves: delivered at once.
    assert mesh.r["a"].send_payload(mesh.key["a"], b"me", 0.0) == [
        Delivered(mesh.key["a"], b"me", 0)]


def test_ping_and_pong_measure_round_trip_and_hops() -> None:
    mesh = Mesh("abcd", ["ab", "bc", "cd"])
    mesh.push("a", mesh.r["a"].ping(mesh.key["d"], 42, mesh.now))
    sent = mesh.now
    mesh.now += 0.25  # everything below happens "later"
    mesh.deliver_all()
    (pong,) = mesh.events["a"]
    assert isinstance(pong, PongReceived)
    assert (pong.source, pong.ping_id, pong.hops) == (mesh.key["d"], 42, 3)
    assert abs(pong.rtt - (mesh.now - sent)) < 1e-9
    assert mesh.r["a"].ping(mesh.key["a"], 7, 0.0) == [PongReceived(mesh.key["a"], 7, 0.0, 0)]


def test_no_route_at_the_source_is_an_unreachable_at_once() -> None:
    mesh = Mesh("ab", ["ab"])
    nowhere = identity("nowhere").public
    assert mesh.r["a"].ping(nowhere, 9, 0.0) == [Unreachable(nowhere, "noRoute", mesh.key["a"], 9)]
    assert mesh.r["a"].send_payload(nowhere, b"x", 0.0) == [
        Unreachable(nowhere, "noRoute", mesh.key["a"], 0)]


def test_no_route_on_the_way_comes_back_as_unreachable() -> None:
    mesh = Mesh("abc", ["ab", "bc"])
    nowhere = identity("nowhere").public
    # a's packet reaches b, which has no route: b tells a.
    mesh.push("b", mesh.r["b"].receive(
        mesh.key["a"], packet(mesh.key["a"], nowhere, HOP_LIMIT, "ping", (5, 0.0, 0)), 0.0))
    mesh.deliver_all()
    assert mesh.events["a"] == [Unreachable(nowhere, "noRoute", mesh.key["b"], 5)]
    assert mesh.r["b"].stats["packets_unroutable"] == 1


def test_out_of_hops_comes_back_as_hop_limit_exceeded() -> None:
    mesh = Mesh("abc", ["ab", "bc"])
    data = packet(mesh.key["a"], mesh.key["c"], 1, "payload", b"x")
    mesh.push("b", mesh.r["b"].receive(mesh.key["a"], data, 0.0))
    mesh.deliver_all()
    assert mesh.events["a"] == [Unreachable(mesh.key["c"], "hopLimitExceeded", mesh.key["b"], 0)]
    assert mesh.events["c"] == []
    # With hops left it goes through.
    mesh.push("b", mesh.r["b"].receive(
        mesh.key["a"], packet(mesh.key["a"], mesh.key["c"], 2, "payload", b"y"), 0.0))
    mesh.deliver_all()
    assert mesh.events["c"] == [Delivered(mesh.key["a"], b"y", HOP_LIMIT)]  # as if sent at b


def test_an_unreachable_is_never_answered_with_an_unreachable() -> None:
    mesh = Mesh("abc", ["ab", "bc"])
    nowhere = identity("nowhere").public
    for hop_limit, destination in ((HOP_LIMIT, nowhere), (1, mesh.key["c"])):
        data = packet(mesh.key["a"], destination, hop_limit, "unreachable", ("noRoute", nowhere))
        assert mesh.r["b"].receive(mesh.key["a"], data, 0.0) == []
    assert mesh.r["b"].stats["packets_unroutable"] == 2
    # Sent back the way it came, it is dropped rather than bounced.
    data = packet(mesh.key["c"], mesh.key["c"], HOP_LIMIT, "unreachable", ("noRoute", nowhere))
    assert mesh.r["b"].receive(mesh.key["c"], data, 0.0) == []


def test_a_ping_that_started_above_the_hop_limit_is_answered() -> None:
    # Regression (found by the fuzz test below): hop count = HOP_LIMIT - hopLimit + 1
    # went negative and encoding the pong raised from receive().
    mesh = Mesh("ab", ["ab"])
    data = packet(mesh.key["a"], mesh.key["b"], 255, "ping", (3, 0.0, 0))
    mesh.push("b", mesh.r["b"].receive(mesh.key["a"], data, 0.0))
    mesh.deliver_all()
    (pong,) = mesh.events["a"]
    assert isinstance(pong, PongReceived) and pong.hops == 1


def test_a_packet_with_malformed_addresses_is_a_violation() -> None:
    router, keys = lone_router()
    message = schemas.route.Overlay.new_message()
    p = message.init("packet")
    p.source = b"short"
    p.destination = router.key.raw
    p.body.payload = b""
    (violation,) = router.receive(keys["a"], message.to_bytes(), 0.0)
    assert isinstance(violation, Violation)


# ----------------------------------------------------------------------- fuzz

ALLOWED = (SendTo, Delivered, PongReceived, Unreachable, Violation)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KNOWN = [identity(n) for n in ("n", "a", "b", "o")]


def _fuzz_router() -> tuple[Router, list[PublicKey]]:
    router, keys = lone_router(config=RouterConfig(max_batch=8, max_routes=4))
    origin = KNOWN[3]
    router.receive(keys["a"], routing([(origin.public, 3, signature(origin, 3), 1)]), 0.5)
    router.handle_timer(router.get_timer())
    return router, [keys["a"], keys["b"]]


def _exercise(router: Router, peers: list[PublicKey], messages: list[bytes]) -> None:
    now = 1.0
    for i, data in enumerate(messages):
        outputs = router.receive(peers[i % 2], data, now)
        assert all(isinstance(o, ALLOWED) for o in outputs)
        now += 0.01
    for _ in range(6):  # time passes; the core keeps working
        now = max(now, router.get_timer())
        router.handle_timer(now)
    router.routes(now)
    router.neighbor_down(peers[0], now)


keys_st = st.one_of(st.sampled_from([k.public.raw for k in KNOWN]), st.binary(max_size=40))
seqno_st = st.one_of(st.sampled_from([0, 1, 2, 3, 4, MAX_SEQNO - 1, MAX_SEQNO]),
                     st.integers(0, MAX_SEQNO))


@st.composite
def routing_messages(draw: st.DrawFn) -> bytes:
    message = schemas.route.Overlay.new_message()
    body = message.init("routing")
    n_updates = draw(st.integers(0, 10))
    for item in body.init("updates", n_updates):
        origin = draw(st.sampled_from(KNOWN))
        seqno = draw(seqno_st)
        good = draw(st.booleans())
        item.announcement.origin = origin.public.raw if good else draw(keys_st)
        item.announcement.seqno = seqno
        item.announcement.signature = (
            signature(origin, seqno) if good else draw(st.binary(max_size=70)))
        item.metric = draw(st.integers(0, 0xFFFF))
    gone = body.init("retractions", draw(st.integers(0, 4)))
    for i in range(len(gone)):
        gone[i] = draw(keys_st)
    for item in body.init("requests", draw(st.integers(0, 4))):
        item.origin = draw(keys_st)
        item.seqno = draw(seqno_st)
        item.hopLimit = draw(st.integers(0, 255))
    return bytes(message.to_bytes())


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    message = schemas.route.Overlay.new_message()
    p = message.init("packet")
    p.source = draw(keys_st)
    p.destination = draw(keys_st)
    p.hopLimit = draw(st.integers(0, 255))
    kind = draw(st.sampled_from(["payload", "ping", "pong", "unreachable"]))
    if kind == "payload":
        p.body.payload = draw(st.binary(max_size=20))
    elif kind in ("ping", "pong"):
        ping = p.body.init(kind)
        ping.id = draw(st.integers(0, 2**64 - 1))
        ping.sentAt = draw(st.floats(allow_nan=True))
        ping.hops = draw(st.integers(0, 255))
    else:
        u = p.body.init("unreachable")
        u.code = draw(st.sampled_from(["noRoute", "hopLimitExceeded"]))
        u.destination = draw(keys_st)
        u.pingId = draw(st.integers(0, 2**64 - 1))
    return bytes(message.to_bytes())


@st.composite
def mutated(draw: st.DrawFn, real: bytes) -> bytes:
    data = bytearray(real)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            return bytes(draw(st.binary(min_size=1, max_size=16)))
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "truncate", "splice", "delete"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
        elif op == "splice":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[i : i + draw(st.integers(1, 16))]
    return bytes(data)


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_random_bytes_are_violations_and_never_raise(noise: list[bytes]) -> None:
    router, peers = _fuzz_router()
    for i, data in enumerate(noise):
        outputs = router.receive(peers[i % 2], data, 1.0)
        assert all(isinstance(o, ALLOWED) for o in outputs)
    _exercise(router, peers, [])


@FUZZ
@given(st.lists(st.one_of(routing_messages(), packets()), min_size=1, max_size=6))
def test_well_formed_hostile_messages_never_raise(messages: list[bytes]) -> None:
    router, peers = _fuzz_router()
    _exercise(router, peers, messages)


@FUZZ
@given(st.data())
def test_mutated_real_messages_never_raise(data: st.DataObject) -> None:
    router, peers = _fuzz_router()
    real = data.draw(st.one_of(routing_messages(), packets()), label="real")
    _exercise(router, peers, [data.draw(mutated(real), label="mutated")])
