"""The bus client against a scripted NIC on a real Unix socket: what it does when the
NIC is slow to read, never answers, or fails a request.

The end-to-end behaviour (real NICs, delivery, acks, exactly once) is tested in
tests/nic/test_twins.py and tests/nic/test_bus_reliability.py; here the NIC is a
test double that speaks the local protocol by hand, so the test decides when it
reads and what it answers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from twinmesh.bus.client import EARLY_WRITE_ITEMS, REQUEST_TIMEOUT, BusClient, BusError
from twinmesh.bus.crypto import MAX_PAYLOAD, TwinCrypto, read_header
from twinmesh.bus.inbox_store import InboxStore
from twinmesh.carriers.unix import serve_unix
from twinmesh.control.framed import FramedStream
from twinmesh.identity.keys import Identity
from twinmesh.wire import schemas

_local = schemas.local
TIMEOUT = 10
BOB = Identity.generate().public


class ScriptedNic:
    """Attaches any twin, answers `publish`; what it does with submissions is up to
    the test: `answer` (the default) says ok, else they are only collected."""

    def __init__(self) -> None:
        self.key = Identity.generate().public
        self.reading = trio.Event()  # cleared: the NIC does not read (its buffer fills)
        self.reading.set()
        self.answer = True
        self.submitted: list[tuple[int, bytes]] = []  # (request id, envelope)
        self.submits_frames = 0
        self.framed: FramedStream | None = None
        self._sending = trio.Lock()  # the test and the serving task both send

    async def serve(self, stream: trio.abc.Stream, remote: str) -> None:
        framed = self.framed = FramedStream(stream)
        challenge = _local.LocalMessage.new_message()
        challenge.init("challenge").nicKey = self.key.raw
        challenge.challenge.nonce = bytes(32)
        await framed.send(challenge.to_bytes())
        assert await framed.receive() is not None  # the attach: any twin will do here
        attached = _local.LocalMessage.new_message()
        attached.init("attached").sessionId = 1
        await framed.send(attached.to_bytes())
        while True:
            await self.reading.wait()
            body = await framed.receive()
            if body is None:
                return
            which, items = schemas.decode(_local.LocalMessage, body, _read)
            if which == "publish":
                await self.results([(items, True, "", "")])
            elif which == "submits":
                self.submits_frames += 1
                self.submitted += items
                if self.answer:
                    await self.results([(request_id, True, "", "queued")
                                        for request_id, _ in items if request_id])

    async def results(self, answers: list[tuple[int, bool, str, str]]) -> None:
        assert self.framed is not None
        message = _local.LocalMessage.new_message()
        for result, (request_id, ok, code, status) in zip(
                message.init("results", len(answers)), answers, strict=True):
            result.requestId, result.ok, result.code, result.status = (
                request_id, ok, code, status)
        async with self._sending:
            await self.framed.send(message.to_bytes())

    async def status_update(self, message_id: bytes, status: str, code: str) -> None:
        assert self.framed is not None
        message = _local.LocalMessage.new_message()
        update = message.init("statusUpdates", 1)[0]
        update.messageId, update.status, update.code = message_id, status, code
        async with self._sending:
            await self.framed.send(message.to_bytes())


def _read(reader: Any) -> tuple[str, Any]:
    which = str(reader.which())
    if which == "submits":
        return which, [(int(s.requestId), bytes(s.envelope)) for s in reader.submits]
    return which, int(reader.requestId)


@asynccontextmanager
async def attached(tmp_path: Path) -> AsyncIterator[tuple[BusClient, ScriptedNic]]:
    nic = ScriptedNic()
    path = tmp_path / "twins.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, path, nic.serve)
        async with BusClient.connect(Identity.generate(), path) as bus:
            yield bus, nic
        nursery.cancel_scope.cancel()


def _text(size: int) -> Any:
    message = schemas.rmb.TextMessage.new_message()
    message.body = "x" * size
    return message


async def test_sends_queued_while_the_nic_does_not_read_all_arrive_whole_in_order(
    tmp_path: Path
) -> None:
    count = 24  # ~1.5 MB: far more than a socket buffer holds
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            nic.reading = trio.Event()
            ids: list[bytes] = []

            async def send(i: int) -> None:
                ids.append(await bus.send(BOB, _text(MAX_PAYLOAD - 100)))

            async with trio.open_nursery() as senders:
                for i in range(count):
                    senders.start_soon(send, i)
                await trio.testing.wait_all_tasks_blocked()
                nic.reading.set()
            assert len(ids) == count
            sent = [read_header(envelope).id for _, envelope in nic.submitted]
            assert sorted(sent) == sorted(ids)
            request_ids = [request_id for request_id, _ in nic.submitted]
            assert request_ids == sorted(request_ids)  # in the order they were made


async def test_a_nic_that_never_answers_fails_the_send_as_offline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with attached(tmp_path) as (bus, nic):
        nic.answer = False
        with trio.fail_after(10 * REQUEST_TIMEOUT):  # (virtual time)
            with pytest.raises(BusError) as error:
                await bus.send(BOB, _text(10))
            assert error.value.code == "offline" and "did not answer" in str(error.value)
            nic.answer = True  # later requests are answered again
            assert len(await bus.send(BOB, _text(10))) == 16


async def test_a_request_whose_message_fails_ends_with_the_nics_code(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with attached(tmp_path) as (bus, nic), trio.open_nursery() as nursery:
        async def fail_it() -> None:
            while not nic.submitted:
                await trio.sleep(0.01)
            message_id = read_header(nic.submitted[-1][1]).id
            await nic.status_update(message_id, "failed", "noRoute")

        nursery.start_soon(fail_it)
        # (virtual time) long before the request would expire
        with trio.fail_after(REQUEST_TIMEOUT / 2), pytest.raises(BusError) as error:
            await bus.request(BOB, _text(10), timeout=REQUEST_TIMEOUT)
        assert error.value.code == "noRoute"


async def test_a_burst_of_sends_reaches_the_nic_in_two_frames(tmp_path: Path) -> None:
    """The first send goes out at once; the others made in the same scheduling round
    wait for it and go out together (one write, one wake-up of the NIC)."""
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            async with trio.open_nursery() as senders:
                for _ in range(50):
                    senders.start_soon(bus.send, BOB, _text(10))
            assert len(nic.submitted) == 50
            assert nic.submits_frames == 2


async def test_waits_for_a_status_end_at_their_own_timeouts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with attached(tmp_path) as (bus, nic):
        message_id = await bus.send(BOB, _text(10))
        ended: dict[str, tuple[float, tuple[str, str]]] = {}

        async def wait(name: str, timeout: float) -> None:
            status = await bus.wait_status(message_id, timeout=timeout)
            ended[name] = (trio.current_time() - started, status)

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "short", 5.0)
            nursery.start_soon(wait, "long", 20.0)
            nursery.start_soon(wait, "delivered", 60.0)
            await trio.sleep(10.0)
            assert set(ended) == {"short"}
            await trio.sleep(15.0)
            await nic.status_update(message_id, "delivered", "")
        assert ended["short"][0] == pytest.approx(5.0, abs=0.1)
        assert ended["long"][0] == pytest.approx(20.0, abs=0.1)
        assert ended["short"][1][0] == ended["long"][1][0] == "queued"
        assert ended["delivered"][1] == ("delivered", "")
        assert 25.0 <= ended["delivered"][0] < 26.0


class _Steps(trio.abc.Instrument):
    """Counts the steps of the tasks whose name ends with `suffix`."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.steps += 1


async def test_sends_made_one_at_a_time_go_out_without_waking_the_writer_task(
    tmp_path: Path
) -> None:
    """Each goes out at once from the sending task: no other task of the client runs
    for it (a task switch is a turn of the event loop, per message)."""
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            await bus.send(BOB, _text(10))
            writer = _Steps("BusClient._writer")
            trio.lowlevel.add_instrument(writer)
            try:
                for _ in range(10):
                    await bus.send(BOB, _text(10))
            finally:
                trio.lowlevel.remove_instrument(writer)
            assert len(nic.submitted) == 11
            assert writer.steps == 0


async def test_status_changes_of_one_frame_reach_on_statuses_together(
    tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            calls: list[list[tuple[bytes, str, str]]] = []
            bus.on_statuses = calls.append
            first = await bus.send(BOB, _text(10))
            second = await bus.send(BOB, _text(10))
            assert nic.framed is not None
            message = _local.LocalMessage.new_message()
            updates = message.init("statusUpdates", 2)
            for update, message_id in zip(updates, (first, second), strict=True):
                update.messageId, update.status = message_id, "delivered"
            await nic.framed.send(message.to_bytes())
            assert await bus.wait_status(second, timeout=TIMEOUT) == ("delivered", "")
            assert calls[-1] == [(first, "delivered", ""), (second, "delivered", "")]


async def test_a_message_on_message_takes_is_consumed_and_the_rest_reach_receive(
    tmp_path: Path
) -> None:
    me, peer = Identity.generate(), Identity.generate()
    nic = ScriptedNic()
    path = tmp_path / "twins.sock"
    inbox = InboxStore(tmp_path / "inbox.sqlite3")
    sealer = TwinCrypto(peer)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_unix, path, nic.serve)
            async with BusClient.connect(me, path, inbox=inbox) as bus:
                taken: list[bytes] = []

                def on_message(received: Any) -> bool:
                    if received.payload == _text(1).to_bytes():
                        taken.append(received.id)
                        return True
                    return False

                bus.on_message = on_message
                envelopes = [sealer.seal_message(me.public, _text(size).to_bytes(),
                                                 _text(size).schema.node.id,
                                                 now=time.time())[0]
                             for size in (1, 2)]
                message = _local.LocalMessage.new_message()
                listed = message.init("deliveries", 2)
                for i, envelope in enumerate(envelopes):
                    listed[i] = envelope
                assert nic.framed is not None
                await nic.framed.send(message.to_bytes())
                received = await bus.receive()
                assert received.payload == _text(2).to_bytes()
                assert taken == [read_header(envelopes[0]).id]
                # Handled there and then: consumed, never offered again.
                assert [m.id for m in inbox.pending()] == [received.id]
            nursery.cancel_scope.cancel()
    inbox.close()


# ------------------------------------------------ submit_sealed_soon (callbacks)


def _sealed(size: int = 10) -> tuple[bytes, bytes]:
    envelope, header = TwinCrypto(Identity.generate()).seal_message(
        BOB, _text(size).to_bytes(), _text(size).schema.node.id, now=time.time())
    return envelope, header.id


async def test_a_callback_submit_hears_the_result_once_after_its_status(
    tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            events: list[Any] = []
            bus.on_statuses = lambda changes: events.append(("statuses", changes))
            nic.answer = False
            envelope, message_id = _sealed()
            answered = trio.Event()

            def done(error: BusError | None) -> None:
                events.append(("done", error))
                answered.set()

            assert bus.submit_sealed_soon(envelope, 10, message_id, done)
            while not nic.submitted:
                await trio.sleep(0.001)
            ((request_id, _),) = nic.submitted
            assert nic.framed is not None
            message = _local.LocalMessage.new_message()
            result = message.init("results", 1)[0]
            result.requestId, result.ok, result.status = request_id, True, "sent"
            await nic.framed.send(message.to_bytes())
            await answered.wait()
            await nic.status_update(message_id, "delivered", "")
            assert await bus.wait_status(message_id, timeout=TIMEOUT) == ("delivered", "")
            # The NIC's "sent" came with its result: told before `done`, as with
            # `submit_sealed`.
            assert events == [("statuses", [(message_id, "sent", "")]), ("done", None),
                              ("statuses", [(message_id, "delivered", "")])]
            assert await bus.status(message_id) == ("delivered", "")


async def test_a_callback_submit_the_nic_refuses_hears_its_code(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            nic.answer = False
            errors: list[BusError | None] = []
            envelope, message_id = _sealed()
            assert bus.submit_sealed_soon(envelope, 10, message_id, errors.append)
            while not nic.submitted:
                await trio.sleep(0.001)
            await nic.results([(nic.submitted[0][0], False, "overloaded", "too many")])
            while not errors:
                await trio.sleep(0.001)
            (error,) = errors
            assert error is not None and error.code == "overloaded"


async def test_callback_submits_hear_offline_once_when_the_nic_connection_breaks(
    tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            nic.answer = False
            calls: list[list[BusError | None]] = [[], []]
            for i in range(2):
                envelope, message_id = _sealed()
                assert bus.submit_sealed_soon(envelope, 10, message_id, calls[i].append)
            while len(nic.submitted) < 2:
                await trio.sleep(0.001)
            assert nic.framed is not None
            await nic.framed.stream.aclose()  # the NIC goes away mid-request
            while not all(calls):
                await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()
            for errors in calls:
                (error,) = errors  # exactly once
                assert error is not None and error.code == "offline"
            # A gone connection takes no more: the caller uses `submit_sealed`.
            envelope, message_id = _sealed()
            assert not bus.submit_sealed_soon(envelope, 10, message_id, calls[0].append)
    assert len(calls[0]) == 1


async def test_a_callback_submit_hears_offline_once_when_the_client_ends(
    tmp_path: Path
) -> None:
    errors: list[BusError | None] = []
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            nic.answer = False
            envelope, message_id = _sealed()
            assert bus.submit_sealed_soon(envelope, 10, message_id, errors.append)
            while not nic.submitted:
                await trio.sleep(0.001)
            assert errors == []
    (error,) = errors
    assert error is not None and error.code == "offline"


async def test_a_callback_submit_the_nic_never_answers_hears_offline_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with attached(tmp_path) as (bus, nic):
        nic.answer = False
        errors: list[BusError | None] = []
        envelope, message_id = _sealed()
        with trio.fail_after(10 * REQUEST_TIMEOUT):  # (virtual time)
            assert bus.submit_sealed_soon(envelope, 10, message_id, errors.append)
            while not errors:
                await trio.sleep(1)
            await trio.sleep(3 * REQUEST_TIMEOUT)
        (error,) = errors
        assert error is not None and "did not answer" in str(error)


# ------------------------------------------------------- send_soon (no task waits)


async def test_a_long_burst_of_send_soon_goes_out_in_frames_as_it_is_made_in_order(
    tmp_path: Path
) -> None:
    """Sends made in one scheduling round without a checkpoint: the NIC gets them in
    frames of EARLY_WRITE_ITEMS while the burst is still being made (the first one at
    once, the rest when the round ends), none lost, in the order they were made."""
    count = 200
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            ids = [bus.send_soon(BOB, _text(10)) for _ in range(count)]
            while len(nic.submitted) < count:
                await trio.sleep(0.001)
            assert [read_header(envelope).id for _, envelope in nic.submitted] == ids
            assert nic.submits_frames == 1 + (count - 1) // EARLY_WRITE_ITEMS + 1


async def test_send_soon_statuses_reach_on_statuses_and_wait_status(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            changes: list[tuple[bytes, str, str]] = []
            bus.on_statuses = changes.extend
            accepted: list[BusError | None] = []
            message_id = bus.send_soon(BOB, _text(10), done=accepted.append)
            while not accepted:
                await trio.sleep(0.001)
            assert accepted == [None]  # the NIC stored it
            await nic.status_update(message_id, "delivered", "")
            assert await bus.wait_status(message_id, timeout=TIMEOUT) == ("delivered", "")
            assert changes[-1] == (message_id, "delivered", "")


async def test_a_send_soon_the_nic_refuses_ends_failed_with_its_code(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            nic.answer = False
            changes: list[tuple[bytes, str, str]] = []
            bus.on_statuses = changes.extend
            errors: list[BusError | None] = []
            message_id = bus.send_soon(BOB, _text(10), done=errors.append)
            while not nic.submitted:
                await trio.sleep(0.001)
            await nic.results([(nic.submitted[0][0], False, "tooLarge", "too big")])
            assert await bus.wait_status(message_id, timeout=TIMEOUT) == (
                "failed", "tooLarge")
            assert changes == [(message_id, "failed", "tooLarge")]
            (error,) = errors
            assert error is not None and error.code == "tooLarge"


async def test_send_soon_says_overloaded_while_the_nic_does_not_read_and_loses_nothing(
    tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            nic.reading = trio.Event()
            ids: list[bytes] = []
            with pytest.raises(BusError) as refused:
                for _ in range(1000):  # 64 MB: far beyond buffers and backlog
                    ids.append(bus.send_soon(BOB, _text(MAX_PAYLOAD - 100)))
            assert refused.value.code == "overloaded"
            assert 0 < len(ids) < 1000
            nic.reading.set()
            while len(nic.submitted) < len(ids):
                await trio.sleep(0.001)
            assert [read_header(envelope).id for _, envelope in nic.submitted] == ids
            # Room again once the NIC has read the backlog.
            ids.append(bus.send_soon(BOB, _text(10)))


async def test_send_soon_on_a_broken_connection_says_offline(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with attached(tmp_path) as (bus, nic):
            bus.send_soon(BOB, _text(10))
            while not nic.submitted:
                await trio.sleep(0.001)
            assert nic.framed is not None
            await nic.framed.stream.aclose()
            with pytest.raises(BusError) as error:
                while True:
                    bus.send_soon(BOB, _text(10))
                    await trio.sleep(0.001)
            assert error.value.code == "offline"
