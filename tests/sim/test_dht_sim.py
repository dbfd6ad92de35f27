"""The DHT simulator at small sizes: lookups find the newest record, replays are exact,
rounds stay far below the NIC count, dead NICs cost success only when every replica
of a twin is gone."""

from __future__ import annotations

import math

import pytest

from twinmesh.identity.keys import Identity
from twinmesh.proto.attach import Location
from twinmesh.sim import topologies
from twinmesh.sim.dht import WALL, DhtNetwork, Scenario, markdown, rows, run


@pytest.mark.parametrize("topology", ["line", "random-geometric", "scale-free"])
def test_every_lookup_finds_the_newest_record_without_dead_nics(topology: str) -> None:
    result = run(Scenario(60, 0.0, twins=10, lookups=40, topology=topology))
    assert len(result.rounds) == 40
    assert result.found == 40 and result.stale == 0
    assert result.violations == 0
    # Rounds grow like log N, not like N (or the diameter, for the line).
    assert max(result.rounds) <= 2 * math.ceil(math.log2(60))


def test_a_seed_replays_exactly() -> None:
    one = run(Scenario(50, 0.2, twins=8, lookups=30, seed=3))
    two = run(Scenario(50, 0.2, twins=8, lookups=30, seed=3))
    assert (one.rounds, one.queried, one.latency, one.found) == \
        (two.rounds, two.queried, two.latency, two.found)


@pytest.mark.parametrize("seed", [2, 5])
def test_dead_nics_fail_only_lookups_with_no_live_replica_in_reach(seed: int) -> None:
    result = run(Scenario(80, 0.3, twins=20, lookups=80, seed=seed))
    assert len(result.rounds) == 80
    assert result.stale == 0
    assert result.found == 80 - result.cut_off


def test_messages_to_dead_nics_are_lost_and_paths_go_round_them() -> None:
    net = DhtNetwork(5, topologies.ring(5, 0), seed=1)
    net.bootstrap()
    net.run_until_quiet(30.0)
    hops, _ = net.paths_from(0)
    assert hops == [0, 1, 2, 2, 1]
    net.kill([1])
    hops, _ = net.paths_from(0)
    assert hops == [0, -1, 3, 2, 1]
    twin = Identity.generate()
    assert net.publish(0, Location.sign(twin, net.keys[0], 1, WALL + 3600)) == ""
    net.run_until_quiet(net.now + 30.0)
    assert net.lost > 0  # the store (and queries) sent to NIC 1
    assert twin.public not in net.cores[1].records


def test_the_report_has_a_row_per_scenario() -> None:
    results = [run(Scenario(30, 0.0, twins=4, lookups=10))]
    head, body = rows(results)
    assert len(body) == 1 and len(body[0]) == len(head)
    text = markdown(results, "python -m twinmesh.sim.dht", 1.0)
    assert "| 30 | 0% |" in text
