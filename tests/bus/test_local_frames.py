"""The twin's flat LocalMessage frames read and write what pycapnp does, and hand
everything else to pycapnp."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from twinmesh.bus import local_frames
from twinmesh.bus.client import _read_local
from twinmesh.errors import DecodeError
from twinmesh.wire import schemas

_local = schemas.local
TEXTS = ["", "sent", "delivered", "noRoute", "é ünïcode ✓", "x" * 300]


def _pycapnp(body: bytes) -> tuple[str, Any] | None:
    try:
        return schemas.decode(_local.LocalMessage, body, _read_local)
    except (DecodeError, UnicodeDecodeError):
        return None


def _frame(rng: random.Random) -> bytes:
    message = _local.LocalMessage.new_message()
    message.requestId = rng.randrange(2**32)
    kind = rng.choice(["results", "statusUpdates", "deliveries", "deliver", "result",
                       "statusUpdate"])
    count = rng.randrange(0, 5)
    if kind == "results":
        for item in message.init("results", count):
            item.requestId = rng.randrange(2**32)
            item.ok = rng.random() < 0.5
            item.code, item.message, item.status = (rng.choice(TEXTS) for _ in range(3))
    elif kind == "statusUpdates":
        for item in message.init("statusUpdates", count):
            item.messageId = os.urandom(rng.choice([0, 16]))
            item.status, item.code = rng.choice(TEXTS), rng.choice(TEXTS)
    elif kind == "deliveries":
        envelopes = message.init("deliveries", count)
        for i in range(count):
            envelopes[i] = os.urandom(rng.randrange(0, 300))
    elif kind == "deliver":
        message.deliver = os.urandom(rng.randrange(0, 300))
    elif kind == "result":
        item = message.init("result")
        item.requestId = rng.randrange(2**32)
        item.ok = rng.random() < 0.5
        item.code, item.message, item.status = (rng.choice(TEXTS) for _ in range(3))
    else:
        item = message.init("statusUpdate")
        item.messageId = os.urandom(rng.choice([0, 16]))
        item.status, item.code = rng.choice(TEXTS), rng.choice(TEXTS)
    return bytes(message.to_bytes())


def test_the_frames_a_nic_sends_read_as_pycapnp_reads_them() -> None:
    rng = random.Random(1)
    fast = 0
    for _ in range(500):
        body = _frame(rng)
        got = local_frames.read(body)
        if got is not None:
            fast += 1
            assert got == _pycapnp(body)
    assert fast == 500  # what a NIC sends never needs pycapnp


def test_a_single_result_or_update_reads_without_pycapnp() -> None:
    # What a NIC sends for a run of one: most frames of a twin that is not busy.
    message = _local.LocalMessage.new_message()
    message.requestId = 7
    result = message.init("result")
    result.requestId, result.ok, result.status = 7, True, "sent"
    assert local_frames.read(bytes(message.to_bytes())) == (
        "result", (7, (True, "", "", "sent")))
    message = _local.LocalMessage.new_message()
    update = message.init("statusUpdate")
    update.messageId, update.status = b"i" * 16, "delivered"
    assert local_frames.read(bytes(message.to_bytes())) == (
        "statusUpdate", (b"i" * 16, "delivered", ""))


@pytest.mark.parametrize("seed", range(4))
def test_damaged_frames_read_as_pycapnp_reads_them_or_go_to_it(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        body = bytearray(_frame(rng))
        for _ in range(rng.randrange(1, 4)):
            if rng.random() < 0.2 and body:
                del body[rng.randrange(len(body)):]
            elif body:
                body[rng.randrange(len(body))] = rng.randrange(256)
        got = local_frames.read(bytes(body))
        if got is not None:
            assert got == _pycapnp(bytes(body))


def test_a_frame_of_another_member_or_shape_goes_to_pycapnp() -> None:
    message = _local.LocalMessage.new_message()
    message.init("challenge").nonce = b"n" * 32
    assert local_frames.read(bytes(message.to_bytes())) is None
    assert local_frames.read(b"") is None
    assert local_frames.read(bytes(16)) is None
    # Text without its NUL, or not UTF-8: pycapnp's business.
    message = _local.LocalMessage.new_message()
    message.init("results", 1)[0].code = "ok"
    body = bytearray(message.to_bytes())
    at = body.index(b"ok\x00")
    body[at + 2] = ord("!")
    assert local_frames.read(bytes(body)) is None
    body[at:at + 3] = b"\xff\xfe\x00"
    assert local_frames.read(bytes(body)) is None


def test_submits_are_the_bytes_pycapnp_writes() -> None:
    rng = random.Random(2)
    for _ in range(200):
        items = [(rng.randrange(2**32), os.urandom(rng.choice([0, 1, 8, 9, 200, 3000])),
                  rng.random() < 0.5, rng.random() < 0.5, rng.randrange(2**32))
                 for _ in range(rng.randrange(0, 6))]
        message = _local.LocalMessage.new_message()
        for submit, (request_id, envelope, reliable, fail_fast, size) in zip(
                message.init("submits", len(items)), items, strict=True):
            submit.requestId = request_id
            submit.envelope = envelope
            submit.reliable = reliable
            submit.failFast = fail_fast
            submit.payloadSize = size
        body = local_frames.submits(items)
        if len(body) < 8 * 1024:  # pycapnp's first segment: beyond, it writes two
            assert body == message.to_bytes()
        assert schemas.decode(_local.LocalMessage, body, lambda r: [
            (s.requestId, bytes(s.envelope), s.reliable, s.failFast, s.payloadSize)
            for s in r.submits]) == items


def test_big_submits_read_back_whole() -> None:
    items = [(i + 1, os.urandom(65_000 + i), True, False, 65_000) for i in range(5)]
    body = local_frames.submits(items)
    read = schemas.decode(_local.LocalMessage, body, lambda r: [
        (s.requestId, bytes(s.envelope), s.reliable, s.failFast, s.payloadSize)
        for s in r.submits])
    assert read == items


@pytest.mark.parametrize("text", ["", "hi", "é ü ✓ 😀", "x" * 20_000])
def test_chat_payloads_are_what_pycapnp_writes_and_reads(text: str) -> None:
    text_message = schemas.rmb.TextMessage
    payload = local_frames.text_payload(text)
    if len(payload) < 8 * 1024:
        assert payload == text_message.new_message(body=text).to_bytes()
    assert schemas.decode(text_message, payload, lambda r: r.to_dict()) == {"body": text}
    assert local_frames.read_text_payload(payload) == text


def test_damaged_chat_payloads_read_as_pycapnp_reads_them_or_go_to_it() -> None:
    rng = random.Random(5)
    hits = 0
    for _ in range(1000):
        body = bytearray(local_frames.text_payload(rng.choice(TEXTS)))
        body[rng.randrange(len(body))] = rng.randrange(256)
        got = local_frames.read_text_payload(bytes(body))
        if got is not None:
            hits += 1
            try:
                fields = schemas.decode(schemas.rmb.TextMessage, bytes(body),
                                        lambda r: r.to_dict())
            except (DecodeError, UnicodeDecodeError):
                fields = None
            assert fields == {"body": got}
    assert hits > 100
