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

    Every body is copied once out of what was fed: complete frames are sliced from a
    chunk directly, and a frame spread over several chunks (a 64 KiB message arrives
    in several reads) is joined from them once it is complete, not gathered into a
    buffer first and sliced out of it again. Memory: at most one incomplete frame's
    bytes (bounded by the cap) plus the rest of the read that began it; small chunks
    are gathered into one buffer, so a frame trickling in byte by byte is not held as
    a list of a million objects.

    After a FrameTooLarge the decoder is poisoned: the stream is out of sync and the
    link must be closed.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        # The incomplete frame's bytes, in order, and how many; `_want`: the size of
        # that frame with its prefix (0 while the prefix itself is incomplete).
        self._pending: list[bytes | bytearray | memoryview] = []
        self._size = 0
        self._want = 0
        self._gather: bytearray | None = None  # the last of `_pending`, when it is ours to extend
        self._failed: FrameTooLarge | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; return the bodies of all frames now complete, in order.
        The decoder may keep a view of `data` when it is `bytes` (never mutated)."""
        if self._failed is not None:
            raise self._failed
        if not self._pending:
            return self._split_fresh(data, owned=type(data) is bytes)
        self._hold(data)
        if not self._want:
            if self._size < PREFIX_SIZE:
                return []
            # The prefix was cut (rare): start again from one joined buffer.
            joined = b"".join(self._pending)
            self._reset()
            return self._split_fresh(joined, owned=True)
        if self._size < self._want:
            return []
        pieces = self._pending
        last = pieces[-1]
        cut = len(last) - (self._size - self._want)
        views = [memoryview(piece) for piece in pieces]
        views[-1] = views[-1][:cut]  # before the first one: they may be the same piece
        views[0] = views[0][PREFIX_SIZE:]
        body = b"".join(views)
        for view in views:
            view.release()
        self._reset()
        if cut == len(last):
            return [body]
        rest = memoryview(last)[cut:]
        return [body, *self._split_fresh(rest, owned=True)]

    def _split_fresh(self, data: bytes | bytearray | memoryview, *, owned: bool) -> list[bytes]:
        """Frames sliced straight out of `data` (nothing pending); the incomplete tail
        is kept as a view when `owned` (nobody changes those bytes), else copied."""
        frames, offset = self._split(data)
        size = len(data)
        if offset < size:
            tail = memoryview(data)[offset:] if owned else bytes(data[offset:])
            self._pending = [tail]
            self._size = size - offset
            if self._size >= PREFIX_SIZE:
                # `_split` read this prefix and checked it against the cap.
                self._want = PREFIX_SIZE + PREFIX.unpack_from(tail)[0]
        return frames

    def _hold(self, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        if size < _SMALL_CHUNK:
            gather = self._gather
            if gather is None or self._pending[-1] is not gather:
                gather = self._gather = bytearray()
                self._pending.append(gather)
            gather += data
        else:
            self._pending.append(data if type(data) is bytes else bytes(data))
        self._size += size

    def _reset(self) -> None:
        self._pending = []
        self._size = 0
        self._want = 0
        self._gather = None

    def _split(self, buf: bytes | bytearray | memoryview) -> tuple[list[bytes], int]:
        """The complete frames at the start of `buf`, and where they end."""
        frames: list[bytes] = []
        offset = 0
        size = len(buf)
        with memoryview(buf) as view:
            while size - offset >= PREFIX_SIZE:
                (length,) = PREFIX.unpack_from(view, offset)
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
        return self._size


# Chunks smaller than this are gathered into one buffer while a frame is incomplete.
_SMALL_CHUNK = 4096
