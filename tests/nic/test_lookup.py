"""Twin lookups across in-process NICs: `BusClient.find` through the DHT shell.

NICs in a line a <- b <- c over the in-memory network (`twinmesh.testing.bus`), twins
attached with `BusClient` to each NIC's twins.sock, the DHT running in every NIC as
in pnicd. Every wait is a poll bounded by the test's `fail_after`.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from twinmesh.bus.client import BusClient, BusError, text_message
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.proto.attach import Location
from twinmesh.testing.bus import BusNic, bus_line
from twinmesh.testing.nics import wait_for
from twinmesh.wire import schemas


async def dht_holds(nodes: list[BusNic], twin: PublicKey, seqno: int) -> None:
    """Wait until every NIC in `nodes` holds `twin`'s record `seqno` or newer (as a
    replica, or as the twin's own NIC), so a lookup from anywhere can find it; with 3
    NICs and k=12 every NIC is a replica."""
    def held() -> bool:
        for node in nodes:
            core = node.lookup.core
            record = core.cached(twin, trio.current_time()) if core is not None else None
            if record is None or record.seqno < seqno:
                return False
        return True

    await wait_for(held, step=0.02)


async def test_a_twin_two_hops_away_is_found_with_its_nic_and_hops(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with (
            bus_line(tmp_path, ["a", "b", "c"]) as n,
            BusClient.connect(alice, tmp_path / "a") as a_bus,
            BusClient.connect(bob, tmp_path / "c"),
        ):
            await wait_for(lambda: len(n["a"].lookup.core.contacts()) == 2, step=0.02)
            await dht_holds(list(n.values()), bob.public, 0)
            found = await a_bus.find(bob.public)
            assert found.location.twin == bob.public
            assert found.location.nic == n["c"].key
            assert found.location.verify()
            assert found.hops == 2
            assert found.queried >= 1 and found.rounds >= 1


async def test_an_unknown_twin_is_answered_unknown_twin(tmp_path: Path) -> None:
    alice, nobody = Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with (
            bus_line(tmp_path, ["a", "b"]) as n,
            BusClient.connect(alice, tmp_path / "a") as a_bus,
        ):
            await wait_for(lambda: len(n["a"].lookup.core.contacts()) == 1, step=0.02)
            try:
                await a_bus.find(nobody.public)
            except BusError as exc:
                assert exc.code == "unknownTwin"
            else:
                raise AssertionError("a twin nobody published was found")


def forged_store(record: Location) -> bytes:
    message = schemas.dht.DhtMessage.new_message()
    message.requestId = 7
    record.fill(message.init("store"))
    return bytes(message.to_bytes())


async def test_a_forged_record_from_a_nic_is_refused(tmp_path: Path) -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with (
            bus_line(tmp_path, ["a", "b", "c"]) as n,
            BusClient.connect(alice, tmp_path / "a") as a_bus,
            BusClient.connect(bob, tmp_path / "c"),
        ):
            await dht_holds(list(n.values()), bob.public, 0)
            genuine = n["a"].lookup.core.cached(bob.public, trio.current_time())
            assert genuine is not None
            # NIC b claims Bob moved to it: a newer seqno, signed by Mallory, not Bob.
            forged = Location(bob.public, n["b"].key, genuine.seqno + 1,
                              time.time() + 600,
                              mallory.sign(b"twinmesh/location/v1" + bob.public.raw))
            for victim in ("a", "c"):
                n["b"].port.send_dht(n[victim].key, forged_store(forged))
            await wait_for(lambda: all(n[v].lookup.core.stats["stores_refused"] >= 1
                                       for v in ("a", "c")), step=0.02)
            found = await a_bus.find(bob.public)
            assert found.location == genuine
            assert found.location.nic == n["c"].key


async def test_a_moved_twin_is_found_at_its_new_nic(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with (
            bus_line(tmp_path, ["a", "b", "c"]) as n,
            BusClient.connect(alice, tmp_path / "a") as a_bus,
        ):
            async with BusClient.connect(bob, tmp_path / "c"):
                await dht_holds(list(n.values()), bob.public, 0)
                first = (await a_bus.find(bob.public)).location
            assert first.nic == n["c"].key
            # Bob moves to b: his new record has a higher seqno (his clock in ms).
            await trio.sleep(0.01)
            async with BusClient.connect(bob, tmp_path / "b"):
                await dht_holds(list(n.values()), bob.public, first.seqno + 1)
                found = await a_bus.find(bob.public)
            assert found.location.nic == n["b"].key
            assert found.location.seqno > first.seqno
            assert found.hops == 1


async def test_messages_reach_a_twin_the_flooded_directory_does_not_know(
    tmp_path: Path,
) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with (
            bus_line(tmp_path, ["a", "b", "c"]) as n,
            BusClient.connect(alice, tmp_path / "a") as a_bus,
            BusClient.connect(bob, tmp_path / "c") as b_bus,
        ):
            await dht_holds([n["b"], n["c"]], bob.public, 0)
            # NIC a's flooded directory knows nothing, and its DHT holds no record:
            # only a lookup can tell where Bob is.
            n["a"].lookup.directory_locate = lambda twin: None
            core = n["a"].lookup.core
            assert core is not None
            core.records.clear()
            core.own.clear()
            message_id = await a_bus.send(bob.public, text_message("found you"),
                                          wait="delivered", timeout=20)
            received = await b_bus.receive()
            assert received.id == message_id
            assert core.stats["lookups_found"] >= 1


async def test_the_nics_metrics_show_the_dht(tmp_path: Path) -> None:
    bob = Identity.generate()
    with trio.fail_after(30):
        async with (
            bus_line(tmp_path, ["a", "b"]) as n,
            BusClient.connect(bob, tmp_path / "b"),
        ):
            await dht_holds(list(n.values()), bob.public, 0)
            metrics = {m.name: m for m in n["b"].nic.metrics()}
            assert metrics["twinmesh_links_up"].samples == [({}, 1.0)]  # the NIC's own
            assert metrics["twinmesh_dht_own_records"].samples == [({}, 1.0)]
            assert metrics["twinmesh_dht_contacts"].samples == [({}, 1.0)]
            messages = dict((labels["direction"], value) for labels, value in
                            metrics["twinmesh_dht_messages_total"].samples)
            assert messages["in"] >= 1 and messages["out"] >= 1
            assert metrics["twinmesh_dht_store_lookups_total"].samples[0][1] >= 1
