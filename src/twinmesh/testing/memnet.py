"""An in-memory network of carriers, for tests and the simulator.

Theory of operation
-------------------
A `MemoryNetwork` joins named nodes. `net.carrier("a")` is node a's carrier (scheme
"memory"): `serve(PeerUri("memory", "a", 0), handler)` listens at memory://a, and
`dial(PeerUri.parse("memory://b"))` connects to whoever listens at memory://b.
Conditions and partitions are between node names: the dialer's and the listener's.
`net.stream_pair(a, b)` joins two nodes directly, without a listener.

A connection is two pipes, one per direction. `send_all` cuts its data into chunks of
at most `buffer_size` bytes and stamps each with an arrival time: now + the latency of
that direction, never earlier than the previous chunk, so bytes stay in order. The
receiver lands the chunks whose time has come and sleeps (`trio.move_on_at`) until the
next one: latency costs nothing under `trio.testing.MockClock(autojump_threshold=0)`
and is exact. There are no background tasks.

Knobs (all of them also act on connections that are already open):

- latency and loss, per direction of a node pair: `set_conditions(a, b, ...)`, with
  the constructor's values as defaults. A lost chunk vanishes silently; on a byte
  stream that corrupts the framing above, which the link detects.
- `partition(a, b)` / `heal(a, b)`: while partitioned, everything between a and b
  vanishes silently in both directions (data in the air too), as when a route goes
  away; only keepalives notice. Dialing across a partition is refused at once.
- `break_links(a, b)`: every open connection between a and b fails with
  `trio.BrokenResourceError` on both ends, like a TCP reset.
- `buffer_size`: the bytes one direction may hold (in the air plus arrived but unread).
  `send_all` waits while it is full: back-pressure.

Chunks are dropped with a `random.Random(seed)`, so a run is reproducible as long as
the sends happen in the same order. `net.statistics()` counts chunks sent and dropped.
"""

from __future__ import annotations

import contextlib
import errno
import math
import random
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace

import trio

from twinmesh.carriers.base import (
    DEFAULT_CONNECT_TIMEOUT,
    ConnectionHandler,
    connected,
    receive_limit,
)
from twinmesh.carriers.uri import PeerUri

DEFAULT_BUFFER_SIZE = 256 * 1024
DEFAULT_RECEIVE_SIZE = 64 * 1024
BACKLOG = 64  # connections a listener holds before it refuses new ones
FIRST_PORT = 49152  # remote addresses look like "a:49152", like an ephemeral TCP port


@dataclass(frozen=True)
class Conditions:
    """How one direction between two nodes behaves."""

    latency: float = 0.0  # seconds from send_all until the bytes can be received
    loss: float = 0.0  # probability that one send_all chunk vanishes

    def __post_init__(self) -> None:
        if not (0.0 <= self.latency < math.inf):
            raise ValueError(f"latency must be a finite number >= 0, got {self.latency}")
        if not (0.0 <= self.loss <= 1.0):
            raise ValueError(f"loss must be between 0 and 1, got {self.loss}")


@dataclass(frozen=True)
class MemoryNetworkStatistics:
    open_connections: int
    chunks_sent: int  # chunks handed to the network, including the dropped ones
    chunks_dropped: int  # lost (`loss`) or swallowed by a partition
    bytes_delivered: int  # bytes that arrived at a receiver


class MemoryNetwork:
    """Nodes, their listeners and the connections between them (one trio run)."""

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: float = 0.0,
        loss: float = 0.0,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self.default_conditions = Conditions(latency, loss)
        self.buffer_size = buffer_size  # changing it affects open connections
        self._random = random.Random(seed)
        self._conditions: dict[tuple[str, str], Conditions] = {}
        self._partitions: set[frozenset[str]] = set()
        self._listeners: dict[str, _Listener] = {}
        self._connections: set[_Connection] = set()
        self._next_port = FIRST_PORT
        self._chunks_sent = 0
        self._chunks_dropped = 0
        self._bytes_delivered = 0

    # Nodes

    def carrier(self, node: str) -> MemoryCarrier:
        """The carrier node `node` uses to dial and to listen."""
        return MemoryCarrier(self, node)

    def stream_pair(self, a: str, b: str) -> tuple[MemoryStream, MemoryStream]:
        """A connection between nodes a and b without dialing: (a's end, b's end)."""
        connection = _Connection(self, a, b)
        self._connections.add(connection)
        return connection.ends

    # Knobs

    def conditions(self, src: str, dst: str) -> Conditions:
        """The conditions of the direction src -> dst."""
        return self._conditions.get((src, dst), self.default_conditions)

    def set_conditions(
        self,
        a: str,
        b: str,
        *,
        latency: float | None = None,
        loss: float | None = None,
        one_way: bool = False,
    ) -> None:
        """Change latency and/or loss between a and b: both directions, or only a -> b
        with `one_way=True`. Takes effect for the next chunk sent."""
        changes: dict[str, float] = {}
        if latency is not None:
            changes["latency"] = latency
        if loss is not None:
            changes["loss"] = loss
        directions = [(a, b)] if one_way else [(a, b), (b, a)]
        for direction in directions:
            self._conditions[direction] = replace(self.conditions(*direction), **changes)

    def partition(self, a: str, b: str) -> None:
        """From now on, traffic between a and b vanishes silently (both directions)."""
        self._partitions.add(frozenset((a, b)))
        for connection in self._between(a, b):
            connection.wake()

    def heal(self, a: str, b: str) -> None:
        """Undo `partition(a, b)`; what vanished meanwhile stays lost."""
        self._partitions.discard(frozenset((a, b)))

    def is_partitioned(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self._partitions

    def break_links(self, a: str, b: str) -> int:
        """Reset every open connection between a and b; returns how many there were."""
        broken = self._between(a, b)
        for connection in broken:
            connection.break_()
        return len(broken)

    def statistics(self) -> MemoryNetworkStatistics:
        return MemoryNetworkStatistics(
            open_connections=len(self._connections),
            chunks_sent=self._chunks_sent,
            chunks_dropped=self._chunks_dropped,
            bytes_delivered=self._bytes_delivered,
        )

    # Internals, used by MemoryCarrier

    def _between(self, a: str, b: str) -> list[_Connection]:
        pair = {a, b}
        return [c for c in self._connections if {c.a, c.b} == pair]

    def _listen(self, name: str, node: str) -> _Listener:
        if name in self._listeners:
            raise OSError(errno.EADDRINUSE, f"memory://{name} is already in use")
        listener = self._listeners[name] = _Listener(node)
        return listener

    def _unlisten(self, name: str, listener: _Listener) -> None:
        if self._listeners.get(name) is listener:
            del self._listeners[name]
        # Connections dialed but never accepted are reset, like a closing backlog.
        while True:
            try:
                stream, _ = listener.incoming.receive_nowait()
            except trio.WouldBlock:
                break
            stream._connection.break_()
        listener.offers.close()
        listener.incoming.close()

    async def _connect(self, node: str, name: str) -> MemoryStream:
        listener = self._listeners.get(name)
        target = listener.node if listener is not None else name
        # Connecting takes a round trip, whether it succeeds or not.
        await trio.sleep(
            self.conditions(node, target).latency + self.conditions(target, node).latency
        )
        listener = self._listeners.get(name)
        if listener is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"memory://{name}: nobody listens")
        if self.is_partitioned(node, listener.node):
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"memory://{name}: unreachable from {node} (partitioned)"
            )
        connection = _Connection(self, node, listener.node)
        mine, theirs = connection.ends
        try:
            listener.offers.send_nowait((theirs, f"{node}:{self._next_port}"))
        except trio.WouldBlock:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"memory://{name}: backlog full"
            ) from None
        self._next_port += 1
        self._connections.add(connection)
        return mine


class MemoryCarrier:
    """Node `node`'s carrier on a `MemoryNetwork` (scheme "memory")."""

    scheme = "memory"

    def __init__(self, net: MemoryNetwork, node: str) -> None:
        self.net = net
        self.node = node

    async def dial(self, uri: PeerUri) -> trio.abc.Stream:
        """Connect to memory://name. Raises ConnectionRefusedError when nobody listens
        there, across a partition, or when the listener's backlog is full."""
        _check_scheme(uri)
        return await self.net._connect(self.node, uri.host)

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
        """Listen at memory://`uri.host` until cancelled, running `handler(stream,
        "node:port")` in its own task per connection and closing the stream after."""
        _check_scheme(uri)
        listener = self.net._listen(uri.host, self.node)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(uri)
                async for stream, remote in listener.incoming:
                    nursery.start_soon(_run_connection, handler, stream, remote)
        finally:
            self.net._unlisten(uri.host, listener)


class MemoryStream(trio.abc.Stream):
    """One end of a memory connection. Made by `MemoryCarrier` or `stream_pair`."""

    def __init__(self, connection: _Connection, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._connection = connection
        self._out = outgoing
        self._in = incoming
        self.local_node = outgoing.src  # immutable
        self.remote_node = outgoing.dst  # immutable
        self._closed = False
        self._sending = False
        self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_guard():
            await trio.lowlevel.checkpoint()
            view = memoryview(data).cast("B")
            size = self._out.net.buffer_size
            for start in range(0, len(view), size):
                chunk = bytes(view[start : start + size])
                await self._out.wait_for_room(len(chunk))
                self._out.push(chunk)

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard():
            await trio.lowlevel.checkpoint()
            await self._out.wait_for_room(1)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        max_bytes = receive_limit(max_bytes, DEFAULT_RECEIVE_SIZE)
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            return await self._in.pull(max_bytes)
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close without waiting: the peer reads EOF once what we sent has arrived."""
        if self._closed:
            return
        self._closed = True
        self._out.close_writer()
        self._in.close_reader()
        self._connection.end_closed()

    @contextlib.contextmanager
    def _send_guard(self) -> Iterator[None]:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("this stream is closed")
        self._sending = True
        try:
            yield
        finally:
            self._sending = False


class _Pipe:
    """One direction of a connection: bytes from node `src` to node `dst`.

    Only the two `MemoryStream`s of its connection and `MemoryNetwork` touch it.
    """

    def __init__(self, net: MemoryNetwork, src: str, dst: str) -> None:
        self.net = net
        self.src = src
        self.dst = dst
        self.in_air: deque[tuple[float, bytes | None]] = deque()  # (arrival, chunk); None = EOF
        self.arrived = bytearray()  # landed, not read yet
        self.held = 0  # bytes in the air plus arrived: at most net.buffer_size
        self.last_arrival = -math.inf
        self.eof = False  # the writer's EOF has arrived
        self.writer_closed = False
        self.reader_closed = False
        self.broken = False
        self.wakeup = trio.lowlevel.ParkingLot()  # writer and reader wait here

    def partitioned(self) -> bool:
        return self.net.is_partitioned(self.src, self.dst)

    async def wait_for_room(self, size: int) -> None:
        while True:
            if self.writer_closed:
                raise trio.ClosedResourceError("this stream is closed")
            if self.broken:
                raise trio.BrokenResourceError("connection reset")
            if self.partitioned():
                return  # it will vanish anyway; a closed peer cannot be seen either
            if self.reader_closed:
                raise trio.BrokenResourceError("the peer closed the connection")
            if self.held == 0 or self.held + size <= self.net.buffer_size:
                return  # (an empty pipe takes any chunk, even after buffer_size shrank)
            await self.wakeup.park()

    def push(self, chunk: bytes | None) -> None:
        """Put `chunk` (None: EOF) in the air, unless it is lost or partitioned away."""
        net = self.net
        conditions = net.conditions(self.src, self.dst)
        if chunk is not None:
            net._chunks_sent += 1
        lost = chunk is not None and conditions.loss > 0 and net._random.random() < conditions.loss
        if self.partitioned() or lost:
            if chunk is not None:
                net._chunks_dropped += 1
            return
        arrival = max(trio.current_time() + conditions.latency, self.last_arrival)
        self.last_arrival = arrival
        self.in_air.append((arrival, chunk))
        self.held += len(chunk) if chunk is not None else 0
        self.wakeup.unpark_all()

    async def pull(self, max_bytes: int) -> bytes:
        while True:
            if self.reader_closed:
                raise trio.ClosedResourceError("this stream is closed")
            if self.broken:
                raise trio.BrokenResourceError("connection reset")
            self._land()
            if self.arrived:
                data = bytes(self.arrived[:max_bytes])
                del self.arrived[:max_bytes]
                self.held -= len(data)
                self.wakeup.unpark_all()
                return data
            if self.eof:
                return b""
            if self.in_air:
                with trio.move_on_at(self.in_air[0][0]):
                    await self.wakeup.park()
            else:
                await self.wakeup.park()

    def _land(self) -> None:
        """Move the chunks whose arrival time has come into `arrived`."""
        now = trio.current_time()
        while self.in_air and self.in_air[0][0] <= now:
            _, chunk = self.in_air.popleft()
            if self.partitioned():  # it was in the air when the route went away
                if chunk is not None:
                    self.held -= len(chunk)
                    self.net._chunks_dropped += 1
                    self.wakeup.unpark_all()
            elif chunk is None:
                self.eof = True
            else:
                self.arrived += chunk
                self.net._bytes_delivered += len(chunk)

    def close_writer(self) -> None:
        self.writer_closed = True
        if not self.broken:
            self.push(None)
        self.wakeup.unpark_all()

    def close_reader(self) -> None:
        self.reader_closed = True
        self._discard()

    def break_(self) -> None:
        self.broken = True
        self._discard()

    def _discard(self) -> None:
        self.in_air.clear()
        self.arrived.clear()
        self.held = 0
        self.wakeup.unpark_all()


class _Connection:
    """Two pipes and their two ends; registered in the network while open."""

    def __init__(self, net: MemoryNetwork, a: str, b: str) -> None:
        self.net = net
        self.a = a
        self.b = b
        a_to_b, b_to_a = _Pipe(net, a, b), _Pipe(net, b, a)
        self.pipes = (a_to_b, b_to_a)
        self.ends = (MemoryStream(self, a_to_b, b_to_a), MemoryStream(self, b_to_a, a_to_b))
        self._open_ends = 2

    def end_closed(self) -> None:
        self._open_ends -= 1
        if self._open_ends == 0:
            self.net._connections.discard(self)

    def break_(self) -> None:
        for pipe in self.pipes:
            pipe.break_()
        self.net._connections.discard(self)

    def wake(self) -> None:
        for pipe in self.pipes:
            pipe.wakeup.unpark_all()


class _Listener:
    def __init__(self, node: str) -> None:
        self.node = node
        self.offers, self.incoming = trio.open_memory_channel[tuple[MemoryStream, str]](BACKLOG)


async def _run_connection(handler: ConnectionHandler, stream: MemoryStream, remote: str) -> None:
    async with stream:
        with contextlib.suppress(Exception):  # the handler reports its own errors
            await handler(stream, remote)


def _check_scheme(uri: PeerUri) -> None:
    if uri.scheme != "memory":
        raise ValueError(f"the memory carrier cannot handle {uri}")
