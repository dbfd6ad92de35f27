"""The message bus end to end in one process: twins attach to NICs over Unix
sockets, NICs link over the in-memory network, envelopes cross the overlay."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from twinmesh.bus import local_frames
from twinmesh.bus.client import BusClient, BusError, text_message
from twinmesh.bus.inbox_store import InboxStore
from twinmesh.errors import StorageError
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.nic.health import render_prometheus
from twinmesh.nic.twins import _local_frame
from twinmesh.proto.attach import sign_attach
from twinmesh.proto.outbox import OutboxConfig, Status
from twinmesh.testing.bus import BusNic, bus_line
from twinmesh.testing.nics import wait_for
from twinmesh.wire import schemas


@asynccontextmanager
async def alice_and_bob(
    tmp_path: Path, alice: Identity, bob: Identity, **line: Any,
) -> AsyncIterator[tuple[dict[str, BusNic], BusClient, BusClient]]:
    """NICs a and b linked, Alice attached to a and Bob to b, Bob located from a."""
    async with (
        bus_line(tmp_path, ["a", "b"], **line) as n,
        BusClient.connect(alice, tmp_path / "a") as a_bus,
        BusClient.connect(bob, tmp_path / "b") as b_bus,
    ):
        await n["a"].wait_located(bob.public)
        yield n, a_bus, b_bus


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



@pytest.mark.parametrize("count", [2, 200])
def test_frames_to_twins_are_read_without_pycapnp_however_long(count: int) -> None:
    # A frame of several segments sends the twin to pycapnp's slow reader.
    envelopes = [bytes([n % 251]) * (40 + 37 * n) for n in range(count)]
    updates = [(bytes([n % 251]) * 16, "delivered", "x" * (n % 30)) for n in range(count)]
    results = [(n, n % 2 == 0, "too-large" * (n % 3), "é" * (n % 50), "queued")
               for n in range(count)]
    for kind, run, member, expected in (
        ("deliver", envelopes, "deliveries", envelopes),
        ("status", updates, "statusUpdates", updates),
        ("result", results, "results", [(n, (ok, code, text, status))
                                         for n, ok, code, text, status in results]),
    ):
        read = local_frames.read(_local_frame(kind, run))
        assert read == (member, expected)
@pytest.mark.parametrize("count", [1, 3])
def test_deliveries_are_the_bytes_pycapnp_builds(count: int) -> None:
    # Written without pycapnp now: a twin decoding them with pycapnp reads the same.
    envelopes = [bytes([n + 1]) * (65536 + 37 * n) for n in range(count)]
    # (One segment, as the NIC writes them: pycapnp's default first segment is small.)
    message = schemas.local.LocalMessage.new_message(num_first_segment_words=1 << 16)
    if count == 1:
        message.deliver = envelopes[0]
    else:
        deliveries = message.init("deliveries", count)
        for index, envelope in enumerate(envelopes):
            deliveries[index] = envelope
    assert _local_frame("deliver", envelopes) == message.to_bytes()


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
    # Its power-safe commit ran once, on the loop or in a thread.
    assert (grew("a", "twinmesh_outbox_commits_inline_total")
            + grew("a", "twinmesh_outbox_commits_threaded_total")) == 1
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
            # More for the away twin: they wait behind the first one's retries (its
            # probe) instead of each being resent while he is away.
            more = [await a_bus.send(bob.public, text_message(f"and {i}")) for i in range(3)]
            await trio.sleep(0.5)
            away = samples(render_prometheus(n["a"].nic.metrics()))
            assert away["twinmesh_outbox_away_destinations"] == 1
            assert away["twinmesh_outbox_parked"] == 3
            async with BusClient.connect(bob, tmp_path / "b") as b_bus:
                received = [await b_bus.receive() for _ in range(4)]
                assert {m.id for m in received} == {message_id, *more}
            for sent in (message_id, *more):
                status, _ = await a_bus.wait_status(sent, timeout=10)
                assert status == "delivered"
            back = samples(render_prometheus(n["a"].nic.metrics()))
            assert back["twinmesh_outbox_away_destinations"] == 0
            assert back["twinmesh_outbox_parked"] == 0
            assert back["twinmesh_outbox_parked_total"] == 3


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


async def test_acks_arriving_during_a_durable_commit_are_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with (
            alice_and_bob(tmp_path, alice, bob) as (n, a_bus, b_bus),
            trio.open_nursery() as nursery,
        ):
            port = n["a"].port
            held: list[tuple[PublicKey, bytes]] = []

            def hold(source: PublicKey, frame: bytes) -> list[bytes]:
                held.append((source, frame))
                return []

            n["a"].intercept(hold)
            first = await a_bus.send(bob.public, text_message("one"))
            assert (await b_bus.receive()).id == first
            await wait_for(lambda: bool(held), step=0.01)  # Bob's ack, held back
            # The next durable commit (a new submission) stops in its thread until told;
            # durable commits run in a thread from now on, as after a slow one.
            port.commit_placement.next_probe = math.inf
            store = port._store
            assert store is not None
            apply = store.apply
            in_commit, release = trio.Event(), threading.Event()
            overlapping: list[bool] = []
            busy = threading.Lock()

            def gated(outputs: Any, now: float | None = None, *, power_safe: bool = True) -> None:
                if not busy.acquire(blocking=False):
                    overlapping.append(True)  # two commits at once
                    apply(outputs, now, power_safe=power_safe)
                    return
                try:
                    if power_safe and not release.is_set():
                        trio.from_thread.run_sync(in_commit.set)
                        release.wait(10)
                    apply(outputs, now, power_safe=power_safe)
                finally:
                    busy.release()

            monkeypatch.setattr(store, "apply", gated)
            second: list[bytes] = []

            async def submit() -> None:
                second.append(await a_bus.send(bob.public, text_message("two")))

            nursery.start_soon(submit)
            await in_commit.wait()
            n["a"].intercept(None)
            for source, frame in held:  # the ack arrives while the commit runs
                port.on_packet(source, frame, 1)
            await trio.sleep(0.05)
            release.set()
            assert await a_bus.wait_status(first, timeout=10) == ("delivered", "")
            await wait_for(lambda: bool(second), step=0.01)
            assert (await b_bus.receive()).id == second[0]
            assert await a_bus.wait_status(second[0], timeout=10) == ("delivered", "")
            # Nothing to resend after a restart: both are delivered in the store too.
            await wait_for(lambda: all(e.status is Status.DELIVERED for e in store.load()),
                           step=0.01)
            assert {e.id for e in store.load()} == {first, second[0]}
            assert not overlapping
            nursery.cancel_scope.cancel()


async def test_a_twin_slow_to_read_gets_all_its_frames_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    # No retries meanwhile: every message reaches Bob's NIC once.
    outbox = OutboxConfig(initial_retry=30.0, max_retry=60.0)
    with trio.fail_after(60):
        async with (
            alice_and_bob(tmp_path, alice, bob, outbox=outbox) as (n, a_bus, b_bus),
        ):
            # Bob's client stops reading its socket at the first delivery until told.
            reading = trio.Event()
            delivered = b_bus._delivered

            async def stalled(envelopes: list[bytes]) -> None:
                await reading.wait()
                await delivered(envelopes)

            monkeypatch.setattr(b_bus, "_delivered", stalled)
            [session] = n["b"].port.sessions[bob.public]
            mailbox = session.outgoing
            ids = [await a_bus.send(bob.public, text_message(f"{i}:" + "x" * 20_000))
                   for i in range(60)]
            # Far more than the socket takes: some waits in the NIC for Bob to read.
            await wait_for(lambda: bool(mailbox.items or mailbox.unsent), step=0.01)
            reading.set()
            got = [await b_bus.receive() for _ in ids]
            assert [m.id for m in got] == ids
            assert [m.decode(schemas.rmb.TextMessage)["body"].split(":")[0] for m in got] == [
                str(i) for i in range(60)]
            for message_id in ids:
                assert await a_bus.wait_status(message_id, timeout=10) == ("delivered", "")


async def test_a_bug_handling_one_twin_frame_drops_only_that_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    boom = b"\xee" * 16
    with trio.fail_after(20):
        async with (
            alice_and_bob(tmp_path, alice, bob) as (n, a_bus, b_bus),
            trio.open_nursery() as nursery,
        ):
            port = n["a"].port
            status = port.outbox.status

            def failing(message_id: bytes) -> Any:
                if message_id == boom:
                    raise KeyError("a bug in a frame handler")
                return status(message_id)

            monkeypatch.setattr(port.outbox, "status", failing)
            # Unanswered: the twin's request would time out; the session goes on.
            nursery.start_soon(a_bus.status, boom)
            await wait_for(lambda: port.internal_errors.counts["twin_frame"] == 1, step=0.01)
            message_id = await a_bus.send(bob.public, text_message("after"),
                                          wait="delivered", timeout=10)
            assert (await b_bus.receive()).id == message_id
            assert await a_bus.status(message_id) == ("delivered", "")
            metrics = samples(render_prometheus(n["a"].nic.metrics()))
            assert metrics['twinmesh_internal_errors_total{where="twin_frame"}'] == 1
            assert metrics['twinmesh_internal_errors_total{where="link_packet"}'] == 0
            nursery.cancel_scope.cancel()


async def test_a_final_status_reaches_a_twin_whose_mailbox_is_full(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with (
            alice_and_bob(tmp_path, alice, bob) as (n, a_bus, b_bus),
        ):
            [session] = n["a"].port.sessions[alice.public]
            # Alice's mailbox at her NIC takes nothing more that may be dropped (as when
            # she reads slower than her updates come): results and final statuses only.
            session.outgoing.limit = 0
            message_id = await a_bus.send(bob.public, text_message("still told"))
            assert (await b_bus.receive()).id == message_id
            assert await a_bus.wait_status(message_id, timeout=10) == ("delivered", "")
            assert n["a"].port.counters["session_overflow"] == 0


async def test_durable_commits_run_on_the_loop_until_one_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with alice_and_bob(tmp_path, alice, bob) as (n, a_bus, b_bus):
            port = n["a"].port
            store = port._store
            assert store is not None
            # Commit durations come from a fake clock that a "slow disk" moves on.
            clock = [0.0]
            port.commit_clock = lambda: clock[0]
            loop_thread = threading.get_ident()
            places: list[str] = []
            slow = [False]
            apply = store.apply

            def measured(outputs: Any, now: float | None = None, *,
                         power_safe: bool = True) -> None:
                if power_safe:
                    places.append("loop" if threading.get_ident() == loop_thread else "thread")
                    if slow[0]:
                        clock[0] += 0.05
                apply(outputs, now, power_safe=power_safe)

            monkeypatch.setattr(store, "apply", measured)

            async def send(text: str) -> bytes:
                return await a_bus.send(bob.public, text_message(text))

            ids = [await send("fast disk")]
            slow[0] = True
            ids += [await send("slow, on the loop once"), await send("then in a thread")]
            slow[0] = False
            ids += [await send("fast again, still in a thread until the probe")]
            clock[0] += 60.0  # the probe is due
            ids += [await send("probe"), await send("on the loop again")]
            assert places == ["loop", "loop", "thread", "thread", "loop", "loop"]
            got = [await b_bus.receive() for _ in ids]
            assert sorted(m.id for m in got) == sorted(ids)
            for message_id in ids:
                assert await a_bus.wait_status(message_id, timeout=10) == ("delivered", "")


@pytest.mark.parametrize("place", ["loop", "thread"])
async def test_a_failed_durable_commit_answers_overloaded_and_loses_nothing_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, place: str,
) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with alice_and_bob(tmp_path, alice, bob) as (n, a_bus, b_bus):
            port = n["a"].port
            store = port._store
            assert store is not None
            # Commits look instant (a fake clock), or run in a thread as after a slow one.
            port.commit_clock = lambda: 0.0
            if place == "thread":
                port.commit_placement.next_probe = math.inf
            loop_thread = threading.get_ident()
            failed_in: list[str] = []
            apply = store.apply

            def failing(outputs: Any, now: float | None = None, *,
                        power_safe: bool = True) -> None:
                if power_safe:
                    failed_in.append("loop" if threading.get_ident() == loop_thread
                                     else "thread")
                    raise StorageError(f"{store.path}: cannot write the outbox: disk I/O error")
                apply(outputs, now, power_safe=power_safe)

            # The first message is accepted, and still in the outbox (Bob's NIC drops
            # what arrives) when the next commit fails.
            n["b"].intercept(lambda source, frame: [])
            first = await a_bus.send(bob.public, text_message("accepted"))
            monkeypatch.setattr(store, "apply", failing)
            with pytest.raises(BusError) as info:
                await a_bus.send(bob.public, text_message("refused"))
            assert info.value.code == "overloaded" and "disk I/O error" in str(info.value)
            assert failed_in == [place]
            monkeypatch.setattr(store, "apply", apply)
            n["b"].intercept(None)
            last = await a_bus.send(bob.public, text_message("accepted after"))
            got = {(await b_bus.receive()).id for _ in range(2)}
            assert got == {first, last}
            for message_id in (first, last):
                assert await a_bus.wait_status(message_id, timeout=10) == ("delivered", "")
            assert {e.id for e in store.load()} == {first, last}
            assert len(port.outbox) == 0


async def test_an_acked_message_leaves_no_retry_timer_to_wake_the_nic(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with alice_and_bob(tmp_path, alice, bob) as (n, a_bus, b_bus):
            port = n["a"].port
            fired: list[float] = []
            handle_timer = port.outbox.handle_timer

            def counted(now: float) -> Any:
                fired.append(now)
                return handle_timer(now)

            port.outbox.handle_timer = counted  # type: ignore[method-assign]
            message_id = await a_bus.send(bob.public, text_message("hi"), wait="delivered",
                                          timeout=10)
            assert (await b_bus.receive()).id == message_id
            retry_at = time.time() + OutboxConfig().initial_retry
            # Past the time its first retry was due: nothing is left to do, so the
            # outbox's timer must not have fired (each firing is a wake-up of the NIC).
            await trio.sleep(max(0.0, retry_at - time.time()) + 0.3)
            assert fired == []
            assert await a_bus.status(message_id) == ("delivered", "")


async def test_a_twins_inbox_store_keeps_only_its_history_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("twinmesh.bus.client.PRUNE_INTERVAL", 0.0)  # prune at every consume
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with bus_line(tmp_path, ["a", "b"]) as n:
            inbox = InboxStore(tmp_path / "bob-inbox.sqlite3", max_history=1)
            async with (
                BusClient.connect(alice, tmp_path / "a") as a_bus,
                BusClient.connect(bob, tmp_path / "b", inbox=inbox) as b_bus,
            ):
                await n["a"].wait_located(bob.public)
                ids = [await a_bus.send(bob.public, text_message(f"m{i}")) for i in range(4)]
                got = [(await b_bus.receive()).id for _ in ids]
                assert sorted(got) == sorted(ids)
                # Three consumed (the fourth is consumed by the next receive): the
                # history keeps one, and the last received still waits.
                kept = [m.id for m in inbox.history(alice.public.raw)]
                assert kept == got[2:]
                # A trimmed message is still a duplicate: its id is remembered.
                assert not inbox.accept(got[0], alice.public.raw, time.time() + 60, 1, b"x",
                                        time.time())
            inbox.close()
