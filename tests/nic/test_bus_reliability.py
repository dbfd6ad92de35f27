"""The bus keeps its promise over a bad network, and refuses bad input (in process).

Twins attach to NICs two hops apart (a <- b <- c) over the in-memory network; the
network loses, delays, partitions and resets links while messages flow. Every
message `send` accepted must end exactly once: received once by the destination
twin and reported `delivered`, or reported `expired`; never received twice.

One case is outside any protocol's reach, the two generals': a message received
whose every ack was lost before its deadline. The sender cannot tell it from a lost
message, so it says `expired`. These tests allow it only when no ack of that message
reached the source NIC at all (checked at the NIC), so the bus never ignores an
answer it had.

Real clock throughout: the outbox runs on envelope deadlines, which are unix times.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from twinmesh.bus.client import BusClient, BusError, Received, text_message
from twinmesh.bus.crypto import MAX_PAYLOAD, Header, TwinCrypto, read_header
from twinmesh.bus.inbox_store import InboxStore
from twinmesh.carriers.unix import connect_unix
from twinmesh.control.framed import FramedStream
from twinmesh.errors import DecodeError
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.proto.attach import sign_attach
from twinmesh.proto.outbox import ACK_GRACE, OutboxConfig
from twinmesh.testing.bus import BusNic, bus_line
from twinmesh.testing.memnet import MemoryNetwork
from twinmesh.wire import schemas

# Quick retries so a test sees many of them; the cap keeps recovery after a heal short.
FAST_OUTBOX = OutboxConfig(initial_retry=0.1, max_retry=1.0, offline_retry=0.5,
                           ack_grace=ACK_GRACE)
TEXT = schemas.rmb.TextMessage
TEXT_ID: int = TEXT.schema.node.id


# --- tools -------------------------------------------------------------------------


def bus_frame(envelope: bytes) -> bytes:
    """The NIC-to-NIC frame carrying `envelope` (what `TwinPort.on_packet` takes)."""
    frame = schemas.local.NicBus.new_message()
    frame.envelope = envelope
    return bytes(frame.to_bytes())


def unbatched(frame: bytes) -> list[bytes]:
    """A bus frame carrying several envelopes as one frame per envelope (others as
    they are)."""
    try:
        envelopes = schemas.decode(
            schemas.local.NicBus, frame,
            lambda r: [bytes(e) for e in r.envelopes] if str(r.which()) == "envelopes"
            else None)
    except DecodeError:
        return [frame]
    return [frame] if envelopes is None else [bus_frame(e) for e in envelopes]


def envelope_in(frame: bytes) -> tuple[bytes, Header] | None:
    """The envelope in a bus frame and its header; None for notices and garbage."""
    try:
        envelope = schemas.decode(
            schemas.local.NicBus, frame,
            lambda r: bytes(r.envelope) if str(r.which()) == "envelope" else None)
        return None if envelope is None else (envelope, read_header(envelope))
    except DecodeError:
        return None


def altered(envelope: bytes, **fields: Any) -> bytes:
    """`envelope` re-encoded with some fields replaced (a NIC tampering in transit)."""
    as_dict = schemas.decode(schemas.rmb.Envelope, envelope, lambda r: r.to_dict())
    as_dict.update(fields)
    return bytes(schemas.rmb.Envelope.new_message(**as_dict).to_bytes())


def flip_sealed_byte(envelope: bytes) -> bytes:
    sealed = bytearray(schemas.decode(schemas.rmb.Envelope, envelope,
                                      lambda r: bytes(r.sealed)))
    sealed[len(sealed) // 2] ^= 0x01
    return altered(envelope, sealed=bytes(sealed))


class Tap:
    """Sits between the overlay and a NIC's twin port (`BusNic.intercept`): records
    what arrives, and lets a test drop, duplicate or alter it with `rewrite`."""

    def __init__(self, rewrite: Callable[[bytes, Header], list[bytes]] | None = None) -> None:
        self.rewrite = rewrite
        self.messages: dict[bytes, bytes] = {}  # message id -> its last frame
        self.copies: Counter[bytes] = Counter()  # message id -> frames seen
        self.acks: defaultdict[bytes, list[float]] = defaultdict(list)  # id -> arrival times
        self.changed = trio.Event()

    def __call__(self, source: PublicKey, frame: bytes) -> Iterable[bytes]:
        # A NIC packs the envelopes queued for one NIC into one frame: the tap looks
        # at (and rewrites) each of them as a frame of its own.
        return [out for single in unbatched(frame) for out in self.one(single)]

    def one(self, frame: bytes) -> Iterable[bytes]:
        found = envelope_in(frame)
        if found is None:
            return [frame]
        _, header = found
        if header.kind == "message":
            self.messages[header.id] = frame
            self.copies[header.id] += 1
        elif header.kind == "ack":
            for message_id, _token in header.acked():  # one ack may answer several
                self.acks[message_id].append(time.time())
        self.changed.set()
        self.changed = trio.Event()
        if self.rewrite is None:
            return [frame]
        return self.rewrite(frame, header)

    async def wait_acks(self, message_id: bytes, count: int) -> None:
        while len(self.acks[message_id]) < count:
            await self.changed.wait()


@dataclass
class Twins:
    alice: Identity
    bob: Identity
    a_bus: BusClient  # alice, attached at NIC a
    b_bus: BusClient  # bob, attached at NIC c, with an inbox store
    inbox: InboxStore


@asynccontextmanager
async def two_hops(
    tmp_path: Path, *, net: MemoryNetwork | None = None, accepted: list[Any] | None = None,
    inbox: InboxStore | None = None,
) -> AsyncIterator[tuple[dict[str, BusNic], Twins]]:
    """Alice at NIC a, Bob at NIC c (a <- b <- c), each knowing where the other is."""
    alice, bob = Identity.generate(), Identity.generate()
    inbox = inbox if inbox is not None else InboxStore(tmp_path / "bob-inbox.sqlite3")
    try:
        async with (
            bus_line(tmp_path, ["a", "b", "c"], net=net, outbox=FAST_OUTBOX) as line,
            BusClient.connect(alice, line["a"].state_dir) as a_bus,
            BusClient.connect(bob, line["c"].state_dir, inbox=inbox,
                              accepted=accepted) as b_bus,
        ):
            await line["a"].wait_located(bob.public)
            await line["c"].wait_located(alice.public)
            yield line, Twins(alice, bob, a_bus, b_bus, inbox)
    finally:
        inbox.close()


async def nothing_received(bus: BusClient, seconds: float = 0.3) -> bool:
    with trio.move_on_after(seconds):
        await bus.receive()
        return False
    return True


# --- (a) loss, latency, partitions and resets: exactly once or expired ---------------


@dataclass(frozen=True)
class Weather:
    loss: float  # on the a-b link, until `calm_at`
    latency: float  # on both links, throughout
    calm_at: float  # seconds after the first send: the loss stops
    partition: tuple[float, float] | None  # b-c cut at, for how long
    break_at: float | None  # a-b links reset at
    duplicate: float  # share of the message frames Bob's NIC gets twice
    reattach_at: float | None  # Bob's twin detaches, and attaches again a moment later


weathers = st.builds(
    Weather,
    loss=st.floats(0.0, 0.3),
    latency=st.floats(0.0, 0.03),
    calm_at=st.floats(0.3, 2.0),
    partition=st.none() | st.tuples(st.floats(0.0, 1.5), st.floats(0.2, 2.5)),
    break_at=st.none() | st.floats(0.0, 2.0),
    duplicate=st.sampled_from([0.0, 0.2, 1.0]),
    reattach_at=st.none() | st.floats(0.0, 2.0),
)

LONG_TTL = 20.0  # outlasts the worst weather plus link recovery and the retry cap


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck),
          print_blob=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    count=st.integers(5, 40),
    short_share=st.floats(0.0, 0.5),
    weather=weathers,
)
async def test_every_accepted_message_is_delivered_once_or_expired(
    seed: int, count: int, short_share: float, weather: Weather
) -> None:
    rng = random.Random(seed)
    net = MemoryNetwork(seed=seed)
    alice, bob = Identity.generate(), Identity.generate()
    received: Counter[bytes] = Counter()  # what Bob's application got, by id
    sent: dict[bytes, tuple[float, float]] = {}  # id -> (ttl, deadline)
    statuses: dict[bytes, tuple[str, str]] = {}
    to_a = Tap()
    to_c = Tap(lambda frame, header: [frame, frame] if header.kind == "message"
               and rng.random() < weather.duplicate else [frame])
    with (
        tempfile.TemporaryDirectory(prefix="tm-bus-") as tmp,
        InboxStore(Path(tmp) / "bob-inbox.sqlite3") as inbox,
        trio.fail_after(60),
    ):
        async with (
            bus_line(Path(tmp), ["a", "b", "c"], net=net, outbox=FAST_OUTBOX) as line,
            BusClient.connect(alice, line["a"].state_dir) as a_bus,
            trio.open_nursery() as nursery,
        ):
            line["a"].intercept(to_a)
            line["c"].intercept(to_c)
            began = trio.current_time()

            async def bob_twin(task_status: trio.TaskStatus[None]) -> None:
                # Attached, then (maybe) away for a moment and back with a new client
                # on the same inbox store; the application consumes what it gets.
                leave = (math.inf if weather.reattach_at is None
                         else began + weather.reattach_at)
                for attachment in (1, 2):
                    async with BusClient.connect(bob, line["c"].state_dir,
                                                 inbox=inbox) as bus:
                        if attachment == 1:
                            task_status.started()
                        with trio.CancelScope(deadline=leave if attachment == 1 else math.inf):
                            while True:
                                message = await bus.receive()
                                received[message.id] += 1
                                await trio.to_thread.run_sync(inbox.consume, message.id,
                                                              time.time())
                    await trio.sleep(0.2)

            async def chaos() -> None:
                net.set_conditions("a", "b", latency=weather.latency, loss=weather.loss)
                net.set_conditions("b", "c", latency=weather.latency)
                events: list[tuple[float, Callable[[], object]]] = [
                    (weather.calm_at, lambda: net.set_conditions("a", "b", loss=0.0))]
                if weather.partition is not None:
                    start, length = weather.partition
                    events += [(start, lambda: net.partition("b", "c")),
                               (start + length, lambda: net.heal("b", "c"))]
                if weather.break_at is not None:
                    events.append((weather.break_at, lambda: net.break_links("a", "b")))
                for at, act in sorted(events, key=lambda e: e[0]):
                    await trio.sleep_until(began + at)
                    act()

            await nursery.start(bob_twin)
            await line["a"].wait_located(bob.public)
            nursery.start_soon(chaos)
            for i in range(count):
                ttl = rng.uniform(0.5, 2.5) if rng.random() < short_share else LONG_TTL
                message_id = await a_bus.send(bob.public, text_message(f"message {i}"),
                                              ttl=ttl)
                sent[message_id] = ttl, time.time() + ttl
                await trio.sleep(rng.uniform(0.0, 0.04))
            for message_id, (_, deadline) in sent.items():
                statuses[message_id] = await a_bus.wait_status(
                    message_id, timeout=max(0.0, deadline - time.time()) + 10.0)
            # Copies still in the air would show up now as duplicates.
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()

    duplicates = {m.hex(): n for m, n in received.items() if n > 1}
    assert not duplicates, duplicates
    assert set(received) <= set(sent)
    for message_id, (ttl, deadline) in sent.items():
        status = statuses[message_id]
        assert status[0] in ("delivered", "expired"), (message_id.hex(), status)  # never neither
        if status[0] == "delivered":
            assert received[message_id] == 1, message_id.hex()
        elif received[message_id]:
            # The two generals: received, but every ack lost before the deadline.
            acks = to_a.acks.get(message_id, [])
            assert not acks, (message_id.hex(), "expired although acks reached its NIC",
                              [round(t - deadline, 3) for t in acks])
            event("received, every ack lost, expired")
        event(f"ttl {'long' if ttl == LONG_TTL else 'short'}: {status[0]}")
        if ttl == LONG_TTL:  # outlives the weather: must get through
            assert status == ("delivered", ""), (message_id.hex(), status)


# --- (b) duplicated delivery ---------------------------------------------------------


async def test_a_duplicated_envelope_is_received_once_and_both_copies_acked(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        to_a = Tap()
        # The network hands Bob's NIC every message twice.
        twice = Tap(lambda frame, header: [frame, frame] if header.kind == "message"
                    else [frame])
        async with two_hops(tmp_path) as (line, twins):
            line["a"].intercept(to_a)
            line["c"].intercept(twice)
            message_id = await twins.a_bus.send(twins.bob.public, text_message("once"),
                                                wait="delivered", timeout=10)
            received = await twins.b_bus.receive()
            assert received.id == message_id
            await to_a.wait_acks(message_id, 2)
            assert await nothing_received(twins.b_bus)
            assert [m.id for m in twins.inbox.history(twins.alice.public.raw)] == [message_id]


# --- (c) replays ---------------------------------------------------------------------


async def test_a_replay_is_acked_not_delivered_and_refused_after_its_deadline(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        to_a, to_c = Tap(), Tap()
        async with two_hops(tmp_path) as (line, twins):
            line["a"].intercept(to_a)
            line["c"].intercept(to_c)
            alice, bob = twins.a_bus, twins.b_bus
            ttl = 2.0
            message_id = await alice.send(bob.key, text_message("just once"), ttl=ttl,
                                          wait="delivered", timeout=10)
            deadline = time.time() + ttl
            assert (await bob.receive()).id == message_id
            recorded = to_c.messages[message_id]
            acks = len(to_a.acks[message_id])

            async def replay_then_sync(label: str) -> Received:
                # A NIC replays the recorded envelope; a fresh message behind it on the
                # same path tells us when Bob has dealt with the replay.
                line["c"].port.on_packet(line["a"].key, recorded, 2)
                fresh = await alice.send(bob.key, text_message(label), wait="delivered",
                                         timeout=10)
                after = await bob.receive()
                assert after.id == fresh  # not the replay
                return after

            await replay_then_sync("behind the first replay")
            assert len(to_a.acks[message_id]) > acks  # acked again...
            # ...but delivered once, which the inbox store remembers.
            assert twins.inbox.remembers(message_id)

            await trio.sleep(max(0.0, deadline - time.time()) + 0.1)
            acks = len(to_a.acks[message_id])
            await replay_then_sync("behind the late replay")
            assert len(to_a.acks[message_id]) == acks  # expired: refused, not acked
            assert await alice.status(message_id) == ("delivered", "")


# --- an ack late by less than the grace ---------------------------------------------


@pytest.mark.parametrize("late", [0.3, ACK_GRACE + 0.5])
async def test_an_ack_late_by_less_than_the_grace_still_delivers(
    tmp_path: Path, late: float,
) -> None:
    """Bob accepts a message until its deadline, so his ack may reach Alice's NIC after
    it: within ACK_GRACE it still counts (else the message would be received *and*
    reported expired); later it is ignored, and the message has expired."""
    held: list[bytes] = []

    def hold_acks(frame: bytes, header: Header) -> list[bytes]:
        if header.kind == "ack":
            held.append(frame)
            return []
        return [frame]

    with trio.fail_after(20):
        async with two_hops(tmp_path) as (line, twins):
            line["a"].intercept(Tap(hold_acks))
            ttl = 1.0
            message_id = await twins.a_bus.send(twins.bob.public, text_message("late"),
                                                ttl=ttl)
            deadline = time.time() + ttl
            assert (await twins.b_bus.receive()).id == message_id
            await trio.sleep(max(0.0, deadline - time.time()) + late)
            line["a"].intercept(None)
            for frame in held:
                line["a"].port.on_packet(line["b"].key, frame, 2)
            status = await twins.a_bus.wait_status(message_id, timeout=10)
    assert held and status == (("delivered", "") if late < ACK_GRACE else ("expired", ""))


# --- (d) bad input -------------------------------------------------------------------


async def test_an_oversized_payload_is_refused_and_nothing_is_queued(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with two_hops(tmp_path) as (line, twins):
            with pytest.raises(BusError) as info:
                await twins.a_bus.send(twins.bob.public, (TEXT_ID, b"x" * (MAX_PAYLOAD + 1)))
            assert info.value.code == "tooLarge"
            assert len(line["a"].port.outbox) == 0
            # The NIC checks the size a twin declares too.
            framed = await attach_raw(line["a"], twins.alice)
            async with framed.stream:
                assert await answer(framed) == "attached"
                envelope, _ = TwinCrypto(twins.alice).seal_message(
                    twins.bob.public, b"", TEXT_ID, now=time.time())
                assert await submit_raw(framed, envelope, MAX_PAYLOAD + 1) == (
                    False, "tooLarge")
            assert len(line["a"].port.outbox) == 0
            # A full-size payload is fine.
            await twins.a_bus.send(twins.bob.public, (TEXT_ID, b"x" * MAX_PAYLOAD),
                                   wait="delivered", timeout=10)
            assert len((await twins.b_bus.receive()).payload) == MAX_PAYLOAD


async def test_a_nic_refuses_an_oversized_frame_and_keeps_serving(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with two_hops(tmp_path) as (line, twins):
            mallory = Identity.generate()
            framed = await attach_raw(line["a"], mallory)
            async with framed.stream:
                assert await answer(framed) == "attached"
                await framed.stream.send_all(  # a frame header announcing 1 MiB
                    (1 << 20).to_bytes(4, "big") + b"\0" * 4096)
                assert await framed_closed(framed)
            # Others are not affected.
            await twins.a_bus.send(twins.bob.public, text_message("still here"),
                                   wait="delivered", timeout=10)


@pytest.mark.parametrize("how", ["ciphertext", "deadline"])
async def test_a_tampered_envelope_is_dropped_and_the_clean_retry_delivers(
    tmp_path: Path, how: str,
) -> None:
    tampered: list[bytes] = []

    def tamper_first_copy(frame: bytes, header: Header) -> list[bytes]:
        if header.kind != "message" or header.id in tampered:
            return [frame]
        tampered.append(header.id)
        envelope, _ = envelope_in(frame) or (b"", header)
        if how == "ciphertext":
            return [bus_frame(flip_sealed_byte(envelope))]
        return [bus_frame(altered(envelope, deadline=header.deadline + 600))]

    with trio.fail_after(20):
        async with two_hops(tmp_path) as (line, twins):
            line["c"].intercept(Tap(tamper_first_copy))
            message_id = await twins.a_bus.send(twins.bob.public, text_message("intact"),
                                                wait="delivered", timeout=10)
            received = await twins.b_bus.receive()
            assert received.id == message_id and tampered == [message_id]
            assert received.decode(TEXT)["body"] == "intact"
            assert await nothing_received(twins.b_bus)


async def test_an_envelope_tampered_every_time_expires_undelivered(tmp_path: Path) -> None:
    def tamper(frame: bytes, header: Header) -> list[bytes]:
        found = envelope_in(frame)
        if header.kind != "message" or found is None:
            return [frame]
        return [bus_frame(flip_sealed_byte(found[0]))]

    with trio.fail_after(20):
        to_c = Tap(tamper)
        async with two_hops(tmp_path) as (line, twins):
            line["c"].intercept(to_c)
            message_id = await twins.a_bus.send(twins.bob.public, text_message("x"), ttl=1.5)
            status = await twins.a_bus.wait_status(message_id, timeout=10)
            assert status[0] == "expired"
            assert to_c.copies[message_id] >= 2  # it was retried, every copy altered...
            assert await nothing_received(twins.b_bus, 0.1)  # ...so none was delivered
            assert not twins.inbox.remembers(message_id)


async def test_truncated_frames_and_envelopes_are_counted_and_the_nic_keeps_running(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with two_hops(tmp_path) as (line, twins):
            crypto = TwinCrypto(twins.alice)
            envelope, _ = crypto.seal_message(
                twins.bob.public, text_message("cut").to_bytes(), TEXT_ID, now=time.time())
            port, a_key = line["c"].port, line["a"].key
            frame = bus_frame(envelope)
            for cut in (1, 7, len(frame) // 2, len(frame) - 1):
                port.on_packet(a_key, frame[:cut], 2)
            port.on_packet(a_key, b"\xff" * 64, 2)
            for cut in (0, 8, len(envelope) // 2, len(envelope) - 8):
                port.on_packet(a_key, bus_frame(envelope[:cut]), 2)
            bad = port.counters["bad_bus_frames"] + port.counters["bad_envelopes"]
            assert bad == 9, dict(port.counters)
            assert port.counters["bad_envelopes"] >= 3
            message_id = await twins.a_bus.send(twins.bob.public, text_message("fine"),
                                                wait="delivered", timeout=10)
            assert (await twins.b_bus.receive()).id == message_id


@pytest.mark.parametrize("payload", ["wrong schema", "truncated payload"])
async def test_a_payload_the_receiver_cannot_read_fails_as_rejected_schema(
    tmp_path: Path, payload: str,
) -> None:
    good = bytes(text_message("a text long enough to cut in the middle").to_bytes())
    message: Any
    if payload == "wrong schema":
        message = schemas.rmb.Ping.new_message(sentAt=time.time(), sequence=1)
    else:
        message = (TEXT_ID, good[: len(good) - 12])
    with trio.fail_after(20):
        async with two_hops(tmp_path, accepted=[TEXT]) as (_, twins):
            message_id = await twins.a_bus.send(twins.bob.public, message)
            status = await twins.a_bus.wait_status(message_id, timeout=10)
            assert status == ("failed", "rejectedSchema")
            assert await nothing_received(twins.b_bus)


async def attach_raw(node: BusNic, identity: Identity, *, nic_key: PublicKey | None = None,
                     signer: Identity | None = None) -> FramedStream:
    """Attach to a NIC's twins.sock speaking the local protocol by hand."""
    stream = await connect_unix(node.state_dir / "twins.sock")
    framed = FramedStream(stream)
    hello = await framed.receive()
    assert hello is not None
    nonce = schemas.decode(schemas.local.LocalMessage, hello,
                           lambda r: bytes(r.challenge.nonce))
    message = schemas.local.LocalMessage.new_message()
    attach = message.init("attach")
    attach.twinKey = identity.public.raw
    attach.signature = sign_attach(signer or identity, nic_key or node.key, nonce)
    await framed.send(message.to_bytes())
    return framed


async def submit_raw(framed: FramedStream, envelope: bytes, payload_size: int) -> tuple[bool, str]:
    """Submit an envelope by hand; the NIC's (ok, code)."""
    request = schemas.local.LocalMessage.new_message()
    request.requestId = 7
    submit = request.init("submit")
    submit.envelope = envelope
    submit.reliable = True
    submit.payloadSize = payload_size
    await framed.send(request.to_bytes())
    while True:
        body = await framed.receive()
        assert body is not None
        result: tuple[bool, str] | None = schemas.decode(
            schemas.local.LocalMessage, body,
            lambda r: (bool(r.result.ok), str(r.result.code))
            if str(r.which()) == "result" else None)
        if result is not None:
            return result


async def framed_closed(framed: FramedStream) -> bool:
    """Read until the NIC hangs up; True then (frames before it are skipped)."""
    try:
        while await framed.receive() is not None:
            pass
    except trio.BrokenResourceError:
        pass
    return True


async def answer(framed: FramedStream) -> str:
    body = await framed.receive()
    assert body is not None
    return str(schemas.decode(schemas.local.LocalMessage, body, lambda r: str(r.which())))


@pytest.mark.parametrize("fault", ["signed for another NIC", "signed by another key",
                                   "garbage signature"])
async def test_a_twin_that_fails_the_key_challenge_is_refused(
    tmp_path: Path, fault: str,
) -> None:
    with trio.fail_after(20):
        async with two_hops(tmp_path) as (line, twins):
            mallory = Identity.generate()
            if fault == "signed for another NIC":
                framed = await attach_raw(line["a"], mallory, nic_key=line["b"].key)
            elif fault == "signed by another key":
                framed = await attach_raw(line["a"], twins.bob, signer=mallory)
            else:
                stream = await connect_unix(line["a"].state_dir / "twins.sock")
                framed = FramedStream(stream)
                await framed.receive()
                await framed.send(b"\x00" * 40)
            async with framed.stream:
                assert await answer(framed) == "refused"
                assert await framed_closed(framed)
            assert line["a"].port.counters["attach_refused"] == 1
            # Bob's sessions are untouched; Alice's NIC still serves her.
            await twins.a_bus.send(twins.bob.public, text_message("still fine"),
                                   wait="delivered", timeout=10)


async def test_a_twin_cannot_send_or_publish_as_another(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with two_hops(tmp_path) as (line, twins):
            # Mallory proves her own key, then submits an envelope sealed as Alice.
            mallory = Identity.generate()
            framed = await attach_raw(line["a"], mallory)
            async with framed.stream:
                assert await answer(framed) == "attached"
                envelope, _ = TwinCrypto(twins.alice).seal_message(
                    twins.bob.public, text_message("forged").to_bytes(), TEXT_ID,
                    now=time.time())
                assert await submit_raw(framed, envelope, 10) == (False, "unauthorized")
            assert len(line["a"].port.outbox) == 0
            assert await nothing_received(twins.b_bus)


def notice_frame(message_id: bytes, twin: PublicKey, code: str) -> bytes:
    frame = schemas.local.NicBus.new_message()
    notice = frame.init("notice")
    notice.messageId = message_id
    notice.twin = twin.raw
    notice.code = code
    return bytes(frame.to_bytes())


async def test_only_the_destination_nic_may_answer_for_the_destination(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with two_hops(tmp_path) as (line, twins):
            # Bob is busy: his NIC takes his messages but they do not reach him.
            line["c"].intercept(lambda source, frame: [])
            message_id = await twins.a_bus.send(twins.bob.public, text_message("hi"))
            port, bob = line["a"].port, twins.bob.public
            # The NIC in the middle saw the id go by, and claims Bob is unknown.
            port.on_packet(line["b"].key, notice_frame(message_id, bob, "unknownTwin"), 1)
            # Bob's own NIC may say he is offline or unknown, but nothing else.
            port.on_packet(line["c"].key, notice_frame(message_id, bob, "rejectedSchema"), 2)
            assert port.counters["notices_refused"] == 2
            assert await twins.a_bus.status(message_id) == ("sent", "")
            port.on_packet(line["c"].key, notice_frame(message_id, bob, "unknownTwin"), 2)
            assert await twins.a_bus.wait_status(message_id, timeout=5) == (
                "failed", "unknownTwin")


# --- the inbox store and a concurrent arrival ------------------------------------------


class SlowInbox(InboxStore):
    """An inbox whose `accept` returns slowly after it committed: the window in which
    the client's reader has stored a message but not yet handed it to `receive()`."""

    def accept(self, *args: Any, **kwargs: Any) -> bool:
        new = super().accept(*args, **kwargs)
        time.sleep(0.3)
        return new


async def test_a_message_arriving_while_the_inbox_is_read_is_received_once(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        inbox = SlowInbox(tmp_path / "bob-inbox.sqlite3")
        async with two_hops(tmp_path, inbox=inbox) as (_, twins):
            # A message arrives, and while Bob's client is storing it the application
            # asks for its first message (which reads what waits in the store).
            message_id = await twins.a_bus.send(twins.bob.public, text_message("one"))
            while not inbox.remembers(message_id):
                await trio.sleep(0.01)
            assert (await twins.b_bus.receive()).id == message_id
            assert await nothing_received(twins.b_bus, 1.0)
