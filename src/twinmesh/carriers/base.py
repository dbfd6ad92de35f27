"""The carrier interface every transport implements."""

from __future__ import annotations

import operator
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import trio

from twinmesh.carriers.uri import PeerUri

# Called once per accepted connection with the stream and a printable remote address.
# The connection lives as long as the handler runs; the carrier closes it afterwards.
ConnectionHandler = Callable[[trio.abc.Stream, str], Awaitable[None]]

DEFAULT_CONNECT_TIMEOUT = 10.0


def receive_limit(max_bytes: int | None, default: int) -> int:
    """`receive_some`'s argument as trio's Stream contract wants it checked."""
    if max_bytes is None:
        return default
    limit = operator.index(max_bytes)
    if limit < 1:
        raise ValueError("max_bytes must be at least 1")
    return limit


class Carrier(Protocol):
    """How bytes move between NICs. Both halves are structured: a connection lives
    inside `async with carrier.connect(uri)` on the dialling side and inside the
    handler on the listening side, so a carrier may run tasks for it (websockets does)."""

    scheme: str

    def connect(
        self, uri: PeerUri, *, timeout: float = DEFAULT_CONNECT_TIMEOUT
    ) -> AbstractAsyncContextManager[trio.abc.Stream]:
        """`async with carrier.connect(uri) as stream:` dials `uri`; the stream is closed
        when the block ends. Entering raises OSError (TimeoutError after `timeout`) when
        the peer is unreachable."""
        ...

    async def serve(
        self,
        uri: PeerUri,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[PeerUri] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `uri` until cancelled; `task_status.started()` gets the bound URI
        (with the real port when `uri` asked for port 0)."""
        ...


@asynccontextmanager
async def connected(
    dial: Callable[[], Awaitable[trio.abc.Stream]], uri: PeerUri, timeout: float
) -> AsyncIterator[trio.abc.Stream]:
    """`Carrier.connect` for a carrier whose `dial()` returns a stream the caller owns:
    dial within `timeout` (else TimeoutError, an OSError, naming `uri`), and close the
    stream when the block ends."""
    stream: trio.abc.Stream | None = None
    with trio.move_on_after(timeout):
        stream = await dial()
    if stream is None:
        raise TimeoutError(f"connecting to {uri} timed out after {timeout:g} s")
    async with stream:
        yield stream


def nowait_writer(stream: trio.abc.Stream) -> Callable[[bytes | bytearray], int] | None:
    """A function writing to `stream` without blocking, or None when the stream has no
    such path (only a plain socket has one). It returns how many bytes the kernel took
    (0 when its buffer is full) and raises OSError when the connection is broken or
    closed. The caller must not call it while a `send_all` on the stream is running.

    Why: a trio `send_all` costs a trip through the run loop (and usually a writer
    task's wake-up); a write the kernel can take at once needs neither."""
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = stream.socket

    def write(data: bytes | bytearray) -> int:
        # fileno() is -1 once the socket is closed: EBADF, never another file.
        try:
            return os.write(sock.fileno(), data)
        except BlockingIOError:
            return 0

    return write


def nowait_reader(stream: trio.abc.Stream) -> NowaitReader | None:
    """A reader of `stream` that skips `receive_some`'s detours, or None when the stream
    has no such path (only a plain socket has one).

    Why: `receive_some` tries the read, then yields to the scheduler even when bytes were
    there, and a read that finds nothing raises, waits and reads again: a trip through
    the run loop and an empty system call on every wake-up. A link that reads what a
    wake-up brought and then waits (a packet at a time, the usual case) needs one wait
    and one read."""
    if not isinstance(stream, trio.SocketStream):
        return None
    return NowaitReader(stream.socket)


class NowaitReader:
    """`read(max_bytes)` without blocking, and `wait_readable()` to wait for bytes."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock  # the caller owns the stream, and closes it

    def read(self, max_bytes: int) -> bytes | None:
        """Bytes the kernel holds (at most `max_bytes`): b"" at end of stream, None when
        there are none yet. Raises OSError when the connection is broken or closed."""
        # fileno() is -1 once the socket is closed: EBADF, never another file.
        try:
            return os.read(self._sock.fileno(), max_bytes)
        except BlockingIOError:
            return None

    async def wait_readable(self) -> None:
        """Wait until `read` has something to say (a checkpoint). Raises
        trio.ClosedResourceError when the stream is closed meanwhile."""
        await trio.lowlevel.wait_readable(self._sock)
