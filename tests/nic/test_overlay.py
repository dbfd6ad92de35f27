"""Multi-hop overlay between Nics in one process: routes, packets, ping, repair."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from twinmesh.errors import NoRouteError
from twinmesh.identity.keys import Identity
from twinmesh.nic.health import render_prometheus
from twinmesh.testing.memnet import MemoryNetwork
from twinmesh.testing.nics import MeshNode, nic_mesh, wait_for


def line(nodes: dict[str, MeshNode], names: list[str]) -> None:
    for left, right in itertools.pairwise(names):
        nodes[right].nic.add_peer(nodes[left].pinned)


async def test_packets_and_pings_cross_a_line_of_four(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(latency=0.001)
    with trio.fail_after(60):
        async with nic_mesh(net, ["a", "b", "c", "d"]) as n:
            line(n, ["a", "b", "c", "d"])
            a, d = n["a"], n["d"]
            await wait_for(lambda: a.nic.overlay.lookup(d.nic.key) is not None)
            route = a.nic.overlay.lookup(d.nic.key)
            assert route is not None and route.metric == 3
            assert route.next_hop == n["b"].nic.key
            await a.nic.send(d.nic.key, b"across three links")
            await wait_for(lambda: bool(d.received))
            assert d.received == [(a.nic.key, b"across three links")]
            reply = await a.nic.ping(d.nic.key)
            assert reply.error == "" and reply.hops == 3
            # Three links each way at 1 ms of virtual latency.
            assert reply.rtt is not None and 0.006 <= reply.rtt < 0.05


async def test_ping_to_an_unknown_key_is_answered_not_silent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    with trio.fail_after(60):
        async with nic_mesh(net, ["a", "b"]) as n:
            line(n, ["a", "b"])
            await wait_for(lambda: n["a"].nic.overlay.lookup(n["b"].nic.key) is not None)
            reply = await n["a"].nic.ping(Identity.generate().public)
            assert reply.error == "noRoute" and reply.rtt is None


async def test_traffic_moves_to_the_other_path_when_a_link_is_cut(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(latency=0.001)
    with trio.fail_after(120):
        async with nic_mesh(net, ["a", "b", "c", "d"]) as n:
            # A ring a-b-c-d-a: two paths between a and c.
            line(n, ["a", "b", "c", "d"])
            n["a"].nic.add_peer(n["d"].pinned)
            a, c = n["a"], n["c"]
            await wait_for(lambda: (r := a.nic.overlay.lookup(c.nic.key)) is not None
                           and r.metric == 2)
            first_hop = a.nic.overlay.lookup(c.nic.key).next_hop  # type: ignore[union-attr]
            via = "b" if first_hop == n["b"].nic.key else "d"
            # Silent cut (no RST): only keepalives notice.
            net.partition("a", via)
            cut_at = trio.current_time()
            while (await a.nic.ping(c.nic.key, timeout=0.5)).error:
                pass
            repaired = trio.current_time() - cut_at
            route = a.nic.overlay.lookup(c.nic.key)
            assert route is not None and route.next_hop != first_hop and route.metric == 2
            # Detection (dead_after = 2 s) plus one ping timeout: virtual, deterministic.
            assert repaired <= 2.0 + 0.5 + 0.5


async def test_a_dead_end_gets_no_route_after_the_far_side_goes_away(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    with trio.fail_after(60):
        async with nic_mesh(net, ["a", "b", "c"]) as n:
            line(n, ["a", "b", "c"])
            a, c = n["a"], n["c"]
            await wait_for(lambda: a.nic.overlay.lookup(c.nic.key) is not None)
            net.break_links("b", "c")
            n["c"].nic.remove_peer(n["b"].nic.key.text)
            await wait_for(lambda: a.nic.overlay.lookup(c.nic.key) is None)
            reply = await a.nic.ping(c.nic.key)
            assert reply.error == "noRoute"


def sent_metric(node: MeshNode) -> float:
    rows = samples(render_prometheus(node.nic.metrics()))
    return rows['twinmesh_overlay_packets_total{kind="sent"}']


def samples(text: str) -> dict[str, float]:
    return {row.rsplit(" ", 1)[0]: float(row.rsplit(" ", 1)[1])
            for row in text.splitlines() if row and not row.startswith("#")}


async def test_send_nowait_falls_back_when_the_first_link_is_full_and_counts_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    with trio.fail_after(60):
        async with nic_mesh(net, ["a", "b"], send_queue=4) as n:
            line(n, ["a", "b"])
            a, b = n["a"], n["b"]
            await wait_for(lambda: a.nic.overlay.lookup(b.nic.key) is not None)
            with pytest.raises(NoRouteError):
                a.nic.overlay.send_nowait(Identity.generate().public, b"nowhere")
            before = sent_metric(a)
            # No checkpoint in between: the link's writer cannot drain its queue.
            taken = [i for i in range(10) if a.nic.overlay.send_nowait(b.nic.key, b"p%d" % i)]
            # The queue's 4 (plus one handed to the writer waiting for it), in order.
            assert 4 <= len(taken) < 10 and taken == list(range(len(taken)))
            for i in range(len(taken), 10):  # what did not fit: the caller waits for room
                await a.nic.overlay.send(b.nic.key, b"p%d" % i)
            await wait_for(lambda: len(b.received) == 10)
            await trio.sleep(1)
            assert [data for _, data in b.received] == [b"p%d" % i for i in range(10)]
            assert sent_metric(a) - before == 10
