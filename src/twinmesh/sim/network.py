"""A discrete-event network of routing cores on a virtual clock.

Theory of operation
-------------------
`Network` holds one `Router` per node and a heap of events keyed by `(time, seq)`: the
sequence number breaks ties in the order events were scheduled, so a run with the same
seed replays exactly. There are three kinds of event:

- *delivery*: bytes a router sent to a neighbour (`SendTo`), due one link latency
  later. They arrive only if the link they were sent on is still up: a cut link loses
  everything in flight, and anything sent on it before the ends notice.
- *timer*: the node's `get_timer()`. Each node has at most one live timer entry; when
  a call changes a node's deadline a new entry is pushed and the old one, found stale
  when popped, is skipped (lazy deletion).
- *detection*: `neighbor_down` on both ends of a cut link, `detection_delay` after the
  cut (0 = a socket that closes at once; 1-2 s = a keepalive timeout).

The simulator only drives the cores through their public API (`neighbor_up`,
`neighbor_down`, `receive`, `handle_timer`, `get_timer`, `ping`, `send_payload`) and
inspects them with `next_hop`, `routes`, `table_size` and `stats`, exactly like a NIC.
All routers share one `verified` cache, so each signature is checked once per process.

*Relays.* A flat distance-vector table holds every destination, so N announcing
nodes cost N^2 entries in one process. For large runs, `origins` names the nodes that
announce themselves; the others are relays: they forward and hold routes, but their
identity signs announcements with an empty signature, which every core refuses as
malformed (counted in `relay_announcements_refused`, not as violations). A relay is
therefore not a destination: the cost per destination stays that of the real
protocol, for `len(origins)` destinations.

Running is bounded: every `run_*` method stops at a virtual time limit, and raises
`SimulationLimit` past `max_events` events or `wall_limit` seconds of real time.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from twinmesh.identity.keys import KEY_SIZE, Identity, PublicKey
from twinmesh.proto.router import (
    Delivered,
    Output,
    PongReceived,
    Router,
    RouterConfig,
    SendTo,
    Unreachable,
    Violation,
)
from twinmesh.sim import topologies

DELIVERY, TIMER, DETECTION, CALL = 0, 1, 2, 3
RELAY_REFUSAL = "update with malformed key or signature"


class SimulationLimit(Exception):
    """A run went past its event count or wall-clock bound."""


class _RelayIdentity(Identity):
    """An identity whose announcements every router refuses: a node that only relays."""

    __slots__ = ()

    def sign(self, message: bytes) -> bytes:
        return b""


@dataclass
class _Link:
    epoch: int
    latency: float


@dataclass(frozen=True)
class Walk:
    """The hop-by-hop path `next_hop` gives from a source towards a destination."""

    reached: bool
    path: list[int]  # node indices, source first (and the repeated node last on a loop)
    loop: bool = False
    # "arrived" | "no route" | "link down" (a next hop over a cut, undetected link) | "loop"
    reason: str = "arrived"


@dataclass
class NodeCounters:
    control_bytes_sent: int = 0
    control_messages_sent: int = 0
    control_bytes_received: int = 0
    data_messages_sent: int = 0
    lost: int = 0  # messages sent over a cut link, or in flight when it was cut


@dataclass
class Statistics:
    events: int = 0
    deliveries: int = 0
    timers: int = 0
    lost: int = 0
    relay_announcements_refused: int = 0
    violations: Counter[str] = field(default_factory=Counter)
    outputs: Counter[str] = field(default_factory=Counter)


class Network:
    """Routers joined by links with latency, on a virtual clock starting at 0."""

    def __init__(
        self,
        size: int,
        edges: Iterable[tuple[int, int]] = (),
        *,
        seed: int = 0,
        latency: float | tuple[float, float] = 0.001,
        detection_delay: float = 0.0,
        config: RouterConfig | None = None,
        origins: Collection[int] | None = None,
        max_events: int = 50_000_000,
        wall_limit: float = 1800.0,
        keep_outputs: int = 256,
    ) -> None:
        """`latency` is one value for every link, or a (low, high) range each link draws
        from with the seed. `origins`: the nodes that announce themselves (default all;
        see the module docstring). The links in `edges` come up at time 0."""
        self.size = size
        self.seed = seed
        self.now = 0.0
        self.latency = latency
        self.detection_delay = detection_delay
        self.config = config or RouterConfig()
        self.max_events = max_events
        self.wall_limit = wall_limit
        self._rng = random.Random(f"network:{seed}")
        self.origins = frozenset(range(size) if origins is None else origins)
        started = time.perf_counter()
        self.identities = [self._identity(i) for i in range(size)]
        self.keygen_seconds = time.perf_counter() - started
        self.keys: list[PublicKey] = [identity.public for identity in self.identities]
        self.index: dict[PublicKey, int] = {key: i for i, key in enumerate(self.keys)}
        self.verified: dict[tuple[bytes, int], bytes] = {}
        started = time.perf_counter()
        self.routers = [
            Router(identity, now=0.0, seqno=1, config=self.config, verified=self.verified)
            for identity in self.identities
        ]
        self.router_seconds = time.perf_counter() - started  # mostly the first signatures
        self.neighbors: list[set[int]] = [set() for _ in range(size)]
        self.counters = [NodeCounters() for _ in range(size)]
        self.stats = Statistics()
        # The last outputs for the NIC layer (Delivered, PongReceived, Unreachable,
        # Violation) of each node, with their time.
        self.outputs: list[deque[tuple[float, Output]]] = [
            deque(maxlen=keep_outputs) for _ in range(size)
        ]
        # Called with (node, time, output) for every output that is not a SendTo.
        self.on_output: Callable[[int, float, Output], None] | None = None
        self.in_flight = 0
        self.control_in_flight = 0
        self.last_control_delivery = 0.0
        self._links: dict[tuple[int, int], _Link] = {}
        self._pending_detection: dict[tuple[int, int], int] = {}  # link -> epoch cut
        self._epoch = 0
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._timer_due = [float("inf")] * size
        self._started = time.perf_counter()
        for i in range(size):
            self._reschedule(i)
        for a, b in edges:
            self.link_up(a, b)

    @classmethod
    def from_topology(cls, name: str, size: int, *, seed: int = 0, **kwargs: Any) -> Network:
        """A network on `topologies.GENERATORS[name](size, seed)`."""
        edges = topologies.GENERATORS[name](size, seed)
        return cls(size, edges, seed=seed, **kwargs)

    def _identity(self, i: int) -> Identity:
        seed = self._rng.randbytes(KEY_SIZE)
        return Identity(seed) if i in self.origins else _RelayIdentity(seed)

    # ------------------------------------------------------------------- links

    def link_up(self, a: int, b: int, *, latency: float | None = None, cost: int = 1) -> None:
        """Join `a` and `b` now: `neighbor_up` on both ends."""
        pair = _pair(a, b)
        if pair in self._links:
            return
        if pair in self._pending_detection:
            self._detect(pair, self._pending_detection[pair])  # the old link ends first
        if latency is None:
            if isinstance(self.latency, tuple):
                latency = self._rng.uniform(*self.latency)
            else:
                latency = self.latency
        self._epoch += 1
        self._links[pair] = _Link(self._epoch, latency)
        self.neighbors[a].add(b)
        self.neighbors[b].add(a)
        self._handle(a, self.routers[a].neighbor_up(self.keys[b], self.now, cost))
        self._handle(b, self.routers[b].neighbor_up(self.keys[a], self.now, cost))

    def cut(self, a: int, b: int, *, detection_delay: float | None = None) -> None:
        """Cut the link now: what is in flight is lost. Both ends learn it (neighbor_down)
        after `detection_delay` (default: the network's); until then what they send on
        it is lost too."""
        pair = _pair(a, b)
        link = self._links.pop(pair, None)
        if link is None:
            raise ValueError(f"no link between {a} and {b}")
        self.neighbors[a].discard(b)
        self.neighbors[b].discard(a)
        delay = self.detection_delay if detection_delay is None else detection_delay
        self._pending_detection[pair] = link.epoch
        if delay <= 0:
            self._detect(pair, link.epoch)
        else:
            self._push(self.now + delay, DETECTION, (pair, link.epoch))

    def is_up(self, a: int, b: int) -> bool:
        return _pair(a, b) in self._links

    @property
    def links(self) -> list[tuple[int, int]]:
        return sorted(self._links)

    def _detect(self, pair: tuple[int, int], epoch: int) -> None:
        if self._pending_detection.get(pair) != epoch:
            return  # already handled (the link came back up in between)
        del self._pending_detection[pair]
        a, b = pair
        self._handle(a, self.routers[a].neighbor_down(self.keys[b], self.now))
        self._handle(b, self.routers[b].neighbor_down(self.keys[a], self.now))

    # ----------------------------------------------------------------- traffic

    def ping(self, source: int, destination: int, ping_id: int) -> None:
        """`source` pings `destination` now; look for the answer in `outputs[source]`."""
        self._handle(source, self.routers[source].ping(self.keys[destination], ping_id, self.now))

    def send_payload(self, source: int, destination: int, payload: bytes) -> None:
        outputs = self.routers[source].send_payload(self.keys[destination], payload, self.now)
        self._handle(source, outputs)

    def call_at(self, when: float, function: Callable[[], None]) -> None:
        """Run `function()` at virtual time `when` (a scripted action: a ping, a cut)."""
        self._push(max(when, self.now), CALL, function)

    # ----------------------------------------------------------------- running

    def run_until(
        self, until: float, *, after_event: Callable[[Network], None] | None = None
    ) -> None:
        """Process every event due up to `until`, then set the clock to `until`.
        `after_event(network)`, when given, is called after each event."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            self._step()
            if after_event is not None:
                after_event(self)
        self.now = max(self.now, until)

    def run_until_quiet(
        self,
        limit: float,
        *,
        quiet: float = 0.5,
        after_event: Callable[[Network], None] | None = None,
    ) -> float:
        """Run until no routing message has been in flight for `quiet` seconds (or until
        `limit`) and return the time the last routing message arrived: the convergence
        time. Periodic full dumps end a quiet period, so this fits the first
        `full_update_interval` seconds after a change, or a config with long periods."""
        heap = self._heap
        since = self.now
        while heap:
            when = heap[0][0]
            if when > limit:
                self.now = limit
                break
            quiet_since = max(self.last_control_delivery, since)
            if self.control_in_flight == 0 and when - quiet_since >= quiet:
                self.now = quiet_since + quiet
                break
            self._step()
            if after_event is not None:
                after_event(self)
        return self.last_control_delivery

    def _step(self) -> None:
        when, _, kind, payload = heapq.heappop(self._heap)
        self.now = when
        stats = self.stats
        stats.events += 1
        if stats.events > self.max_events:
            raise SimulationLimit(f"more than {self.max_events} events")
        if stats.events & 0xFFF == 0 and time.perf_counter() - self._started > self.wall_limit:
            raise SimulationLimit(f"more than {self.wall_limit:.0f} s of real time")
        if kind == DELIVERY:
            source, target, data, epoch, control = payload
            self.in_flight -= 1
            if control:
                self.control_in_flight -= 1
            link = self._links.get(_pair(source, target))
            if link is None or link.epoch != epoch:
                stats.lost += 1
                self.counters[source].lost += 1
                return
            stats.deliveries += 1
            if control:
                self.counters[target].control_bytes_received += len(data)
                self.last_control_delivery = when
            self._handle(target, self.routers[target].receive(self.keys[source], data, when))
        elif kind == TIMER:
            node = payload
            if self._timer_due[node] != when:
                return  # stale: the node's deadline moved since this entry was pushed
            self._timer_due[node] = float("inf")
            stats.timers += 1
            self._handle(node, self.routers[node].handle_timer(when))
        elif kind == DETECTION:
            pair, epoch = payload
            self._detect(pair, epoch)
        else:
            payload()

    def _handle(self, node: int, outputs: list[Output]) -> None:
        counters = self.counters[node]
        for output in outputs:
            if type(output) is SendTo:
                target = self.index[output.peer]
                data = output.data
                if output.control:
                    counters.control_bytes_sent += len(data)
                    counters.control_messages_sent += 1
                else:
                    counters.data_messages_sent += 1
                link = self._links.get(_pair(node, target))
                if link is None:
                    counters.lost += 1  # the link is cut and this end does not know yet
                    self.stats.lost += 1
                    continue
                self.in_flight += 1
                if output.control:
                    self.control_in_flight += 1
                self._push(self.now + link.latency, DELIVERY,
                           (node, target, data, link.epoch, output.control))
            elif type(output) is Violation:
                peer = self.index.get(output.peer)
                if output.reason == RELAY_REFUSAL and peer is not None \
                        and peer not in self.origins:
                    self.stats.relay_announcements_refused += 1
                    continue
                self.stats.violations[output.reason] += 1
                self.outputs[node].append((self.now, output))
                if self.on_output is not None:
                    self.on_output(node, self.now, output)
            else:
                self.stats.outputs[type(output).__name__] += 1
                self.outputs[node].append((self.now, output))
                if self.on_output is not None:
                    self.on_output(node, self.now, output)
        self._reschedule(node)

    def _reschedule(self, node: int) -> None:
        due = self.routers[node].get_timer()
        if due != self._timer_due[node]:
            self._timer_due[node] = due
            self._push(max(due, self.now), TIMER, node)

    def _push(self, when: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, payload))

    # ------------------------------------------------------------- inspection

    def walk(self, source: int, destination: int) -> Walk:
        """Follow `next_hop` from `source` towards `destination`, hop by hop."""
        key = self.keys[destination]
        path = [source]
        seen = {source}
        node = source
        while node != destination:
            hop = self.routers[node].next_hop(key)
            if hop is None:
                return Walk(False, path, reason="no route")
            nxt = self.index[hop]
            path.append(nxt)
            if nxt in seen:
                return Walk(False, path, loop=True, reason="loop")
            if _pair(node, nxt) not in self._links:
                return Walk(False, path, reason="link down")
            seen.add(nxt)
            node = nxt
        return Walk(True, path)

    def reachable(self, source: int, destination: int) -> tuple[bool, list[int]]:
        """(reached, path) of `walk`."""
        walk = self.walk(source, destination)
        return walk.reached, walk.path

    def find_loop(self, pairs: Iterable[tuple[int, int]]) -> Walk | None:
        """The first walk among `pairs` that revisits a node, or None."""
        for source, destination in pairs:
            walk = self.walk(source, destination)
            if walk.loop:
                return walk
        return None

    def uses_link(self, destination: int, a: int, b: int) -> set[int]:
        """The sources whose current path to `destination` crosses the link a-b (either
        way): one pass over the next-hop tree, memoised."""
        key = self.keys[destination]
        memo: dict[int, bool] = {destination: False}
        for start in range(self.size):
            chain: list[int] = []
            node = start
            verdict = False
            while node not in memo:
                chain.append(node)
                hop = self.routers[node].next_hop(key)
                nxt = self.index[hop] if hop is not None else None
                if nxt is None or nxt in chain:
                    verdict = False
                    break
                if {node, nxt} == {a, b}:
                    verdict = True
                    break
                node = nxt
            else:
                verdict = memo[node]
            for x in reversed(chain):
                # Everything upstream of the crossing crosses it too.
                memo[x] = verdict
        return {x for x, crosses in memo.items() if crosses}

    def missing_routes(self, destinations: Iterable[int] | None = None) -> int:
        """How many (node, destination) pairs within one connected component lack a
        next hop; 0 once routing has converged."""
        targets = list(self.origins if destinations is None else destinations)
        missing = 0
        for part in topologies.components(self.size, self._links):
            for d in targets:
                if d not in part:
                    continue
                key = self.keys[d]
                missing += sum(1 for x in part if x != d and self.routers[x].next_hop(key) is None)
        return missing

    def route_counts(self) -> list[int]:
        """Routes with a next hop held by each node (its own entry excluded)."""
        return [len(router.routes(self.now)) - 1 for router in self.routers]

    def component_of(self, node: int) -> set[int]:
        for part in topologies.components(self.size, self._links):
            if node in part:
                return part
        raise AssertionError("unreachable")

    @property
    def events_pending(self) -> int:
        return len(self._heap)


def _pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


__all__ = [
    "Delivered",
    "Network",
    "NodeCounters",
    "PongReceived",
    "SimulationLimit",
    "Statistics",
    "Unreachable",
    "Walk",
]
