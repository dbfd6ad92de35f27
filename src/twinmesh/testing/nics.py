"""Meshes of in-process Nics over the in-memory network, for tests and benchmarks.

    async with nic_mesh(MemoryNetwork(), ["a", "b", "c"]) as nodes:
        nodes["b"].nic.add_peer(nodes["a"].pinned)
        await wait_for(lambda: nodes["a"].up_peers())

Run under `trio.testing.MockClock(autojump_threshold=0)` to make time-based
behaviour (keepalives, backoff, repair) instant and deterministic.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from twinmesh.carriers.uri import PeerUri
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.nic.config import NicConfig, ReconnectConfig
from twinmesh.nic.node import Nic
from twinmesh.proto.link import LinkConfig
from twinmesh.testing.memnet import MemoryNetwork

LINK = LinkConfig(keepalive_interval=0.5, dead_after=2.0, handshake_timeout=3.0)
RECONNECT = ReconnectConfig(initial=0.5, max=4.0, jitter=0.1)


class MeshNode:
    def __init__(self, name: str, nic: Nic) -> None:
        self.name = name
        self.nic = nic
        self.received: list[tuple[PublicKey, bytes]] = []
        nic.overlay.on_packet = lambda peer, data, hops: self.received.append((peer, data))

    @property
    def uri(self) -> PeerUri:
        return PeerUri("memory", self.name, 0)

    @property
    def pinned(self) -> PeerUri:
        return replace(self.uri, key=self.nic.key)

    def up_peers(self) -> set[PublicKey]:
        return {peer for peer, s in self.nic.by_peer.items() if s.is_up}


@asynccontextmanager
async def nic_mesh(
    net: MemoryNetwork, names: list[str], **overrides: Any
) -> AsyncIterator[dict[str, MeshNode]]:
    nodes: dict[str, MeshNode] = {}
    async with trio.open_nursery() as nursery:
        for name in names:
            config = NicConfig(
                state_dir=Path("/nonexistent"),
                listen=(PeerUri("memory", name, 0),),
                link=LINK,
                reconnect=RECONNECT,
                **overrides,
            )
            nic = Nic(
                Identity.generate(), config, {"memory": net.carrier(name)}, rng=random.Random(1)
            )
            await nursery.start(nic.run)
            nodes[name] = MeshNode(name, nic)
        yield nodes
        nursery.cancel_scope.cancel()


async def wait_for(predicate: Callable[[], bool], step: float = 0.05) -> None:
    """Poll `predicate` (cheap under MockClock; the caller bounds it with fail_after)."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(step)
