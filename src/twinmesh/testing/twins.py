"""Twins in one process: real `Twin` objects attached to in-process NICs.

    async with twin_mesh(tmp_path, nics=3) as mesh:        # NICs a <- b <- c, a twin on each
        alice, carol = mesh.twins[0], mesh.twins[2]
        await alice.send_text(carol.key.text, "hi", wait=True)

The NICs are those of `twinmesh.testing.bus.bus_line` (real TwinPorts on real Unix
sockets, links over the in-memory network); each twin has its own state dir
`tmp_path/twin-<i>` and attaches over its NIC's `twins.sock` exactly as twind does.
The block is entered once every twin is attached and every NIC can locate every
twin, so tests start from a settled mesh.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from twinmesh.identity.keys import Identity
from twinmesh.testing.bus import BusNic, bus_line
from twinmesh.testing.memnet import MemoryNetwork
from twinmesh.testing.nics import wait_for
from twinmesh.twin.service import Twin

SETTLE_TIMEOUT = 20.0


@dataclass
class TwinMesh:
    nics: list[BusNic]
    twins: list[Twin]
    net: MemoryNetwork
    nursery: trio.Nursery

    async def start_twin(self, state_dir: Path, nics: list[BusNic],
                         identity: Identity | None = None) -> Twin:
        """Start another twin (attached to the first of `nics`, the others are its
        fallbacks) in the mesh's nursery; returns once it is attached."""
        state_dir.mkdir(mode=0o700, exist_ok=True)
        twin = Twin(identity or Identity.generate(), state_dir, [n.state_dir for n in nics])
        await self.nursery.start(twin.run)
        with trio.fail_after(SETTLE_TIMEOUT):
            await twin.wait_attached()
        return twin


@asynccontextmanager
async def twin_mesh(
    tmp_path: Path, *, nics: int = 2, net: MemoryNetwork | None = None
) -> AsyncIterator[TwinMesh]:
    names = [chr(ord("a") + i) for i in range(nics)]
    net = net if net is not None else MemoryNetwork()
    async with bus_line(tmp_path, names, net=net) as line, trio.open_nursery() as nursery:
        mesh = TwinMesh([line[name] for name in names], [], net, nursery)
        for i, node in enumerate(mesh.nics):
            mesh.twins.append(await mesh.start_twin(tmp_path / f"twin-{i}", [node]))
        with trio.fail_after(SETTLE_TIMEOUT):
            await wait_for(lambda: all(node.located(twin.key) is not None
                                       for node in mesh.nics for twin in mesh.twins),
                           step=0.01)
        yield mesh
        nursery.cancel_scope.cancel()
