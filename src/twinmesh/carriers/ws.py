"""The websocket carrier: a link tunnelled through `ws://host:port/pnic`, so it passes
HTTP proxies and reverse proxies that only forward websockets.

Theory of operation
-------------------
The link wants a plain byte stream; a websocket carries messages. `WebSocketStream`
turns one into the other: every `send_all` becomes one binary message (split when it
exceeds `MAX_MESSAGE`), and `receive_some` hands out the payloads of incoming data
frames as one continuous byte stream — message boundaries carry no meaning.

The stream drives websockets' sans-I/O core (`ClientProtocol` / `ServerProtocol`)
directly over a trio stream, the way websockets' own trio layer does: read bytes →
`receive_data()` → take `events_received()` → write `data_to_send()`.

Why not `websockets.trio.client.connect` / `serve` themselves (websockets 17.4): their
background reader, after every read, flushes protocol replies under the connection's
send lock. When both ends send bulk data at once, each sender holds its lock while
blocked on a full socket, so each reader waits for that lock and stops reading: both
peers deadlock. A link does exactly that (data both ways plus keepalives); the
`echo_1mib` carrier check reproduces it in a second. Here the receive side never
waits for the send lock (see `_read_more`), and without background tasks nothing
happens unless the link reads or writes, so there is no extra buffering either:
incoming data waits in the kernel until the link asks for it (back-pressure end to
end). A stock websockets.trio client and server interoperate with this carrier (tested).

Choices: no compression (the payload is encrypted, it would not shrink), no websocket
pings (the link has its own keepalive; we still answer the peer's pings), incoming
messages capped at `MAX_SIZE`, and the server only upgrades requests for its own path
(`/pnic` by default) — anything else gets HTTP 404.

Errors follow trio's stream contract: a clean websocket close (code 1000/1001) reads
as EOF (b""); a reset, an abnormal close or a protocol violation raises
`trio.BrokenResourceError`; using the stream after our own `aclose` raises
`trio.ClosedResourceError`.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from contextlib import AbstractAsyncContextManager
from dataclasses import replace

import trio
from websockets.client import ClientProtocol
from websockets.frames import DATA_OPCODES, OK_CLOSE_CODES, CloseCode, Frame
from websockets.http11 import Request
from websockets.protocol import CONNECTING, OPEN, Event, Protocol
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from twinmesh.carriers.base import (
    DEFAULT_CONNECT_TIMEOUT,
    ConnectionHandler,
    connected,
    receive_limit,
)
from twinmesh.carriers.tcp import DEFAULT_MAX_CONNECTIONS, TcpCarrier, check_scheme, serve_tcp
from twinmesh.carriers.uri import DEFAULT_WS_PATH, PeerUri

MAX_MESSAGE = 256 * 1024  # largest message we send; bigger send_all calls are split
MAX_SIZE = MAX_MESSAGE + 4096  # largest message we accept
RECEIVE_CHUNK = 64 * 1024  # how much we read from the transport at once
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # a client that does not finish its HTTP upgrade
CLOSE_TIMEOUT = 2.0  # how long aclose tries to get its close frame out


class WebSocketStream(trio.abc.Stream):
    """A `trio.abc.Stream` over one websocket connection (either side).

    Build it with `WebSocketStream.connect` (client) or `WebSocketStream.accept`
    (server); both run the HTTP upgrade over an already connected `transport`.
    Owns `transport` from then on and closes it in `aclose`.
    """

    def __init__(self, transport: trio.abc.Stream, protocol: Protocol) -> None:
        """Wrap a `protocol` whose opening handshake is done. Prefer the constructors."""
        self._transport = transport
        self._protocol = protocol
        self._buffer = bytearray()  # received payload bytes not yet handed out
        self._closed = False  # aclose() was called
        # Both the sending and the receiving side write to the transport (the receive
        # side answers pings and close frames); the lock keeps those writes whole.
        self._send_lock = trio.Lock()
        self._sending = False  # conflict detection for send_all / wait_send_all...
        self._receiving = False  # conflict detection for receive_some

    @classmethod
    async def connect(cls, transport: trio.abc.Stream, uri: PeerUri) -> WebSocketStream:
        """Run the client side of the upgrade for `uri` over `transport`.

        Raises ConnectionRefusedError when the server refuses the upgrade (wrong path,
        not a websocket server) and ConnectionResetError when it hangs up; `transport`
        is closed in both cases and on cancellation.
        """
        try:
            protocol = ClientProtocol(parse_uri(str(uri.without_key())), max_size=MAX_SIZE)
            protocol.send_request(protocol.connect())
            await _write_all(transport, protocol)
            events: list[Event] = []
            while protocol.state is CONNECTING and protocol.handshake_exc is None:
                await _read_once(transport, protocol)
                events += protocol.events_received()
            if protocol.handshake_exc is not None:
                raise ConnectionRefusedError(
                    f"{uri}: websocket upgrade failed: {protocol.handshake_exc}"
                ) from protocol.handshake_exc
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(transport)
            raise ConnectionResetError(f"{uri}: connection lost during the upgrade") from exc
        except BaseException:
            await trio.aclose_forcefully(transport)
            raise
        stream = cls(transport, protocol)
        stream._absorb(events)
        return stream

    @classmethod
    async def accept(cls, transport: trio.abc.Stream, path: str) -> WebSocketStream | None:
        """Run the server side of the upgrade over `transport`, accepting only `path`.

        Returns None after refusing the request (HTTP 404 for another path, 4xx for
        something that is not a websocket upgrade) or when the client hangs up; the
        caller then closes `transport`. Never raises for what the client sends.
        """
        protocol = ServerProtocol(max_size=MAX_SIZE)
        events: list[Event] = []
        try:
            while not events and protocol.handshake_exc is None:
                await _read_once(transport, protocol)
                events += protocol.events_received()
            if events:
                request = events[0]
                assert isinstance(request, Request)
                if urllib.parse.urlsplit(request.path).path == path:
                    response = protocol.accept(request)
                else:
                    response = protocol.reject(404, "Not Found\n")
                protocol.send_response(response)
            await _write_all(transport, protocol)
        except trio.BrokenResourceError:
            return None
        if protocol.state is not OPEN:
            return None
        stream = cls(transport, protocol)
        stream._absorb(events[1:])
        return stream

    # trio.abc.SendStream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` as one binary message, or as several when it is over MAX_MESSAGE."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this websocket")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("this websocket stream is closed")
            await trio.lowlevel.checkpoint()
            view = memoryview(data).cast("B")
            for start in range(0, len(view), MAX_MESSAGE):
                async with self._send_lock:
                    self._check_sendable()
                    self._protocol.send_binary(view[start : start + MAX_MESSAGE])
                    await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this websocket")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("this websocket stream is closed")
            async with self._send_lock:
                await self._transport.wait_send_all_might_not_block()
        finally:
            self._sending = False

    # trio.abc.ReceiveStream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` of payload; b"" once the peer closed the websocket cleanly."""
        max_bytes = receive_limit(max_bytes, RECEIVE_CHUNK)
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this websocket")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this websocket stream is closed")
                if self._buffer:
                    chunk = bytes(self._buffer[:max_bytes])
                    del self._buffer[:max_bytes]
                    return chunk
                if self._peer_closed_cleanly():  # raises when it closed otherwise
                    return b""
                await self._read_more()
        finally:
            self._receiving = False

    # trio.abc.AsyncResource

    async def aclose(self) -> None:
        """Send a close frame (code 1000) when that cannot block, then close the
        transport. The peer reads EOF; a task blocked in `send_all` or `receive_some`
        on this stream gets ClosedResourceError."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            # A close frame only when no send is in progress (a blocked send would hold
            # the lock, and half a frame on the wire must not be followed by another).
            if self._protocol.state is OPEN and not self._send_lock.locked():
                with trio.move_on_after(CLOSE_TIMEOUT):  # a peer that reads nothing
                    async with self._send_lock:
                        self._protocol.send_close(CloseCode.NORMAL_CLOSURE)
                        with contextlib.suppress(trio.BrokenResourceError):
                            await self._flush()
        finally:
            await trio.aclose_forcefully(self._transport)

    # Internals

    def _check_sendable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this websocket stream is closed")
        if self._protocol.state is not OPEN:
            raise trio.BrokenResourceError("the websocket is closing or closed")

    def _peer_closed_cleanly(self) -> bool:
        """True after a clean close frame from the peer; raises BrokenResourceError when
        the websocket died otherwise; False while it is open."""
        protocol = self._protocol
        close = protocol.close_rcvd
        if close is not None and protocol.parser_exc is None:
            if close.code in OK_CLOSE_CODES:
                return True
            raise trio.BrokenResourceError(f"the peer closed the websocket: {close}")
        if protocol.state is not OPEN:
            raise trio.BrokenResourceError(
                f"the websocket failed: {protocol.parser_exc or 'connection lost'}"
            ) from protocol.parser_exc
        return False

    async def _read_more(self) -> None:
        """Read once from the transport, feed the core, keep the data, send any replies."""
        try:
            await _read_once(self._transport, self._protocol)
        except trio.BrokenResourceError:
            self._protocol.receive_eof()  # from now on the core knows it is dead
            raise
        self._absorb(self._protocol.events_received())
        # Answers to pings and close frames. If a sender holds the lock, it writes them
        # when its own write finishes (see _flush); never wait for it here, or two peers
        # both blocked on sending would stop reading and deadlock.
        if not self._send_lock.locked():
            async with self._send_lock:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._flush()

    def _absorb(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Frame) and event.opcode in DATA_OPCODES:
                self._buffer += event.data

    async def _flush(self) -> None:
        """Write what the core has queued, including what was queued meanwhile.
        Call with the send lock held."""
        await _write_all(self._transport, self._protocol)


class WebSocketCarrier:
    """Links over websockets: `ws://host:port/path` (path defaults to /pnic)."""

    scheme = "ws"

    def __init__(
        self,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        # Both immutable after construction.
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections

    async def dial(self, uri: PeerUri) -> trio.abc.Stream:
        """Connect and upgrade. Raises OSError when the peer is unreachable or refuses
        the upgrade. There is no timeout here: wrap the call in `trio.fail_after`."""
        check_scheme(uri, self.scheme)
        transport = await TcpCarrier().dial(PeerUri("tcp", uri.host, uri.port))
        return await WebSocketStream.connect(transport, uri)

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
        """Listen on `uri` until cancelled; upgrade requests for `uri.path` and run
        `handler(stream, "host:port")` for each, closing the stream afterwards."""
        check_scheme(uri, self.scheme)
        path = uri.path or DEFAULT_WS_PATH

        async def on_connection(transport: trio.SocketStream, remote: str) -> None:
            stream = None
            with trio.move_on_after(self.handshake_timeout):
                stream = await WebSocketStream.accept(transport, path)
            if stream is not None:
                async with stream:
                    await handler(stream, remote)

        await serve_tcp(
            replace(uri, path=path),
            on_connection,
            max_connections=self.max_connections,
            task_status=task_status,
        )


async def _read_once(transport: trio.abc.Stream, protocol: Protocol) -> None:
    data = await transport.receive_some(RECEIVE_CHUNK)
    if data:
        protocol.receive_data(data)
    else:
        protocol.receive_eof()


async def _write_all(transport: trio.abc.Stream, protocol: Protocol) -> None:
    while chunks := protocol.data_to_send():
        for chunk in chunks:
            if chunk:
                await transport.send_all(chunk)
            elif isinstance(transport, trio.abc.HalfCloseableStream):
                await transport.send_eof()  # the core's "end of stream" marker
