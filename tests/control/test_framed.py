"""Frames over a stream: whole frames however the bytes arrive, writes that go out at
once or leave the rest for later, and the errors of a broken or closed stream; over a
real socket and over a stream that is not one."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from twinmesh.control.framed import FramedStream
from twinmesh.errors import FrameTooLarge
from twinmesh.wire.framing import PREFIX, encode_frame

TIMEOUT = 10


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_frames_arrive_whole_however_the_bytes_are_cut() -> None:
    bodies = [b"", b"a", b"x" * 70_000, b"last"]
    wire = b"".join(encode_frame(body, 1 << 20) for body in bodies)
    left, right = socket_pair()
    with trio.fail_after(TIMEOUT):
        async with left, right, trio.open_nursery() as nursery:
            framed = FramedStream(right)

            async def dribble() -> None:
                for start in range(0, len(wire), 1000):
                    await left.send_all(wire[start:start + 1000])
                    await trio.lowlevel.checkpoint()
                await left.send_eof()

            nursery.start_soon(dribble)
            assert [await framed.receive() for _ in bodies] == bodies
            assert await framed.receive() is None  # then a clean end


async def test_what_the_socket_cannot_take_at_once_is_left_to_the_caller() -> None:
    left, right = socket_pair()
    with trio.fail_after(TIMEOUT):
        async with left, right:
            framed = FramedStream(left)
            data = encode_frame(b"y" * 60_000, 1 << 20) * 40  # more than the buffer
            sent = framed.send_now(data)
            assert 0 < sent < len(data)
            assert framed.send_now(data[sent:]) == 0  # still full: nothing, no wait
            reader = FramedStream(right)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(left.send_all, data[sent:])  # the rest, in order
                for _ in range(40):
                    assert await reader.receive() == b"y" * 60_000


async def test_errors_say_what_happened_to_the_stream() -> None:
    left, right = socket_pair()
    with trio.fail_after(TIMEOUT):
        framed = FramedStream(right, max_frame=100)
        await left.send_all(PREFIX.pack(101))
        with pytest.raises(FrameTooLarge):
            await framed.receive()
        left2, right2 = socket_pair()
        cut = FramedStream(right2)
        await left2.send_all(PREFIX.pack(10) + b"abc")
        await left2.aclose()
        with pytest.raises(trio.BrokenResourceError, match="inside a frame"):
            await cut.receive()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # the peer is gone: sooner or later a broken pipe
                FramedStream(right2).send_now(b"x" * 65536)
        await right.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await framed.receive()
        with pytest.raises(trio.ClosedResourceError):
            framed.send_now(b"x")
        await left.aclose()
        await right2.aclose()


async def test_a_stream_that_is_not_a_socket_is_served_by_its_own_methods() -> None:
    left, right = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT):
        framed = FramedStream(left)
        assert framed.send_now(b"anything") == 0  # not a socket: the caller sends it
        await framed.send(b"hello")
        assert await FramedStream(right).receive() == b"hello"
