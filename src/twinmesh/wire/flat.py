"""Cap'n Proto for the hot, simple shapes, without pycapnp (sans-I/O).

Every packet a NIC handles is three nested messages (`LinkMessage.data` holding an
`Overlay` packet holding a `NicBus` frame), and pycapnp costs microseconds per message
and per field. The shapes on that path are plain: one segment, a root struct with a
union tag, byte blobs and lists of them. This module reads and writes exactly those.

Reading is a shortcut, never a second opinion: every reader returns None for anything
it does not recognise as the canonical flat form (several segments, far pointers,
another union member, a struct of another size, out-of-bounds pointers, blobs that
overlap so their total exceeds the message), and the caller then decodes with pycapnp,
which accepts or refuses as before. Whatever a reader does return is what pycapnp
would have read from the same bytes (tests/wire/test_flat.py checks this on random and
damaged input). Writers produce the bytes pycapnp's own builder produces for a small
message, in one segment.

Word layout reminders (all little-endian): a message starts with its segment table
(segment count - 1, then each segment's size in words); a struct pointer is
`offset << 2 | data_words << 32 | pointers << 48`; a list pointer is
`1 | offset << 2 | element_size << 32 | count << 35`, with element size 2 for bytes and
6 for pointers; offsets count words from the end of the pointer itself.
"""

from __future__ import annotations

import struct

U16 = struct.Struct("<H")
U64 = struct.Struct("<Q")
_SEGMENT_TABLE = struct.Struct("<II")
_BYTE_LIST = 2
_POINTER_LIST = 6
# A list pointer to a list of structs (element size 7), and the first word of such a
# list: its element count, then each element's data words and pointers.
_COMPOSITE_LIST = 7
_ZEROS = bytes(8)

# (data section start, data words, pointer section start, pointer count)
Layout = tuple[int, int, int, int]


def root(data: bytes) -> Layout | None:
    """Where the root struct of a one-segment message lies, or None."""
    if len(data) < 16:
        return None
    segments_minus_one, words = _SEGMENT_TABLE.unpack_from(data, 0)
    if segments_minus_one != 0 or 8 + words * 8 != len(data):
        return None
    return struct_at(data, 8)


def struct_at(data: bytes, position: int) -> Layout | None:
    """The struct the pointer at byte `position` points to; None when the pointer is
    null, not a struct pointer, or out of bounds."""
    (word,) = U64.unpack_from(data, position)
    if word & 3 != 0 or word == 0:
        return None
    start = position + 8 + _offset(word) * 8
    data_words = (word >> 32) & 0xFFFF
    pointers = word >> 48
    if start < 8 or start + (data_words + pointers) * 8 > len(data):
        return None
    return start, data_words, start + data_words * 8, pointers


def blob_at(data: bytes, position: int) -> bytes | None:
    """The Data behind the pointer at byte `position`: b"" when null; None when it is
    not a byte list in bounds."""
    (word,) = U64.unpack_from(data, position)
    return _blob(data, position, word)


def blobs_at(data: bytes, layout: Layout, count: int) -> list[bytes] | None:
    """The Data fields behind the struct's first `count` pointers, b"" for a null one
    or one past its pointer section (an older writer's struct); None when one is not a
    byte list in bounds."""
    _, _, pointers, have = layout
    present = min(count, have)
    blobs: list[bytes] = []
    if present:
        # `_blob` inlined: a NIC reads an envelope's nine fields twice per hop.
        size = len(data)
        position = pointers + 8  # the end of the pointer being read
        for word in pointer_run(present).unpack_from(data, pointers):
            if word == 0:
                blobs.append(b"")
            else:
                if word & 0x700000003 != 0x200000001:  # a list pointer, byte elements
                    return None
                offset = (word >> 2) & 0x3FFFFFFF
                start = position + 8 * (offset - 0x40000000 if offset & 0x20000000
                                        else offset)
                end = start + (word >> 35)
                if start < 8 or end > size:
                    return None
                blobs.append(data[start:end])
            position += 8
    if present < count:
        blobs += [b""] * (count - present)
    return blobs


def _blob(data: bytes, position: int, word: int) -> bytes | None:
    """The Data behind pointer `word`, which sits at byte `position`."""
    if word == 0:
        return b""
    if word & 3 != 1 or (word >> 32) & 7 != _BYTE_LIST:
        return None
    start = position + 8 + _offset(word) * 8
    end = start + (word >> 35)
    if start < 8 or end > len(data):
        return None
    return data[start:end]


def blob_list_at(data: bytes, position: int) -> list[bytes] | None:
    """The List(Data) behind the pointer at byte `position` ([] when null); None when
    it is not a pointer list in bounds, an item is not a byte list in bounds, or the
    items add up to more bytes than the message (shared blobs: pycapnp's traversal
    limit decides those)."""
    (word,) = U64.unpack_from(data, position)
    if word == 0:
        return []
    if word & 3 != 1 or (word >> 32) & 7 != _POINTER_LIST:
        return None
    start = position + 8 + _offset(word) * 8
    count = word >> 35
    if start < 8 or start + count * 8 > len(data):
        return None
    items: list[bytes] = []
    total = 0
    for item in range(start, start + count * 8, 8):
        blob = blob_at(data, item)
        if blob is None:
            return None
        total += len(blob)
        items.append(blob)
    if total > len(data):
        return None
    return items


def struct_list_at(data: bytes, position: int) -> list[Layout] | None:
    """The elements of the List(struct) behind the pointer at byte `position` ([] when
    null), each as the Layout of a struct; None when it is not such a list in bounds."""
    (word,) = U64.unpack_from(data, position)
    if word == 0:
        return []
    if word & 3 != 1 or (word >> 32) & 7 != _COMPOSITE_LIST:
        return None
    tag_at = position + 8 + _offset(word) * 8
    words = word >> 35
    if tag_at < 8 or tag_at + 8 + words * 8 > len(data):
        return None
    (tag,) = U64.unpack_from(data, tag_at)
    count = (tag >> 2) & 0x3FFFFFFF
    data_words = (tag >> 32) & 0xFFFF
    pointers = tag >> 48
    size = data_words + pointers
    if tag & 3 != 0 or count * size > words or (count and not size):
        return None  # empty structs: as many as the traversal limit lets pycapnp read
    start = tag_at + 8
    return [(at, data_words, at + data_words * 8, pointers)
            for at in range(start, start + count * size * 8, size * 8)]


def union_tag(data: bytes, layout: Layout, offset: int = 0) -> int | None:
    """The u16 union discriminant at `offset` (in u16 units) of the struct's data
    section; None when the data section does not reach it (pycapnp reads 0 then)."""
    start, data_words, _, _ = layout
    if (offset + 1) * 2 > data_words * 8:
        return None
    return int(U16.unpack_from(data, start + offset * 2)[0])


def _offset(word: int) -> int:
    offset = (word >> 2) & 0x3FFFFFFF
    return offset - 0x40000000 if offset & 0x20000000 else offset


# ------------------------------------------------------------------ writing


def message(data_section: bytes, blobs: tuple[bytes, ...] | list[bytes]) -> bytes:
    """A one-segment message whose root struct has `data_section` (whole words) and
    one Data pointer per blob, the blobs after it in order (pycapnp's layout)."""
    return b"".join(message_parts(data_section, blobs)[0])


def blob_list_message(data_section: bytes, items: list[bytes]) -> bytes:
    """A one-segment message whose root struct has `data_section` and one pointer, to
    a List(Data) of `items` (pycapnp's layout)."""
    return b"".join(blob_list_parts(data_section, items)[0])


def blob_list_parts(data_section: bytes, items: list[bytes]) -> tuple[list[bytes], int]:
    """`blob_list_message` as the parts to join and their total size: a writer that
    joins them with other bytes (a frame prefix, other frames) copies each item once."""
    body, pointers, blob_words = _lay_out(items)
    words = len(data_section) // 8
    count = len(items)
    size = 1 + words + 1 + count + blob_words
    return [_HEAD.pack(0, size, struct_pointer(0, words, 1)), data_section,
            U64.pack(1 | (_POINTER_LIST << 32) | (count << 35)),
            pointer_run(count).pack(*pointers), *body], 8 + size * 8


def message_parts(data_section: bytes, blobs: tuple[bytes, ...] | list[bytes]
                  ) -> tuple[list[bytes], int]:
    """`message` as the parts to join and their total size (see `blob_list_parts`)."""
    body, pointers, blob_words = _lay_out(blobs)
    words = len(data_section) // 8
    count = len(blobs)
    size = 1 + words + count + blob_words
    return [_HEAD.pack(0, size, struct_pointer(0, words, count)), data_section,
            pointer_run(count).pack(*pointers), *body], 8 + size * 8


# Segment table of one segment, then the root pointer.
_HEAD = struct.Struct("<IIQ")
_POINTER_RUNS = [struct.Struct(f"<{count}Q") for count in range(16)]


def pointer_run(count: int) -> struct.Struct:
    """The layout of `count` consecutive pointer words."""
    if count < len(_POINTER_RUNS):
        return _POINTER_RUNS[count]
    return struct.Struct(f"<{count}Q")


def struct_pointer(offset: int, data_words: int, pointers: int) -> int:
    return ((offset & 0x3FFFFFFF) << 2) | (data_words << 32) | (pointers << 48)


def lay_out(blobs: tuple[bytes, ...] | list[bytes]) -> tuple[list[bytes], list[int]]:
    """The padded bodies of `blobs` laid out after a run of their pointers, and the
    pointers (each offset counts from its own end to its blob)."""
    body, pointers, _ = _lay_out(blobs)
    return body, pointers


def _lay_out(blobs: tuple[bytes, ...] | list[bytes]) -> tuple[list[bytes], list[int], int]:
    """`lay_out`, and the words the bodies take."""
    body: list[bytes] = []
    pointers: list[int] = []
    position = 0  # words from the end of the pointer run to the next blob
    remaining = len(blobs)
    for blob in blobs:
        remaining -= 1
        size = len(blob)
        if not size:
            pointers.append(0)
            continue
        pointers.append(1 | ((remaining + position) << 2) | (_BYTE_LIST << 32) | (size << 35))
        body.append(blob)
        pad = -size & 7
        if pad:
            body.append(_ZEROS[:pad])
        position += (size + 7) >> 3
    return body, pointers, position



def struct_parts(data_section: bytes, child_data: bytes, child_blobs: tuple[bytes, ...]
                 ) -> tuple[list[bytes], int]:
    """A one-segment message whose root struct has `data_section` and one pointer, to
    a struct of `child_data` (whole words) and one Data pointer per child blob, the
    blobs after it (an empty blob is a null pointer). As the parts to join and their
    total size."""
    root_words = len(data_section) // 8
    data_words = len(child_data) // 8
    count = len(child_blobs)
    body, pointers, blob_words = _lay_out(child_blobs)
    size = 1 + root_words + 1 + data_words + count + blob_words
    return [_HEAD.pack(0, size, struct_pointer(0, root_words, 1)), data_section,
            U64.pack(struct_pointer(0, data_words, count)), child_data,
            pointer_run(count).pack(*pointers), *body], 8 + size * 8


def struct_list_parts(data_section: bytes, data_words: int, items: list[bytes],
                      item_blobs: list[tuple[bytes, ...]]) -> tuple[list[bytes], int]:
    """A one-segment message whose root struct has `data_section` and one pointer, to
    a list of structs: item i has data section `items[i]` (`data_words` words) and one
    Data pointer per blob of `item_blobs[i]` (all alike in number; an empty blob is a
    null pointer), the blobs after the list in item order. As the parts to join and
    their total size."""
    root_words = len(data_section) // 8
    count = len(items)
    pointers = len(item_blobs[0]) if item_blobs else 0
    element = data_words + pointers
    run = pointer_run(pointers)
    # Word positions in the segment (word 0 is the root pointer).
    blob_at_word = 1 + root_words + 2 + count * element
    pointer_word = 1 + root_words + 2 + data_words  # item 0's first pointer
    parts: list[bytes] = [b"", data_section,
                          U64.pack(1 | _COMPOSITE_LIST << 32 | (count * element) << 35),
                          U64.pack(count << 2 | data_words << 32 | pointers << 48)]
    body: list[bytes] = []
    for data, blobs in zip(items, item_blobs, strict=True):
        words: list[int] = []
        position = pointer_word
        for blob in blobs:
            size = len(blob)
            if not size:
                words.append(0)
            else:
                words.append(1 | (blob_at_word - position - 1) << 2 | _BYTE_LIST << 32
                             | size << 35)
                body.append(blob)
                pad = -size & 7
                if pad:
                    body.append(_ZEROS[:pad])
                blob_at_word += (size + 7) >> 3
            position += 1
        parts.append(data)
        parts.append(run.pack(*words))
        pointer_word += element
    parts[0] = _HEAD.pack(0, blob_at_word, struct_pointer(0, root_words, 1))
    parts += body
    return parts, 8 + blob_at_word * 8
