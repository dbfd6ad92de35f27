"""End-to-end sealing of bus envelopes (twinmesh.bus.crypto): round trips, every way
an envelope can be forged or tampered with, expiry, epochs, and a fuzz of the promise
that opening untrusted bytes raises only DecodeError, AuthenticationError or
ExpiredError."""

from __future__ import annotations

import contextlib
import math
import random
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinmesh.bus import crypto
from twinmesh.bus.crypto import (
    DEFAULT_TTL,
    ERROR_CODES,
    ERROR_SCHEMA_ID,
    MAX_ACKS,
    MAX_ENVELOPE,
    MAX_PAYLOAD,
    MAX_SEALED,
    MAX_TTL,
    Header,
    Opened,
    TwinCrypto,
    ack_matches,
    associated_data,
    read_header,
    token_hash,
)
from twinmesh.errors import (
    AuthenticationError,
    DecodeError,
    ExpiredError,
    LocalProtocolError,
)
from twinmesh.identity.keys import KEY_SIZE, Identity, PublicKey
from twinmesh.proto.outbox import token_matches
from twinmesh.wire import schemas

ALICE = Identity(b"\x0a" * KEY_SIZE)
BOB = Identity(b"\x0b" * KEY_SIZE)
CAROL = Identity(b"\x0c" * KEY_SIZE)
MALLORY = Identity(b"\x0d" * KEY_SIZE)
NOW = 1_700_000_000.25  # a realistic unix time: float rounding matters at this size
PING_ID: int = schemas.rmb.Ping.schema.node.id
OPEN_ERRORS = (DecodeError, AuthenticationError, ExpiredError)
# Points of order 1, 2, 4 and 8 on Curve25519 (as X25519 u-coordinates).
LOW_ORDER_POINTS = (
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
)
def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def ping(sequence: int = 7) -> bytes:
    message = schemas.rmb.Ping.new_message()
    message.sentAt = 1.5
    message.sequence = sequence
    data: bytes = message.to_bytes()
    return data


def twins(**kwargs: Any) -> tuple[TwinCrypto, TwinCrypto]:
    return TwinCrypto(ALICE, **kwargs), TwinCrypto(BOB, **kwargs)


# Rebuilding an envelope field by field (never `as_builder()` on untrusted bytes).
FIELDS = (
    "id", "source", "destination", "created", "deadline", "kind", "replyTo", "schemaId",
    "ackHash", "ackToken", "ephemeral", "nonce", "sealed",
)


def _read_fields(reader: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {name: getattr(reader, name) for name in FIELDS}
    fields["kind"] = reader.kind.raw
    more = [{"id": bytes(a.id), "token": bytes(a.token)} for a in reader.moreAcks]
    if more:  # only an ack of several messages has them
        fields["moreAcks"] = more
    return fields


def fields_of(envelope: bytes) -> dict[str, Any]:
    return schemas.decode(schemas.rmb.Envelope, envelope, _read_fields)


def build(fields: dict[str, Any]) -> bytes:
    envelope = schemas.rmb.Envelope.new_message()
    for name, value in fields.items():
        setattr(envelope, name, value)
    data: bytes = envelope.to_bytes()
    return data


def with_field(envelope: bytes, **changes: Any) -> bytes:
    fields = fields_of(envelope)
    fields.update(changes)
    return build(fields)


# ------------------------------------------------------------------ round trips


def test_message_round_trip() -> None:
    alice, bob = twins()
    envelope, sent = alice.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    assert read_header(envelope) == sent
    opened = bob.open(envelope, now=NOW + 1)
    assert opened.header == sent
    assert opened.payload == ping()
    assert opened.error is None
    assert len(opened.token) == 16 and token_hash(opened.token) == sent.ack_hash
    assert sent.kind == "message" and sent.source == ALICE.public
    assert sent.destination == BOB.public and sent.schema_id == PING_ID
    assert sent.created == NOW and sent.deadline == NOW + DEFAULT_TTL
    assert len(sent.id) == 16 and sent.reply_to == b"" and sent.ack_token == b""
    sequence = schemas.decode(schemas.rmb.Ping, opened.payload, lambda r: r.sequence)
    assert sequence == 7


def test_payload_never_appears_in_the_clear() -> None:
    alice, _ = twins()
    secret = b"attack at dawn, bring snacks " * 4
    envelope, _ = alice.seal_message(BOB.public, secret, PING_ID, now=NOW)
    assert b"attack at dawn" not in envelope


def test_reply_round_trip() -> None:
    alice, bob = twins()
    _, request = alice.seal_message(BOB.public, ping(1), PING_ID, now=NOW)
    envelope, reply = bob.seal_message(
        ALICE.public, ping(2), PING_ID, now=NOW + 1, ttl=60, reply_to=request.id
    )
    opened = alice.open(envelope, now=NOW + 2)
    assert opened.header.reply_to == request.id == reply.reply_to
    assert opened.header.deadline == NOW + 61
    assert opened.payload == ping(2)


def test_ack_round_trip_and_ack_matches() -> None:
    alice, bob = twins()
    envelope, sent = alice.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    opened = bob.open(envelope, now=NOW + 1)
    ack = bob.seal_ack(opened.header, opened.token, now=NOW + 2)
    header = read_header(ack)
    assert ack_matches(sent, header)
    assert token_matches(header.ack_token, sent.ack_hash)  # the outbox agrees
    assert header.kind == "ack" and header.reply_to == sent.id
    assert header.source == BOB.public and header.destination == ALICE.public
    assert header.deadline == sent.deadline and header.created == NOW + 2
    assert header.schema_id == 0 and header.ack_hash == b""
    acked = alice.open(ack, now=NOW + 3)
    assert acked == Opened(header, b"", b"", None)


def test_ack_matches_refuses_what_does_not_match() -> None:
    alice, bob = twins()
    envelope, sent = alice.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    opened = bob.open(envelope, now=NOW)
    ack = read_header(bob.seal_ack(opened.header, opened.token, now=NOW))
    _, other = alice.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    assert not ack_matches(sent, replace(ack, ack_token=b"\x00" * 16))  # a made-up token
    assert not ack_matches(sent, replace(ack, ack_token=b""))
    assert not ack_matches(other, ack)  # another message's ack
    assert not ack_matches(sent, replace(ack, reply_to=other.id))
    assert not ack_matches(sent, replace(ack, source=CAROL.public))
    assert not ack_matches(sent, replace(ack, destination=CAROL.public))
    assert not ack_matches(sent, replace(ack, kind="error"))
    assert not ack_matches(ack, ack)


def test_error_round_trip() -> None:
    alice, bob = twins()
    envelope, sent = alice.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    opened = bob.open(envelope, now=NOW)
    error = bob.seal_error(opened.header, "rejectedSchema", "no such service", now=NOW + 1)
    header = read_header(error)
    assert header.kind == "error" and header.reply_to == sent.id
    assert header.schema_id == ERROR_SCHEMA_ID and header.deadline == sent.deadline
    assert not ack_matches(sent, header)
    answer = alice.open(error, now=NOW + 2)
    assert answer.error == ("rejectedSchema", "no such service")
    assert answer.token == b""


def test_every_error_code_round_trips() -> None:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    opened = bob.open(envelope, now=NOW)
    for code in sorted(ERROR_CODES):
        answer = alice.open(bob.seal_error(opened.header, code, "é" * 3, now=NOW), now=NOW)
        assert answer.error == (code, "ééé")


def test_largest_payload_round_trips_and_fits_the_caps() -> None:
    alice, bob = twins()
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256)
    envelope, _ = alice.seal_message(BOB.public, payload, PING_ID, now=NOW, ttl=MAX_TTL)
    assert len(envelope) <= MAX_ENVELOPE
    assert len(fields_of(envelope)["sealed"]) <= MAX_SEALED
    assert bob.open(envelope, now=NOW + MAX_TTL).payload == payload
    empty, _ = alice.seal_message(BOB.public, b"", PING_ID, now=NOW)
    assert bob.open(empty, now=NOW).payload == b""


def test_same_random_source_gives_the_same_envelope() -> None:
    first = TwinCrypto(ALICE, random=seeded(1)).seal_message(BOB.public, b"x", 1, now=NOW)
    again = TwinCrypto(ALICE, random=seeded(1)).seal_message(BOB.public, b"x", 1, now=NOW)
    other = TwinCrypto(ALICE, random=seeded(2)).seal_message(BOB.public, b"x", 1, now=NOW)
    assert first == again
    assert first[0] != other[0] and first[1].id != other[1].id


def test_every_envelope_has_a_fresh_id_and_nonce() -> None:
    alice, _ = twins()
    envelopes = [alice.seal_message(BOB.public, b"same", 1, now=NOW)[0] for _ in range(50)]
    fields = [fields_of(e) for e in envelopes]
    assert len({f["id"] for f in fields}) == 50
    assert len({f["nonce"] for f in fields}) == 50
    assert len({f["ackHash"] for f in fields}) == 50


# ------------------------------------------------------------- authentication


def test_a_third_twin_cannot_open() -> None:
    alice, _ = twins()
    carol = TwinCrypto(CAROL)
    envelope, _ = alice.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    with pytest.raises(AuthenticationError, match="not addressed"):
        carol.open(envelope, now=NOW)
    # Nor by readdressing it to herself: the destination is in the key and the tag.
    with pytest.raises(AuthenticationError):
        carol.open(with_field(envelope, destination=CAROL.public.raw), now=NOW)


def test_forged_source_is_refused() -> None:
    # Mallory seals with her own static key but writes Alice as the source (in the
    # header and in the associated data): Bob's DH(B, Alice) does not match.
    mallory = TwinCrypto(MALLORY)
    mallory.public = ALICE.public
    bob = TwinCrypto(BOB)
    envelope, header = mallory.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    assert header.source == ALICE.public
    with pytest.raises(AuthenticationError):
        bob.open(envelope, now=NOW)
    # And rewriting the source of her honest envelope does not help either.
    honest, _ = TwinCrypto(MALLORY).seal_message(BOB.public, ping(), PING_ID, now=NOW)
    with pytest.raises(AuthenticationError):
        bob.open(with_field(honest, source=ALICE.public.raw), now=NOW)


def test_direction_matters() -> None:
    # Same randomness on both sides, so the same ephemeral, nonce and plaintext: the
    # ciphertexts (tag aside) differ only because A→B and B→A keys differ.
    alice = TwinCrypto(ALICE, random=seeded(5))
    bob = TwinCrypto(BOB, random=seeded(5))
    to_bob, _ = alice.seal_message(BOB.public, b"same", 1, now=NOW)
    to_alice, _ = bob.seal_message(ALICE.public, b"same", 1, now=NOW)
    a, b = fields_of(to_bob), fields_of(to_alice)
    assert a["ephemeral"] == b["ephemeral"] and a["nonce"] == b["nonce"]
    assert a["sealed"][:-16] != b["sealed"][:-16]
    # Reflecting Alice's envelope back to her as if Bob sent it fails.
    reflected = with_field(to_bob, source=BOB.public.raw, destination=ALICE.public.raw)
    with pytest.raises(AuthenticationError):
        alice.open(reflected, now=NOW)


def _reply_envelope() -> tuple[bytes, TwinCrypto]:
    alice, bob = twins()
    envelope, _ = alice.seal_message(
        BOB.public, ping(), PING_ID, now=NOW, reply_to=b"r" * 16
    )
    return envelope, bob


def _ack_envelope() -> tuple[bytes, TwinCrypto]:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    opened = bob.open(envelope, now=NOW)
    return bob.seal_ack(opened.header, opened.token, now=NOW), alice


OTHER_EPHEMERAL = TwinCrypto(CAROL).seal_message(BOB.public, b"", 1, now=NOW)[1].ephemeral

# (field, new value, which envelope): each a well-formed header with one field changed.
TAMPERED = [
    ("id", b"i" * 16, _reply_envelope),
    ("source", CAROL.public.raw, _reply_envelope),
    ("destination", CAROL.public.raw, _reply_envelope),
    ("created", NOW - 1, _reply_envelope),
    ("created", NOW + 1, _reply_envelope),
    ("deadline", NOW + DEFAULT_TTL + 1, _reply_envelope),  # extended
    ("deadline", NOW + 10, _reply_envelope),  # shortened
    ("kind", 2, _reply_envelope),  # message → error
    ("replyTo", b"s" * 16, _reply_envelope),
    ("replyTo", b"", _reply_envelope),
    ("schemaId", PING_ID + 1, _reply_envelope),
    ("schemaId", ERROR_SCHEMA_ID, _reply_envelope),
    ("ackHash", b"h" * 16, _reply_envelope),
    ("ephemeral", OTHER_EPHEMERAL, _reply_envelope),
    ("nonce", b"n" * 24, _reply_envelope),
    ("ackToken", b"t" * 16, _ack_envelope),
    ("ackHash", b"h" * 16, _ack_envelope),
    ("kind", 2, _ack_envelope),  # ack → error
    ("deadline", NOW + DEFAULT_TTL + 1, _ack_envelope),
    ("replyTo", b"s" * 16, _ack_envelope),
]


@pytest.mark.parametrize(
    ("field", "value", "make"), TAMPERED, ids=[f"{f}-{m.__name__[1:]}" for f, _, m in TAMPERED]
)
def test_every_header_field_is_authenticated(
    field: str, value: Any, make: Callable[[], tuple[bytes, TwinCrypto]]
) -> None:
    envelope, receiver = make()
    receiver.open(envelope, now=NOW)  # the untouched envelope opens
    tampered = with_field(envelope, **{field: value})
    assert fields_of(tampered)[field] == value
    read_header(tampered)  # well-formed: only the tag can tell
    with pytest.raises(AuthenticationError):
        receiver.open(tampered, now=NOW)


def test_every_clear_field_is_in_the_associated_data() -> None:
    _, header = TwinCrypto(ALICE).seal_message(
        BOB.public, b"", 1, now=NOW, reply_to=b"r" * 16
    )
    changes: dict[str, Any] = {
        "id": b"i" * 16,
        "source": CAROL.public,
        "destination": CAROL.public,
        "created": NOW + 1e-6,
        "deadline": header.deadline - 1e-6,
        "kind": "error",
        "reply_to": b"",
        "schema_id": 2,
        "ack_hash": b"",
        "ack_token": b"t" * 16,
        "ephemeral": OTHER_EPHEMERAL,
        "more_acks": ((b"m" * 16, b"t" * 16),),
    }
    assert set(changes) == {f for f in Header.__dataclass_fields__}
    original = associated_data(header)
    for name, value in changes.items():
        assert associated_data(replace(header, **{name: value})) != original, name
    # Moving bytes between the variable-length fields changes it too.
    moved = replace(header, reply_to=b"", ack_token=b"r" * 16)
    assert associated_data(moved) != original


@pytest.mark.parametrize("reply_to", [b"", b"r" * 16])
@pytest.mark.parametrize("ack_hash", [b"", b"h" * 16])
@pytest.mark.parametrize("ack_token", [b"", b"t" * 16, b"odd"])
def test_associated_data_is_the_documented_layout(
    reply_to: bytes, ack_hash: bytes, ack_token: bytes
) -> None:
    """The same bytes for every size of the variable fields (the common ones are
    packed in one go, the rest joined piece by piece): peers of other versions
    compute it from the layout, not from our code."""
    _, header = TwinCrypto(ALICE).seal_message(BOB.public, b"x", 7, now=NOW)
    header = replace(header, reply_to=reply_to, ack_hash=ack_hash, ack_token=ack_token)
    expected = b"".join((
        b"twinmesh/rmb/v1/ad", header.id, ALICE.public.raw, BOB.public.raw,
        struct.pack(">dd", header.created, header.deadline), bytes((0,)),
        (7).to_bytes(8, "big"), bytes((len(reply_to),)), reply_to,
        bytes((len(ack_hash),)), ack_hash, bytes((len(ack_token),)), ack_token,
        header.ephemeral,
    ))
    assert associated_data(header) == expected


def test_flipped_ciphertext_bytes_are_refused() -> None:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, b"payload", PING_ID, now=NOW)
    sealed = fields_of(envelope)["sealed"]
    for index in range(len(sealed)):
        flipped = bytearray(sealed)
        flipped[index] ^= 0x01
        with pytest.raises(AuthenticationError):
            bob.open(with_field(envelope, sealed=bytes(flipped)), now=NOW)
    with pytest.raises(AuthenticationError):
        bob.open(with_field(envelope, sealed=sealed[:-1]), now=NOW)


def test_every_flipped_bit_is_refused_or_harmless() -> None:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, b"payload", PING_ID, now=NOW)
    original = bob.open(envelope, now=NOW)
    for index in range(len(envelope)):
        for bit in (0, 7):
            flipped = bytearray(envelope)
            flipped[index] ^= 1 << bit
            try:
                opened = bob.open(bytes(flipped), now=NOW)
            except OPEN_ERRORS:
                continue
            assert opened == original  # a flip in padding changes nothing


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=range(len(LOW_ORDER_POINTS)))
def test_low_order_ephemeral_is_refused(point: bytes) -> None:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, b"x", 1, now=NOW)
    with pytest.raises(AuthenticationError):
        bob.open(with_field(envelope, ephemeral=point), now=NOW)


def test_invalid_source_key_is_refused() -> None:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, b"x", 1, now=NOW)
    for source in (bytes(32), b"\xff" * 32, b"\x01" + bytes(31)):
        with pytest.raises(AuthenticationError):
            bob.open(with_field(envelope, source=source), now=NOW)


def test_a_destination_with_no_x25519_form_is_refused_every_time() -> None:
    alice, carol = TwinCrypto(ALICE), TwinCrypto(CAROL)
    for sender in (alice, carol, alice):  # the refusal is never remembered as a key
        for destination in (bytes(32), b"\xff" * 32, b"\x01" + bytes(31)):
            with pytest.raises(LocalProtocolError, match="not a valid twin key"):
                sender.seal_message(PublicKey(destination), b"x", 1, now=NOW)
    bob = TwinCrypto(BOB)
    for sender in (alice, carol):  # twins of one process sealing for the same peer
        envelope, header = sender.seal_message(BOB.public, b"x", 1, now=NOW)
        assert bob.open(envelope, now=NOW).header == header


def test_forgeries_do_not_fill_the_key_cache() -> None:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, b"x", 1, now=NOW)
    rng = random.Random(3)
    for _ in range(20):
        forged = with_field(envelope, ephemeral=rng.randbytes(32))
        with pytest.raises(AuthenticationError):
            bob.open(forged, now=NOW)
    assert bob.statistics().receive_keys == 0
    bob.open(envelope, now=NOW)
    assert bob.statistics().receive_keys == 1


def test_a_sender_with_a_valid_key_but_an_inconsistent_token_is_refused() -> None:
    # Only the real sender could do this (it has the key); the receiver still refuses a
    # message whose sealed token does not hash to ackHash: it could never be acked.
    bob = TwinCrypto(BOB)
    liar = TwinCrypto(ALICE)
    original_seal = liar._seal

    def lying_seal(*args: Any, **kwargs: Any) -> tuple[bytes, Header]:
        kwargs["ack_hash"] = b"\x00" * 16
        return original_seal(*args, **kwargs)

    liar._seal = lying_seal  # type: ignore[method-assign]
    lie, _ = liar.seal_message(BOB.public, b"x", 1, now=NOW)
    with pytest.raises(DecodeError, match="token"):
        bob.open(lie, now=NOW)


def _sealed_body(token: bytes = b"", payload: bytes = b"") -> bytes:
    body = schemas.rmb.SealedBody.new_message()
    body.token = token
    body.payload = payload
    data: bytes = body.to_bytes()
    return data


def _authentic(kind: str, plaintext: bytes, **overrides: Any) -> bytes:
    """An envelope from Alice to Bob that authenticates but breaks the rules inside."""
    fields: dict[str, Any] = {
        "created": NOW, "deadline": NOW + 10, "reply_to": b"r" * 16, "schema_id": 0,
        "ack_hash": b"", "ack_token": b"", "plaintext": plaintext,
    }
    fields.update(overrides)
    envelope, _ = TwinCrypto(ALICE)._seal(BOB.public, kind, **fields)
    return envelope


AUTHENTIC_BUT_WRONG: dict[str, tuple[str, bytes, dict[str, Any]]] = {
    "ack-with-body": ("ack", b"x", {"ack_token": b"t" * 16}),
    "ack-with-schema": ("ack", b"", {"ack_token": b"t" * 16, "schema_id": 5}),
    "ack-with-hash": ("ack", b"", {"ack_token": b"t" * 16, "ack_hash": b"h" * 16}),
    "message-not-a-body": ("message", b"garbage!", {"ack_hash": token_hash(b"t" * 16)}),
    "message-without-token": ("message", _sealed_body(), {"ack_hash": token_hash(b"")}),
    "message-too-large": (
        "message",
        _sealed_body(b"t" * 16, bytes(MAX_PAYLOAD + 1)),
        {"ack_hash": token_hash(b"t" * 16)},
    ),
    "error-with-token": ("error", _sealed_body(b"t" * 16), {"schema_id": ERROR_SCHEMA_ID}),
    "error-wrong-schema": ("error", _sealed_body(), {"schema_id": 5}),
    "error-with-ack-token": (
        "error", _sealed_body(), {"schema_id": ERROR_SCHEMA_ID, "ack_token": b"t" * 16}
    ),
    "error-not-an-error-body": (
        "error", _sealed_body(payload=b"garbage!"), {"schema_id": ERROR_SCHEMA_ID}
    ),
}


@pytest.mark.parametrize("case", sorted(AUTHENTIC_BUT_WRONG))
def test_authentic_envelopes_with_wrong_contents_are_decode_errors(case: str) -> None:
    # Only the real sender can make these (it holds the key), yet Bob still refuses them.
    kind, plaintext, overrides = AUTHENTIC_BUT_WRONG[case]
    with pytest.raises(DecodeError):
        TwinCrypto(BOB).open(_authentic(kind, plaintext, **overrides), now=NOW)


def test_an_error_code_newer_than_this_schema_opens_as_unknown() -> None:
    error = schemas.rmb.ErrorBody.new_message()
    error.code = 99
    error.message = "from the future"
    envelope = _authentic(
        "error", _sealed_body(payload=error.to_bytes()), schema_id=ERROR_SCHEMA_ID
    )
    assert TwinCrypto(BOB).open(envelope, now=NOW).error == ("unknown", "from the future")


# ------------------------------------------------------------------- decoding


def test_truncated_envelopes_are_decode_errors() -> None:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    for end in range(len(envelope)):
        with pytest.raises(DecodeError):
            bob.open(envelope[:end], now=NOW)
        with pytest.raises(DecodeError):
            read_header(envelope[:end])


@pytest.mark.parametrize(
    "garbage", [b"", b"\x00", bytes(8), bytes(16), b"\xff" * 64, b"not an envelope!" * 4]
)
def test_garbage_is_a_decode_error(garbage: bytes) -> None:
    with pytest.raises(DecodeError):
        read_header(garbage)
    with pytest.raises(DecodeError):
        TwinCrypto(BOB).open(garbage, now=NOW)


WRONG_SIZES = [
    ("id", b"i" * 15),
    ("id", b""),
    ("source", b"s" * 31),
    ("destination", b"d" * 33),
    ("ephemeral", b""),
    ("nonce", b"n" * 12),
    ("replyTo", b"r" * 8),
    ("ackHash", b""),  # a message must carry one
    ("ackHash", b"h" * 32),
    ("ackToken", b"t" * 16),  # a message carries none
    ("sealed", b"s" * 15),  # shorter than the tag
    ("sealed", b"s" * (MAX_SEALED + 1)),  # claims more than a full payload
    ("kind", 3),  # an enumerant this schema does not know
    ("created", math.nan),
    ("deadline", math.inf),
    ("deadline", NOW - 1),  # before created
    ("deadline", NOW + MAX_TTL + 1),  # over the TTL cap
]


@pytest.mark.parametrize(("field", "value"), WRONG_SIZES, ids=[f for f, _ in WRONG_SIZES])
def test_malformed_headers_are_decode_errors(field: str, value: Any) -> None:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, b"x", 1, now=NOW)
    bad = with_field(envelope, **{field: value})
    with pytest.raises(DecodeError):
        read_header(bad)
    with pytest.raises(DecodeError):
        bob.open(bad, now=NOW)


def test_ack_and_error_shapes_are_checked() -> None:
    ack, _ = _ack_envelope()
    for bad in (with_field(ack, ackToken=b""), with_field(ack, replyTo=b"")):
        with pytest.raises(DecodeError):
            read_header(bad)
    envelope, _ = _reply_envelope()
    with pytest.raises(DecodeError):  # an error must answer an id
        read_header(with_field(envelope, kind=2, replyTo=b""))


def test_oversized_envelope_is_refused_before_decoding() -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        read_header(bytes(MAX_ENVELOPE + 8))


# ----------------------------------------------------------------------- time


def test_expired_envelope_is_refused() -> None:
    alice, bob = twins()
    envelope, header = alice.seal_message(BOB.public, b"x", 1, now=NOW, ttl=30)
    assert header.deadline == NOW + 30
    assert bob.open(envelope, now=header.deadline).payload == b"x"  # the last moment
    with pytest.raises(ExpiredError):
        bob.open(envelope, now=header.deadline + 0.001)


def test_a_forged_deadline_is_an_authentication_error_not_an_expiry() -> None:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, b"x", 1, now=NOW, ttl=30)
    with pytest.raises(AuthenticationError):
        bob.open(with_field(envelope, deadline=NOW + 1), now=NOW + 10)


def test_ttl_bounds() -> None:
    alice, bob = twins()
    envelope, header = alice.seal_message(BOB.public, b"x", 1, now=NOW, ttl=MAX_TTL)
    assert header.deadline - header.created == pytest.approx(MAX_TTL)
    assert bob.open(envelope, now=NOW).header == header
    for ttl in (0.0, -1.0, MAX_TTL + 0.001, math.nan, math.inf):
        with pytest.raises(LocalProtocolError):
            alice.seal_message(BOB.public, b"x", 1, now=NOW, ttl=ttl)


def test_ack_deadline_stays_within_the_cap_when_the_sender_clock_runs_ahead() -> None:
    alice, bob = twins()
    envelope, sent = alice.seal_message(BOB.public, b"x", 1, now=NOW + 60, ttl=MAX_TTL)
    opened = bob.open(envelope, now=NOW)  # Bob's clock is a minute behind
    ack = read_header(bob.seal_ack(opened.header, opened.token, now=NOW))
    assert ack.deadline == NOW + MAX_TTL < sent.deadline
    assert ack_matches(sent, ack)


# --------------------------------------------------------------------- epochs


def test_epoch_rotates_after_n_envelopes_and_old_ones_still_open() -> None:
    alice, bob = twins(epoch_messages=3)
    sealed = [alice.seal_message(BOB.public, b"%d" % i, 1, now=NOW) for i in range(7)]
    ephemerals = [header.ephemeral for _, header in sealed]
    assert ephemerals[0] == ephemerals[1] == ephemerals[2] != ephemerals[3]
    assert ephemerals[3] == ephemerals[5] != ephemerals[6]
    assert alice.statistics().epochs == 3
    for i, (envelope, _) in enumerate(sealed):
        assert bob.open(envelope, now=NOW).payload == b"%d" % i
    assert bob.statistics().receive_keys == 3


def test_epoch_rotates_after_t_seconds() -> None:
    alice, bob = twins(epoch_seconds=10)
    first = alice.seal_message(BOB.public, b"a", 1, now=NOW)
    same = alice.seal_message(BOB.public, b"b", 1, now=NOW + 9.9)
    later = alice.seal_message(BOB.public, b"c", 1, now=NOW + 10)
    assert first[1].ephemeral == same[1].ephemeral != later[1].ephemeral
    back = alice.seal_message(BOB.public, b"d", 1, now=NOW)  # the clock went back
    assert back[1].ephemeral not in (first[1].ephemeral, later[1].ephemeral)
    for envelope, header in (first, same, later, back):
        assert bob.open(envelope, now=NOW + 11).header == header


def test_acks_and_errors_count_toward_the_epoch() -> None:
    alice, bob = twins(epoch_messages=2)
    envelope, _ = alice.seal_message(BOB.public, b"x", 1, now=NOW)
    opened = bob.open(envelope, now=NOW)
    acks = [read_header(bob.seal_ack(opened.header, opened.token, now=NOW)) for _ in range(3)]
    assert acks[0].ephemeral == acks[1].ephemeral != acks[2].ephemeral


def test_rotation_forgets_the_old_epoch() -> None:
    alice, _ = twins(epoch_messages=1)
    alice.seal_message(BOB.public, b"x", 1, now=NOW)
    alice.seal_message(CAROL.public, b"x", 1, now=NOW)
    stats = alice.statistics()
    assert stats.epochs == 2 and stats.epoch_envelopes == 1
    assert stats.send_keys == 1  # Bob's key from the first epoch is gone


def test_key_caches_are_bounded() -> None:
    bob = TwinCrypto(BOB, key_cache_size=2)
    senders = [TwinCrypto(identity) for identity in (ALICE, CAROL, MALLORY)]
    envelopes = [s.seal_message(BOB.public, b"x", 1, now=NOW)[0] for s in senders]
    for envelope in envelopes + envelopes:
        assert bob.open(envelope, now=NOW).payload == b"x"
        assert bob.statistics().receive_keys <= 2
        assert bob.statistics().static_secrets <= 2
    alice = TwinCrypto(ALICE, key_cache_size=2)
    for identity in (BOB, CAROL, MALLORY):
        alice.seal_message(identity.public, b"x", 1, now=NOW)
    assert alice.statistics().send_keys == 2
    assert alice.statistics().static_secrets == 2


def test_a_pair_shares_one_static_secret_in_both_directions_and_across_epochs() -> None:
    alice = TwinCrypto(ALICE, epoch_messages=1)  # a new ephemeral for every envelope
    bob = TwinCrypto(BOB, epoch_messages=1)
    for _ in range(3):
        sealed, _ = alice.seal_message(BOB.public, b"ping", 1, now=NOW)
        message = bob.open(sealed, now=NOW)
        assert message.payload == b"ping"
        reply, _ = bob.seal_message(ALICE.public, b"pong", 1, now=NOW)
        assert alice.open(reply, now=NOW).payload == b"pong"
    # Every envelope had a fresh key (3 epochs each side) on one cached static secret.
    assert alice.statistics().epochs == 3 and bob.statistics().epochs == 3
    assert alice.statistics().static_secrets == 1 and bob.statistics().static_secrets == 1


# ---------------------------------------------------------------------- misuse


def test_sealing_misuse_is_a_local_protocol_error() -> None:
    alice, bob = twins()
    with pytest.raises(LocalProtocolError, match="too-large"):
        alice.seal_message(BOB.public, bytes(MAX_PAYLOAD + 1), 1, now=NOW)
    with pytest.raises(LocalProtocolError):
        alice.seal_message(BOB.public, b"x", 0, now=NOW)
    with pytest.raises(LocalProtocolError):
        alice.seal_message(BOB.public, b"x", 1 << 64, now=NOW)
    with pytest.raises(LocalProtocolError):
        alice.seal_message(BOB.public, b"x", 1, now=NOW, reply_to=b"short")
    with pytest.raises(LocalProtocolError):
        alice.seal_message(BOB.public, b"x", 1, now=math.nan)
    with pytest.raises(LocalProtocolError):
        alice.seal_message(PublicKey(b"\xff" * 32), b"x", 1, now=NOW)
    with pytest.raises(LocalProtocolError):
        TwinCrypto(ALICE, random=lambda n: bytes(n - 1)).seal_message(
            BOB.public, b"x", 1, now=NOW
        )

    envelope, sent = alice.seal_message(BOB.public, b"x", 1, now=NOW, ttl=10)
    opened = bob.open(envelope, now=NOW)
    with pytest.raises(LocalProtocolError, match="token"):
        bob.seal_ack(opened.header, b"\x00" * 16, now=NOW)
    with pytest.raises(LocalProtocolError, match="not addressed"):
        alice.seal_ack(sent, opened.token, now=NOW)  # Alice cannot ack her own message
    with pytest.raises(LocalProtocolError, match="expired"):
        bob.seal_ack(opened.header, opened.token, now=NOW + 11)
    ack = read_header(bob.seal_ack(opened.header, opened.token, now=NOW))
    with pytest.raises(LocalProtocolError, match="only a message"):
        alice.seal_ack(ack, opened.token, now=NOW)
    with pytest.raises(LocalProtocolError, match="unknown error code"):
        bob.seal_error(opened.header, "no-such-code", "", now=NOW)


def test_error_text_too_long_is_a_local_protocol_error() -> None:
    alice, bob = twins()
    envelope, _ = alice.seal_message(BOB.public, b"x", 1, now=NOW)
    opened = bob.open(envelope, now=NOW)
    with pytest.raises(LocalProtocolError):
        bob.seal_error(opened.header, "tooLarge", "x" * MAX_PAYLOAD, now=NOW)


# ------------------------------------------------------------------------ fuzz


def _scenarios() -> dict[str, tuple[bytes, TwinCrypto, Opened]]:
    alice, bob = twins(random=seeded(11))
    message, _ = alice.seal_message(BOB.public, ping(), PING_ID, now=NOW)
    reply, _ = alice.seal_message(BOB.public, b"r" * 40, 9, now=NOW, reply_to=b"q" * 16)
    opened = bob.open(message, now=NOW)
    ack = bob.seal_ack(opened.header, opened.token, now=NOW)
    found = {
        "message": (message, bob, opened),
        "reply": (reply, bob, bob.open(reply, now=NOW)),
        "ack": (ack, alice, alice.open(ack, now=NOW)),
    }
    error = bob.seal_error(opened.header, "overloaded", "slow down", now=NOW)
    found["error"] = (error, alice, alice.open(error, now=NOW))
    return found


SCENARIOS = _scenarios()
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "id": st.binary(max_size=20),
    "source": st.one_of(
        st.sampled_from([ALICE.public.raw, BOB.public.raw, CAROL.public.raw]),
        st.binary(min_size=32, max_size=32),
        st.binary(max_size=40),
    ),
    "destination": st.one_of(
        st.sampled_from([ALICE.public.raw, BOB.public.raw]), st.binary(max_size=40)
    ),
    "created": st.one_of(st.floats(), st.sampled_from([NOW, NOW - MAX_TTL, NOW + 1])),
    "deadline": st.one_of(st.floats(), st.sampled_from([NOW, NOW + MAX_TTL, NOW - 1])),
    "kind": st.integers(0, 0xFFFF),
    "replyTo": st.one_of(st.just(b""), st.binary(min_size=16, max_size=16), st.binary()),
    "schemaId": st.integers(0, (1 << 64) - 1),
    "ackHash": st.one_of(st.just(b""), st.binary(min_size=16, max_size=16), st.binary()),
    "ackToken": st.one_of(st.just(b""), st.binary(min_size=16, max_size=16), st.binary()),
    "ephemeral": st.one_of(
        st.sampled_from([*LOW_ORDER_POINTS, OTHER_EPHEMERAL]), st.binary(max_size=40)
    ),
    "nonce": st.binary(max_size=30),
    "sealed": st.binary(max_size=200),
}


def rewrite_field(draw: Callable[..., Any], data: bytes) -> bytes | None:
    """Structure-aware mutation: one field of a well-formed envelope changed."""
    try:
        fields = fields_of(data)
    except DecodeError:
        return None
    name = draw(st.sampled_from(sorted(FIELD_VALUES)))
    fields[name] = draw(FIELD_VALUES[name])
    return build(fields)


@st.composite
def mutated(draw: st.DrawFn, real: bytes) -> bytes:
    """One to four mutations of `real`: bit flips, truncation, splices, field rewrites."""
    data = bytearray(real)
    ops = ["flip", "truncate", "duplicate", "splice", "delete", "zero", "field"]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(ops))
        if not data:
            data = bytearray(draw(st.binary(min_size=1, max_size=16)))
            continue
        if op == "field":
            rewritten = rewrite_field(draw, bytes(data))
            if rewritten is not None:
                data = bytearray(rewritten)
            continue
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "zero":
            j = draw(st.integers(i, min(len(data), i + 8)))
            data[i:j] = bytes(j - i)
        elif op == "truncate":
            del data[i:]
        elif op == "duplicate":
            j = draw(st.integers(i, len(data)))
            data[j:j] = data[i:j] or data[i : i + 1]
        elif op == "splice":
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        else:
            j = draw(st.integers(i, min(len(data), i + 16)))
            del data[i:j]
    return bytes(data)


def check_promise(data: bytes, receiver: TwinCrypto, original: Opened | None) -> None:
    """Only the documented errors escape; what opens is exactly what was sealed."""
    with contextlib.suppress(DecodeError):
        read_header(data)
    for now in (NOW, NOW + 1e9):
        try:
            opened = receiver.open(data, now=now)
        except OPEN_ERRORS:
            continue
        assert original is not None and opened == original


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(noise=st.binary(max_size=600))
def test_fuzz_random_bytes(noise: bytes) -> None:
    for _, receiver, _ in SCENARIOS.values():
        check_promise(noise, receiver, None)


@FUZZ
@given(name=st.sampled_from(sorted(SCENARIOS)), data=st.data())
def test_fuzz_mutated_envelopes(name: str, data: st.DataObject) -> None:
    envelope, receiver, original = SCENARIOS[name]
    check_promise(data.draw(mutated(envelope), label="mutated"), receiver, original)


@FUZZ
@given(name=st.sampled_from(sorted(SCENARIOS)), data=st.data())
def test_fuzz_one_field_rewritten(name: str, data: st.DataObject) -> None:
    envelope, receiver, original = SCENARIOS[name]
    rewritten = rewrite_field(data.draw, envelope)
    assert rewritten is not None
    check_promise(rewritten, receiver, original)


def test_fuzz_scenarios_open() -> None:
    # The fuzz is only meaningful if the unmutated envelopes really open.
    for envelope, receiver, original in SCENARIOS.values():
        assert receiver.open(envelope, now=NOW) == original


# --- the NIC's fast header read agrees with pycapnp -----------------------------------


def _capnp_fields(envelope: bytes) -> tuple[Any, ...] | None:
    """The clear fields as pycapnp reads them (None when it cannot)."""
    def read(r: Any) -> tuple[Any, ...]:
        return (bytes(r.id), bytes(r.source), bytes(r.destination), float(r.created),
                float(r.deadline), int(r.kind.raw), bytes(r.replyTo), int(r.schemaId),
                bytes(r.ackHash), bytes(r.ackToken), bytes(r.ephemeral))
    try:
        return schemas.decode(schemas.rmb.Envelope, envelope, read)
    except DecodeError:
        return None


def _header_fields(header: Header) -> tuple[Any, ...]:
    kinds = dict(schemas.rmb.Kind.schema.enumerants)
    return (header.id, header.source.raw, header.destination.raw, header.created,
            header.deadline, kinds[header.kind], header.reply_to, header.schema_id,
            header.ack_hash, header.ack_token, header.ephemeral)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(size=st.sampled_from([0, 100, 5000, MAX_PAYLOAD]), data=st.data(),
       reencode=st.booleans())
def test_read_header_reads_exactly_what_pycapnp_reads(
    size: int, data: st.DataObject, reencode: bool
) -> None:
    """`read_header` takes a shortcut for flat (one-segment) envelopes; on any bytes,
    flat or not, intact or damaged, it must see the same fields pycapnp sees, or
    refuse."""
    envelope, _ = TwinCrypto(ALICE).seal_message(BOB.public, b"p" * size, PING_ID, now=NOW)
    if reencode:  # the default builder: a big envelope spans two segments
        fields = schemas.decode(schemas.rmb.Envelope, envelope, lambda r: r.to_dict())
        envelope = bytes(schemas.rmb.Envelope.new_message(**fields).to_bytes())
    damaged = bytearray(envelope)
    for _ in range(data.draw(st.integers(0, 4))):
        position = data.draw(st.integers(0, min(len(damaged) - 1, 400)))
        damaged[position] = data.draw(st.integers(0, 255))
    expected = _capnp_fields(bytes(damaged))
    try:
        header = read_header(bytes(damaged))
    except DecodeError:
        return
    assert expected is not None and _header_fields(header) == expected


def _capnp_acked(envelope: bytes) -> tuple[Any, ...] | None:
    """The clear fields and moreAcks pairs as pycapnp reads them (None when it cannot)."""
    fields = _capnp_fields(envelope)
    try:
        pairs = schemas.decode(schemas.rmb.Envelope, envelope, lambda r: tuple(
            (bytes(a.id), bytes(a.token)) for a in r.moreAcks))
    except DecodeError:
        return None
    return None if fields is None else (*fields, pairs)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(count=st.integers(1, 40), data=st.data(), reencode=st.booleans())
def test_read_header_reads_the_ack_list_exactly_as_pycapnp_does(
    count: int, data: st.DataObject, reencode: bool
) -> None:
    """Acks of many messages take the flat shortcut too: on any bytes, intact or
    damaged, one segment or two, a NIC sees the (id, token) pairs pycapnp sees, or
    refuses."""
    alice, bob = twins()
    opened = [bob.open(alice.seal_message(BOB.public, b"m", PING_ID, now=NOW)[0], now=NOW)
              for _ in range(count)]
    (ack,) = bob.seal_acks([(o.header, o.token) for o in opened], now=NOW)
    if reencode:  # a builder with a tiny first segment: the list lands in another one
        fields = fields_of(ack)
        builder = schemas.rmb.Envelope.new_message(num_first_segment_words=8)
        for name, value in fields.items():
            setattr(builder, name, value)
        ack = bytes(builder.to_bytes())
    damaged = bytearray(ack)
    for _ in range(data.draw(st.integers(0, 4))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    expected = _capnp_acked(bytes(damaged))
    try:
        header = read_header(bytes(damaged))
    except DecodeError:
        return
    assert expected is not None
    assert (*_header_fields(header), header.more_acks) == expected


def test_an_ack_of_many_messages_is_read_without_pycapnp() -> None:
    # The shortcut must not step aside for what twins really send.
    alice, bob = twins()
    opened = [bob.open(alice.seal_message(BOB.public, b"m", PING_ID, now=NOW)[0], now=NOW)
              for _ in range(MAX_ACKS)]
    (ack,) = bob.seal_acks([(o.header, o.token) for o in opened], now=NOW)
    fields = crypto._flat_fields(ack)
    assert fields is not None
    assert [o.header.id for o in opened] == [
        message_id for message_id, _ in read_header(ack).acked()]


# --- one ack for many messages --------------------------------------------------------


def test_one_ack_answers_many_messages_and_each_matches() -> None:
    alice, bob = twins()
    sent = [alice.seal_message(BOB.public, b"m", PING_ID, now=NOW, ttl=10.0 + n)
            for n in range(5)]
    opened = [bob.open(envelope, now=NOW) for envelope, _ in sent]
    acks = bob.seal_acks([(o.header, o.token) for o in opened], now=NOW + 1)
    assert len(acks) == 1
    ack = read_header(acks[0])
    assert [message_id for message_id, _ in ack.acked()] == [h.id for _, h in sent]
    assert all(ack_matches(header, ack) for _, header in sent)
    assert ack.deadline == max(h.deadline for _, h in sent)
    assert alice.open(acks[0], now=NOW + 1).header == ack  # the sender can open it too
    # An ack of other messages does not match.
    _, other_header = alice.seal_message(BOB.public, b"m", PING_ID, now=NOW)
    assert not ack_matches(other_header, ack)


def test_a_tampered_ack_list_is_refused() -> None:
    alice, bob = twins()
    opened = [bob.open(alice.seal_message(BOB.public, b"m", PING_ID, now=NOW)[0], now=NOW)
              for _ in range(3)]
    ack = bob.seal_acks([(o.header, o.token) for o in opened], now=NOW)[0]
    pairs = fields_of(ack)["moreAcks"]
    dropped = with_field(ack, moreAcks=pairs[:1])
    assert len(read_header(dropped).acked()) == 2  # a NIC reads it...
    with pytest.raises(AuthenticationError):
        alice.open(dropped, now=NOW)  # ...but it no longer authenticates


def test_more_acks_only_in_acks_and_bounded() -> None:
    alice, _ = twins()
    envelope, _ = alice.seal_message(BOB.public, b"m", PING_ID, now=NOW)
    with pytest.raises(DecodeError, match="moreAcks"):
        read_header(with_field(envelope, moreAcks=[{"id": b"i" * 16, "token": b"t" * 16}]))
