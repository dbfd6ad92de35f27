"""The scaling scenarios behind docs/SCALING.md, and how each figure is measured.

One scenario = one seeded graph, one `Network`, measured in this order:

1. *Convergence*: all links come up at t=0; `run_until_quiet` returns the time the
   last routing message arrived before 0.5 s without any. Then every node must have
   a route to every announcing destination (`missing_routes() == 0`).
2. *Steady state*: `steady` virtual seconds right after that (60 s = one whole period:
   three full dumps and one re-announcement per origin, 20 s and 60 s apart). Control
   bytes each node sent, per minute; routes each node holds.
3. *Repair*, once per detection delay (0 = the socket closes at once; then the link
   keepalive's `dead_after`, the worst case for a silent cut):
   cut the link that is busiest at that moment and not a bridge (the one most
   (source, destination) paths cross), then step the clock by 1 ms and walk every
   affected pair's path until all reach again: the repair time. Alongside, up to 20
   affected pairs (whose source is a destination too, so the pong can come back) ping
   every 10 ms; "traffic" is when the first ping after the last failed one was sent,
   for the slowest pair. Then the link comes back and the network settles before the
   next cut.

Every loop is bounded: virtual limits on each phase, and the network's own event and
wall-clock limits (`Network.max_events`, `Network.wall_limit`).
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twinmesh.proto.link import LinkConfig
from twinmesh.proto.router import Output, PongReceived
from twinmesh.sim import topologies
from twinmesh.sim.network import Network

PING_EVERY = 0.01
PING_PAIRS = 20
STEP = 0.001
REPAIR_LIMIT = 15.0  # past the detection delay
# A silent cut is noticed when the link has heard nothing for `dead_after`: at worst
# that long after the cut (at best one keepalive interval less).
KEEPALIVE_DETECTION = LinkConfig().dead_after


@dataclass(frozen=True)
class Scenario:
    topology: str
    size: int
    origins: int | None  # announcing destinations; None: every node
    steady: float  # virtual seconds of steady state measured
    seed: int = 1
    detections: tuple[float, ...] = (0.0, KEEPALIVE_DETECTION)
    wall_limit: float = 900.0  # real seconds; a loaded machine needs more than ~300

    @property
    def label(self) -> str:
        origins = "all" if self.origins is None else str(self.origins)
        return f"{self.size} NICs, {self.topology}, {origins} announcing"


SCENARIOS = (
    Scenario("random-geometric", 100, None, steady=120.0),
    Scenario("scale-free", 1000, None, steady=60.0),
    Scenario("scale-free", 10_000, 30, steady=60.0),
)
QUICK = (
    Scenario("random-geometric", 100, None, steady=60.0),
    Scenario("scale-free", 1000, 50, steady=60.0),
    Scenario("scale-free", 10_000, 10, steady=60.0),
)


@dataclass
class Repair:
    detection: float
    link: tuple[int, int]
    link_degrees: tuple[int, int]
    affected_pairs: int
    repaired: float | None  # virtual seconds from the cut until every affected pair reaches
    traffic: float | None  # the same, seen by pings (the slowest sampled pair)
    pinged_pairs: int
    resigned: int  # origins that signed a new seqno during the repair


@dataclass
class Result:
    scenario: Scenario
    links: int = 0
    mean_degree: float = 0.0
    max_degree: int = 0
    diameter: int = 0
    destinations: int = 0
    keygen_seconds: float = 0.0
    setup_seconds: float = 0.0
    converged: float = 0.0
    converge_wall: float = 0.0
    converge_events: int = 0
    missing_routes: int = 0
    routes_mean: float = 0.0
    routes_max: int = 0
    table_mean: float = 0.0
    bytes_per_min_mean: float = 0.0
    bytes_per_min_median: float = 0.0
    bytes_per_min_max: float = 0.0
    messages_per_min_mean: float = 0.0
    steady_wall: float = 0.0
    repairs: list[Repair] = field(default_factory=list)
    violations: int = 0
    lost: int = 0
    relay_refusals: int = 0
    events: int = 0
    wall: float = 0.0
    rss_mib: float = 0.0

    @property
    def bytes_per_destination_per_link(self) -> float:
        """Bytes per minute a NIC sends per destination and per neighbour: the constant of
        the cost model (bytes/min/NIC = this x destinations x degree)."""
        return self.bytes_per_min_mean / max(1, self.destinations) / max(1e-9, self.mean_degree)


Progress = Callable[[str], None]


def run(scenario: Scenario, progress: Progress) -> Result:
    started = time.perf_counter()
    result = Result(scenario)
    edges = topologies.GENERATORS[scenario.topology](scenario.size, scenario.seed)
    degree = Counter(x for edge in edges for x in edge)
    result.links = len(edges)
    result.mean_degree = 2 * len(edges) / scenario.size
    result.max_degree = max(degree.values(), default=0)
    result.diameter = topologies.diameter_estimate(scenario.size, edges, seed=scenario.seed)
    rng = random.Random(f"scenario:{scenario.seed}")
    origins = None
    if scenario.origins is not None:
        origins = sorted(rng.sample(range(scenario.size), scenario.origins))
    network = Network(scenario.size, edges, seed=scenario.seed, origins=origins,
                      wall_limit=scenario.wall_limit)
    result.destinations = len(network.origins)
    result.keygen_seconds = network.keygen_seconds
    result.setup_seconds = time.perf_counter() - started
    progress(f"{scenario.label}: {result.links} links, degree {result.mean_degree:.1f} mean / "
             f"{result.max_degree} max, diameter ~{result.diameter}; set up in "
             f"{result.setup_seconds:.1f} s (keys {result.keygen_seconds:.2f} s)")

    # 1. Convergence.
    mark = time.perf_counter()
    result.converged = network.run_until_quiet(120.0)
    result.converge_wall = time.perf_counter() - mark
    result.converge_events = network.stats.events
    result.missing_routes = network.missing_routes()
    progress(f"  converged at {result.converged:.3f} s virtual ({result.converge_events} events, "
             f"{result.converge_wall:.1f} s wall); routes missing: {result.missing_routes}")

    # 2. Steady state.
    mark = time.perf_counter()
    start = network.now
    sent = [c.control_bytes_sent for c in network.counters]
    messages = [c.control_messages_sent for c in network.counters]
    network.run_until(start + scenario.steady)
    per_min = 60.0 / scenario.steady
    rates = [(c.control_bytes_sent - s) * per_min for c, s in zip(network.counters, sent,
                                                                  strict=True)]
    result.bytes_per_min_mean = statistics.fmean(rates)
    result.bytes_per_min_median = statistics.median(rates)
    result.bytes_per_min_max = max(rates)
    result.messages_per_min_mean = statistics.fmean(
        (c.control_messages_sent - m) * per_min
        for c, m in zip(network.counters, messages, strict=True))
    routes = network.route_counts()
    result.routes_mean = statistics.fmean(routes)
    result.routes_max = max(routes)
    result.table_mean = statistics.fmean(r.table_size() for r in network.routers)
    result.steady_wall = time.perf_counter() - mark
    progress(f"  steady {scenario.steady:.0f} s: {fmt_bytes(result.bytes_per_min_mean)}/min per "
             f"NIC (median {fmt_bytes(result.bytes_per_min_median)}, max "
             f"{fmt_bytes(result.bytes_per_min_max)}); routes {result.routes_mean:.1f} mean, "
             f"{result.routes_max} max ({result.steady_wall:.1f} s wall)")

    # 3. Repairs.
    network.run_until_quiet(network.now + 30.0)
    destinations = sorted(network.origins)
    for detection in scenario.detections:
        # The busiest link now: the previous repair and re-join moved paths around.
        link = busiest_link(network, destinations)
        if link is None:
            break
        a, b = link
        pairs = [(s, d) for d in destinations for s in sorted(network.uses_link(d, a, b))]
        mark = time.perf_counter()
        repair = measure_repair(network, link, detection, pairs, rng)
        result.repairs.append(repair)
        progress(f"  cut {a}-{b} (degrees {repair.link_degrees[0]}/{repair.link_degrees[1]}, "
                 f"{repair.affected_pairs} paths), detection {detection:g} s: repaired in "
                 f"{fmt_seconds(repair.repaired)}, pings through again after "
                 f"{fmt_traffic(repair)}; {repair.resigned} origins re-signed "
                 f"({time.perf_counter() - mark:.1f} s wall)")
        network.link_up(a, b)
        network.run_until_quiet(network.now + 30.0)
    result.violations = sum(network.stats.violations.values())
    result.lost = network.stats.lost
    result.relay_refusals = network.stats.relay_announcements_refused
    result.events = network.stats.events
    result.wall = time.perf_counter() - started
    result.rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def busiest_link(network: Network, destinations: Sequence[int]) -> tuple[int, int] | None:
    """The link that the most (source, destination) paths cross, among those whose loss
    leaves the network connected."""
    usage: Counter[tuple[int, int]] = Counter()
    n = network.size
    for d in destinations:
        key = network.keys[d]
        parent = [-1] * n
        for x in range(n):
            if x != d:
                hop = network.routers[x].next_hop(key)
                parent[x] = -1 if hop is None else network.index[hop]
        unknown, unrouted = -2, -1
        depth = [unknown] * n
        depth[d] = 0
        for x in range(n):
            chain: list[int] = []
            y = x
            while y >= 0 and depth[y] == unknown and len(chain) <= n:  # loop-free: ends
                chain.append(y)
                y = parent[y]
            base = depth[y] if y >= 0 else unrouted
            for z in reversed(chain):
                base = base + 1 if base >= 0 else unrouted
                depth[z] = base
        below = [1] * n
        for x in sorted(range(n), key=depth.__getitem__, reverse=True):
            p = parent[x]
            if depth[x] > 0 and p >= 0:
                below[p] += below[x]
                usage[(min(x, p), max(x, p))] += below[x]
    links = network.links
    for link, _ in usage.most_common():
        rest = [e for e in links if e != link]
        if len(topologies.components(n, rest)) == 1:
            return link
    return None


def measure_repair(
    network: Network, link: tuple[int, int], detection: float,
    pairs: list[tuple[int, int]], rng: random.Random,
) -> Repair:
    a, b = link
    degrees = (len(network.neighbors[a]), len(network.neighbors[b]))
    # Only sources that are destinations too: a relay cannot be answered.
    pingable = [p for p in pairs if p[0] in network.origins]
    sample = rng.sample(pingable, min(PING_PAIRS, len(pingable)))
    answered: list[set[int]] = [set() for _ in sample]
    t0 = network.now
    end = t0 + detection + REPAIR_LIMIT
    stop = end
    ticks = 0

    def on_output(node: int, now: float, output: Output) -> None:
        if isinstance(output, PongReceived):
            tick, index = divmod(output.ping_id, 1000)
            if index < len(sample) and sample[index][0] == node:
                answered[index].add(tick)

    def tick() -> None:
        nonlocal ticks
        for index, (source, destination) in enumerate(sample):
            network.ping(source, destination, ticks * 1000 + index)
        ticks += 1
        if network.now + PING_EVERY < stop:
            network.call_at(t0 + ticks * PING_EVERY, tick)

    seqnos = [r.seqno for r in network.routers]
    network.on_output = on_output
    network.call_at(t0, tick)
    network.cut(a, b, detection_delay=detection)
    repaired = None
    pointer = 0
    try:
        while network.now < end:
            network.run_until(network.now + STEP)
            while pointer < len(pairs) and network.walk(*pairs[pointer]).reached:
                pointer += 1
            if pointer == len(pairs):
                failing = next((i for i, p in enumerate(pairs) if not network.walk(*p).reached),
                               None)
                if failing is None:
                    repaired = network.now - t0
                    break
                pointer = failing
        # Let the pings show it too: half a second more of them, then their answers.
        stop = min(end, network.now + 0.5)
        network.run_until(stop + 0.5)
    finally:
        network.on_output = None
    traffic: float | None = 0.0
    for got in answered:
        failed = [k for k in range(ticks) if k not in got]
        if not failed:
            continue
        if failed[-1] >= ticks - 1:
            traffic = None
            break
        assert traffic is not None
        traffic = max(traffic, (failed[-1] + 1) * PING_EVERY)
    resigned = sum(1 for r, s in zip(network.routers, seqnos, strict=True) if r.seqno != s)
    return Repair(detection, link, degrees, len(pairs), repaired,
                  traffic if sample else None, len(sample), resigned)


# ------------------------------------------------------------------ formatting


def fmt_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def fmt_traffic(repair: Repair) -> str:
    if not repair.pinged_pairs:
        return "(no pair to ping)"
    return f"{fmt_seconds(repair.traffic)} ({repair.pinged_pairs} pairs)"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "not within the limit"
    if value < 1.0:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"
