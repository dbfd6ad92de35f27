"""The message bus in one process: NICs with their twin ports over the in-memory network.

    async with bus_line(tmp_path, ["a", "b", "c"]) as line:       # a <- b <- c
        async with BusClient.connect(alice, line["a"].state_dir) as bus:
            await line["a"].wait_located(bob.public)
            await bus.send(bob.public, text_message("hi"))

Each NIC gets a state directory `tmp_path/<name>` holding its `twins.sock` and its
outbox, so twins attach with `BusClient.connect(identity, line[name].state_dir)` as
they would to a real `pnicd`. Pass your own `MemoryNetwork` to turn its knobs
(latency, loss, partitions, `break_links`) on the links between the NICs, which are
named like the NICs; the link and reconnect timers are short (`testing.nics`), so a
dead link is noticed within about two seconds and redialled within four.

Each NIC runs twin lookups as pnicd does (`nic.lookup.TwinLookup`, the DHT core at
`line[name].lookup.core`), so `BusClient.find` works across the line.

`BusNic.intercept(rewrite)` puts a function between the overlay and the twin port:
each bus frame arriving at that NIC goes through `rewrite(source_nic, frame)`, and
the frames it returns are handed on (none: dropped, two: duplicated, altered:
tampered). The outbox runs on the wall clock (envelope deadlines are unix times), so
bus tests run on trio's real clock, not `MockClock`.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from twinmesh.carriers.uri import PeerUri
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.nic.config import NicConfig
from twinmesh.nic.lookup import TwinLookup
from twinmesh.nic.node import Nic
from twinmesh.nic.twins import TwinPort
from twinmesh.proto.outbox import OutboxConfig
from twinmesh.testing.memnet import MemoryNetwork
from twinmesh.testing.nics import LINK, RECONNECT, wait_for

Rewrite = Callable[[PublicKey, bytes], Iterable[bytes]]


@dataclass
class BusNic:
    """One NIC of a bus test bed and its twin port (immutable after `bus_line` made it)."""

    name: str
    nic: Nic
    port: TwinPort
    state_dir: Path  # where its twins.sock and outbox live
    lookup: TwinLookup  # twin lookups: the DHT core is `lookup.core`

    @property
    def key(self) -> PublicKey:
        return self.nic.key

    def located(self, twin: PublicKey) -> PublicKey | None:
        """The NIC this one believes `twin` is attached to (its location records)."""
        return self.nic.overlay.locate(twin)

    async def wait_located(self, twin: PublicKey) -> None:
        """Wait until this NIC has a location record for `twin` (bound it yourself)."""
        await wait_for(lambda: self.located(twin) is not None, step=0.01)

    def intercept(self, rewrite: Rewrite | None) -> None:
        """Pass every bus frame arriving here through `rewrite` (None: stop)."""
        port = self.port
        if rewrite is None:
            self.nic.overlay.on_packet = port.on_packet
            return

        def on_packet(source: PublicKey, frame: bytes, hops: int) -> None:
            for out in rewrite(source, frame):
                port.on_packet(source, out, hops)

        self.nic.overlay.on_packet = on_packet


@asynccontextmanager
async def bus_line(
    tmp_path: Path,
    names: list[str],
    *,
    net: MemoryNetwork | None = None,
    outbox: OutboxConfig | None = None,
) -> AsyncIterator[dict[str, BusNic]]:
    """NICs in a line a <- b <- c ... (each dials the one before), each with its twin
    port in `tmp_path/<name>`; yields them by name once every NIC has a route to
    every other. Leaving the block stops them all."""
    net = net if net is not None else MemoryNetwork()
    started: dict[str, BusNic] = {}
    async with trio.open_nursery() as nursery:
        for name in names:
            state = tmp_path / name
            state.mkdir(mode=0o700)
            config = NicConfig(state_dir=state, listen=(PeerUri("memory", name, 0),),
                               link=LINK, reconnect=RECONNECT)
            nic = Nic(Identity.generate(), config, {"memory": net.carrier(name)})
            await nursery.start(nic.run)
            port = TwinPort(nic, state, locate=nic.overlay.locate,
                            publish=nic.overlay.publish_location, config=outbox)
            nic.overlay.on_packet = port.on_packet
            lookup = TwinLookup(nic, port)
            await nursery.start(lookup.run)
            await nursery.start(port.serve)
            started[name] = BusNic(name, nic, port, state, lookup)
        for left, right in itertools.pairwise(names):
            started[right].nic.add_peer(PeerUri("memory", left, 0, key=started[left].key))
        await wait_for(lambda: all(len(node.nic.overlay.routes()) >= len(names)
                                   for node in started.values()), step=0.01)
        yield started
        nursery.cancel_scope.cancel()
