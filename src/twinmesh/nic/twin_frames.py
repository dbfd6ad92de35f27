"""The NIC's side of the hot twin frames without pycapnp (schemas/local.capnp).

Per message a NIC reads a twin's `submits` item and writes a `result` and a
`statusUpdate` ("sent", then "delivered"); through pycapnp that is a Python object and
about a microsecond per field, more than the rest of the NIC's work on them. The
twin's counterparts are `twinmesh.bus.local_frames`. As in `twinmesh.wire.flat`,
reading is a shortcut, never a second opinion: `read_submits` returns None for
anything but the canonical flat form (the caller then decodes with pycapnp, which
accepts or refuses as before), and what it does return is what pycapnp reads from the
same bytes. The writers write bytes pycapnp reads as the same items
(tests/nic/test_twin_frames.py checks both).
"""

from __future__ import annotations

import struct

from twinmesh.wire import flat, schemas

# (request id, envelope, reliable, fail fast, payload size)
Submit = tuple[int, bytes, bool, bool, int]
# (request id, ok, code, message, status)
Result = tuple[int, bool, str, str, str]
# (message id, status, code)
Update = tuple[bytes, str, str]

_TAGS = schemas.union_tags(schemas.local.LocalMessage)
_SUBMIT_TAG = _TAGS["submit"]
_SUBMITS_TAG = _TAGS["submits"]
_ROOT = struct.Struct("<IH2x")  # LocalMessage's data word: requestId, union tag
_RESULTS = _ROOT.pack(0, _TAGS["results"])
_UPDATES = _ROOT.pack(0, _TAGS["statusUpdates"])
_UPDATE = _ROOT.pack(0, _TAGS["statusUpdate"])
_RESULT_TAG = _TAGS["result"]
_RESULT_DATA = struct.Struct("<I?3x")  # requestId, ok (bit 0 of byte 4)
# Submit's two data words (flags, payloadSize, requestId) and its envelope pointer.
_SUBMIT = struct.Struct("<BxxxIIxxxxQ")
_SUBMIT_DATA_WORDS = 2
_COMPOSITE_LIST = 7
_NO_POINTERS = b""


def read_submits(body: bytes) -> tuple[int, list[Submit]] | None:
    """(frame request id, items) of a `submits` frame, or of a `submit` frame as one
    item with the frame's request id; None: decode it with pycapnp."""
    layout = flat.root(body)
    if layout is None or layout[1] < 1 or layout[3] < 1:
        return None
    request_id, tag = _ROOT.unpack_from(body, layout[0])
    if tag == _SUBMITS_TAG:
        items = _submit_list(body, layout[2])
        return None if items is None else (request_id, items)
    if tag == _SUBMIT_TAG:
        inner = flat.struct_at(body, layout[2])
        if inner is None or inner[1] < _SUBMIT_DATA_WORDS or inner[3] < 1:
            return None
        item = _submit(body, inner[0], inner[2])
        return None if item is None else (request_id, [(request_id, *item[1:])])
    return None


def _submit_list(body: bytes, position: int) -> list[Submit] | None:
    (word,) = flat.U64.unpack_from(body, position)
    if word & 3 != 1 or (word >> 32) & 7 != _COMPOSITE_LIST:
        return None  # a null list too: pycapnp says so
    tag_at = position + 8 + _offset(word) * 8
    words = word >> 35
    if tag_at < 8 or tag_at + 8 + words * 8 > len(body):
        return None
    (tag,) = flat.U64.unpack_from(body, tag_at)
    count = (tag >> 2) & 0x3FFFFFFF
    data_words = (tag >> 32) & 0xFFFF
    pointers = tag >> 48
    size = data_words + pointers
    if (tag & 3 != 0 or data_words < _SUBMIT_DATA_WORDS or pointers < 1
            or count * size > words):
        return None
    items: list[Submit] = []
    total = 0
    start = tag_at + 8
    for _ in range(count):
        item = _submit(body, start, start + data_words * 8)
        if item is None:
            return None
        total += len(item[1])
        items.append(item)
        start += size * 8
    if total > len(body):
        return None  # envelopes that share bytes: pycapnp's traversal limit decides
    return items


def _submit(body: bytes, start: int, pointer: int) -> Submit | None:
    flags, payload_size, request_id, _ = _SUBMIT.unpack_from(body, start)
    envelope = flat.blob_at(body, pointer)
    if envelope is None:
        return None
    return request_id, envelope, bool(flags & 1), bool(flags & 2), payload_size


def _offset(word: int) -> int:
    offset = (word >> 2) & 0x3FFFFFFF
    return offset - 0x40000000 if offset & 0x20000000 else offset


def _text(text: str) -> bytes:
    """Text as a Data blob (NUL-terminated); "" as a null pointer, which reads as ""."""
    return text.encode() + b"\0" if text else b""


def results_parts(run: list[Result]) -> tuple[list[bytes], int]:
    """A `result` frame for one (its request id also the frame's, as pycapnp's writer
    did), a `results` list for more: the parts to join and their total size."""
    if len(run) == 1:
        request_id, ok, code, message, status = run[0]
        return flat.struct_parts(_ROOT.pack(request_id, _RESULT_TAG),
                                 _RESULT_DATA.pack(request_id, ok),
                                 (_text(code), _text(message), _text(status)))
    return flat.struct_list_parts(
        _RESULTS, 1, [_RESULT_DATA.pack(request_id, ok) for request_id, ok, _, _, _ in run],
        [(_text(code), _text(message), _text(status)) for _, _, code, message, status in run])


def updates_parts(run: list[Update]) -> tuple[list[bytes], int]:
    """A `statusUpdate` frame for one, a `statusUpdates` list for more."""
    if len(run) == 1:
        message_id, status, code = run[0]
        return flat.struct_parts(_UPDATE, _NO_POINTERS, (message_id, _text(status),
                                                         _text(code)))
    return flat.struct_list_parts(
        _UPDATES, 0, [_NO_POINTERS] * len(run),
        [(message_id, _text(status), _text(code)) for message_id, status, code in run])
