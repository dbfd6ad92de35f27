"""What every carrier shares: the non-blocking write path of a plain socket."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from twinmesh.carriers.base import nowait_reader, nowait_writer


async def test_a_memory_stream_has_no_direct_write_path() -> None:
    left, _right = trio.testing.memory_stream_pair()
    assert nowait_writer(left) is None
    assert nowait_reader(left) is None


async def test_direct_reads_take_what_is_there_and_see_the_end() -> None:
    left, right = trio.socket.socketpair()
    async with trio.SocketStream(left) as a, trio.SocketStream(right) as b:
        reader = nowait_reader(b)
        assert reader is not None
        assert reader.read(100) is None  # nothing yet: no wait, no error
        await a.send_all(b"hello world")
        await reader.wait_readable()
        assert reader.read(5) == b"hello"
        assert reader.read(100) == b" world"
        assert reader.read(100) is None
        await a.send_eof()
        await reader.wait_readable()
        assert reader.read(100) == b""  # the end of the stream
    with pytest.raises(OSError):  # closed here: never another file
        reader.read(100)


async def test_a_reader_waiting_when_its_stream_closes_hears_of_it() -> None:
    left, right = trio.socket.socketpair()
    async with trio.SocketStream(left), trio.SocketStream(right) as b:
        reader = nowait_reader(b)
        assert reader is not None
        told = trio.Event()

        async def wait() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await reader.wait_readable()
            told.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await b.aclose()
        assert told.is_set()


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
