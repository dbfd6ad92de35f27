"""Length-prefixed frames with a hard size cap (sans-I/O).

A frame on the wire is a 4-byte big-endian length followed by that many bytes. The
decoder refuses a length over its cap as soon as the prefix arrives, before buffering
the body, so an oversized frame costs the receiver four bytes.
"""

from __future__ import annotations

import struct

from twinmesh.errors import FrameTooLarge, LocalProtocolError

PREFIX = struct.Struct(">I")
PREFIX_SIZE = PREFIX.size
DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB body; big enough for a 64 KiB payload plus headers


def encode_frame(body: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Prefix `body` with its length. Raises LocalProtocolError if it exceeds the cap."""
    return frame_prefix(len(body), max_frame) + body


def frame_prefix(size: int, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """The prefix of a frame of `size` bytes, for a writer that joins it with the body's
    parts itself. Raises LocalProtocolError if it exceeds the cap."""
    if size > max_frame:
        raise LocalProtocolError(f"frame of {size} bytes exceeds the cap of {max_frame}")
    return PREFIX.pack(size)


class FrameDecoder:
    """Feed bytes in any chunking; take complete frame bodies out.

    After a FrameTooLarge the decoder is poisoned: the stream is out of sync and the
    link must be closed.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._failed: FrameTooLarge | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the bodies of all frames now complete, in order."""
        if self._failed is not None:
            raise self._failed
        buf = self._buffer
        if buf:
            buf += data
            frames, offset = self._split(buf)
            if offset:
                del buf[:offset]
            return frames
        # Nothing held back: frames are sliced straight out of `data` (one copy each,
        # not two through the buffer), and only an incomplete tail is kept.
        frames, offset = self._split(data)
        if offset < len(data):
            buf += data[offset:] if offset else data
        return frames

    def _split(self, buf: bytes | bytearray) -> tuple[list[bytes], int]:
        """The complete frames at the start of `buf`, and where they end."""
        frames: list[bytes] = []
        offset = 0
        size = len(buf)
        with memoryview(buf) as view:
            while size - offset >= PREFIX_SIZE:
                (length,) = PREFIX.unpack_from(buf, offset)
                if length > self.max_frame:
                    self._failed = FrameTooLarge(
                        f"frame length {length} exceeds the cap of {self.max_frame}"
                    )
                    raise self._failed
                end = offset + PREFIX_SIZE + length
                if end > size:
                    break
                frames.append(bytes(view[offset + PREFIX_SIZE:end]))
                offset = end
        return frames, offset

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame (a truncated frame)."""
        return len(self._buffer)
