"""Length-prefixed frames over a trio stream, for request/response control protocols."""

from __future__ import annotations

import trio

from twinmesh.wire.framing import FrameDecoder, encode_frame

CONTROL_MAX_FRAME = 4 << 20


class FramedStream:
    """Send and receive whole frames over a stream. Not safe for concurrent senders."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int = CONTROL_MAX_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self._ready: list[bytes] = []

    async def send(self, body: bytes) -> None:
        await self.stream.send_all(encode_frame(body, self.max_frame))

    async def receive(self) -> bytes | None:
        """The next frame, or None at a clean end of stream.

        Raises FrameTooLarge for an oversized frame and trio.BrokenResourceError
        when the stream ends inside a frame.
        """
        while not self._ready:
            data = await self.stream.receive_some(65536)
            if not data:
                if self._decoder.buffered:
                    raise trio.BrokenResourceError("stream ended inside a frame")
                return None
            self._ready.extend(self._decoder.feed(bytes(data)))
        return self._ready.pop(0)
