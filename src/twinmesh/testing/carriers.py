"""A conformance suite for carriers: what every `Carrier` must do, checked live.

Each check starts `carrier.serve(listen, ...)` with a small scripted handler, connects
the bound URI and watches what happens. The first byte a client sends tells the
handler what to do: `E` echo until EOF, `C` return at once, `R` raise.

    await check_carrier(TcpCarrier(), PeerUri("tcp", "127.0.0.1", 0))

Run it under `trio.fail_after`: a carrier that hangs makes the checks hang.
For the stream contract itself (checkpoints, Busy/Closed errors, cancellation), also
run `trio.testing.check_two_way_stream` on a pair of the carrier's streams.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from twinmesh.carriers.base import Carrier
from twinmesh.carriers.uri import PeerUri

BIG = 1024 * 1024
SEND_PIECE = 64 * 1024


class _Server:
    """The scripted handler and what it saw."""

    def __init__(self) -> None:
        self.remotes: list[str] = []
        self.eof_seen = trio.Event()

    async def handle(self, stream: trio.abc.Stream, remote: str) -> None:
        self.remotes.append(remote)
        command = await stream.receive_some(1)
        if command == b"R":
            raise RuntimeError("this handler fails on purpose")
        if command == b"E":
            while data := await stream.receive_some():
                await stream.send_all(data)
            self.eof_seen.set()
        # b"C" (or EOF): return; the carrier must close the stream.


@asynccontextmanager
async def serving(carrier: Carrier, listen: PeerUri) -> AsyncIterator[tuple[PeerUri, _Server]]:
    """Run the scripted handler on `listen`; yields (bound URI, server)."""
    server = _Server()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(carrier.serve, listen, server.handle)
        yield bound, server
        nursery.cancel_scope.cancel()


async def receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    """Read `size` bytes; AssertionError if the stream ends first."""
    got = bytearray()
    while len(got) < size:
        data = await stream.receive_some(size - len(got))
        assert data, f"stream ended after {len(got)} of {size} bytes"
        got += data
    return bytes(got)


async def expect_end(stream: trio.abc.Stream) -> None:
    """The stream must end: EOF or BrokenResourceError, and no data before that."""
    try:
        data = await stream.receive_some()
    except trio.BrokenResourceError:
        return
    assert data == b"", f"expected the end of the stream, got {len(data)} bytes"


async def check_echo_small(carrier: Carrier, bound: PeerUri, server: _Server) -> None:
    async with carrier.connect(bound) as stream:
        await stream.send_all(b"Ehello")
        assert await receive_exactly(stream, 5) == b"hello"


async def check_echo_1mib(carrier: Carrier, bound: PeerUri, server: _Server) -> None:
    payload = random.Random(1).randbytes(BIG)
    async with carrier.connect(bound) as stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(b"E")
            for start in range(0, BIG, SEND_PIECE):
                await stream.send_all(payload[start : start + SEND_PIECE])

        nursery.start_soon(send)  # receive at the same time: buffers are bounded
        assert await receive_exactly(stream, BIG) == payload


async def check_one_big_send_all(carrier: Carrier, bound: PeerUri, server: _Server) -> None:
    payload = random.Random(2).randbytes(BIG)
    async with carrier.connect(bound) as stream, trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, b"E" + payload)
        assert await receive_exactly(stream, BIG) == payload


async def check_client_close_is_eof(carrier: Carrier, bound: PeerUri, server: _Server) -> None:
    async with carrier.connect(bound) as stream:
        await stream.send_all(b"Eping")
        assert await receive_exactly(stream, 4) == b"ping"
        await stream.aclose()  # closing inside the block is allowed, and idempotent
        await server.eof_seen.wait()


async def check_server_close_is_end(carrier: Carrier, bound: PeerUri, server: _Server) -> None:
    async with carrier.connect(bound) as stream:
        await stream.send_all(b"C")
        await expect_end(stream)


async def check_send_to_closed_peer_breaks(
    carrier: Carrier, bound: PeerUri, server: _Server
) -> None:
    async with carrier.connect(bound) as stream:
        await stream.send_all(b"C")
        await expect_end(stream)
        try:
            while True:  # a TCP peer's reset may take a send or two to come back
                await stream.send_all(b"x" * 1024)
                await trio.sleep(0.01)
        except trio.BrokenResourceError:
            pass


async def check_failing_handler_keeps_listener(
    carrier: Carrier, bound: PeerUri, server: _Server
) -> None:
    for _ in range(3):
        async with carrier.connect(bound) as stream:
            await stream.send_all(b"R")
            await expect_end(stream)
    await check_echo_small(carrier, bound, server)


async def check_remote_address(carrier: Carrier, bound: PeerUri, server: _Server) -> None:
    await check_echo_small(carrier, bound, server)
    assert server.remotes, "the handler never ran"
    host, sep, port = server.remotes[0].rpartition(":")
    assert host and sep and port.isdigit(), f"remote {server.remotes[0]!r} is not host:port"


CARRIER_CHECKS: dict[str, Callable[[Carrier, PeerUri, _Server], Awaitable[None]]] = {
    "echo_small": check_echo_small,
    "echo_1mib": check_echo_1mib,
    "one_big_send_all": check_one_big_send_all,
    "client_close_is_eof": check_client_close_is_eof,
    "server_close_is_end": check_server_close_is_end,
    "send_to_closed_peer_breaks": check_send_to_closed_peer_breaks,
    "failing_handler_keeps_listener": check_failing_handler_keeps_listener,
    "remote_address": check_remote_address,
}


async def run_carrier_check(carrier: Carrier, listen: PeerUri, name: str) -> None:
    """Run the check called `name` (a key of CARRIER_CHECKS) on a fresh listener."""
    async with serving(carrier, listen) as (bound, server):
        await CARRIER_CHECKS[name](carrier, bound, server)


async def check_carrier(carrier: Carrier, listen: PeerUri) -> None:
    """Run every check; AssertionError (or the carrier's exception) on the first failure."""
    for name in CARRIER_CHECKS:
        await run_carrier_check(carrier, listen, name)
