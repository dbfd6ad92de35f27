"""The message bus end to end in one process: twins attach to NICs over Unix
sockets, NICs link over the in-memory network, envelopes cross the overlay."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from twinmesh.bus.client import BusClient, BusError, text_message
from twinmesh.bus.inbox_store import InboxStore
from twinmesh.identity.keys import Identity
from twinmesh.nic.health import render_prometheus
from twinmesh.proto.attach import sign_attach
from twinmesh.testing.bus import bus_line
from twinmesh.wire import schemas


async def test_a_message_crosses_two_hops_exactly_once_and_is_acked(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with bus_line(tmp_path, ["a", "b", "c"]) as n:
            inbox = InboxStore(tmp_path / "bob-inbox.sqlite3")
            async with (
                BusClient.connect(alice, tmp_path / "a") as a_bus,
                BusClient.connect(bob, tmp_path / "c", inbox=inbox) as b_bus,
            ):
                await n["a"].wait_located(bob.public)
                message_id = await a_bus.send(bob.public, text_message("hello bob"),
                                              wait="delivered", timeout=10)
                received = await b_bus.receive()
                assert received.id == message_id and received.source == alice.public
                assert received.decode(schemas.rmb.TextMessage)["body"] == "hello bob"
                assert await a_bus.status(message_id) == ("delivered", "")
            inbox.close()


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value from a rendered /metrics page."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def test_metrics_count_a_delivered_message_at_each_nic(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with (
            bus_line(tmp_path, ["a", "b", "c"]) as n,
            BusClient.connect(alice, tmp_path / "a") as a_bus,
            BusClient.connect(bob, tmp_path / "c") as b_bus,
        ):
            await n["a"].wait_located(bob.public)
            before = {name: samples(render_prometheus(n[name].nic.metrics())) for name in "abc"}
            await a_bus.send(bob.public, text_message("counted"), wait="delivered", timeout=10)
            await b_bus.receive()
            after = {name: samples(render_prometheus(n[name].nic.metrics())) for name in "abc"}

    def grew(name: str, sample: str) -> float:
        return after[name][sample] - before[name][sample]

    assert grew("a", "twinmesh_outbox_accepted_total") == 1
    assert grew("a", 'twinmesh_outbox_finished_total{status="delivered"}') == 1
    assert grew("a", "twinmesh_outbox_transmissions_total") >= 1
    assert after["a"]['twinmesh_outbox_finished_total{status="failed"}'] == 0
    assert after["a"]["twinmesh_outbox_pending"] == 0
    # The message went a -> b -> c and its ack c -> b -> a.
    assert grew("a", 'twinmesh_overlay_packets_total{kind="sent"}') >= 1
    assert grew("b", 'twinmesh_overlay_packets_total{kind="forwarded"}') >= 2
    assert grew("c", 'twinmesh_overlay_packets_total{kind="delivered"}') >= 1
    assert grew("a", 'twinmesh_overlay_packets_total{kind="delivered"}') >= 1
    assert grew("c", "twinmesh_outbox_accepted_total") == 0  # acks take no outbox


async def test_request_and_reply(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with (
            bus_line(tmp_path, ["a", "b"]) as n, BusClient.connect(alice, tmp_path / "a") as a_bus,
            BusClient.connect(bob, tmp_path / "b") as b_bus,
            trio.open_nursery() as nursery,
        ):
            async def echo() -> None:
                while True:
                    message = await b_bus.receive()
                    body = message.decode(schemas.rmb.TextMessage)["body"]
                    await b_bus.reply(message, text_message(body.upper()))

            nursery.start_soon(echo)
            await n["a"].wait_located(bob.public)
            reply = await a_bus.request(bob.public, text_message("ping"), timeout=10)
            assert reply.decode(schemas.rmb.TextMessage)["body"] == "PING"
            assert reply.source == bob.public
            nursery.cancel_scope.cancel()


async def test_messages_wait_for_an_offline_twin(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with (
            bus_line(tmp_path, ["a", "b"]) as n,
            BusClient.connect(alice, tmp_path / "a") as a_bus,
        ):
            # Bob attaches once (publishing where he is), then goes away.
            async with BusClient.connect(bob, tmp_path / "b"):
                await n["a"].wait_located(bob.public)
            message_id = await a_bus.send(bob.public, text_message("are you there?"))
            await trio.sleep(0.5)
            assert (await a_bus.status(message_id))[0] == "sent"
            async with BusClient.connect(bob, tmp_path / "b") as b_bus:
                received = await b_bus.receive()
                assert received.id == message_id
            status, _ = await a_bus.wait_status(message_id, timeout=10)
            assert status == "delivered"


async def test_an_unknown_twin_expires_with_a_clear_status(tmp_path: Path) -> None:
    alice, nobody = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with bus_line(tmp_path, ["a"]), BusClient.connect(alice, tmp_path / "a") as a_bus:
            with pytest.raises(BusError) as info:
                await a_bus.send(nobody.public, text_message("x"), fail_fast=True)
            assert info.value.code == "noRoute"
            message_id = await a_bus.send(nobody.public, text_message("x"), ttl=1.0)
            status, _ = await a_bus.wait_status(message_id, timeout=5)
            assert status == "expired"


async def test_fail_fast_to_an_away_twin_is_answered_at_once(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with (
            bus_line(tmp_path, ["a"]) as n,
            BusClient.connect(alice, tmp_path / "a") as a_bus,
        ):
            async with BusClient.connect(bob, tmp_path / "a"):
                pass  # Bob published that he lives at NIC a, then left
            while bob.public in n["a"].port.sessions:  # the NIC notices the hang-up
                await trio.sleep(0.01)
            with pytest.raises(BusError) as info:
                await a_bus.send(bob.public, text_message("x"), fail_fast=True)
            assert info.value.code == "offline"
            # Without fail-fast the same message is queued for his return.
            message_id = await a_bus.send(bob.public, text_message("x"))
            assert (await a_bus.status(message_id))[0] in ("queued", "sent")


async def test_a_rejected_schema_is_reported_to_the_sender(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with (
            bus_line(tmp_path, ["a", "b"]) as n, BusClient.connect(alice, tmp_path / "a") as a_bus,
            BusClient.connect(bob, tmp_path / "b",
                              accepted=[schemas.rmb.TextMessage]),
        ):
            await n["a"].wait_located(bob.public)
            ping = schemas.rmb.Ping.new_message(sentAt=time.time(), sequence=1)
            message_id = await a_bus.send(bob.public, ping)
            status = await a_bus.wait_status(message_id, timeout=10)
            assert status == ("failed", "rejectedSchema")


async def test_a_twin_without_the_key_cannot_attach(tmp_path: Path) -> None:
    from twinmesh.carriers.unix import connect_unix
    from twinmesh.control.framed import FramedStream

    bob, mallory = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with bus_line(tmp_path, ["a"]) as n:
            stream = await connect_unix(tmp_path / "a" / "twins.sock")
            async with stream:
                framed = FramedStream(stream)
                challenge = await framed.receive()
                assert challenge is not None
                nonce = schemas.decode(schemas.local.LocalMessage, challenge,
                                       lambda r: bytes(r.challenge.nonce))
                message = schemas.local.LocalMessage.new_message()
                attach = message.init("attach")
                attach.twinKey = bob.public.raw  # claims Bob...
                attach.signature = sign_attach(mallory, n["a"].key, nonce)  # ...signs as Mallory
                await framed.send(message.to_bytes())
                answer = await framed.receive()
                assert answer is not None
                which = schemas.decode(schemas.local.LocalMessage, answer,
                                       lambda r: str(r.which()))
                assert which == "refused"
                assert await framed.receive() is None  # and the NIC hangs up
