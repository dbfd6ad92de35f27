"""Length-prefixed frames over a trio stream, for request/response control protocols.

Over a socket (what the twin and NIC daemons use) frames are read, and by `send_now`
written, with plain system calls on the socket's descriptor: a read or write that the
socket can serve at once then costs the system call and no trip through the event
loop, which is most of what a small frame costs otherwise. Only a read that finds
nothing waits in trio (`wait_readable`), cancellable as any other.
"""

from __future__ import annotations

import os

import trio

from twinmesh.carriers.base import nowait_writer
from twinmesh.wire.framing import FrameDecoder, encode_frame

CONTROL_MAX_FRAME = 4 << 20
RECEIVE_SIZE = 65536


class FramedStream:
    """Send and receive whole frames over a stream. Not safe for concurrent senders."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int = CONTROL_MAX_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self._ready: list[bytes] = []
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._write_now = nowait_writer(stream)
        # The last read took all the socket had (so wait before reading again), or
        # filled the buffer (so let other tasks run before reading on).
        self._emptied = False
        self._filled = False

    async def send(self, body: bytes) -> None:
        await self.stream.send_all(encode_frame(body, self.max_frame))

    def send_now(self, data: bytes) -> int:
        """Send as much of `data` as the socket takes at once, without waiting and
        without a checkpoint; returns how many bytes went (0 for a stream that is not
        a socket). For a task that would otherwise hand a small write to a writer
        task and wait for it: call it only while no other send on the stream is under
        way, and leave the rest to one. Raises trio.BrokenResourceError when the peer
        is gone, trio.ClosedResourceError when the stream was closed."""
        if self._write_now is None:
            return 0
        self._descriptor()  # closed here: ClosedResourceError, not a broken pipe
        try:
            return self._write_now(data)
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def receive(self) -> bytes | None:
        """The next frame, or None at a clean end of stream.

        Raises FrameTooLarge for an oversized frame and trio.BrokenResourceError
        when the stream ends inside a frame.
        """
        while not self._ready:
            data = await self._receive_some()
            if not data:
                if self._decoder.buffered:
                    raise trio.BrokenResourceError("stream ended inside a frame")
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)

    async def _receive_some(self) -> bytes:
        if self._socket is None:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        if self._filled:
            await trio.lowlevel.checkpoint()  # a peer that floods us starves nobody
        while True:
            fd = self._descriptor()
            if not self._emptied:
                try:
                    data = os.read(fd, RECEIVE_SIZE)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise trio.BrokenResourceError(
                        f"socket connection broken: {exc}") from exc
                else:
                    self._filled = len(data) == RECEIVE_SIZE
                    self._emptied = not self._filled
                    return data
            await trio.lowlevel.wait_readable(self._socket)
            self._emptied = False

    def _descriptor(self) -> int:
        # Asked each time, never kept: once the stream is closed its number may name
        # another file.
        assert self._socket is not None
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the stream was closed")
        return fd
