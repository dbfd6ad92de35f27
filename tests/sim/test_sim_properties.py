"""Properties of the routing core, checked on simulated networks of 2-50 nodes.

Hypothesis draws the topology, its size and seed, per-link latencies, which links to
cut (cuts that partition the network included) and how long the ends take to notice.
The claims, in the order the design makes them:

- after convergence every node reaches every other, on a shortest path;
- after cuts, every node reaches every node of its connected component again, within
  the detection delay plus a few seconds (one seqno-request retry);
- there is never a forwarding loop: not after convergence, and not at any instant in
  between, since loop freedom at every instant is what the feasibility condition buys.
  The loop check runs after every single event (delivery, timer, detection).
"""

from __future__ import annotations

import collections
import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from twinmesh.proto.router import PongReceived, Unreachable
from twinmesh.sim import topologies
from twinmesh.sim.network import Network

TOPOLOGIES = sorted(topologies.GENERATORS)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
RETRY = 6.0  # request_hold plus a sweep, with room: the repair bound asserted below


def bfs(network: Network, source: int) -> dict[int, int]:
    depth = {source: 0}
    frontier = collections.deque([source])
    while frontier:
        x = frontier.popleft()
        for y in network.neighbors[x]:
            if y not in depth:
                depth[y] = depth[x] + 1
                frontier.append(y)
    return depth


def assert_reaches_within_components(network: Network) -> None:
    for part in topologies.components(network.size, network.links):
        for a in part:
            for b in part:
                if a != b:
                    walk = network.walk(a, b)
                    assert walk.reached, (a, b, walk, network.now)


def assert_no_loop_anywhere(network: Network) -> None:
    for a in range(network.size):
        for b in range(network.size):
            if a != b:
                assert not network.walk(a, b).loop, (a, b, network.walk(a, b))


class LoopWatch:
    """An `after_event` hook: walk next-hop chains for a sample of pairs."""

    def __init__(self, network: Network, pairs: list[tuple[int, int]]) -> None:
        self.pairs = pairs
        self.checks = 0

    def __call__(self, network: Network) -> None:
        self.checks += 1
        loop = network.find_loop(self.pairs)
        assert loop is None, f"forwarding loop {loop.path} at t={network.now:.4f}"


@settings(max_examples=60, **SETTINGS)  # type: ignore[arg-type]
@given(
    topology=st.sampled_from(TOPOLOGIES),
    size=st.integers(2, 50),
    seed=st.integers(0, 2**16),
)
@example(topology="random-geometric", size=50, seed=1)
@example(topology="line", size=50, seed=0)
def test_after_convergence_every_node_reaches_every_other_on_a_shortest_path(
    topology: str, size: int, seed: int
) -> None:
    network = Network.from_topology(topology, size, seed=seed, latency=(0.001, 0.005))
    converged = network.run_until_quiet(15.0)
    assert converged < 5.0
    assert network.missing_routes() == 0
    for a in range(size):
        depth = bfs(network, a)
        for b in range(size):
            if a != b:
                walk = network.walk(b, a)
                assert walk.reached, (b, a, walk)
                assert len(walk.path) - 1 == depth[b], (b, a, walk.path, depth[b])
    assert not network.stats.violations
    assert network.stats.lost == 0


@settings(max_examples=60, **SETTINGS)  # type: ignore[arg-type]
@given(
    topology=st.sampled_from(TOPOLOGIES),
    size=st.integers(2, 50),
    seed=st.integers(0, 2**16),
    cuts=st.integers(1, 6),
    detection=st.sampled_from([0.0, 0.0, 0.3, 2.0]),
    heal=st.booleans(),
)
@example(topology="scale-free", size=50, seed=3, cuts=6, detection=2.0, heal=True)
@example(topology="ring", size=50, seed=2, cuts=2, detection=0.0, heal=False)
def test_after_random_cuts_every_node_reaches_its_component(
    topology: str, size: int, seed: int, cuts: int, detection: float, heal: bool
) -> None:
    network = Network.from_topology(topology, size, seed=seed, latency=(0.001, 0.005),
                                    detection_delay=detection)
    network.run_until_quiet(15.0)
    rng = random.Random(seed)
    links = network.links
    if not links:
        return
    cut = rng.sample(links, min(len(links), cuts))
    for a, b in cut:
        network.cut(a, b)
    network.run_until(network.now + detection + RETRY)
    network.run_until_quiet(network.now + 15.0)
    assert_reaches_within_components(network)
    assert_no_loop_anywhere(network)
    # Across a partition: an answer, not silence.
    parts = topologies.components(size, network.links)
    if len(parts) > 1:
        a, b = min(parts[0]), min(parts[1])
        network.ping(a, b, 1)
        network.run_until(network.now + 1.0)
        assert any(isinstance(o, Unreachable) for _, o in network.outputs[a])
    if heal:
        for a, b in cut:
            network.link_up(a, b)
        network.run_until(network.now + RETRY)
        network.run_until_quiet(network.now + 15.0)
        assert network.missing_routes() == 0
        assert_reaches_within_components(network)
        a, b = rng.randrange(size), rng.randrange(size)
        network.ping(a, b, 2)
        network.run_until(network.now + 1.0)
        assert any(isinstance(o, PongReceived) and o.ping_id == 2 for _, o in network.outputs[a])
    assert not network.stats.violations


@settings(max_examples=45, **SETTINGS)  # type: ignore[arg-type]
@given(
    topology=st.sampled_from(TOPOLOGIES),
    size=st.integers(3, 20),
    seed=st.integers(0, 2**16),
    rounds=st.lists(
        st.tuples(st.integers(1, 3), st.sampled_from([0.0, 0.0, 0.5, 1.5]), st.booleans()),
        min_size=1, max_size=3,
    ),
)
def test_no_forwarding_loop_after_any_single_event(
    topology: str, size: int, seed: int, rounds: list[tuple[int, float, bool]]
) -> None:
    network = Network.from_topology(topology, size, seed=seed, latency=(0.001, 0.01))
    pairs = [(a, b) for a in range(size) for b in range(size) if a != b]
    watch = LoopWatch(network, pairs)
    network.run_until_quiet(15.0, after_event=watch)
    rng = random.Random(seed)
    for cuts, detection, heal in rounds:
        links = network.links
        if not links:
            break
        cut = rng.sample(links, min(len(links), cuts))
        for a, b in cut:
            network.cut(a, b, detection_delay=detection)
        network.run_until(network.now + detection + RETRY, after_event=watch)
        assert_reaches_within_components(network)
        if heal:
            for a, b in cut:
                network.link_up(a, b)
            network.run_until(network.now + RETRY, after_event=watch)
            assert_reaches_within_components(network)
    # Through the periodic full dumps and re-announcements too.
    network.run_until(network.now + rng.choice([0.0, 25.0, 65.0]), after_event=watch)
    assert watch.checks > 0
    assert not network.stats.violations


def test_the_loop_check_bites() -> None:
    # The property above is only worth something if a loop would be seen: make one by
    # hand (two routers pointing at each other after a cut, as they would without the
    # feasibility condition) and check that the walk reports it.
    network = Network.from_topology("line", 3, seed=0)
    network.run_until_quiet(5.0)

    class Stuck:
        def __init__(self, to: object) -> None:
            self.to = to

        def next_hop(self, destination: object) -> object:
            return self.to

    real = network.routers[0], network.routers[1]
    network.routers[0] = Stuck(network.keys[1])
    network.routers[1] = Stuck(network.keys[0])
    try:
        walk = network.walk(0, 2)
        assert walk.loop and walk.path == [0, 1, 0]
    finally:
        network.routers[0], network.routers[1] = real
