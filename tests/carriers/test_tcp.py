import contextlib
import socket

import pytest
import trio

from twinmesh.carriers.tcp import TcpCarrier, format_address
from twinmesh.carriers.uri import PeerUri
from twinmesh.testing.carriers import CARRIER_CHECKS, run_carrier_check

LISTEN = PeerUri("tcp", "127.0.0.1", 0)


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
        await run_carrier_check(TcpCarrier(), LISTEN, check)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
async def test_ipv6_loopback() -> None:
    with trio.fail_after(10):
        await run_carrier_check(TcpCarrier(), PeerUri("tcp", "::1", 0), "remote_address")


async def test_serve_reports_the_real_port() -> None:
    async def handler(stream: trio.abc.Stream, remote: str) -> None:
        await stream.send_all(remote.encode())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(TcpCarrier().serve, LISTEN, handler)
            assert bound.scheme == "tcp" and bound.host == "127.0.0.1" and bound.port != 0
            stream = await TcpCarrier().dial(bound)
            async with stream:
                local_port = stream.socket.getsockname()[1]
                remote = (await stream.receive_some()).decode()
            assert remote == f"127.0.0.1:{local_port}"
            nursery.cancel_scope.cancel()


async def test_dialed_streams_have_nodelay() -> None:
    async def handler(stream: trio.abc.Stream, remote: str) -> None:
        await stream.receive_some()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(TcpCarrier().serve, LISTEN, handler)
            stream = await TcpCarrier().dial(bound)
            async with stream:
                assert isinstance(stream, trio.SocketStream)
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            nursery.cancel_scope.cancel()


async def test_dial_nobody_raises_oserror() -> None:
    with trio.fail_after(10):
        # Bind a port, then close it: nobody listens there any more.
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()
        with pytest.raises(OSError):
            await TcpCarrier().dial(PeerUri("tcp", "127.0.0.1", port))


async def test_connections_over_the_limit_are_closed() -> None:
    entered = trio.Event()

    async def handler(stream: trio.abc.Stream, remote: str) -> None:
        entered.set()
        await trio.sleep_forever()

    carrier = TcpCarrier(max_connections=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(carrier.serve, LISTEN, handler)
            first = await carrier.dial(bound)
            await entered.wait()
            second = await carrier.dial(bound)
            async with first, second:
                with contextlib.suppress(trio.BrokenResourceError):  # EOF or reset
                    assert await second.receive_some() == b""
            nursery.cancel_scope.cancel()


async def test_other_schemes_are_refused() -> None:
    with pytest.raises(ValueError, match="tcp carrier"):
        await TcpCarrier().dial(PeerUri("ws", "127.0.0.1", 1, "/pnic"))


def test_format_address() -> None:
    assert format_address(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert format_address(("::1", 80, 0, 0)) == "[::1]:80"
