"""Schema loading and defensive decoding (twinmesh.wire.schemas)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinmesh.errors import DecodeError, RemoteProtocolError
from twinmesh.wire import schemas


def read_handshake(reader: Any) -> tuple[Any, ...]:
    """Read every field the way a careful core would, copying values out."""
    which = str(reader.which())
    if which == "refuse":
        return which, str(reader.refuse.code), str(reader.refuse.reason)
    msg = getattr(reader, which)
    return (
        which,
        int(msg.version),
        bytes(msg.staticKey),
        bytes(msg.ephemeralKey),
        bytes(msg.signature),
        int(msg.maxFrame),
    )


def read_link_message(reader: Any) -> tuple[Any, ...]:
    which = str(reader.which())
    if which == "data":
        return which, bytes(reader.data)
    if which == "close":
        return which, str(reader.close.reason)
    msg = getattr(reader, which)
    return which, float(msg.sentAt), int(msg.seq)


def hello_bytes() -> bytes:
    handshake = schemas.link.Handshake.new_message()
    hello = handshake.init("hello")
    hello.version = 1
    hello.staticKey = b"s" * 32
    hello.ephemeralKey = b"e" * 32
    hello.signature = b"g" * 64
    hello.maxFrame = 4096
    data: bytes = handshake.to_bytes()
    return data


def data_message_bytes(payload: bytes) -> bytes:
    message = schemas.link.LinkMessage.new_message()
    message.data = payload
    data: bytes = message.to_bytes()
    return data


def test_schemas_load() -> None:
    assert (schemas.schema_dir() / "link.capnp").is_file()
    for name in ("Hello", "Accept", "Refuse", "Handshake", "Keepalive", "Close", "LinkMessage"):
        assert hasattr(schemas.link, name)
    assert hasattr(schemas.admin, "AdminRequest")


def test_decode_valid_message() -> None:
    assert schemas.decode(schemas.link.Handshake, hello_bytes(), read_handshake) == (
        "hello",
        1,
        b"s" * 32,
        b"e" * 32,
        b"g" * 64,
        4096,
    )


def test_copied_values_are_usable_after_decode_returns() -> None:
    payload = bytes(range(256)) * 4
    data = bytearray(data_message_bytes(payload))
    copied = schemas.decode(schemas.link.LinkMessage, bytes(data), lambda r: bytes(r.data))
    data[:] = b"\x00" * len(data)  # nothing may still point into the input
    assert copied == payload
    assert copied[::-1][::-1] == payload

    reason = schemas.decode(
        schemas.link.Handshake,
        _refuse_bytes("not on the allow-list"),
        lambda r: str(r.refuse.reason),
    )
    assert reason.upper() == "NOT ON THE ALLOW-LIST"


def _refuse_bytes(reason: str) -> bytes:
    handshake = schemas.link.Handshake.new_message()
    refuse = handshake.init("refuse")
    refuse.code = "notAllowed"
    refuse.reason = reason
    data: bytes = handshake.to_bytes()
    return data


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00", id="one-byte"),
        pytest.param(b"\xff" * 8, id="huge-segment-count"),
        pytest.param(b"\x00\x00\x00\x00\xff\xff\xff\x7f", id="huge-segment"),
        pytest.param(b"garbage that is not capnp at all", id="text"),
    ],
)
def test_garbage_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="undecodable") as exc:
        schemas.decode(schemas.link.Handshake, data, read_handshake)
    assert isinstance(exc.value, RemoteProtocolError)
    assert "\n" not in str(exc.value)


def test_truncated_message_is_a_decode_error() -> None:
    data = hello_bytes()
    for cut in range(len(data)):
        try:
            schemas.decode(schemas.link.Handshake, data[:cut], read_handshake)
        except DecodeError:
            continue
        # A prefix may decode only if the missing part was never read.
        pytest.fail(f"a hello cut to {cut} of {len(data)} bytes decoded")


def test_error_raised_lazily_inside_extract_is_a_decode_error() -> None:
    # The pointer to `data` is only followed when extract reads it.
    data = data_message_bytes(b"x" * 64)
    truncated = data[:-40]
    fixed_header = truncated[:4] + (len(truncated) // 8 - 1).to_bytes(4, "little") + truncated[8:]
    with pytest.raises(DecodeError):
        schemas.decode(schemas.link.LinkMessage, fixed_header, lambda r: bytes(r.data))


def test_unknown_enum_value_read_as_text_is_a_decode_error() -> None:
    # pycapnp raises RuntimeError ("Member was null") for an enumerant it does not know.
    handshake = schemas.link.Handshake.new_message()
    handshake.init("refuse").code = 200
    data = handshake.to_bytes()
    with pytest.raises(DecodeError):
        schemas.decode(schemas.link.Handshake, data, lambda r: str(r.refuse.code))
    assert schemas.decode(schemas.link.Handshake, data, lambda r: r.refuse.code.raw) == 200


def test_decode_error_passes_through_unchanged() -> None:
    def extract(reader: Any) -> None:
        raise DecodeError("mine")

    with pytest.raises(DecodeError, match=r"^mine$"):
        schemas.decode(schemas.link.Handshake, hello_bytes(), extract)


def _mutations() -> st.SearchStrategy[bytes]:
    seeds = [hello_bytes(), data_message_bytes(b"payload" * 5), _refuse_bytes("why")]

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        return bytes(data)

    return st.one_of(st.binary(max_size=200), mutated())


@settings(max_examples=300, deadline=None)
@given(data=_mutations())
def test_garbage_never_raises_anything_but_decode_error(data: bytes) -> None:
    for struct, extract in (
        (schemas.link.Handshake, read_handshake),
        (schemas.link.LinkMessage, read_link_message),
    ):
        with contextlib.suppress(DecodeError):
            schemas.decode(struct, data, extract)


def test_union_tags_are_the_discriminants_pycapnp_writes() -> None:
    setters = {
        "envelope": lambda m: setattr(m, "envelope", b"x"),
        "notice": lambda m: m.init("notice"),
        "dht": lambda m: setattr(m, "dht", b"x"),
        "envelopes": lambda m: m.init("envelopes", 1),
    }
    tags = schemas.union_tags(schemas.local.NicBus)
    assert set(tags) == set(setters)
    for member, tag in tags.items():
        message = schemas.local.NicBus.new_message()
        setters[member](message)
        # One segment: table (8), root pointer (8), then the data section's tag.
        assert message.to_bytes()[16:18] == tag.to_bytes(2, "little")
