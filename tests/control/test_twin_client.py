"""The twin control client against real twins on real control sockets, and against a
hand-written server for what a healthy twin never does (hang up, answer garbage)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from twinmesh.carriers.unix import serve_unix
from twinmesh.control.framed import FramedStream
from twinmesh.control.twin_client import (
    CALL_TIMEOUT,
    call_timeout,
    connect_twin,
    control_socket_path,
    twin_call,
)
from twinmesh.errors import ApiError
from twinmesh.testing.twins import TwinMesh, twin_mesh
from twinmesh.twin.control import serve_control
from twinmesh.twin.service import CONTROL_SOCKET

TIMEOUT = 20


@asynccontextmanager
async def controlled(tmp_path: Path, nics: int = 2) -> AsyncIterator[TwinMesh]:
    """A twin mesh whose twins each serve their control socket in their state dir."""
    async with twin_mesh(tmp_path, nics=nics) as mesh:
        for twin in mesh.twins:
            await mesh.nursery.start(serve_control, twin, twin.state_dir / CONTROL_SOCKET)
        yield mesh


@asynccontextmanager
async def hand_server(path: Path, handler: Callable[[FramedStream], Awaitable[None]]
                      ) -> AsyncIterator[None]:
    async def connection(stream: trio.abc.Stream, remote: str) -> None:
        await handler(FramedStream(stream))

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, path, connection)
        yield
        nursery.cancel_scope.cancel()


async def test_nobody_at_the_path_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ApiError) as missing:
        await twin_call(tmp_path, "status")
    assert missing.value.code == "notRunning"
    assert missing.value.message == (
        f"twin not running at {tmp_path / CONTROL_SOCKET} (is twind running?)")
    stale = tmp_path / "stale.sock"  # a socket file nobody listens on: refused
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()
    with pytest.raises(ApiError, match=r"twin not running at .*stale\.sock"):
        await twin_call(stale, "status")


def test_a_state_dir_or_the_socket_itself_names_the_twin(tmp_path: Path) -> None:
    assert control_socket_path(tmp_path) == tmp_path / CONTROL_SOCKET
    assert control_socket_path(tmp_path / "x.sock") == tmp_path / "x.sock"
    # Not there yet: a state dir, unless it looks like a socket.
    assert control_socket_path(tmp_path / "twin") == tmp_path / "twin" / CONTROL_SOCKET


def test_calls_that_wait_by_design_get_that_long_plus_the_margin() -> None:
    assert call_timeout("status", None) == CALL_TIMEOUT
    assert call_timeout("ping", {"twin": "t", "timeout": 7.0}) == CALL_TIMEOUT + 7.0
    assert call_timeout("send", {"ttl": 60.0, "wait": True}) == CALL_TIMEOUT + 60.0
    assert call_timeout("send", {"ttl": 60.0, "wait": False}) == CALL_TIMEOUT
    assert call_timeout("ping", {"timeout": float("nan")}) == CALL_TIMEOUT


async def test_calls_return_the_answer_and_refusals_raise_with_the_code(tmp_path: Path) -> None:
    async with controlled(tmp_path) as mesh:
        alice, bob = mesh.twins
        with trio.fail_after(TIMEOUT):
            async with connect_twin(alice.state_dir) as client:
                identity = await client.call("identity")
                assert identity["twin"] == alice.key.text
                assert identity["nicSocket"] == str(alice.nic_path)
                pong = await client.call("ping", {"twin": bob.key.text, "sequence": 3})
                assert pong["sequence"] == 3 and pong["rtt"] > 0
                added = await client.call("addContact", {"twin": bob.key.text, "name": "bob"})
                assert (added["twin"], added["name"]) == (bob.key.text, "bob")
                assert await client.call("removeContact", bob.key.text) is None
                with pytest.raises(ApiError) as refused:
                    await client.call("acceptContact", {"twin": bob.key.text})
                assert refused.value.code == "unknownTwin"
                with pytest.raises(ApiError) as malformed:
                    await client.call("find", "not-a-twin")
                assert malformed.value.code == "malformed"
                assert (await client.call("status"))["connected"] is True  # still usable


async def test_concurrent_calls_on_one_connection_each_get_their_own_answer(
    tmp_path: Path
) -> None:
    async with controlled(tmp_path, nics=3) as mesh:
        alice, bob, carol = mesh.twins
        results: dict[str, object] = {}
        with trio.fail_after(TIMEOUT):
            async with connect_twin(alice.state_dir) as client:

                async def run(name: str, which: str, value: object) -> None:
                    results[name] = await client.call(which, value)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run, "bob", "ping", {"twin": bob.key.text, "sequence": 1})
                    nursery.start_soon(run, "carol", "ping",
                                       {"twin": carol.key.text, "sequence": 2})
                    nursery.start_soon(run, "status", "status", None)
                    nursery.start_soon(run, "contacts", "contacts", None)
    assert results["bob"]["twin"] == bob.key.text  # type: ignore[index]
    assert results["carol"]["sequence"] == 2  # type: ignore[index]
    assert results["status"]["twin"] == alice.key.text  # type: ignore[index]
    assert results["contacts"] == []


async def test_events_after_subscribe_bring_an_incoming_chat(tmp_path: Path) -> None:
    async with controlled(tmp_path) as mesh:
        alice, bob = mesh.twins
        with trio.fail_after(TIMEOUT):
            async with connect_twin(bob.state_dir) as client:
                with pytest.raises(ApiError, match="subscribe"):
                    client.events()
                await client.subscribe()
                await twin_call(alice.state_dir, "send", {"twin": bob.key.text, "text": "yo"})
                async for event in client.events():
                    if "message" in event:
                        break
    assert event["message"]["text"] == "yo"
    assert event["message"]["peer"] == alice.key.text


async def test_a_twin_that_hangs_up_fails_pending_calls_and_events(tmp_path: Path) -> None:
    path = tmp_path / "hangup.sock"

    async def hang_up_after_subscribe(framed: FramedStream) -> None:
        body = await framed.receive()
        assert body is not None
        await framed.send(json.dumps({"id": json.loads(body)["id"], "done": None}).encode())
        await framed.receive()  # the next request: hang up instead of answering

    with trio.fail_after(TIMEOUT):
        async with hand_server(path, hang_up_after_subscribe), connect_twin(path) as client:
            await client.subscribe()
            with pytest.raises(ApiError) as lost:
                await client.call("status")
            assert lost.value.code == "disconnected"
            with pytest.raises(ApiError, match="closed the connection"):
                await client.next_event()
            with pytest.raises(ApiError, match="closed the connection"):
                async for _ in client.events():
                    pass
            with pytest.raises(ApiError, match="closed the connection"):
                await client.call("identity")


async def test_a_silent_twin_is_a_timeout_and_garbage_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"

    async def babble(framed: FramedStream) -> None:
        await framed.receive()
        await framed.send(b"{not json")
        await framed.send(json.dumps({"id": 999, "status": {}}).encode())  # nobody asked
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with hand_server(path, babble), connect_twin(path) as client:
            with pytest.raises(ApiError) as slow:
                await client.call("status", timeout=0.3)
    assert slow.value.code == "timeout"
    assert "did not answer status" in slow.value.message


async def test_a_closing_notice_from_the_twin_is_the_error_callers_see(tmp_path: Path) -> None:
    path = tmp_path / "notice.sock"

    async def refuse(framed: FramedStream) -> None:
        await framed.receive()
        notice = {"id": 0, "error": {"code": "malformed", "message": "closing: frame cap"}}
        await framed.send(json.dumps(notice).encode())
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with hand_server(path, refuse), connect_twin(path) as client:
            with pytest.raises(ApiError, match="closing: frame cap"):
                await client.call("status")


async def test_the_error_escaping_a_connection_block_is_the_error_itself(
    tmp_path: Path
) -> None:
    path = tmp_path / CONTROL_SOCKET

    async def answer(framed: FramedStream) -> None:
        await framed.receive()

    async with hand_server(path, answer):
        with pytest.raises(KeyError):  # not an ExceptionGroup around it
            async with connect_twin(tmp_path):
                raise KeyError("mine")
