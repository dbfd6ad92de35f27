import contextlib
import functools
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
import trio
import trio.testing
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode
from websockets.trio.client import connect
from websockets.trio.server import ServerConnection, serve

from twinmesh.carriers.uri import PeerUri
from twinmesh.carriers.ws import MAX_MESSAGE, WebSocketCarrier, WebSocketStream
from twinmesh.testing.carriers import CARRIER_CHECKS, expect_end, receive_exactly, run_carrier_check

LISTEN = PeerUri("ws", "127.0.0.1", 0, "/pnic")


async def _echo(stream: trio.abc.Stream, remote: str) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


async def ws_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Client and server websocket streams joined in memory, no sockets."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    accepted: list[WebSocketStream | None] = []

    async def accept() -> None:
        accepted.append(await WebSocketStream.accept(server_transport, "/pnic"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        client = await WebSocketStream.connect(client_transport, LISTEN.with_port(1))
    server = accepted[0]
    assert server is not None
    return client, server


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("check", list(CARRIER_CHECKS))
async def test_conformance(check: str) -> None:
    with trio.fail_after(10):
        await run_carrier_check(WebSocketCarrier(), LISTEN, check)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
async def test_ipv6_loopback() -> None:
    with trio.fail_after(10):
        await run_carrier_check(WebSocketCarrier(), PeerUri("ws", "::1", 0), "remote_address")


async def test_stream_contract() -> None:
    with trio.fail_after(30):
        await trio.testing.check_two_way_stream(ws_pair, None)


async def test_serve_reports_real_port_and_default_path() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                WebSocketCarrier().serve, PeerUri("ws", "127.0.0.1", 0), _echo
            )
            assert bound.port != 0
            assert bound.path == "/pnic"
            nursery.cancel_scope.cancel()


async def test_wrong_path_is_refused_with_404() -> None:
    carrier = WebSocketCarrier()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(carrier.serve, LISTEN, _echo)
            with pytest.raises(ConnectionRefusedError, match="404"):
                await carrier.dial(replace(bound, path="/other"))
            # A foreign client gets the same answer.
            with pytest.raises(InvalidStatus, match="404"):
                async with connect(f"ws://127.0.0.1:{bound.port}/other"):
                    pass
            # The listener is still fine.
            stream = await carrier.dial(bound)
            async with stream:
                await stream.send_all(b"ok")
                assert await receive_exactly(stream, 2) == b"ok"
            nursery.cancel_scope.cancel()


async def test_custom_path() -> None:
    with trio.fail_after(10):
        await run_carrier_check(WebSocketCarrier(), replace(LISTEN, path="/a/b"), "echo_small")


async def test_a_standard_client_can_link_without_compression() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(WebSocketCarrier().serve, LISTEN, _echo)
            # The client offers permessage-deflate by default; we must decline it.
            async with connect(str(bound)) as ws:
                assert ws.protocol.extensions == []
                await ws.send(b"abc")
                assert await ws.recv() == b"abc"
            nursery.cancel_scope.cancel()


async def _foreign_server(
    nursery: trio.Nursery,
    handler: Callable[[ServerConnection], Awaitable[None]],
    max_size: int | None = 2**20,
) -> PeerUri:
    """A plain websockets.trio server, as some other implementation would run it."""
    server = await nursery.start(
        functools.partial(serve, handler, 0, host="127.0.0.1", max_size=max_size)
    )
    port = server.listeners[0].socket.getsockname()[1]
    return PeerUri("ws", "127.0.0.1", port, "/pnic")


async def test_big_sends_are_split_into_messages() -> None:
    sizes: list[int] = []
    done = trio.Event()

    async def record(ws: ServerConnection) -> None:
        async for message in ws:
            sizes.append(len(message))
        done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            uri = await _foreign_server(nursery, record, max_size=None)
            stream = await WebSocketCarrier().dial(uri)
            async with stream:
                await stream.send_all(b"x" * (2 * MAX_MESSAGE + 10))
                await stream.send_all(b"y")
            await done.wait()
            nursery.cancel_scope.cancel()
    assert sizes == [MAX_MESSAGE, MAX_MESSAGE, 10, 1]


async def test_pings_are_answered_and_a_clean_close_reads_as_eof() -> None:
    async def ping_then_close(ws: ServerConnection) -> None:
        pong = await ws.ping()
        await pong.wait()
        await ws.send(b"after pong")
        await ws.aclose(CloseCode.NORMAL_CLOSURE)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            uri = await _foreign_server(nursery, ping_then_close)
            stream = await WebSocketCarrier().dial(uri)
            async with stream:
                assert await receive_exactly(stream, 10) == b"after pong"
                assert await stream.receive_some() == b""
                assert await stream.receive_some() == b""  # and it stays at EOF
                with pytest.raises(trio.BrokenResourceError):
                    await stream.send_all(b"too late")
            nursery.cancel_scope.cancel()


async def test_an_error_close_is_broken() -> None:
    async def fail(ws: ServerConnection) -> None:
        await ws.send("text frames are bytes too")
        await ws.aclose(CloseCode.INTERNAL_ERROR, "boom")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            uri = await _foreign_server(nursery, fail)
            stream = await WebSocketCarrier().dial(uri)
            async with stream:
                assert await receive_exactly(stream, 25) == b"text frames are bytes too"
                with pytest.raises(trio.BrokenResourceError, match="1011"):
                    await stream.receive_some()
            nursery.cancel_scope.cancel()


async def test_an_oversized_message_breaks_the_stream() -> None:
    seen: list[BaseException] = []

    async def handler(stream: trio.abc.Stream, remote: str) -> None:
        try:
            await stream.receive_some()
        except trio.BrokenResourceError as exc:
            seen.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(WebSocketCarrier().serve, LISTEN, handler)
            async with connect(str(bound), compression=None) as ws:
                with contextlib.suppress(ConnectionClosed):  # it may close mid-send
                    await ws.send(b"x" * (MAX_MESSAGE + 8192))
                await ws.wait_closed()
                assert ws.close_code == CloseCode.MESSAGE_TOO_BIG
            nursery.cancel_scope.cancel()
    assert len(seen) == 1


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"",  # connect and say nothing
        b"GET /pnic HTTP/1.1\r\nHost: x\r\n\r\n",  # HTTP, but no upgrade
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64,  # a TLS hello
        b"GET /pnic HTTP/1.1\r\n" + b"X-Long: " + b"a" * 10000 + b"\r\n\r\n",
    ],
)
async def test_bad_clients_are_dropped_and_the_listener_survives(request_bytes: bytes) -> None:
    carrier = WebSocketCarrier(handshake_timeout=0.2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(carrier.serve, LISTEN, _echo)
            raw = await trio.open_tcp_stream("127.0.0.1", bound.port)
            async with raw:
                await raw.send_all(request_bytes)
                while True:  # whatever the answer, the server hangs up
                    try:
                        if not await raw.receive_some():
                            break
                    except trio.BrokenResourceError:
                        break
            stream = await carrier.dial(bound)
            async with stream:
                await stream.send_all(b"ok")
                assert await receive_exactly(stream, 2) == b"ok"
            nursery.cancel_scope.cancel()


async def test_dialing_something_else_is_an_oserror() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(OSError):
                await WebSocketCarrier().dial(PeerUri("ws", "127.0.0.1", port, "/pnic"))
            nursery.cancel_scope.cancel()


async def test_closing_wakes_a_blocked_receiver() -> None:
    with trio.fail_after(10):
        client, server = await ws_pair()
        async with server, trio.open_nursery() as nursery:

            async def receive() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await client.receive_some()

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
            await expect_end(server)
