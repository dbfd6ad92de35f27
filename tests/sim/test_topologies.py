"""Seeded graph generators: connected, canonical, reproducible."""

from __future__ import annotations

import pytest

from twinmesh.sim import topologies


@pytest.mark.parametrize("name", sorted(topologies.GENERATORS))
@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 50, 333])
def test_every_generator_gives_a_connected_canonical_graph(name: str, size: int) -> None:
    generate = topologies.GENERATORS[name]
    edges = generate(size, 5)
    assert edges == sorted(set(edges))
    assert all(0 <= a < b < size for a, b in edges)
    assert len(topologies.components(size, edges)) == 1
    assert generate(size, 5) == edges  # same seed, same graph


def test_shapes() -> None:
    assert topologies.line(4) == [(0, 1), (1, 2), (2, 3)]
    assert topologies.ring(4) == [(0, 1), (0, 3), (1, 2), (2, 3)]
    assert topologies.ring(2) == [(0, 1)]
    assert topologies.grid(6) == [(0, 1), (0, 3), (1, 2), (1, 4), (2, 5), (3, 4), (4, 5)]
    assert topologies.diameter_estimate(10, topologies.line(10)) == 9


def test_random_graphs_depend_on_the_seed_and_have_the_asked_density() -> None:
    assert topologies.random_geometric(200, 1) != topologies.random_geometric(200, 2)
    assert topologies.scale_free(200, 1) != topologies.scale_free(200, 2)
    edges = topologies.random_geometric(2000, 3, degree=8.0)
    assert 6.0 < 2 * len(edges) / 2000 < 9.0
    # Barabási-Albert with m=2: two links per new node, a few large hubs.
    edges = topologies.scale_free(2000, 3)
    assert len(edges) == 3 + 2 * (2000 - 3)
    degrees = [0] * 2000
    for a, b in edges:
        degrees[a] += 1
        degrees[b] += 1
    assert max(degrees) > 40 and min(degrees) == 2


def test_components_lists_largest_first() -> None:
    parts = topologies.components(6, [(0, 1), (2, 3), (3, 4)])
    assert parts == [{2, 3, 4}, {0, 1}, {5}]
