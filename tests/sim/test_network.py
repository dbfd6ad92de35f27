"""The discrete-event network: delivery, cuts, detection, timers, relays, bounds."""

from __future__ import annotations

import pytest

from twinmesh.proto.router import Delivered, PongReceived, RouterConfig, Unreachable
from twinmesh.sim import topologies
from twinmesh.sim.network import Network, SimulationLimit


def test_a_line_converges_and_packets_flow() -> None:
    network = Network.from_topology("line", 5, seed=1, latency=0.002)
    converged = network.run_until_quiet(10.0)
    # Four hops away, each hop one latency plus the 20 ms coalescing of updates.
    assert 0.04 < converged < 0.2
    assert network.missing_routes() == 0
    assert network.reachable(0, 4) == (True, [0, 1, 2, 3, 4])
    network.send_payload(0, 4, b"hi")
    network.ping(4, 0, 9)
    network.run_until(network.now + 1.0)
    assert [o for _, o in network.outputs[4] if isinstance(o, Delivered)] == [
        Delivered(network.keys[0], b"hi", 4)]
    (pong,) = [o for _, o in network.outputs[4] if isinstance(o, PongReceived)]
    assert pong.hops == 4 and abs(pong.rtt - 8 * 0.002) < 1e-9


def test_the_same_seed_replays_exactly() -> None:
    def run() -> tuple[float, list[int]]:
        network = Network.from_topology("random-geometric", 30, seed=4, latency=(0.001, 0.01))
        converged = network.run_until_quiet(10.0)
        return converged, [c.control_bytes_sent for c in network.counters]

    assert run() == run()


def test_what_is_in_flight_on_a_cut_link_is_lost() -> None:
    network = Network(2, [(0, 1)], latency=0.5)
    # Both ends sent their full dump at t=0; it arrives at t=0.5.
    network.run_until(0.1)
    assert network.in_flight == 2
    network.cut(0, 1)
    network.run_until(1.0)
    assert network.stats.lost == 2
    assert network.counters[0].lost == network.counters[1].lost == 1
    assert network.routers[0].neighbors == []


def test_ends_notice_a_cut_after_the_detection_delay() -> None:
    network = Network.from_topology("ring", 4, seed=0, detection_delay=1.5)
    network.run_until_quiet(5.0)
    t = network.now
    network.cut(0, 1)
    network.run_until(t + 1.4)
    # Not noticed yet: 0 still routes to 1 directly, over the dead link.
    assert network.walk(0, 1).reason == "link down"
    assert network.keys[1] in network.routers[0].neighbors
    network.run_until(t + 1.6)
    assert network.keys[1] not in network.routers[0].neighbors
    network.run_until(t + 2.0)
    assert network.reachable(0, 1) == (True, [0, 3, 2, 1])


def test_a_link_back_up_before_detection_is_handled_as_down_then_up() -> None:
    network = Network.from_topology("line", 3, seed=0, detection_delay=5.0)
    network.run_until_quiet(5.0)
    network.cut(1, 2)
    network.link_up(1, 2)
    assert network.is_up(1, 2)
    network.run_until(network.now + 10.0)  # the stale detection event does nothing
    assert network.keys[2] in network.routers[1].neighbors
    assert network.reachable(0, 2)[0]


def test_periodic_timers_run_and_cost_control_bytes() -> None:
    network = Network.from_topology("line", 3, seed=0)
    network.run_until_quiet(5.0)
    before = sum(c.control_bytes_sent for c in network.counters)
    seqnos = [r.seqno for r in network.routers]
    network.run_until(130.0)  # six full dumps and two re-announcements
    assert sum(c.control_bytes_sent for c in network.counters) > before
    assert [r.seqno for r in network.routers] == [s + 2 for s in seqnos]
    assert network.stats.timers > 0
    assert network.missing_routes() == 0


def test_relays_forward_but_are_not_destinations() -> None:
    network = Network.from_topology("line", 5, seed=0, origins=[0, 4])
    network.run_until_quiet(5.0)
    assert network.missing_routes() == 0
    assert network.reachable(0, 4)[0] and network.reachable(2, 0)[0]
    # A relay is only reachable from its direct neighbours.
    assert network.walk(0, 2).reason == "no route"
    assert network.stats.relay_announcements_refused > 0
    assert not network.stats.violations
    assert all(r.table_size() == 2 - (i in (0, 4)) for i, r in enumerate(network.routers))


def test_a_partition_answers_with_unreachable() -> None:
    network = Network.from_topology("line", 4, seed=0)
    network.run_until_quiet(5.0)
    network.cut(1, 2)
    network.run_until(network.now + 1.0)
    assert topologies.components(4, network.links) == [{0, 1}, {2, 3}]
    assert network.missing_routes() == 0  # within components
    network.ping(0, 3, 5)
    network.run_until(network.now + 1.0)
    assert [o for _, o in network.outputs[0] if isinstance(o, Unreachable)] == [
        Unreachable(network.keys[3], "noRoute", network.keys[0], 5)]


def test_uses_link_lists_the_sources_behind_a_link() -> None:
    network = Network.from_topology("line", 5, seed=0)
    network.run_until_quiet(5.0)
    assert network.uses_link(4, 1, 2) == {0, 1}
    assert network.uses_link(0, 1, 2) == {2, 3, 4}
    assert network.uses_link(0, 3, 4) == {4}


def test_runs_are_bounded() -> None:
    network = Network.from_topology("grid", 16, seed=0, max_events=100)
    with pytest.raises(SimulationLimit):
        network.run_until(10.0)


def test_scheduled_calls_run_at_their_time() -> None:
    network = Network(1, config=RouterConfig())
    seen: list[float] = []
    network.call_at(2.5, lambda: seen.append(network.now))
    network.run_until(3.0)
    assert seen == [2.5]
    with pytest.raises(ValueError, match="no link"):
        network.cut(0, 0)
