"""Nics in one process over the in-memory network, on a virtual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import trio
import trio.testing

from twinmesh.carriers.uri import PeerUri
from twinmesh.errors import NoRouteError
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.testing.memnet import MemoryNetwork
from twinmesh.testing.nics import LINK, MeshNode, nic_mesh, wait_for


@asynccontextmanager
async def linked_pair(net: MemoryNetwork) -> AsyncIterator[tuple[MeshNode, MeshNode]]:
    """NICs a and b, b dialling a, with the link up at both ends."""
    async with nic_mesh(net, ["a", "b"]) as n:
        a, b = n["a"], n["b"]
        b.nic.add_peer(a.pinned)
        await wait_for(lambda: bool(a.up_peers() and b.up_peers()))
        yield a, b


async def test_two_nics_link_and_exchange_data(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with nic_mesh(net, ["a", "b"]) as n:
            a, b = n["a"], n["b"]
            b.nic.add_peer(a.pinned)
            await wait_for(lambda: a.up_peers() == {b.nic.key} and b.up_peers() == {a.nic.key})
            await b.nic.send(a.nic.key, b"hello a")
            await a.nic.send(b.nic.key, b"hello b")
            await wait_for(lambda: bool(a.received and b.received))
            assert a.received == [(b.nic.key, b"hello a")]
            assert b.received == [(a.nic.key, b"hello b")]
            rows = {r.direction: r for r in a.nic.peer_rows() + b.nic.peer_rows()}
            assert rows["outbound"].state == rows["inbound"].state == "up"
            assert rows["outbound"].key == a.nic.key.text
            assert rows["inbound"].key == b.nic.key.text


async def test_silent_link_is_declared_down_then_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    with trio.fail_after(60):
        async with linked_pair(net) as (a, b):
            net.partition("a", "b")
            cut = trio.current_time()
            await wait_for(lambda: not a.up_peers() and not b.up_peers())
            # The keepalive deadline is a protocol property: virtual time, deterministic.
            assert trio.current_time() - cut <= LINK.dead_after + LINK.keepalive_interval
            [row] = b.nic.peer_rows()
            assert "nothing received" in row.last_error or "nothing received" in str(
                [s.down for s in b.nic.sessions.values()]
            )
            net.heal("a", "b")
            await wait_for(lambda: bool(a.up_peers() and b.up_peers()))
            await b.nic.send(a.nic.key, b"after heal")
            await wait_for(lambda: bool(a.received))
            assert a.received[-1] == (b.nic.key, b"after heal")


async def test_broken_connection_reconnects(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    with trio.fail_after(60):
        async with linked_pair(net) as (a, b):
            first = b.nic.by_peer[a.nic.key]
            assert net.break_links("a", "b") == 1
            await wait_for(lambda: first.down is not None)
            assert "connection broken" in first.down.reason
            await wait_for(lambda: bool(b.up_peers()) and b.nic.by_peer[a.nic.key] is not first)
            assert b.nic.links_established == 2


async def test_dialer_backs_off_while_peer_is_away(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    with trio.fail_after(60):
        async with nic_mesh(net, ["b"]) as n:
            b = n["b"]
            b.nic.add_peer(PeerUri.parse("memory://nobody"))
            await wait_for(lambda: b.nic.dialers["memory://nobody"].failures >= 4)
            [row] = b.nic.peer_rows()
            assert row.state in ("backoff", "connecting")
            assert "dial failed" in row.last_error
            # Four failures at 0.5, 1, 2, 4 s (cap 4 s, jitter 10 %): not a tight loop.
            assert trio.current_time() >= 0.45 + 0.9 + 1.8


async def test_both_sides_dialling_keep_exactly_one_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    with trio.fail_after(60):
        async with nic_mesh(net, ["a", "b"]) as n:
            a, b = n["a"], n["b"]
            a.nic.add_peer(b.pinned)
            b.nic.add_peer(a.pinned)
            await wait_for(lambda: bool(a.up_peers() and b.up_peers()))
            await trio.sleep(10)  # long enough for any duplicate to have been dropped
            live_a = [s for s in a.nic.sessions.values() if s.is_up]
            live_b = [s for s in b.nic.sessions.values() if s.is_up]
            assert len(live_a) == len(live_b) == 1
            # Both ends agree on which link survived: the one the smaller key initiated.
            smaller = min(a.nic.key, b.nic.key)
            initiator = a if smaller == a.nic.key else b
            assert initiator.nic.by_peer[max(a.nic.key, b.nic.key)].direction == "outbound"
            states = sorted(r.state for r in a.nic.peer_rows() + b.nic.peer_rows())
            assert states.count("up") == 2 and "standby" in states


async def test_wrong_pinned_key_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with nic_mesh(net, ["a", "b"]) as n:
            a, b = n["a"], n["b"]
            impostor = Identity.generate().public
            b.nic.add_peer(replace(a.uri, key=impostor))
            await wait_for(lambda: b.nic.handshake_failures["refused"] >= 1)
            [row] = b.nic.peer_rows()
            assert impostor.text in row.last_error and a.nic.key.text in row.last_error
            assert not b.up_peers() and not a.up_peers()


async def test_allow_list_refuses_unknown_keys(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with nic_mesh(net, ["a", "b"], allow=frozenset({Identity.generate().public})) as n:
            a, b = n["a"], n["b"]
            b.nic.add_peer(a.uri)
            await wait_for(lambda: a.nic.handshake_failures["refused"] >= 1)
            await wait_for(lambda: "refused by peer" in b.nic.peer_rows()[0].last_error)
            assert "allow-list" in b.nic.peer_rows()[0].last_error
            assert not a.up_peers()


async def test_link_limit_refuses_extra_inbound(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with nic_mesh(net, ["a", "b", "c"], max_links=1) as n:
            a, b, c = n["a"], n["b"], n["c"]
            b.nic.add_peer(a.uri)
            await wait_for(lambda: bool(a.up_peers()))
            c.nic.add_peer(a.uri)
            await wait_for(lambda: a.nic.handshake_failures["link-limit"] >= 1)
            assert a.up_peers() == {b.nic.key}


async def test_remove_peer_by_key_and_by_uri(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with nic_mesh(net, ["a", "b", "c"]) as n:
            a, b, c = n["a"], n["b"], n["c"]
            b.nic.add_peer(a.pinned)
            b.nic.add_peer(c.uri)
            assert b.nic.add_peer(c.uri) is False  # already configured
            await wait_for(lambda: len(b.up_peers()) == 2)
            assert b.nic.remove_peer(a.nic.key.text) >= 1
            assert b.nic.remove_peer("memory://c") == 1
            await wait_for(lambda: not b.up_peers())
            await trio.sleep(5)  # no dialer brings them back
            assert not b.up_peers() and not b.nic.dialers
            assert b.nic.remove_peer("memory://c") == 0
            with pytest.raises(NoRouteError):
                await b.nic.send(a.nic.key, b"gone")


async def test_metrics_count_links_and_traffic(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with nic_mesh(net, ["a", "b"]) as n:
            a, b = n["a"], n["b"]
            b.nic.add_peer(a.pinned)
            await wait_for(lambda: bool(a.up_peers()))
            for _ in range(10):
                await b.nic.send(a.nic.key, b"x" * 1000)
            await wait_for(lambda: len(a.received) == 10)
            metrics = {m.name: m for m in a.nic.metrics()}
            assert metrics["twinmesh_links_up"].samples == [({}, 1.0)]
            frames = dict((labels["direction"], v) for labels, v in
                          metrics["twinmesh_link_bytes_total"].samples)
            assert frames["in"] > 10_000
            assert a.nic.healthy()


async def test_send_nowait_delivers_or_says_no_route(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with linked_pair(net) as (a, b):
            with pytest.raises(NoRouteError):
                b.nic.send_nowait(Identity.generate().public, b"nowhere")
            assert b.nic.send_nowait(a.nic.key, b"at once")
            await wait_for(lambda: bool(a.received))
            await trio.sleep(1)
            assert a.received == [(b.nic.key, b"at once")]


def internal_errors(node: MeshNode, where: str) -> float:
    [family] = [m for m in node.nic.metrics() if m.name == "twinmesh_internal_errors_total"]
    return dict((labels["where"], value) for labels, value in family.samples)[where]


@pytest.mark.parametrize("failing", ["dialling", "listening"])
async def test_a_bug_handling_one_packet_drops_only_that_packet(
    autojump_clock: trio.testing.MockClock, failing: str,
) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with nic_mesh(net, ["a", "b"]) as n:
            a, b = n["a"], n["b"]
            b.nic.add_peer(a.pinned)  # b dials, a listens
            await wait_for(lambda: bool(a.up_peers() and b.up_peers()))
            victim, sender = (b, a) if failing == "dialling" else (a, b)
            link = victim.nic.by_peer[sender.nic.key]

            def on_packet(source: PublicKey, data: bytes, hops: int) -> None:
                if data == b"boom":
                    raise ValueError("a bug in a packet handler")
                victim.received.append((source, data))

            victim.nic.overlay.on_packet = on_packet
            await sender.nic.send(victim.nic.key, b"boom")
            await sender.nic.send(victim.nic.key, b"after")
            await wait_for(lambda: bool(victim.received))
            assert victim.received == [(sender.nic.key, b"after")]
            assert victim.nic.by_peer[sender.nic.key] is link and link.is_up
            assert internal_errors(victim, "link_packet") == 1
            assert internal_errors(sender, "link_packet") == 0


async def test_a_bug_in_a_routing_timer_step_is_contained(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with linked_pair(net) as (a, b):
            router = b.nic.overlay.router
            assert router is not None
            handle_timer = router.handle_timer
            failures = [RuntimeError("a bug in a timer step")]

            def failing(now: float) -> Any:
                if failures:
                    raise failures.pop()
                return handle_timer(now)

            monkeypatch.setattr(router, "handle_timer", failing)
            await wait_for(lambda: internal_errors(b, "overlay_timer") == 1)
            await b.nic.send(a.nic.key, b"still routing")
            await wait_for(lambda: bool(a.received))
            assert a.received == [(b.nic.key, b"still routing")]


async def test_a_bug_in_a_link_core_ends_only_that_link(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with linked_pair(net) as (a, b):
            first = b.nic.by_peer[a.nic.key]

            def broken(data: bytes, now: float) -> Any:
                raise AssertionError("a bug in the link core")

            monkeypatch.setattr(first.core, "receive_data", broken)
            await a.nic.send(b.nic.key, b"lost with the link")
            await wait_for(lambda: first.down is not None)
            assert first.down is not None and "internal error" in first.down.reason
            assert internal_errors(b, "link_core") == 1
            await wait_for(lambda: b.up_peers() == {a.nic.key}
                           and b.nic.by_peer[a.nic.key] is not first)
            await a.nic.send(b.nic.key, b"on the next link")
            await wait_for(lambda: bool(b.received))
            assert b.received == [(a.nic.key, b"on the next link")]
