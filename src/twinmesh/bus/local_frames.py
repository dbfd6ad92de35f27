"""The twin's hot Cap'n Proto shapes without pycapnp: its `LocalMessage` frames
(schemas/local.capnp) and the chat payload (`rmb.TextMessage`).

Per message a twin writes a `submits` frame and reads `result(s)`, `statusUpdate(s)`
and `deliver(ies)` frames; through pycapnp each costs tens of microseconds (a builder or a
reader, a context manager, a Python object per field), as much as the rest of the
client's work on them. These shapes are plain: one segment, the root's union tag,
lists of small structs of Data and Text. Like `twinmesh.wire.flat` (whose readers
this uses), reading is a shortcut, never a second opinion: `read` returns None for
anything but the canonical flat form of these members (other members, several
segments, structs smaller than this schema's, bad pointers, Text that is not
NUL-terminated UTF-8) and the caller decodes with pycapnp, which accepts or refuses
as before. What it does return is what pycapnp reads from the same bytes
(tests/bus/test_local_frames.py compares both on random and damaged frames).
`submits` writes bytes pycapnp reads as the same items. The same holds for
`read_text_payload` and `text_payload`.
"""

from __future__ import annotations

import struct
from typing import Any

from twinmesh.wire import flat, schemas

# (request id, ok, code, message, status)
Result = tuple[int, tuple[bool, str, str, str]]
# (message id, status, code)
Update = tuple[bytes, str, str]

_U64 = struct.Struct("<Q")
_RESULT_DATA = struct.Struct("<IB")  # requestId, then the byte holding `ok` (bit 0)
# One Submit: flags, payloadSize, requestId, then the pointer to its envelope.
_SUBMIT = struct.Struct("<BxxxIIxxxxQ")
_ZEROS = bytes(8)
# Segment table, root pointer, root data word (requestId 0, union tag), its pointer
# (to the list), the list's tag word.
_HEAD = struct.Struct("<IIQQQQ")
_COMPOSITE = 7
_BYTE_LIST = 2


_TAG = schemas.union_tags(schemas.local.LocalMessage)
_SUBMITS = _TAG["submits"]
_RESULTS = _TAG["results"]
_UPDATES = _TAG["statusUpdates"]
_DELIVERIES = _TAG["deliveries"]
_DELIVER = _TAG["deliver"]
_RESULT = _TAG["result"]
_UPDATE = _TAG["statusUpdate"]
_SUBMIT_WORDS = 2 + 1  # Submit: 2 data words, 1 pointer (envelope)


def read(body: bytes) -> tuple[str, Any] | None:
    """(member, value) as the client's pycapnp reader gives them for `results`,
    `statusUpdates`, `deliveries`, `deliver`, `result` and `statusUpdate`; None:
    decode with pycapnp."""
    layout = flat.root(body)
    if layout is None or layout[1] < 1 or layout[3] < 1:
        return None
    tag = flat.union_tag(body, layout, 2)
    position = layout[2]
    if tag == _DELIVERIES:
        envelopes = flat.blob_list_at(body, position)
        return None if envelopes is None else ("deliveries", envelopes)
    if tag == _RESULTS:
        results = _structs(body, position, 1, 3, _result)
        return None if results is None else ("results", results)
    if tag == _UPDATES:
        updates = _structs(body, position, 0, 3, _update)
        return None if updates is None else ("statusUpdates", updates)
    if tag == _DELIVER:
        envelope = flat.blob_at(body, position)
        return None if envelope is None else ("deliver", envelope)
    # The single members: what a NIC sends for a run of one, i.e. nearly always for
    # a twin that sends and receives a message now and then.
    if tag == _RESULT:
        result = _one(body, position, 1, 3, _result)
        return None if result is None else ("result", result)
    if tag == _UPDATE:
        update = _one(body, position, 0, 3, _update)
        return None if update is None else ("statusUpdate", update)
    return None


def _one(data: bytes, position: int, data_words: int, pointers: int,
         read_one: Any) -> Any | None:
    """The struct behind the pointer at `position`, read by `read_one`; None unless
    it has at least `data_words` and `pointers` and reads (a null one included:
    pycapnp reads its defaults)."""
    layout = flat.struct_at(data, position)
    if layout is None or layout[1] < data_words or layout[3] < pointers:
        return None
    return read_one(data, layout[0], layout[2])


def _structs(data: bytes, position: int, data_words: int, pointers: int,
             read_one: Any) -> list[Any] | None:
    """The items of the composite list behind the pointer at `position`, each read by
    `read_one(data, data_start, pointer_start)`; None unless every element has at
    least `data_words` and `pointers` and reads."""
    layouts = flat.struct_list_at(data, position)
    if layouts is None:
        return None
    items = []
    for at, have_data, pointer_at, have_pointers in layouts:
        if have_data < data_words or have_pointers < pointers:
            return None
        item = read_one(data, at, pointer_at)
        if item is None:
            return None
        items.append(item)
    return items


def _result(data: bytes, start: int, pointers: int) -> Result | None:
    request_id, flags = _RESULT_DATA.unpack_from(data, start)
    code = _text(data, pointers)
    message = _text(data, pointers + 8)
    status = _text(data, pointers + 16)
    if code is None or message is None or status is None:
        return None
    return request_id, (bool(flags & 1), code, message, status)


def _update(data: bytes, start: int, pointers: int) -> Update | None:
    message_id = flat.blob_at(data, pointers)
    status = _text(data, pointers + 8)
    code = _text(data, pointers + 16)
    if message_id is None or status is None or code is None:
        return None
    return message_id, status, code


def _text(data: bytes, position: int) -> str | None:
    """The Text behind the pointer at `position` ("" when null); None unless it is a
    NUL-terminated UTF-8 byte list in bounds."""
    (word,) = _U64.unpack_from(data, position)
    if word == 0:
        return ""
    if word & 3 != 1 or (word >> 32) & 7 != _BYTE_LIST:
        return None
    start = position + 8 + _offset(word) * 8
    end = start + (word >> 35)
    if start < 8 or end > len(data) or end == start or data[end - 1] != 0:
        return None
    try:
        return data[start:end - 1].decode()
    except UnicodeDecodeError:
        return None


def _offset(word: int) -> int:
    offset = (word >> 2) & 0x3FFFFFFF
    return offset - (1 << 30) if offset & (1 << 29) else offset


def submits(items: list[tuple[int, bytes, bool, bool, int]]) -> bytes:
    """A `submits` LocalMessage (one segment) of (request id, envelope, reliable,
    fail fast, payload size) items: the bytes pycapnp's builder writes for it."""
    parts, _ = submits_parts(items)
    return b"".join(parts)


def submits_parts(items: list[tuple[int, bytes, bool, bool, int]]) -> tuple[list[bytes], int]:
    """`submits` as the parts to join and their total size: a writer that joins them
    with other frames copies each envelope once."""
    count = len(items)
    list_words = count * _SUBMIT_WORDS
    parts: list[bytes] = [b""]  # the head, once the size is known
    blobs: list[bytes] = []
    # The blobs follow the list, in item order; a pointer counts words from its end.
    to_blobs = list_words - _SUBMIT_WORDS  # from item 0's pointer to the first blob
    blob_words = 0
    for request_id, envelope, reliable, fail_fast, payload_size in items:
        size = len(envelope)
        # (pycapnp points an empty Data at where its bytes would be, not null)
        parts.append(_SUBMIT.pack(int(reliable) | int(fail_fast) << 1, payload_size,
                                  request_id, 1 | (to_blobs + blob_words) << 2
                                  | _BYTE_LIST << 32 | size << 35))
        blobs.append(envelope)
        pad = -size & 7
        if pad:
            blobs.append(_ZEROS[:pad])
        blob_words += (size + 7) >> 3
        to_blobs -= _SUBMIT_WORDS
    words = 1 + 2 + 1 + list_words + blob_words  # root pointer, root, list tag, ...
    parts[0] = _HEAD.pack(0, words, flat.struct_pointer(0, 1, 1), _SUBMITS << 32,
                          1 | _COMPOSITE << 32 | list_words << 35,
                          count << 2 | 2 << 32 | 1 << 48)
    parts += blobs
    return parts, 8 + words * 8


def text_payload(text: str) -> bytes:
    """A `TextMessage` with `body = text`, as pycapnp's builder writes it."""
    return flat.message(b"", (text.encode() + b"\0",))


def read_text_payload(payload: bytes) -> str | None:
    """The body of a `TextMessage` payload; None: decode it with pycapnp."""
    layout = flat.root(payload)
    if layout is None or layout[3] < 1:
        return None
    return _text(payload, layout[2])
