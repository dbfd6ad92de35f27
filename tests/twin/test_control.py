"""The twin's control socket: framing, typed errors, concurrency, events, the socket file.

The server is driven by raw frames over a real Unix socket. Most tests serve a
`ScriptedTwin` -- a test double with only the few Twin methods these requests reach, whose
replies the test releases at will (so "a slow ping does not block the next request" is
checked by order, not by clocks). The last test serves a real Twin.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from twinmesh.carriers.unix import connect_unix
from twinmesh.control.framed import CONTROL_MAX_FRAME, FramedStream
from twinmesh.errors import ApiError, ConfigError
from twinmesh.identity.keys import Identity
from twinmesh.testing.twins import twin_mesh
from twinmesh.twin.control import (
    IDLE_TIMEOUT,
    MAX_IN_FLIGHT,
    MAX_REQUEST_FRAME,
    WRITE_TIMEOUT,
    serve_control,
)
from twinmesh.wire.framing import PREFIX

TIMEOUT = 10
OTHER = Identity.generate().public.text


class ScriptedTwin:
    """Test double for `Twin`: identity, status, ping, inbox and subscribe only.

    `ping` waits until the test sets `release`; `status` raises (a bug in the twin);
    `inbox` returns `inbox_rows`; `emit` pushes an event to every subscriber."""

    def __init__(self) -> None:
        self.key = Identity.generate().public.text
        self.release = trio.Event()
        self.pings_started = 0
        self.inbox_rows: list[dict[str, Any]] = []
        self.subscribers: list[trio.MemorySendChannel[dict[str, Any]]] = []
        # `send_text_soon`'s callbacks, called by the test (as the bus client's
        # reader would when the NIC answers).
        self.sends: list[Callable[[dict[str, Any] | ApiError], None]] = []

    def identity_info(self) -> dict[str, Any]:
        return {"twin": self.key, "name": "scripted", "nic": "", "nicSocket": ""}

    async def status(self) -> dict[str, Any]:
        raise RuntimeError("a bug inside the twin")

    async def ping(self, twin: str, *, timeout: float, sequence: int) -> dict[str, Any]:
        self.pings_started += 1
        await self.release.wait()
        return {"twin": twin, "sequence": sequence, "rtt": 0.001}

    async def inbox(self, peer: str = "", *, limit: int = 50, since: float = 0.0
                    ) -> list[dict[str, Any]]:
        return self.inbox_rows

    def send_text_soon(self, twin: str, text: str, *, ttl: float,
                       done: Callable[[dict[str, Any] | ApiError], None],
                       spawn: Any) -> bool:
        if not text:
            raise ApiError("malformed", "an empty message")
        self.sends.append(done)
        return True

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](10)
        self.subscribers.append(send)
        try:
            yield receive
        finally:
            self.subscribers.remove(send)

    def emit(self, event: dict[str, Any]) -> None:
        for subscriber in self.subscribers:
            subscriber.send_nowait(event)


class Raw:
    """A client speaking frames of JSON by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.framed = FramedStream(stream, max_frame=CONTROL_MAX_FRAME)

    async def send(self, obj: Any) -> None:
        await self.framed.send(json.dumps(obj).encode())

    async def send_bytes(self, body: bytes) -> None:
        await self.framed.send(body)

    async def receive(self) -> Any:
        body = await self.framed.receive()
        return None if body is None else json.loads(body)


@asynccontextmanager
async def served(tmp_path: Path, twin: Any = None) -> AsyncIterator[tuple[Any, Path]]:
    twin = twin if twin is not None else ScriptedTwin()
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, twin, path)
        yield twin, path
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_client(path: Path) -> AsyncIterator[Raw]:
    async with await connect_unix(path) as stream:
        yield Raw(stream)


async def test_a_request_is_answered_with_its_id_on_a_0600_socket(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (twin, path), raw_client(path) as client:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            await client.send({"id": 41, "identity": None})
            assert await client.receive() == {"id": 41, "identity": twin.identity_info()}
    assert not path.exists()  # removed when the server stops


@pytest.mark.parametrize(("body", "expected_id", "reason"), [
    (b"{not json", 0, "not JSON"),
    (b"\xff\xfe", 0, "not JSON"),
    (b"[1, 2]", 0, "a request is a JSON object"),
    (b'{"id": 7, "launch": null}', 7, "launch"),
    (b'{"id": 8, "ping": {"twin": 3}}', 8, ""),
    (b'{"id": 9}', 9, "names one operation"),
])
async def test_a_bad_request_gets_a_typed_error_and_the_connection_goes_on(
    tmp_path: Path, body: bytes, expected_id: int, reason: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (twin, path), raw_client(path) as client:
            await client.send_bytes(body)
            answer = await client.receive()
            assert answer["id"] == expected_id
            assert answer["error"]["code"] == "malformed"
            assert reason in answer["error"]["message"]
            await client.send({"id": 10, "identity": None})
            assert (await client.receive())["identity"]["twin"] == twin.key


async def test_a_failing_twin_method_is_an_internal_error_not_a_dropped_socket(
    tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (_, path), raw_client(path) as client:
            await client.send({"id": 3, "status": None})
            answer = await client.receive()
            assert answer["id"] == 3 and answer["error"]["code"] == "internal"
            assert "a bug inside the twin" in answer["error"]["message"]
            await client.send({"id": 4, "identity": None})
            assert (await client.receive())["id"] == 4


async def test_an_oversized_frame_is_answered_with_the_reason_then_closed(
    tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (_, path):
            async with raw_client(path) as client:
                await client.stream.send_all(PREFIX.pack(MAX_REQUEST_FRAME + 1) + b"{}")
                answer = await client.receive()
                assert answer["error"]["code"] == "malformed"
                assert f"exceeds the cap of {MAX_REQUEST_FRAME}" in answer["error"]["message"]
                assert await client.receive() is None  # then the server hangs up
            async with raw_client(path) as other:  # ...on that connection only
                await other.send({"id": 1, "identity": None})
                assert (await other.receive())["id"] == 1


async def test_a_request_over_the_api_limit_but_under_the_frame_cap_is_malformed(
    tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (_, path), raw_client(path) as client:
            text = "x" * (100 * 1024)
            await client.send({"id": 5, "send": {"twin": OTHER, "text": text}})
            answer = await client.receive()
            assert answer["error"]["code"] == "malformed"
            assert "exceeds" in answer["error"]["message"]
            await client.send({"id": 6, "identity": None})
            assert (await client.receive())["id"] == 6


async def test_a_frame_cut_off_by_the_end_of_the_stream_is_answered_then_closed(
    tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (_, path), raw_client(path) as client:
            await client.stream.send_all(PREFIX.pack(100) + b'{"id": 1')
            await client.stream.send_eof()
            answer = await client.receive()
            assert answer["error"]["code"] == "malformed"
            assert "inside a frame" in answer["error"]["message"]
            assert await client.receive() is None


async def test_a_slow_ping_does_not_hold_up_the_next_request(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (twin, path), raw_client(path) as client:
            await client.send({"id": 1, "ping": {"twin": OTHER}})
            await client.send({"id": 2, "identity": None})
            first = await client.receive()
            assert first["id"] == 2 and "identity" in first
            twin.release.set()
            second = await client.receive()
            assert second == {"id": 1, "ping": {"twin": OTHER, "sequence": 0, "rtt": 0.001}}


async def test_requests_in_flight_per_connection_are_bounded(tmp_path: Path) -> None:
    total = MAX_IN_FLIGHT + 4
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (twin, path), raw_client(path) as client:
            frames = b"".join(
                PREFIX.pack(len(body)) + body
                for body in (json.dumps({"id": i, "ping": {"twin": OTHER, "sequence": i}})
                             .encode() for i in range(1, total + 1)))
            await client.stream.send_all(frames)  # all of them at once
            while twin.pings_started < MAX_IN_FLIGHT:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert twin.pings_started == MAX_IN_FLIGHT  # the rest wait their turn
            twin.release.set()
            answers = [await client.receive() for _ in range(total)]
            assert sorted(a["id"] for a in answers) == list(range(1, total + 1))
            assert all(a["ping"]["sequence"] == a["id"] for a in answers)


async def test_after_subscribe_the_connection_carries_events_and_answers(
    tmp_path: Path
) -> None:
    event = {"message": {"id": "ab", "peer": OTHER, "peerName": "", "outgoing": False,
                         "text": "hi", "at": 1.0, "status": "received", "code": ""}}
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (twin, path):
            async with raw_client(path) as subscribed, raw_client(path) as plain:
                await plain.send({"id": 1, "identity": None})
                await plain.receive()
                await subscribed.send({"id": 1, "subscribe": None})
                assert await subscribed.receive() == {"id": 1, "done": None}
                await subscribed.send({"id": 2, "subscribe": None})  # idempotent
                assert await subscribed.receive() == {"id": 2, "done": None}
                assert len(twin.subscribers) == 1
                twin.emit({"message": b"bytes are not JSON"})  # dropped, not fatal
                twin.emit(event)
                assert await subscribed.receive() == {"event": event}
                await subscribed.send({"id": 3, "identity": None})
                assert (await subscribed.receive())["id"] == 3
            while twin.subscribers:  # the subscription ends with its connection
                await trio.sleep(0.01)


async def test_an_answer_too_large_for_a_frame_becomes_a_typed_error(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (twin, path), raw_client(path) as client:
            twin.inbox_rows = [{"text": "x" * 1024}] * (CONTROL_MAX_FRAME // 1024 + 1)
            await client.send({"id": 12, "inbox": {}})
            answer = await client.receive()
            assert answer["id"] == 12 and answer["error"]["code"] == "tooLarge"
            twin.inbox_rows = []
            await client.send({"id": 13, "inbox": {}})
            assert await client.receive() == {"id": 13, "inbox": []}


async def test_a_client_that_vanishes_mid_request_leaves_the_server_serving(
    tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (twin, path):
            async with raw_client(path) as gone:
                await gone.send({"id": 1, "ping": {"twin": OTHER}})
                while twin.pings_started < 1:
                    await trio.sleep(0.01)
            twin.release.set()  # its answer has nobody to go to
            async with raw_client(path) as client:
                await client.send({"id": 2, "identity": None})
                assert (await client.receive())["id"] == 2


async def test_a_send_answered_by_a_callback_is_answered_once_even_after_the_client_ends(
    tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (twin, path), raw_client(path) as client:
            await client.send({"id": 5, "send": {"twin": OTHER, "text": "hi"}})
            await client.send({"id": 6, "send": {"twin": OTHER, "text": ""}})
            assert (await client.receive())["id"] == 6  # refused at once: malformed
            await client.send({"id": 7, "identity": None})
            assert (await client.receive())["id"] == 7  # not held up by the send
            await client.stream.send_eof()  # the client sends no more, still reads
            await trio.testing.wait_all_tasks_blocked()
            (done,) = twin.sends
            done({"id": "ab", "text": "hi"})
            assert await client.receive() == {"id": 5, "sent": {"id": "ab", "text": "hi"}}
            assert await client.receive() is None  # then the connection ends


async def test_a_send_refused_later_by_the_nic_is_a_typed_error(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (twin, path), raw_client(path) as client:
            await client.send({"id": 3, "send": {"twin": OTHER, "text": "hi", "ttl": 60}})
            while not twin.sends:
                await trio.sleep(0.001)
            twin.sends[0](ApiError("overloaded", "too many"))
            assert await client.receive() == {
                "id": 3, "error": {"code": "overloaded", "message": "too many"}}


async def test_only_a_connection_silent_for_the_idle_timeout_is_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with served(tmp_path) as (_, path), raw_client(path) as client:
        for request_id in (1, 2, 3):  # each within the timeout of the one before
            await trio.sleep(IDLE_TIMEOUT - 1)
            await client.send({"id": request_id, "identity": None})
            assert (await client.receive())["id"] == request_id
        with trio.fail_after(IDLE_TIMEOUT + 1):
            assert await client.receive() is None  # then silence: closed


async def test_a_subscribed_connection_is_never_idle(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with served(tmp_path) as (twin, path), raw_client(path) as client:
        await client.send({"id": 1, "subscribe": None})
        assert await client.receive() == {"id": 1, "done": None}
        await trio.sleep(3 * IDLE_TIMEOUT)
        twin.emit({"connection": {"twin": twin.key}})
        assert await client.receive() == {"event": {"connection": {"twin": twin.key}}}


async def test_a_client_that_stops_reading_is_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with served(tmp_path) as (twin, path), raw_client(path) as client:
        await client.send({"id": 1, "subscribe": None})
        assert await client.receive() == {"id": 1, "done": None}
        big = {"message": {"text": "x" * 60_000}}
        with trio.fail_after(3 * WRITE_TIMEOUT):
            while twin.subscribers:  # the subscription ends with the connection
                with contextlib.suppress(trio.WouldBlock):  # the twin's queue is full
                    twin.emit(big)
                await trio.sleep(1)


async def test_a_stale_socket_file_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: what a crashed twind leaves behind
    stale.close()
    assert path.exists()
    with trio.fail_after(TIMEOUT):
        async with served(tmp_path) as (twin, path), raw_client(path) as client:
            await client.send({"id": 1, "identity": None})
            assert (await client.receive())["identity"]["twin"] == twin.key
            with pytest.raises(ConfigError, match="already listening"):
                await serve_control(ScriptedTwin(), path)  # type: ignore[arg-type]
            await client.send({"id": 2, "identity": None})  # the first one still serves
            assert (await client.receive())["id"] == 2


async def test_a_real_twin_answers_and_pushes_a_chat_it_receives(tmp_path: Path) -> None:
    async with twin_mesh(tmp_path, nics=2) as mesh:
        alice, bob = mesh.twins
        with trio.fail_after(TIMEOUT):
            async with served(tmp_path, bob) as (_, path), raw_client(path) as client:
                await client.send({"id": 1, "subscribe": None})
                assert await client.receive() == {"id": 1, "done": None}
                await client.send({"id": 2, "status": None})
                status = (await client.receive())["status"]
                assert status["twin"] == bob.key.text and status["connected"] is True
                await alice.send_text(bob.key.text, "over the socket")
                while True:
                    message = await client.receive()
                    if "message" in message.get("event", {}):
                        break
                assert message["event"]["message"]["text"] == "over the socket"
                assert message["event"]["message"]["peer"] == alice.key.text
