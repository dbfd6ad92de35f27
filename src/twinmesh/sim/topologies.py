"""Seeded graph generators for the simulator and the property tests.

Every generator takes the node count `n` (nodes are `0 .. n-1`) and, when it is random,
a `seed`; it returns an edge list `[(a, b), ...]` with `a < b`, sorted, without
duplicates or self-loops. The same arguments always give the same graph. All of them
return connected graphs for `n >= 1` (a single node has no edges).

- `line`: a path 0-1-...-(n-1); diameter n-1, the slowest to converge.
- `ring`: a line closed into a cycle: every node has two disjoint routes.
- `grid`: a near-square grid filled row by row.
- `random_geometric`: points in the unit square joined when closer than a radius;
  components are joined by their closest pair of points (the fix-up), so the result is
  connected and still local, like a physical mesh.
- `scale_free`: Barabási-Albert preferential attachment: a few hubs, small diameter,
  like an overlay where some NICs are well-known servers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

Edge = tuple[int, int]


def _normalize(edges: Iterable[Edge]) -> list[Edge]:
    return sorted({(min(a, b), max(a, b)) for a, b in edges if a != b})


def line(n: int, seed: int = 0) -> list[Edge]:
    return [(i, i + 1) for i in range(n - 1)]


def ring(n: int, seed: int = 0) -> list[Edge]:
    if n < 3:
        return line(n)
    return _normalize([*line(n), (0, n - 1)])


def grid(n: int, seed: int = 0) -> list[Edge]:
    width = max(1, math.ceil(math.sqrt(n)))
    edges = []
    for i in range(n):
        if (i + 1) % width and i + 1 < n:
            edges.append((i, i + 1))
        if i + width < n:
            edges.append((i, i + width))
    return edges


def random_geometric(n: int, seed: int = 0, degree: float = 8.0) -> list[Edge]:
    """`n` random points; edges between points closer than the radius that gives a mean
    degree of about `degree`; then components are joined by their closest pairs."""
    rng = random.Random(f"geometric:{seed}:{n}")
    points = [(rng.random(), rng.random()) for _ in range(n)]
    if n < 2:
        return []
    radius = min(math.sqrt(2.0), math.sqrt(degree / (math.pi * (n - 1))))
    # Bucket the points in cells of side `radius`: only neighbouring cells can hold
    # points within reach, so building the graph is O(n * degree), not O(n^2).
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(points):
        cells.setdefault((int(x / radius), int(y / radius)), []).append(i)
    edges: list[Edge] = []
    r2 = radius * radius
    for (cx, cy), members in cells.items():
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for j in cells.get((cx + dx, cy + dy), ()):
                    for i in members:
                        if i < j and _dist2(points[i], points[j]) <= r2:
                            edges.append((i, j))
    return _connect(n, edges, lambda a, b: _dist2(points[a], points[b]))


def scale_free(n: int, seed: int = 0, m: int = 2) -> list[Edge]:
    """Barabási-Albert: start from a clique of m+1 nodes; each new node links to `m`
    distinct existing nodes chosen with probability proportional to their degree."""
    rng = random.Random(f"scale-free:{seed}:{n}")
    core = min(n, m + 1)
    edges = [(a, b) for a in range(core) for b in range(a + 1, core)]
    # Every edge end once in this list: drawing from it is drawing by degree.
    ends = [x for edge in edges for x in edge]
    for new in range(core, n):
        targets: set[int] = set()
        while len(targets) < m:
            targets.add(rng.choice(ends))
        for t in sorted(targets):
            edges.append((t, new))
            ends.extend((t, new))
    return _normalize(edges)


GENERATORS: dict[str, Callable[[int, int], list[Edge]]] = {
    "line": line,
    "ring": ring,
    "grid": grid,
    "random-geometric": random_geometric,
    "scale-free": scale_free,
}


def components(n: int, edges: Iterable[Edge]) -> list[set[int]]:
    """The connected components, largest first (ties: smallest member first)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, set[int]] = {}
    for x in range(n):
        groups.setdefault(find(x), set()).add(x)
    return sorted(groups.values(), key=lambda c: (-len(c), min(c)))


def diameter_estimate(n: int, edges: Iterable[Edge], samples: int = 8, seed: int = 0) -> int:
    """The largest eccentricity of a few sampled nodes (a lower bound of the diameter,
    usually exact on these graphs): breadth-first searches, O(samples * edges)."""
    adjacency: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        adjacency[a].append(b)
        adjacency[b].append(a)
    rng = random.Random(seed)
    start_nodes = rng.sample(range(n), min(n, samples)) if n else []
    best = 0
    for start in start_nodes:
        # Two sweeps: the farthest node from a sample is a good start for the second.
        for _ in range(2):
            depth = {start: 0}
            frontier = [start]
            while frontier:
                nxt = []
                for x in frontier:
                    for y in adjacency[x]:
                        if y not in depth:
                            depth[y] = depth[x] + 1
                            nxt.append(y)
                frontier = nxt
            far, dist = max(depth.items(), key=lambda kv: kv[1])
            best = max(best, dist)
            start = far
    return best


def _dist2(p: tuple[float, float], q: tuple[float, float]) -> float:
    return (p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2


def _connect(n: int, edges: list[Edge], distance: Callable[[int, int], float]) -> list[Edge]:
    """Join the components with their closest pairs until one is left (deterministic:
    always the smallest component to its nearest node outside it)."""
    edges = _normalize(edges)
    while True:
        parts = components(n, edges)
        if len(parts) == 1:
            return edges
        small = parts[-1]
        outside = [x for x in range(n) if x not in small]
        a, b = min(((a, b) for a in sorted(small) for b in outside),
                   key=lambda ab: distance(*ab))
        edges = _normalize([*edges, (a, b)])
