"""What every carrier shares: the non-blocking write path of a plain socket."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from twinmesh.carriers.base import nowait_writer


async def test_a_memory_stream_has_no_direct_write_path() -> None:
    left, _right = trio.testing.memory_stream_pair()
    assert nowait_writer(left) is None


async def test_direct_writes_take_what_fits_and_report_a_broken_socket() -> None:
    left, right = trio.socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    async with trio.SocketStream(left) as a, trio.SocketStream(right) as b:
        write = nowait_writer(a)
        assert write is not None
        assert write(b"hello") == 5
        assert await b.receive_some(5) == b"hello"
        data = bytes(range(256)) * 4096  # far more than the buffer takes
        taken = write(data)
        assert 0 < taken < len(data)
        assert write(data[taken:]) == 0  # full: nothing taken, nothing raised
        received = b""
        while len(received) < taken:
            received += await b.receive_some()
        assert received == data[:taken]  # exactly what it said it took, in order
        await b.aclose()
        with pytest.raises(OSError):
            write(b"to nobody")
    with pytest.raises(OSError):  # closed here: never another file
        write(b"after close")
