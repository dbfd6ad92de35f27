"""The twin-lookup DHT (`proto.dht.Dht`) at scale, on a virtual clock.

    python -m twinmesh.sim.dht [--quick] [--out docs/SCALING.md]

Theory of operation
-------------------
`DhtNetwork` holds one production `Dht` core per NIC and a heap of events keyed by
`(time, seq)` (ties in scheduling order, so a seed replays exactly): *deliveries* of
the bytes a core sent, and each core's *timer* (`get_timer()`, one live entry per
node, stale entries skipped when popped). The cores are driven only through their
public API (`add_contact`, `receive`, `publish`, `find`, `handle_timer`), as the NIC
shell drives them.

The routing layer under the DHT is not simulated message by message (that is
`twinmesh.sim.network`'s job); it is taken as converged: a DHT message from A to B
travels the shortest path in hops, and arrives after the sum of that path's link
latencies. A dead NIC neither answers nor forwards, and paths go round it (the
routing heals in about two seconds, see the repair figures; the lookups here run
after that). Each NIC starts knowing only its direct neighbours (`add_contact`), so
the DHT has to find everything else itself: the situation of a routing layer that
does not hold every key (the Yggdrasil-style next step in docs/SCALING.md).

A scenario: all cores bootstrap (each looks itself up), twins attach to random NICs
and publish their records (stored on the k closest NICs), a fraction of the NICs is
killed without warning, then lookups start from random live NICs for random twins,
a few at a time. Measured per lookup: rounds, NICs queried, DHT messages, the
virtual time it took, the overlay hops from the asking NIC to the twin's NIC, and
whether it returned the twin's newest record.
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import random
import resource
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinmesh.identity.keys import KEY_SIZE, Identity, PublicKey
from twinmesh.proto.attach import Location
from twinmesh.proto.dht import Dht, DhtConfig, LookupDone, Output, SendDht, Violation
from twinmesh.sim import topologies

WALL = 1_800_000_000.0  # unix time at virtual time 0 (records expire on unix time)
TTL = 3600.0
DELIVERY, TIMER = 0, 1
BEGIN = "<!-- BEGIN make sim-dht -->"
END = "<!-- END make sim-dht -->"


class SimulationLimit(Exception):
    """A run went past its event or wall-clock bound."""


class DhtNetwork:
    """`Dht` cores joined by a graph whose shortest paths carry their messages."""

    def __init__(
        self,
        size: int,
        edges: list[tuple[int, int]],
        *,
        seed: int = 0,
        latency: tuple[float, float] = (0.001, 0.010),
        config: DhtConfig | None = None,
        max_events: int = 20_000_000,
        wall_limit: float = 1200.0,
    ) -> None:
        self.size = size
        self.now = 0.0
        self.config = config or DhtConfig()
        self._rng = random.Random(f"dht:{seed}")
        self.keys = [Identity(self._rng.randbytes(KEY_SIZE)).public for _ in range(size)]
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.adjacent: list[dict[int, float]] = [{} for _ in range(size)]
        for a, b in edges:
            self.adjacent[a][b] = self.adjacent[b][a] = self._rng.uniform(*latency)
        self.alive = [True] * size
        self.cores = [
            Dht(key, now=0.0, config=self.config, wall_offset=WALL,
                rng=random.Random(f"dht:{seed}:{i}"))
            for i, key in enumerate(self.keys)
        ]
        self.messages = 0
        self.lost = 0  # sent to a dead NIC
        self.violations = 0
        self.events = 0
        self.max_events = max_events
        self.wall_limit = wall_limit
        self._started = time.perf_counter()
        self._paths: dict[int, tuple[list[int], list[float]]] = {}
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._timer_due = [float("inf")] * size
        self.on_done: Callable[[int, LookupDone], None] | None = None
        for i in range(size):
            self._reschedule(i)

    # -------------------------------------------------------------- topology

    def paths_from(self, source: int) -> tuple[list[int], list[float]]:
        """Hops and latency of the shortest path (in hops) to every NIC through live
        NICs; -1 hops: unreachable. Cached until a NIC dies."""
        cached = self._paths.get(source)
        if cached is not None:
            return cached
        hops = [-1] * self.size
        delay = [0.0] * self.size
        hops[source] = 0
        queue = deque([source])
        while queue:
            u = queue.popleft()
            for v, latency in self.adjacent[u].items():
                if hops[v] < 0 and self.alive[v]:
                    hops[v] = hops[u] + 1
                    delay[v] = delay[u] + latency
                    queue.append(v)
        self._paths[source] = (hops, delay)
        return hops, delay

    def kill(self, nodes: list[int]) -> None:
        for node in nodes:
            self.alive[node] = False
        self._paths.clear()

    # ------------------------------------------------------------------ calls

    def bootstrap(self) -> None:
        """Every NIC learns its direct neighbours (as from its links coming up)."""
        for i in range(self.size):
            for j in self.adjacent[i]:
                self._handle(i, self.cores[i].add_contact(self.keys[j], self.now))

    def publish(self, node: int, location: Location) -> str:
        reason, outputs = self.cores[node].publish(location, self.now)
        self._handle(node, outputs)
        return reason

    def find(self, node: int, twin: PublicKey,
             started: Callable[[int], None] = lambda lookup_id: None) -> int:
        """Start a lookup at `node`; `started(lookup_id)` runs before its outputs are
        handled (a lookup with nobody to ask is done at once)."""
        lookup_id, outputs = self.cores[node].find(twin, self.now)
        started(lookup_id)
        self._handle(node, outputs)
        return lookup_id

    def call_at(self, when: float, function: Callable[[], None]) -> None:
        self._push(when, TIMER, function)

    # ---------------------------------------------------------------- running

    def run_until(self, limit: float, done: Callable[[], bool] = lambda: False) -> None:
        while self._heap and self._heap[0][0] <= limit and not done():
            self._step()
        self.now = max(self.now, limit) if not done() else self.now

    def run_until_quiet(self, limit: float) -> None:
        """Until no lookup runs and no message is in flight (timers aside)."""
        def quiet() -> bool:
            return not any(k == DELIVERY for _, _, k, _ in self._heap) and \
                not any(c.lookups_running() for c in self.cores)
        while self._heap and self.now < limit:
            self._step()
            if self._heap[0][2] == TIMER and quiet():
                return

    def _step(self) -> None:
        self.events += 1
        if self.events > self.max_events:
            raise SimulationLimit(f"more than {self.max_events} events")
        if self.events % 4096 == 0 and time.perf_counter() - self._started > self.wall_limit:
            raise SimulationLimit(f"more than {self.wall_limit:g} s of wall time")
        when, _, kind, payload = heapq.heappop(self._heap)
        self.now = max(self.now, when)
        if kind == DELIVERY:
            source, destination, data = payload
            if self.alive[destination]:
                self._handle(destination,
                             self.cores[destination].receive(self.keys[source], data, self.now))
            else:
                self.lost += 1
        elif callable(payload):
            payload()
        else:
            node = payload
            if self.alive[node] and self._timer_due[node] <= self.now:
                self._timer_due[node] = float("inf")
                self._handle(node, self.cores[node].handle_timer(self.now))

    def _handle(self, node: int, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, SendDht):
                self.messages += 1
                target = self.index[output.nic]
                hops, delay = self.paths_from(node)
                if hops[target] < 0:
                    self.lost += 1
                    continue
                self._push(self.now + delay[target], DELIVERY, (node, target, output.data))
            elif isinstance(output, LookupDone):
                if self.on_done is not None:
                    self.on_done(node, output)
            elif isinstance(output, Violation):
                self.violations += 1
        self._reschedule(node)

    def _reschedule(self, node: int) -> None:
        due = self.cores[node].get_timer()
        if due < self._timer_due[node]:
            self._timer_due[node] = due
            self._push(due, TIMER, node)

    def _push(self, when: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, payload))


# -------------------------------------------------------------------- scenario


@dataclass(frozen=True)
class Scenario:
    size: int
    dead: float  # fraction of NICs killed after publishing, before the lookups
    twins: int = 200
    lookups: int = 500
    topology: str = "scale-free"
    seed: int = 1
    concurrent: int = 20  # lookups in flight at once

    @property
    def label(self) -> str:
        return f"{self.size} NICs, {self.dead:.0%} dead"


@dataclass
class Result:
    scenario: Scenario
    diameter: int
    rounds: list[int] = field(default_factory=list)
    queried: list[int] = field(default_factory=list)
    messages: float = 0.0  # DHT messages sent network-wide per lookup
    latency: list[float] = field(default_factory=list)  # found lookups, seconds
    hops: list[int] = field(default_factory=list)  # overlay hops to the twin's NIC
    found: int = 0
    stale: int = 0  # found an older record than the newest
    lost_twins: int = 0  # twins whose every replica died
    cut_off: int = 0  # lookups from a NIC that no live replica of the twin could reach
    timeouts: int = 0
    violations: int = 0
    wall: float = 0.0
    rss_mib: float = 0.0

    @property
    def success(self) -> float:
        """Of the lookups that could succeed (a live replica in reach)."""
        return self.found / max(1, len(self.rounds) - self.cut_off)


def run(scenario: Scenario, progress: Callable[[str], None] = lambda line: None) -> Result:
    started = time.perf_counter()
    edges = topologies.GENERATORS[scenario.topology](scenario.size, scenario.seed)
    net = DhtNetwork(scenario.size, edges, seed=scenario.seed)
    result = Result(scenario, topologies.diameter_estimate(scenario.size, edges))
    rng = random.Random(f"scenario:{scenario.seed}")
    progress(f"{scenario.label}: bootstrap")
    net.bootstrap()
    net.run_until_quiet(60.0)
    progress(f"{scenario.label}: publish {scenario.twins} twins")
    twins = [Identity(rng.randbytes(KEY_SIZE)) for _ in range(scenario.twins)]
    homes = [rng.randrange(scenario.size) for _ in twins]
    records: list[Location] = []
    for identity, home in zip(twins, homes, strict=True):
        # An older record first (the twin was elsewhere), then the current one.
        moved_from = rng.randrange(scenario.size)
        old = Location.sign(identity, net.keys[moved_from], 1, WALL + net.now + TTL)
        net.publish(moved_from, old)
        net.run_until_quiet(net.now + 30.0)
        record = Location.sign(identity, net.keys[home], 2, WALL + net.now + TTL)
        net.publish(home, record)
        records.append(record)
    net.run_until_quiet(net.now + 60.0)
    dead = rng.sample(range(scenario.size), int(scenario.size * scenario.dead))
    net.kill(dead)
    holders = [[i for i in range(scenario.size)
                if net.alive[i] and net.cores[i].cached(identity.public, net.now)]
               for identity in twins]
    result.lost_twins = sum(1 for h in holders if not h)
    progress(f"{scenario.label}: {len(dead)} NICs killed, {scenario.lookups} lookups")
    live = [i for i in range(scenario.size) if net.alive[i]]
    pending: dict[tuple[int, int], int] = {}  # (node, lookup id) -> twin index

    def on_done(node: int, done: LookupDone) -> None:
        twin = pending.pop((node, done.lookup_id), None)
        if twin is None:
            return  # not one of ours (a republish or refresh)
        result.rounds.append(done.rounds)
        result.queried.append(done.queried)
        result.timeouts += done.reason == "timeout"
        if done.location is not None and done.location.seqno == records[twin].seqno:
            result.found += 1
            result.latency.append(done.elapsed)
            hops, _ = net.paths_from(node)
            if hops[homes[twin]] >= 0:  # the twin's NIC may be dead or cut off
                result.hops.append(hops[homes[twin]])
        elif done.location is not None:
            result.stale += 1

    net.on_done = on_done
    messages_before = net.messages
    started_lookups = 0
    while started_lookups < scenario.lookups:
        while len(pending) < scenario.concurrent and started_lookups < scenario.lookups:
            source, twin = rng.choice(live), rng.randrange(len(twins))

            def register(lookup_id: int, source: int = source, twin: int = twin) -> None:
                pending[(source, lookup_id)] = twin

            hops, _ = net.paths_from(source)
            # Killing NICs can split the graph: some replicas are then out of reach.
            result.cut_off += not any(hops[h] >= 0 for h in holders[twin])

            net.find(source, twins[twin].public, register)
            started_lookups += 1
        net.run_until(net.now + 0.05, done=lambda: len(pending) < scenario.concurrent)
    net.run_until(net.now + 60.0, done=lambda: not pending)
    # Everything the lookups caused: queries, answers, repairs of stale replicas.
    result.messages = (net.messages - messages_before) / max(1, scenario.lookups)
    result.violations = net.violations
    result.wall = time.perf_counter() - started
    result.rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


SCENARIOS = (
    Scenario(100, 0.0),
    Scenario(1000, 0.0),
    Scenario(1000, 0.1),
    Scenario(1000, 0.3),
)
QUICK = (
    Scenario(100, 0.0, twins=50, lookups=200),
    Scenario(1000, 0.1, twins=50, lookups=200),
)


# --------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    head = ["NICs", "dead", "graph (diameter)", "lookups", "newest record found",
            "rounds (mean / max)", "NICs queried (mean)", "messages per lookup (mean)",
            "latency p50 / p99 (virtual)", "overlay hops to the twin (mean / max)",
            "twins with no live replica", "lookups with no replica in reach", "wall"]
    body = []
    for r in results:
        s = r.scenario
        body.append([
            f"{s.size:,}".replace(",", " "), f"{s.dead:.0%}",
            f"{s.topology} (~{r.diameter})", str(len(r.rounds)),
            f"{r.success:.1%}" + (f" ({r.stale} stale)" if r.stale else ""),
            f"{statistics.fmean(r.rounds):.2f} / {max(r.rounds)}",
            f"{statistics.fmean(r.queried):.1f}",
            f"{r.messages:.1f}",
            f"{pct(r.latency, 50) * 1e3:.0f} / {pct(r.latency, 99) * 1e3:.0f} ms",
            f"{statistics.fmean(r.hops):.2f} / {max(r.hops)}" if r.hops else "-",
            f"{r.lost_twins} of {s.twins}", str(r.cut_off),
            f"{r.wall:.0f} s",
        ])
    return head, body


def markdown(results: list[Result], command: str, elapsed: float) -> str:
    from twinmesh.sim.__main__ import _md, machine  # the routing report's helpers

    config = DhtConfig()
    head, body = rows(results)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        f"Written by `{command}` on {when}; the whole run took {elapsed:.0f} s. "
        "Regenerate with "
        "`python -m twinmesh.sim.dht --out docs/SCALING.md`; edits by hand between the "
        "markers are overwritten.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine()) + ".",
        "",
        f"Core settings: k = {config.k}, alpha = {config.alpha}, value quorum = "
        f"{config.value_quorum}, query timeout {config.query_timeout:g} s. Links "
        "1-10 ms each; every NIC starts knowing only its direct neighbours.",
        "",
        _md(head, body),
        "",
        *[f"- {r.scenario.label}: violations {r.violations}, lookups ended by "
          f"lookup_timeout {r.timeouts}; peak RSS {r.rss_mib:.0f} MiB." for r in results],
    ])


def main(argv: list[str] | None = None) -> int:
    from twinmesh.sim.__main__ import _align, progress, write_section

    parser = argparse.ArgumentParser(prog="python -m twinmesh.sim.dht",
                                     description="the twin-lookup DHT at 100-1000 NICs")
    parser.add_argument("--quick", action="store_true", help="fewer twins and lookups")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help=f"rewrite the part of FILE between {BEGIN} and {END}")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = []
    try:
        for scenario in QUICK if args.quick else SCENARIOS:
            results.append(run(scenario, progress))
    except SimulationLimit as exc:
        print(f"sim.dht: a scenario went past its bounds: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    head, body = rows(results)
    print(_align(head, body))
    if args.out is not None:
        command = "python -m twinmesh.sim.dht" + (" --quick" if args.quick else "") + \
            f" --out {args.out}"
        write_section(args.out, markdown(results, command, elapsed), begin=BEGIN, end=END)
        progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
