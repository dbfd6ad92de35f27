"""Cap'n Proto without pycapnp (twinmesh.wire.flat): same bytes out, same values in.

The writers must build what pycapnp builds; the readers, on any bytes, must either
read exactly what pycapnp reads or step aside (None), never accept what pycapnp
refuses. NicBus (a union of a Data and a List(Data) member) exercises every reader.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinmesh.errors import DecodeError
from twinmesh.wire import flat, schemas

NicBus = schemas.local.NicBus
ENVELOPE = flat.U16.pack(0) + bytes(6)  # NicBus tag `envelope`
ENVELOPES = flat.U16.pack(3) + bytes(6)  # NicBus tag `envelopes`
blobs = st.lists(st.binary(min_size=1, max_size=300), max_size=6)


def with_pycapnp(data: bytes) -> tuple[str, Any] | None:
    """What pycapnp reads from a NicBus frame: its member and value, or None."""

    def read(reader: Any) -> tuple[str, Any]:
        which = str(reader.which())
        if which == "envelope":
            return which, bytes(reader.envelope)
        if which == "envelopes":
            return which, [bytes(item) for item in reader.envelopes]
        return which, None

    try:
        return schemas.decode(NicBus, data, read)
    except DecodeError:
        return None


def without_pycapnp(data: bytes) -> tuple[str, Any] | None:
    layout = flat.root(data)
    if layout is None or layout[3] < 1:
        return None
    tag = flat.union_tag(data, layout)
    if tag == 0:
        envelope = flat.blob_at(data, layout[2])
        return None if envelope is None else ("envelope", envelope)
    if tag == 3:
        envelopes = flat.blob_list_at(data, layout[2])
        return None if envelopes is None else ("envelopes", envelopes)
    return None


@given(blob=st.binary(min_size=1, max_size=2000))
def test_a_one_blob_message_is_what_pycapnp_builds(blob: bytes) -> None:
    message = NicBus.new_message()
    message.envelope = blob
    assert flat.message(ENVELOPE, (blob,)) == message.to_bytes()


@given(items=blobs)
def test_a_blob_list_message_is_what_pycapnp_builds(items: list[bytes]) -> None:
    message = NicBus.new_message()
    envelopes = message.init("envelopes", len(items))
    for index, item in enumerate(items):
        envelopes[index] = item
    assert flat.blob_list_message(ENVELOPES, items) == message.to_bytes()


@given(items=blobs)
def test_the_parts_of_a_message_join_to_it_and_add_up_to_their_size(items: list[bytes]) -> None:
    for parts, size, whole in (
        (*flat.blob_list_parts(ENVELOPES, items), flat.blob_list_message(ENVELOPES, items)),
        (*flat.message_parts(ENVELOPE, items), flat.message(ENVELOPE, items)),
    ):
        assert b"".join(parts) == whole
        assert size == len(whole)


def test_empty_blobs_read_back_empty() -> None:
    # pycapnp writes an empty blob as a zero-length list, we write a null pointer:
    # both read back as b"".
    for data in (flat.message(ENVELOPE, (b"",)), flat.blob_list_message(ENVELOPES, [b"", b"x"])):
        assert without_pycapnp(data) == with_pycapnp(data)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=blobs, single=st.booleans(), data=st.data())
def test_readers_read_exactly_what_pycapnp_reads_or_step_aside(
    items: list[bytes], single: bool, data: st.DataObject
) -> None:
    if single:
        encoded = flat.message(ENVELOPE, (items[0] if items else b"e",))
    else:
        encoded = flat.blob_list_message(ENVELOPES, items)
    damaged = bytearray(encoded)
    for _ in range(data.draw(st.integers(0, 4))):
        position = data.draw(st.integers(0, min(len(damaged) - 1, 80)))
        damaged[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del damaged[data.draw(st.integers(0, len(damaged))):]
    fast = without_pycapnp(bytes(damaged))
    if fast is not None:
        assert fast == with_pycapnp(bytes(damaged))


def test_shared_blobs_are_left_to_pycapnp() -> None:
    """A list whose items all point at one blob reads as more bytes than the message
    holds: the reader steps aside (pycapnp's traversal limit judges it)."""
    count, size = 8, 64
    pointers = [1 | ((count - 1 - i) << 2) | (2 << 32) | (size << 35) for i in range(count)]
    words = 1 + 1 + 1 + count + size // 8
    data = b"".join((
        flat.U64.pack(words << 32), flat.U64.pack(flat.struct_pointer(0, 1, 1)), ENVELOPES,
        flat.U64.pack(1 | (6 << 32) | (count << 35)),
        *(flat.U64.pack(p) for p in pointers), b"s" * size,
    ))
    assert flat.root(data) is not None
    assert without_pycapnp(data) is None


def test_other_shapes_are_left_to_pycapnp() -> None:
    message = NicBus.new_message()
    message.dht = b"dht message"
    assert without_pycapnp(message.to_bytes()) is None  # another member
    assert flat.root(b"") is None
    assert flat.root(bytes(16)) is None  # a null root pointer
    two_segments = flat.U64.pack(1) + bytes(16)
    assert flat.root(two_segments) is None


SealedBody = schemas.rmb.SealedBody


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(token=st.binary(max_size=40), payload=st.binary(max_size=300), data=st.data())
def test_struct_fields_read_exactly_what_pycapnp_reads_or_step_aside(
    token: bytes, payload: bytes, data: st.DataObject
) -> None:
    """`blobs_at` on a struct of two Data fields (rmb.SealedBody), built by us or by
    pycapnp, intact or damaged."""
    if data.draw(st.booleans()):
        encoded = flat.message(b"", (token, payload))
    else:
        built = SealedBody.new_message()
        built.token, built.payload = token, payload
        encoded = built.to_bytes()
        assert encoded == flat.message(b"", (token, payload)) or not (token and payload)
    damaged = bytearray(encoded)
    for _ in range(data.draw(st.integers(0, 3))):
        position = data.draw(st.integers(0, min(len(damaged) - 1, 40)))
        damaged[position] = data.draw(st.integers(0, 255))
    damaged_bytes = bytes(damaged)
    layout = flat.root(damaged_bytes)
    fast = flat.blobs_at(damaged_bytes, layout, 2) if layout is not None else None
    if fast is None:
        return
    try:
        slow = schemas.decode(SealedBody, damaged_bytes,
                              lambda r: [bytes(r.token), bytes(r.payload)])
    except DecodeError:
        slow = None
    assert fast == slow


def test_fields_past_an_older_struct_read_empty() -> None:
    one_field = flat.message(b"", (b"token",))
    layout = flat.root(one_field)
    assert layout is not None
    assert flat.blobs_at(one_field, layout, 2) == [b"token", b""]


Update = schemas.route.Update  # a struct (Announcement) behind the root's first pointer


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(seqno=st.integers(0, 2**64 - 1), origin=st.binary(max_size=40), data=st.data())
def test_a_nested_struct_is_found_where_pycapnp_finds_it_or_left_to_it(
    seqno: int, origin: bytes, data: st.DataObject
) -> None:
    built = Update.new_message()
    built.announcement.origin = origin
    built.announcement.seqno = seqno
    damaged = bytearray(built.to_bytes())
    for _ in range(data.draw(st.integers(0, 3))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del damaged[data.draw(st.integers(0, len(damaged))):]
    damaged_bytes = bytes(damaged)
    layout = flat.root(damaged_bytes)
    inner = flat.struct_at(damaged_bytes, layout[2]) if layout and layout[3] else None
    if inner is None or inner[1] < 1:
        return
    try:
        slow = schemas.decode(Update, damaged_bytes, lambda r: int(r.announcement.seqno))
    except DecodeError:
        slow = None
    assert flat.U64.unpack_from(damaged_bytes, inner[0])[0] == slow


def test_a_pointer_that_is_not_a_struct_in_bounds_is_left_to_pycapnp() -> None:
    def with_first_pointer(pointer: int) -> bytes:
        # Root struct of no data and one pointer, then a word for that pointer to reach.
        return flat.U64.pack(3 << 32) + flat.U64.pack(flat.struct_pointer(0, 0, 1)) \
            + flat.U64.pack(pointer) + bytes(8)

    assert flat.struct_at(with_first_pointer(flat.struct_pointer(0, 1, 0)), 16) == (24, 1, 32, 0)
    assert flat.struct_at(with_first_pointer(0), 16) is None  # null
    assert flat.struct_at(with_first_pointer(1 | 2 << 32 | 8 << 35), 16) is None  # a list
    assert flat.struct_at(with_first_pointer(2), 16) is None  # a far pointer
    assert flat.struct_at(with_first_pointer(flat.struct_pointer(0, 2, 0)), 16) is None
    assert flat.struct_at(with_first_pointer(flat.struct_pointer(-3, 1, 0)), 16) is None
