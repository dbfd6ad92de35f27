"""Length-prefixed framing with a size cap (twinmesh.wire.framing)."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinmesh.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from twinmesh.wire.framing import (
    DEFAULT_MAX_FRAME,
    PREFIX,
    PREFIX_SIZE,
    FrameDecoder,
    encode_frame,
)


def test_encode_is_big_endian_length_then_body() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert PREFIX_SIZE == 4


def test_round_trip() -> None:
    bodies = [b"", b"a", b"hello world", bytes(range(256)) * 10]
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(encode_frame(b) for b in bodies)) == bodies
    assert decoder.buffered == 0


def test_encode_over_cap_is_a_local_error() -> None:
    assert encode_frame(b"x" * 100, max_frame=100) == PREFIX.pack(100) + b"x" * 100
    with pytest.raises(LocalProtocolError, match="exceeds the cap"):
        encode_frame(b"x" * 101, max_frame=100)
    with pytest.raises(LocalProtocolError):
        encode_frame(b"x" * (DEFAULT_MAX_FRAME + 1))


def test_body_of_exactly_the_cap_is_accepted() -> None:
    decoder = FrameDecoder(max_frame=100)
    assert decoder.feed(encode_frame(b"y" * 100, max_frame=100)) == [b"y" * 100]


def test_truncated_frame_stays_buffered_and_yields_nothing() -> None:
    frame = encode_frame(b"0123456789")
    decoder = FrameDecoder()
    assert decoder.feed(frame[:2]) == []
    assert decoder.buffered == 2
    assert decoder.feed(frame[2:-1]) == []
    assert decoder.buffered == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [b"0123456789"]
    assert decoder.buffered == 0


def test_complete_frames_come_out_and_the_rest_stays_buffered() -> None:
    first, second = encode_frame(b"first"), encode_frame(b"second")
    decoder = FrameDecoder()
    assert decoder.feed(first + second[:5]) == [b"first"]
    assert decoder.buffered == 5
    assert decoder.feed(second[5:]) == [b"second"]


def test_oversized_prefix_is_refused_before_the_body_arrives() -> None:
    decoder = FrameDecoder(max_frame=100)
    assert decoder.feed(PREFIX.pack(101)[:3]) == []
    with pytest.raises(FrameTooLarge, match="101") as exc:
        decoder.feed(PREFIX.pack(101)[3:])  # only the prefix: no body was sent at all
    assert isinstance(exc.value, RemoteProtocolError)


def test_huge_prefix_costs_four_bytes() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\xff\xff\xff\xff")
    assert decoder.buffered <= PREFIX_SIZE


def test_decoder_stays_poisoned_after_frame_too_large() -> None:
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge):
        decoder.feed(PREFIX.pack(1000))
    # The stream is out of sync: even a valid frame or no bytes at all is refused.
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(b"ok"))
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"")


def test_oversized_frame_after_good_ones_in_one_chunk_is_refused() -> None:
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(b"ok") + PREFIX.pack(101))


bodies_strategy = st.lists(st.binary(max_size=300), max_size=8)


@settings(max_examples=200, deadline=None)
@given(bodies=bodies_strategy, data=st.data())
def test_any_chunking_yields_identical_frames(bodies: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(b, max_frame=300) for b in bodies)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=20)))
    decoder = FrameDecoder(max_frame=300)
    received: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        received += decoder.feed(stream[start:cut])
        start = cut
    assert received == bodies
    assert decoder.buffered == 0


@settings(max_examples=50, deadline=None)
@given(bodies=bodies_strategy)
def test_byte_by_byte_yields_identical_frames(bodies: list[bytes]) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder()
    received: list[bytes] = []
    for i in range(len(stream)):
        received += decoder.feed(stream[i : i + 1])
    assert received == bodies
    assert decoder.buffered == 0


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=64), chunk=st.integers(1, 8))
def test_garbage_raises_only_frame_too_large(garbage: bytes, chunk: int) -> None:
    decoder = FrameDecoder(max_frame=16)
    try:
        for i in range(0, len(garbage), chunk):
            for body in decoder.feed(garbage[i : i + chunk]):
                assert len(body) <= 16
    except FrameTooLarge:
        pass


large_bodies = st.lists(st.integers(0, 200_000).map(lambda n: bytes([n % 251]) * n),
                        min_size=1, max_size=4)


@settings(max_examples=100, deadline=None)
@given(bodies=large_bodies, data=st.data())
def test_large_frames_over_many_reads_of_any_size_and_type(
    bodies: list[bytes], data: st.DataObject
) -> None:
    # 64 KiB messages arrive in reads of up to 127 KiB, cut anywhere: in a prefix, in a
    # body, right after one; as bytes, bytearrays (which the caller may reuse) or views.
    stream = b"".join(encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=30)))
    decoder = FrameDecoder()
    received: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        kind = data.draw(st.sampled_from(["bytes", "bytearray", "memoryview"]))
        if kind == "bytearray":
            chunk = bytearray(stream[start:cut])
            received += decoder.feed(chunk)
            chunk[:] = b"\xee" * len(chunk)  # reused by the caller: nothing held may change
        elif kind == "memoryview":
            received += decoder.feed(memoryview(stream)[start:cut])
        else:
            received += decoder.feed(stream[start:cut])
        start = cut
    assert received == bodies
    assert all(type(body) is bytes for body in received)
    assert decoder.buffered == 0


def test_a_frame_trickling_in_byte_by_byte_holds_little_memory() -> None:
    body = bytes(range(256)) * 256  # 64 KiB
    frame = encode_frame(body)
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        assert decoder.feed(frame[:10]) == []
        for i in range(10, len(frame) - 1):
            assert decoder.feed(frame[i:i + 1]) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One object per byte would be over 2 MB.
    assert peak < 4 * len(frame)
    assert decoder.feed(frame[-1:] + encode_frame(b"next")) == [body, b"next"]


def test_an_oversized_frame_after_a_large_one_split_over_reads_is_refused() -> None:
    decoder = FrameDecoder(max_frame=100_000)
    stream = encode_frame(b"x" * 90_000) + PREFIX.pack(100_001)
    assert decoder.feed(stream[:50_000]) == []
    with pytest.raises(FrameTooLarge, match="100001"):
        decoder.feed(stream[50_000:])
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(b"ok"))
