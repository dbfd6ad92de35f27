"""The TCP carrier: a link is one TCP connection carrying the link's bytes as they are.

The listening half (`serve_tcp`) is shared with the websocket carrier, which runs its
HTTP upgrade on top of the same accepted TCP streams.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from twinmesh.carriers.base import DEFAULT_CONNECT_TIMEOUT, ConnectionHandler, connected
from twinmesh.carriers.uri import PeerUri

# What `serve_tcp` calls for every accepted connection (stream, "host:port").
# It may raise anything; `serve_tcp` drops the error and closes the stream.
TcpConnectionHandler = Callable[[trio.SocketStream, str], Awaitable[None]]

DEFAULT_MAX_CONNECTIONS = 1024  # per listener; connections beyond it are closed at once


class TcpCarrier:
    """Links over plain TCP: `tcp://host:port`."""

    scheme = "tcp"

    def __init__(self, *, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.max_connections = max_connections  # immutable after construction

    async def dial(self, uri: PeerUri) -> trio.abc.Stream:
        """Connect to `uri`. Raises OSError when nobody answers there.

        There is no timeout here: wrap the call in `trio.fail_after` if you need one.
        """
        check_scheme(uri, self.scheme)
        stream = await trio.open_tcp_stream(uri.host, uri.port)
        # trio's SocketStream already does this; the link sends small frames and
        # must not wait for Nagle, so we say it explicitly.
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        return stream

    def connect(
        self, uri: PeerUri, *, timeout: float = DEFAULT_CONNECT_TIMEOUT
    ) -> AbstractAsyncContextManager[trio.abc.Stream]:
        """The `Carrier` interface: `dial` within `timeout`, closed when the block ends."""
        return connected(lambda: self.dial(uri), uri, timeout)

    async def serve(
        self,
        uri: PeerUri,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[PeerUri] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `uri` until cancelled, running `handler(stream, "host:port")` in its
        own task for every connection and closing the stream when it returns."""
        check_scheme(uri, self.scheme)
        await serve_tcp(uri, handler, max_connections=self.max_connections, task_status=task_status)


async def serve_tcp(
    uri: PeerUri,
    on_connection: TcpConnectionHandler,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    task_status: trio.TaskStatus[PeerUri] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `uri.host`/`uri.port` until cancelled; report the bound URI (with the
    real port when `uri.port` is 0) through `task_status`.

    Every connection runs `on_connection` in its own task. Whatever it raises is dropped
    there (the caller's handler does its own logging): one connection never takes the
    listener down. The stream is closed when `on_connection` returns. At most
    `max_connections` run at once; further ones are closed as soon as they arrive.
    """
    listeners = await trio.open_tcp_listeners(uri.port, host=uri.host)
    if uri.port == 0 and len(listeners) > 1:
        # A name such as "localhost" can bind several addresses, each getting its own
        # random port; keep the first so the reported URI is the whole truth.
        for extra in listeners[1:]:
            await extra.aclose()
        del listeners[1:]
    port = listeners[0].socket.getsockname()[1]
    limit = trio.CapacityLimiter(max_connections)

    async def run_one(stream: trio.SocketStream) -> None:
        if limit.available_tokens == 0:
            await trio.aclose_forcefully(stream)
            return
        async with limit, stream:
            try:
                remote = format_address(stream.socket.getpeername())
            except OSError:
                return  # the peer is already gone
            with contextlib.suppress(Exception):
                await on_connection(stream, remote)

    # trio.serve_listeners runs the accept loops and the connection tasks in its own
    # nursery: one nursery per server. Listening sockets already exist, so callers may
    # dial the reported URI as soon as `started` returns.
    task_status.started(uri.with_port(port))
    await trio.serve_listeners(run_one, listeners)


def check_scheme(uri: PeerUri, scheme: str) -> None:
    if uri.scheme != scheme:
        raise ValueError(f"the {scheme} carrier cannot handle {uri}")


def format_address(sockaddr: Any) -> str:
    """`host:port` for an IPv4 address, `[host]:port` for IPv6."""
    host, port = sockaddr[0], sockaddr[1]
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"
