"""End-to-end sealing and opening of bus envelopes (sans-I/O: no clock, no sockets).

Theory of operation
-------------------
A twin seals every envelope it sends with `TwinCrypto.seal_message`, `seal_ack` or
`seal_error`, and opens every envelope it receives with `TwinCrypto.open`. A NIC holds
no twin key: it reads the clear header with `read_header` and matches acks to the
messages in its outbox with `ack_matches`. Every call that depends on time takes `now`
(unix seconds) from the caller; randomness comes from the `random` callable the
`TwinCrypto` was built with (`nacl.utils.random` unless a test injects its own).

Keys (docs/BUS.md, "End-to-end security")::

    eph_A                 the sender's epoch X25519 key, in the clear as `ephemeral`
    ikm = X25519(eph_A, B) ‖ X25519(A, B)          A, B: the twins' ed25519 keys as X25519
    key = BLAKE2b-256(KEY_CONTEXT ‖ A ‖ B ‖ eph_A, key=ikm, person=KEY_PERSON)

The sender's key `A` comes first, so A→B and B→A use different keys even within one
pair of twins. `X25519(A, B)` authenticates the sender: only A and B can compute it, so
an envelope that opens under it and names A as its source came from A (B does not
send to itself under A's name). No ed25519 signature is paid per message: one pair of
X25519 operations per (destination, epoch) on the sending side and per (source,
ephemeral) on the receiving side, both cached.

The sender's epoch ephemeral is replaced after `epoch_seconds` or `epoch_messages`
envelopes, whichever comes first, and the old private key and every key derived from
it are dropped at once (forward secrecy on the sender side; see docs/BUS.md for what
a theft of the receiver's static key still opens). The receiver keeps the keys it
derived in a bounded LRU keyed by (source, ephemeral), so envelopes sealed under an
epoch that the sender has since forgotten still open; a key enters that cache only
after an envelope opened under it, so forged envelopes cannot churn it.

Each envelope is XChaCha20-Poly1305 (IETF) with a fresh random 24-byte nonce. The
associated data is `associated_data(header)`: a fixed-layout encoding of every clear
header field (never the Cap'n Proto bytes, which have more than one valid encoding),
so a NIC that changes any of them, the deadline, the destination, the schema id, the
kind, `replyTo`, `ackHash`, `ackToken` or the ephemeral key, breaks the tag. The nonce
is the AEAD's own input and `sealed` is the ciphertext, so they are covered too.

What is sealed, by kind:

- `message`: a `SealedBody` (a fresh 16-byte delivery token and the payload). The
  header carries `ackHash` = BLAKE2b-128(token).
- `ack`: nothing (the plaintext is empty). The header carries the message's token in
  `ackToken`, `replyTo` = the message id and the message's deadline, so the source NIC
  can check it with `ack_matches` without any key, and no one but the destination
  twin, the only reader of the token, can make one. One ack may answer up to MAX_ACKS
  messages of one source (`seal_acks`): the others as (id, token) pairs in `moreAcks`,
  which the associated data covers too; its deadline is the latest of theirs.
- `error`: a `SealedBody` whose payload is an `ErrorBody` (schemaId = ERROR_SCHEMA_ID).

Limits: a payload is at most MAX_PAYLOAD (64 KiB) bytes; a TTL is more than 0 and at
most MAX_TTL (1800 s), and `deadline = created + ttl` is never extended. A TTL over the
cap is refused (LocalProtocolError), never silently clamped: a caller that asked for an
hour must hear that it cannot have it.

Errors: misuse on our side (a payload too big, a bad TTL, acking a message that is not
ours) raises LocalProtocolError. Bytes from elsewhere raise only RemoteProtocolError
subclasses: DecodeError (not an envelope, wrong sizes, over the caps),
AuthenticationError (not for us, tampered, forged source, bad key) or ExpiredError (an
authentic envelope past its deadline: authenticity is checked first, so an expiry is
never claimed on the word of whoever altered the deadline). Nothing is ever sent or
accepted in the clear.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nacl.bindings as sodium
import nacl.exceptions
import nacl.utils
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from twinmesh.errors import AuthenticationError, DecodeError, ExpiredError, LocalProtocolError
from twinmesh.identity.keys import KEY_SIZE, Identity, PublicKey
from twinmesh.wire import flat, schemas

_rmb = schemas.rmb

MAX_PAYLOAD = 64 * 1024
DEFAULT_TTL = 300.0
MAX_TTL = 1800.0
ID_SIZE = 16
TOKEN_SIZE = 16
ACK_HASH_SIZE = 16
NONCE_SIZE: int = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_SIZE: int = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
# A SealedBody around a full payload adds at most 64 bytes (two-segment table, root
# pointer, struct, token, far-pointer landing pad, padding); the rest is slack.
SEALED_OVERHEAD = 112 + TAG_SIZE
MAX_SEALED = MAX_PAYLOAD + SEALED_OVERHEAD
# The clear header of a full envelope takes about 320 bytes.
MAX_ENVELOPE = MAX_SEALED + 512
DEFAULT_KEY_CACHE = 4096
X25519_FORMS = 16384  # peers' X25519 forms kept, for all the twins of a process
MAX_ACKS = 1024  # messages one ack envelope may answer

KEY_PERSON = b"twinmesh-rmb-v1"  # BLAKE2b personalisation (at most 16 bytes)
KEY_CONTEXT = b"twinmesh/rmb/v1/key"
AD_CONTEXT = b"twinmesh/rmb/v1/ad"

# deadline - created may exceed the TTL by float rounding (created is ~1.7e9).
_TTL_SLACK = 1e-3
_U64 = 1 << 64

_KIND_VALUES: dict[str, int] = dict(_rmb.Kind.schema.enumerants)
_KIND_NAMES: dict[int, str] = {v: k for k, v in _KIND_VALUES.items()}
_ERROR_VALUES: dict[str, int] = dict(_rmb.ErrorCode.schema.enumerants)
_ERROR_NAMES: dict[int, str] = {v: k for k, v in _ERROR_VALUES.items()}

# The codes `seal_error` accepts: the ErrorCode enumerant names ("noRoute", ...), the
# spelling the outbox uses. An enumerant newer than this schema opens as "unknown".
ERROR_CODES: frozenset[str] = frozenset(_ERROR_VALUES)
ERROR_SCHEMA_ID: int = _rmb.ErrorBody.schema.node.id

# id, source, destination, created, deadline, kind, schemaId; then replyTo, ackHash and
# ackToken, each after a one-byte length; then the ephemeral key.
_AD_FIXED = struct.Struct(">16s32s32sddBQ")
_COUNT = struct.Struct(">I")
# `associated_data` for the field sizes a well-formed envelope has, as one layout per
# (replyTo, ackHash, ackToken, ephemeral) size.
_AD_LAYOUTS: dict[tuple[int, int, int, int], struct.Struct] = {
    (r, h, t, KEY_SIZE): struct.Struct(
        f">{len(AD_CONTEXT)}s{_AD_FIXED.format[1:]}B{r}sB{h}sB{t}s{KEY_SIZE}s")
    for r in (0, ID_SIZE) for h in (0, ACK_HASH_SIZE) for t in (0, TOKEN_SIZE)
}


@dataclass(frozen=True)
class Header:
    """The clear part of an envelope, copied out of the reader.

    `ephemeral` (the sender's epoch X25519 key) is here too: it is a clear field, and
    seeing it is how a test or a diagnostic tells epochs apart.
    """

    id: bytes
    source: PublicKey
    destination: PublicKey
    created: float
    deadline: float
    kind: str  # "message" | "ack" | "error"
    reply_to: bytes  # b"" or the 16-byte id this answers
    schema_id: int  # 0 for acks
    ack_hash: bytes  # messages: BLAKE2b-128 of the sealed token; b"" otherwise
    ack_token: bytes  # acks: the token of the message acked; b"" otherwise
    ephemeral: bytes
    # An ack of several messages: (id, token) of each one after the first.
    more_acks: tuple[tuple[bytes, bytes], ...] = ()

    def acked(self) -> list[tuple[bytes, bytes]]:
        """(message id, delivery token) of every message this ack answers."""
        if self.kind != "ack":
            return []
        return [(self.reply_to, self.ack_token), *self.more_acks]


@dataclass(frozen=True)
class Opened:
    """An envelope opened by its destination twin."""

    header: Header
    payload: bytes  # Cap'n Proto message of type header.schema_id; b"" for acks
    token: bytes  # a message's delivery token: pass it to seal_ack; b"" otherwise
    error: tuple[str, str] | None  # (code, message) when header.kind == "error"


@dataclass(frozen=True)
class CryptoStatistics:
    epoch_started: float | None  # when the current epoch ephemeral was made
    epoch_envelopes: int  # envelopes sealed under it
    epochs: int  # epoch ephemerals made so far
    send_keys: int  # destinations with a key cached in this epoch
    receive_keys: int  # (source, ephemeral) keys cached
    static_secrets: int = 0  # peers whose static-static X25519 is cached


def token_hash(token: bytes) -> bytes:
    """BLAKE2b-128 of a delivery token: what a message carries as `ackHash`."""
    return hashlib.blake2b(token, digest_size=ACK_HASH_SIZE).digest()


def ack_matches(message: Header, ack: Header) -> bool:
    """True when `ack` is the destination twin's ack of `message` (no key needed).

    The ack must answer the message's id, come from its destination, go to its source,
    and carry the token whose hash the message carries.
    """
    return (
        message.kind == "message"
        and ack.kind == "ack"
        and ack.source == message.destination
        and ack.destination == message.source
        and any(
            message_id == message.id and len(token) == TOKEN_SIZE
            and hmac.compare_digest(token_hash(token), message.ack_hash)
            for message_id, token in ack.acked()
        )
    )


def associated_data(header: Header) -> bytes:
    """The canonical encoding of every clear header field: the AEAD associated data."""
    reply_to, ack_hash, ack_token = header.reply_to, header.ack_hash, header.ack_token
    layout = _AD_LAYOUTS.get((len(reply_to), len(ack_hash), len(ack_token),
                              len(header.ephemeral)))
    if layout is not None and not header.more_acks:
        # The same bytes as below, in one pack: what nearly every envelope takes.
        return layout.pack(AD_CONTEXT, header.id, header.source.raw,
                           header.destination.raw, header.created, header.deadline,
                           _KIND_VALUES[header.kind], header.schema_id, len(reply_to),
                           reply_to, len(ack_hash), ack_hash, len(ack_token), ack_token,
                           header.ephemeral)
    return b"".join(
        (
            AD_CONTEXT,
            _AD_FIXED.pack(
                header.id,
                header.source.raw,
                header.destination.raw,
                header.created,
                header.deadline,
                _KIND_VALUES[header.kind],
                header.schema_id,
            ),
            bytes((len(header.reply_to),)),
            header.reply_to,
            bytes((len(header.ack_hash),)),
            header.ack_hash,
            bytes((len(header.ack_token),)),
            header.ack_token,
            header.ephemeral,
            # Only present in an ack of several messages, so every other AD is as before.
            *((_COUNT.pack(len(header.more_acks)),) if header.more_acks else ()),
            *(message_id + token for message_id, token in header.more_acks),
        )
    )


def read_header(envelope: bytes) -> Header:
    """The clear header of `envelope`, checked for shape; no key needed (for NICs).

    Raises DecodeError when the bytes are not an envelope, a field has the wrong size,
    the times are not finite or the deadline is before `created` or more than MAX_TTL
    after it, or the envelope is larger than an envelope with a full payload can be.
    """
    return _parse(envelope)[0]


@dataclass
class _Epoch:
    private: bytes
    public: bytes
    started: float
    envelopes: int = 0


class TwinCrypto:
    """Seals and opens the envelopes of one twin. Not thread-safe; one per twin.

    Only this object holds the twin's X25519 private key and its epoch ephemerals; the
    key caches (send keys, receive keys, static secrets: secret no less than the static
    private key beside them) are bounded by `key_cache_size` entries each.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        epoch_seconds: float = 600.0,
        epoch_messages: int = 1 << 16,
        key_cache_size: int = DEFAULT_KEY_CACHE,
        random: Callable[[int], bytes] = nacl.utils.random,
    ) -> None:
        if not epoch_seconds > 0:
            raise ValueError(f"epoch_seconds must be positive, got {epoch_seconds}")
        if epoch_messages < 1 or key_cache_size < 1:
            raise ValueError("epoch_messages and key_cache_size must be at least 1")
        self.public = identity.public  # immutable after construction, like the rest
        self.epoch_seconds = float(epoch_seconds)
        self.epoch_messages = epoch_messages
        self.key_cache_size = key_cache_size
        self._x25519_private = identity.x25519_private()
        self._random = random
        self._epoch: _Epoch | None = None
        self._epochs = 0
        # destination → key, for the current epoch only (cleared with the ephemeral).
        self._send_keys: OrderedDict[PublicKey, bytes] = OrderedDict()
        # (source raw, ephemeral) → key; least recently used first.
        self._receive_keys: OrderedDict[tuple[bytes, bytes], bytes] = OrderedDict()
        # peer → X25519(our static, its static): the same for both directions, so a
        # message and its ack (and the peer's replies) share one, whatever the epochs.
        # Kept with the peer's X25519 form, whose conversion costs about as much.
        self._static_secrets: OrderedDict[PublicKey, tuple[bytes, bytes]] = OrderedDict()

    # ------------------------------------------------------------------ sealing

    def seal_message(
        self,
        destination: PublicKey,
        payload: bytes,
        schema_id: int,
        *,
        now: float,
        ttl: float = DEFAULT_TTL,
        reply_to: bytes = b"",
    ) -> tuple[bytes, Header]:
        """Seal `payload` (a Cap'n Proto message of type `schema_id`) for `destination`.

        Returns the envelope to hand to the NIC and its header: keep `header.id` to
        follow its status and the header itself to match its ack (`ack_matches`).
        Raises LocalProtocolError for a payload over MAX_PAYLOAD, a TTL outside
        (0, MAX_TTL], a `reply_to` that is not an id, or a schema id outside 1..2⁶⁴-1.
        """
        _check_now(now)
        if not 0 < ttl <= MAX_TTL:
            raise LocalProtocolError(f"ttl must be in (0, {MAX_TTL:g}] seconds, got {ttl}")
        if len(payload) > MAX_PAYLOAD:
            raise LocalProtocolError(
                f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD} (too-large)"
            )
        if len(reply_to) not in (0, ID_SIZE):
            raise LocalProtocolError(f"reply_to is an id of {ID_SIZE} bytes or empty")
        if not 0 < schema_id < _U64:
            raise LocalProtocolError(f"schema id {schema_id} is not a Cap'n Proto type id")
        # One draw for the token, the id and the nonce.
        drawn = self._take(TOKEN_SIZE + ID_SIZE + NONCE_SIZE)
        token = drawn[:TOKEN_SIZE]
        return self._seal(
            destination,
            "message",
            created=now,
            deadline=now + ttl,
            reply_to=bytes(reply_to),
            schema_id=schema_id,
            ack_hash=token_hash(token),
            ack_token=b"",
            plaintext=flat.message(b"", (token, bytes(payload))),
            drawn=drawn[TOKEN_SIZE:],
        )

    def seal_ack(self, message: Header, token: bytes, *, now: float) -> bytes:
        """The ack of `message` (opened by this twin; `token` is `Opened.token`).

        Sent to `message.source` with `replyTo` = `message.id` and the message's
        deadline (shortened to now + MAX_TTL if the sender's clock runs ahead of
        ours). Seal one for every copy of a message received, duplicates included.
        Raises LocalProtocolError when `message` is not a message to this twin, the
        token is not its token, or `now` is past its deadline.
        """
        deadline = self._reply_deadline(message, now)
        if len(token) != TOKEN_SIZE or not hmac.compare_digest(
            token_hash(token), message.ack_hash
        ):
            raise LocalProtocolError("that token is not the delivery token of this message")
        envelope, _ = self._seal(
            message.source,
            "ack",
            created=now,
            deadline=deadline,
            reply_to=message.id,
            schema_id=0,
            ack_hash=b"",
            ack_token=bytes(token),
            plaintext=b"",
        )
        return envelope

    def seal_acks(self, acks: list[tuple[Header, bytes]], *, now: float) -> list[bytes]:
        """Acks for many messages (each with its `Opened.token`), in as few envelopes as
        possible: one per source and up to MAX_ACKS messages. Same checks as
        `seal_ack`, which is what a single message gets."""
        by_source: dict[PublicKey, list[tuple[Header, bytes]]] = {}
        for message, token in acks:
            self._reply_deadline(message, now)
            if len(token) != TOKEN_SIZE or not hmac.compare_digest(
                token_hash(token), message.ack_hash
            ):
                raise LocalProtocolError("that token is not the delivery token of this message")
            by_source.setdefault(message.source, []).append((message, token))
        envelopes: list[bytes] = []
        for source, answered in by_source.items():
            for start in range(0, len(answered), MAX_ACKS):
                chunk = answered[start:start + MAX_ACKS]
                first, token = chunk[0]
                deadline = max(self._reply_deadline(m, now) for m, _ in chunk)
                envelope, _ = self._seal(
                    source, "ack", created=now, deadline=deadline, reply_to=first.id,
                    schema_id=0, ack_hash=b"", ack_token=bytes(token), plaintext=b"",
                    more_acks=tuple((m.id, bytes(t)) for m, t in chunk[1:]),
                )
                envelopes.append(envelope)
        return envelopes

    def seal_error(self, message: Header, code: str, text: str, *, now: float) -> bytes:
        """A sealed error answering `message`, e.g. `rejectedSchema`, to its source.

        `code` is an ErrorCode enumerant name (ERROR_CODES). Addressing and deadline as
        for `seal_ack`. Raises LocalProtocolError for an unknown code, a text too long
        for a payload, or a `message` this twin cannot answer.
        """
        deadline = self._reply_deadline(message, now)
        if code not in ERROR_CODES:
            raise LocalProtocolError(f"unknown error code {code!r}")
        error = _rmb.ErrorBody.new_message()
        error.code = code
        error.message = text
        payload = error.to_bytes()
        if len(payload) > MAX_PAYLOAD:
            raise LocalProtocolError(f"error text of {len(text)} characters is too long")
        body = _rmb.SealedBody.new_message()
        body.payload = payload
        envelope, _ = self._seal(
            message.source,
            "error",
            created=now,
            deadline=deadline,
            reply_to=message.id,
            schema_id=ERROR_SCHEMA_ID,
            ack_hash=b"",
            ack_token=b"",
            plaintext=body.to_bytes(),
        )
        return envelope

    # ------------------------------------------------------------------ opening

    def open(self, envelope: bytes, *, now: float) -> Opened:
        """Authenticate and decrypt an envelope addressed to this twin.

        Raises DecodeError (not a well-formed envelope), AuthenticationError (not for
        this twin, tampered, not from its claimed source) or ExpiredError (authentic
        but past its deadline). Duplicates open again: deduplicating by
        `header.id` is the caller's job (and every copy of a message gets an ack).
        """
        _check_now(now)
        header, nonce, sealed = _parse(envelope)
        if header.destination != self.public:
            raise AuthenticationError("envelope is not addressed to this twin")
        slot = (header.source.raw, header.ephemeral)
        key = self._receive_keys.get(slot)
        cached = key is not None
        if key is None:
            key = self._derive_receive_key(header.source, header.ephemeral)
        plaintext = _decrypt(sealed, associated_data(header), nonce, key)
        if plaintext is None:
            raise AuthenticationError(
                "envelope does not authenticate (tampered, or not from its source)"
            )
        if cached:
            self._receive_keys.move_to_end(slot)
        else:
            self._receive_keys[slot] = key
            if len(self._receive_keys) > self.key_cache_size:
                self._receive_keys.popitem(last=False)
        if now > header.deadline:
            raise ExpiredError(f"envelope expired {now - header.deadline:.3f} s ago")
        return _unseal(header, plaintext)

    def statistics(self) -> CryptoStatistics:
        epoch = self._epoch
        return CryptoStatistics(
            epoch_started=None if epoch is None else epoch.started,
            epoch_envelopes=0 if epoch is None else epoch.envelopes,
            epochs=self._epochs,
            send_keys=len(self._send_keys),
            receive_keys=len(self._receive_keys),
            static_secrets=len(self._static_secrets),
        )

    # ------------------------------------------------------------------ internals

    def _take(self, size: int) -> bytes:
        data = self._random(size)
        if len(data) != size:
            raise LocalProtocolError(f"the random source gave {len(data)} bytes, not {size}")
        return bytes(data)

    def _reply_deadline(self, message: Header, now: float) -> float:
        _check_now(now)
        if message.kind != "message":
            raise LocalProtocolError(f"only a message can be answered, not an {message.kind}")
        if message.destination != self.public:
            raise LocalProtocolError("that message was not addressed to this twin")
        if now > message.deadline:
            raise LocalProtocolError("that message has expired; its sender no longer waits")
        return min(message.deadline, now + MAX_TTL)

    def _current_epoch(self, now: float) -> _Epoch:
        epoch = self._epoch
        if (
            epoch is None
            or epoch.envelopes >= self.epoch_messages
            or not epoch.started <= now < epoch.started + self.epoch_seconds
        ):
            # The old private key and every key derived from it go now.
            self._send_keys.clear()
            private = self._take(KEY_SIZE)
            epoch = _Epoch(private, sodium.crypto_scalarmult_base(private), now)
            self._epoch = epoch
            self._epochs += 1
        epoch.envelopes += 1
        return epoch

    def _send_key(self, destination: PublicKey, epoch: _Epoch) -> bytes:
        key = self._send_keys.get(destination)
        if key is not None:
            self._send_keys.move_to_end(destination)
            return key
        try:
            peer, second = self._static_secret(destination)
        except nacl.exceptions.RuntimeError:
            raise LocalProtocolError(f"{destination} is not a valid twin key") from None
        first = _dh(epoch.private, peer)
        if first is None or second is None:
            raise LocalProtocolError(f"{destination} is a low-order key")
        key = _derive(first, second, self.public, destination, epoch.public)
        self._send_keys[destination] = key
        if len(self._send_keys) > self.key_cache_size:
            self._send_keys.popitem(last=False)
        return key

    def _derive_receive_key(self, source: PublicKey, ephemeral: bytes) -> bytes:
        try:
            _peer, second = self._static_secret(source)
        except nacl.exceptions.RuntimeError:
            raise AuthenticationError("source is not a valid twin key") from None
        first = _dh(self._x25519_private, ephemeral)
        if first is None or second is None:
            raise AuthenticationError("ephemeral or source is a low-order key")
        return _derive(first, second, source, self.public, ephemeral)

    def _static_secret(self, peer: PublicKey) -> tuple[bytes, bytes | None]:
        """(the peer's X25519 key, our static DH with it; None for a low-order key).
        Raises nacl's RuntimeError when the peer's key has no X25519 form."""
        known = self._static_secrets.get(peer)
        if known is not None:
            self._static_secrets.move_to_end(peer)
            return known
        x25519 = _x25519_form(peer.raw)
        shared = _dh(self._x25519_private, x25519)
        if shared is not None:
            self._static_secrets[peer] = (x25519, shared)
            if len(self._static_secrets) > self.key_cache_size:
                self._static_secrets.popitem(last=False)
        return x25519, shared

    def _seal(
        self,
        destination: PublicKey,
        kind: str,
        *,
        created: float,
        deadline: float,
        reply_to: bytes,
        schema_id: int,
        ack_hash: bytes,
        ack_token: bytes,
        plaintext: bytes,
        more_acks: tuple[tuple[bytes, bytes], ...] = (),
        drawn: bytes | None = None,
    ) -> tuple[bytes, Header]:
        """`drawn`: the id and nonce, when the caller drew them with its own bytes."""
        epoch = self._current_epoch(created)
        key = self._send_key(destination, epoch)
        if drawn is None:
            drawn = self._take(ID_SIZE + NONCE_SIZE)
        header = Header(
            id=drawn[:ID_SIZE],
            source=self.public,
            destination=destination,
            created=float(created),
            deadline=float(deadline),
            kind=kind,
            reply_to=reply_to,
            schema_id=schema_id,
            ack_hash=ack_hash,
            ack_token=ack_token,
            ephemeral=epoch.public,
            more_acks=more_acks,
        )
        nonce = drawn[ID_SIZE:]
        sealed = _encrypt(plaintext, associated_data(header), nonce, key)
        if not more_acks:
            # What pycapnp builds, with one copy of each blob instead of three.
            return flat.message(
                _ENVELOPE_DATA.pack(header.created, header.deadline, _KIND_VALUES[kind],
                                    schema_id),
                (header.id, header.source.raw, header.destination.raw, reply_to, ack_hash,
                 ack_token, header.ephemeral, nonce, sealed)), header
        # One segment, so that `_flat_fields` reads it: an Acked takes 6 words.
        envelope = _rmb.Envelope.new_message(
            num_first_segment_words=_words(len(sealed) + 48 * len(more_acks)))
        envelope.id = header.id
        envelope.source = header.source.raw
        envelope.destination = header.destination.raw
        envelope.created = header.created
        envelope.deadline = header.deadline
        envelope.kind = _KIND_VALUES[kind]
        envelope.replyTo = reply_to
        envelope.schemaId = schema_id
        envelope.ackHash = ack_hash
        envelope.ackToken = ack_token
        envelope.ephemeral = header.ephemeral
        envelope.nonce = nonce
        envelope.sealed = sealed[:]
        if more_acks:
            listed = envelope.init("moreAcks", len(more_acks))
            for item, (message_id, token) in zip(listed, more_acks, strict=True):
                item.id = message_id
                item.token = token
        data: bytes = envelope.to_bytes()
        return data, header


# ---------------------------------------------------------------------- helpers


# Output buffers for libsodium, not zeroed first: it writes every byte of them.
_allocate = _ffi.new_allocator(should_clear_after_alloc=False)


def _encrypt(plaintext: bytes, ad: bytes, nonce: bytes, key: bytes) -> Any:
    """XChaCha20-Poly1305 (IETF) of `plaintext`: a buffer (len, slicing, bytes.join)
    rather than bytes, so the ciphertext is copied once, into the envelope. libsodium
    called directly: nacl's wrapper re-checks sizes that are ours (a 32-byte key, a
    24-byte nonce) and copies the result."""
    size = len(plaintext) + TAG_SIZE
    out = _allocate("unsigned char[]", size)
    _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        out, _ffi.NULL, plaintext, len(plaintext), ad, len(ad), _ffi.NULL, nonce, key)
    return _ffi.buffer(out, size)


def _decrypt(sealed: bytes, ad: bytes, nonce: bytes, key: bytes) -> Any | None:
    """The plaintext as a buffer (its slices are bytes), or None when the tag does not
    verify. `sealed` is at least TAG_SIZE bytes and `nonce` NONCE_SIZE (`_parse`)."""
    size = len(sealed) - TAG_SIZE
    out = _allocate("unsigned char[]", max(size, 1))
    if _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
            out, _ffi.NULL, _ffi.NULL, sealed, len(sealed), ad, len(ad), nonce, key) != 0:
        return None
    return _ffi.buffer(out, size)


def _check_now(now: float) -> None:
    if not math.isfinite(now):
        raise LocalProtocolError(f"now must be a finite number of seconds, got {now}")


@functools.lru_cache(maxsize=X25519_FORMS)
def _x25519_form(raw: bytes) -> bytes:
    """The X25519 form of an ed25519 public key (as public as the key): kept for the
    whole process, whose twins (hundreds in a hosting twind) talk to the same peers,
    and each conversion costs more than the key exchange it is for. Raises nacl's
    RuntimeError for a key that has no such form (not kept)."""
    form: bytes = sodium.crypto_sign_ed25519_pk_to_curve25519(raw)
    return form


def _dh(private: bytes, public: bytes) -> bytes | None:
    """X25519, or None when the result is all zero (a low-order public key)."""
    try:
        shared: bytes = sodium.crypto_scalarmult(private, public)
    except nacl.exceptions.RuntimeError:  # libsodium refuses an all-zero result itself
        return None
    return None if shared == bytes(KEY_SIZE) else shared


def _derive(
    first: bytes, second: bytes, source: PublicKey, destination: PublicKey, ephemeral: bytes
) -> bytes:
    return hashlib.blake2b(
        KEY_CONTEXT + source.raw + destination.raw + ephemeral,
        digest_size=32,
        key=first + second,
        person=KEY_PERSON,
    ).digest()


_Fields = tuple[bytes, bytes, bytes, float, float, int, bytes, int, bytes, bytes, bytes,
                bytes, bytes, tuple[tuple[bytes, bytes], ...]]


def _words(size: int) -> int:
    """First-segment words for a message around `size` bytes of data: one segment, so
    `_flat_fields` reads it without pycapnp."""
    return (size + 1024) // 8


# Envelope layout (rmb.capnp, as compiled): four data words (created, deadline, kind
# and its padding, schemaId), nine pointers.
_ENVELOPE_DATA_WORDS = 4
_ENVELOPE_POINTERS = 9
_ENVELOPE_DATA = struct.Struct("<ddH6xQ")


def _flat_fields(envelope: bytes) -> _Fields | None:
    """The envelope's fields read straight from a flat (single-segment) encoding, as
    pycapnp would read them: a NIC parses every envelope twice per hop, and pycapnp
    costs about 1 µs per field. None: not flat, let pycapnp read it."""
    layout = flat.root(envelope)
    if layout is None:
        return None
    start, data_words, pointers, count = layout
    if data_words != _ENVELOPE_DATA_WORDS or count < _ENVELOPE_POINTERS:
        return None  # an older or newer writer: pycapnp reads it
    more_acks: tuple[tuple[bytes, bytes], ...] = ()
    if count > _ENVELOPE_POINTERS:
        newer = count - _ENVELOPE_POINTERS - 1
        if newer and any(flat.pointer_run(newer).unpack_from(
                envelope, pointers + 8 * (_ENVELOPE_POINTERS + 1))):
            return None  # a newer field: pycapnp reads it
        listed = _flat_more_acks(envelope, pointers + 8 * _ENVELOPE_POINTERS)
        if listed is None:
            return None
        more_acks = listed
    fields = flat.blobs_at(envelope, layout, _ENVELOPE_POINTERS)
    if fields is None:
        return None
    created, deadline, kind, schema_id = _ENVELOPE_DATA.unpack_from(envelope, start)
    id_, source, destination, reply_to, ack_hash, ack_token, ephemeral, nonce, sealed = fields
    return (id_, source, destination, created, deadline, kind, reply_to, schema_id,
            ack_hash, ack_token, ephemeral, nonce, sealed, more_acks)


def _flat_more_acks(envelope: bytes, position: int) -> tuple[tuple[bytes, bytes], ...] | None:
    """The (id, token) pairs of the moreAcks list behind the pointer at `position`, as
    pycapnp reads them; None: let pycapnp read it. At most MAX_ACKS are read here
    (`_check_sizes` refuses more, whoever reads them)."""
    items = flat.struct_list_at(envelope, position)
    if items is None or len(items) > MAX_ACKS:
        return None
    pairs: list[tuple[bytes, bytes]] = []
    total = 0
    for item in items:
        blobs = flat.blobs_at(envelope, item, 2)
        if blobs is None:
            return None
        message_id, token = blobs
        total += len(message_id) + len(token)
        pairs.append((message_id, token))
    if total > len(envelope):
        return None  # items that share bytes: pycapnp's traversal limit decides
    return tuple(pairs)


def _read_envelope(reader: Any) -> _Fields:
    return (
        bytes(reader.id),
        bytes(reader.source),
        bytes(reader.destination),
        float(reader.created),
        float(reader.deadline),
        int(reader.kind.raw),
        bytes(reader.replyTo),
        int(reader.schemaId),
        bytes(reader.ackHash),
        bytes(reader.ackToken),
        bytes(reader.ephemeral),
        bytes(reader.nonce),
        bytes(reader.sealed),
        tuple((bytes(a.id), bytes(a.token)) for a in reader.moreAcks),
    )


def _size(name: str, value: bytes, *sizes: int) -> None:
    if len(value) not in sizes:
        wanted = " or ".join(str(s) for s in sizes)
        raise DecodeError(f"envelope {name} is {len(value)} bytes, not {wanted}")


def _parse(envelope: bytes) -> tuple[Header, bytes, bytes]:
    """Header, nonce and ciphertext of `envelope`; DecodeError unless well-formed."""
    if len(envelope) > MAX_ENVELOPE:
        raise DecodeError(f"envelope of {len(envelope)} bytes exceeds {MAX_ENVELOPE}")
    fields = _flat_fields(envelope)
    if fields is None:
        fields = schemas.decode(_rmb.Envelope, envelope, _read_envelope)
    (id_, source, destination, created, deadline, kind_value, reply_to, schema_id,
     ack_hash, ack_token, ephemeral, nonce, sealed, more_acks) = fields
    kind = _KIND_NAMES.get(kind_value)
    if kind is None:
        raise DecodeError(f"envelope kind {kind_value} is unknown")
    if more_acks or (len(id_), len(source), len(destination), len(ephemeral), len(nonce),
                     len(reply_to), len(ack_hash), len(ack_token)) not in _SIZES[kind]:
        _check_sizes(kind, id_, source, destination, ephemeral, nonce, reply_to, ack_hash,
                     ack_token, more_acks)
    if not TAG_SIZE <= len(sealed) <= MAX_SEALED:
        raise DecodeError(f"sealed part of {len(sealed)} bytes is outside {TAG_SIZE}..{MAX_SEALED}")
    if not (math.isfinite(created) and math.isfinite(deadline)):
        raise DecodeError("envelope times are not finite")
    if not 0 <= deadline - created <= MAX_TTL + _TTL_SLACK:
        raise DecodeError(
            f"envelope lifetime of {deadline - created:.3f} s is outside 0..{MAX_TTL:g} s"
        )
    # What Header(...) makes, without the frozen dataclass's __init__ (a setattr per
    # field, ~2 µs): a NIC reads every envelope on every hop. Fields checked above.
    header: Header = _new(Header)
    vars(header).update({
        "id": id_, "source": _public_key(source), "destination": _public_key(destination),
        "created": created, "deadline": deadline, "kind": kind, "reply_to": reply_to,
        "schema_id": schema_id, "ack_hash": ack_hash, "ack_token": ack_token,
        "ephemeral": ephemeral, "more_acks": more_acks,
    })
    return header, nonce, sealed


_new = object.__new__


# Keys seen in envelopes, shared (a PublicKey is immutable): most envelopes name the
# same few twins, and a key costs more to make than to look up. Emptied when full.
_KEYS: dict[bytes, PublicKey] = {}
KEYS_KEPT = 4096


def _public_key(raw: bytes) -> PublicKey:
    key = _KEYS.get(raw)
    if key is None:
        if len(_KEYS) >= KEYS_KEPT:
            _KEYS.clear()
        key = _KEYS[raw] = PublicKey(raw)
    return key


# The field sizes (id, source, destination, ephemeral, nonce, replyTo, ackHash,
# ackToken) that `_check_sizes` accepts for each kind (without moreAcks): a set
# lookup instead of its checks one by one.
_FIXED_SIZES = (ID_SIZE, KEY_SIZE, KEY_SIZE, KEY_SIZE, NONCE_SIZE)
_SIZES: dict[str, frozenset[tuple[int, ...]]] = {
    "message": frozenset((*_FIXED_SIZES, r, ACK_HASH_SIZE, 0) for r in (0, ID_SIZE)),
    "ack": frozenset((*_FIXED_SIZES, ID_SIZE, h, TOKEN_SIZE) for h in (0, ACK_HASH_SIZE)),
    "error": frozenset((*_FIXED_SIZES, ID_SIZE, h, t)
                       for h in (0, ACK_HASH_SIZE) for t in (0, TOKEN_SIZE)),
}


def _check_sizes(kind: str, id_: bytes, source: bytes, destination: bytes,
                 ephemeral: bytes, nonce: bytes, reply_to: bytes, ack_hash: bytes,
                 ack_token: bytes, more_acks: tuple[tuple[bytes, bytes], ...]) -> None:
    """DecodeError naming the first field whose size is wrong for `kind`."""
    _size("id", id_, ID_SIZE)
    _size("source", source, KEY_SIZE)
    _size("destination", destination, KEY_SIZE)
    _size("ephemeral", ephemeral, KEY_SIZE)
    _size("nonce", nonce, NONCE_SIZE)
    _size("replyTo", reply_to, 0, ID_SIZE)
    _size("ackHash", ack_hash, 0, ACK_HASH_SIZE)
    _size("ackToken", ack_token, 0, TOKEN_SIZE)
    if kind == "message":
        _size("ackHash of a message", ack_hash, ACK_HASH_SIZE)
        _size("ackToken of a message", ack_token, 0)
    elif kind == "ack":
        _size("replyTo of an ack", reply_to, ID_SIZE)
        _size("ackToken of an ack", ack_token, TOKEN_SIZE)
        if len(more_acks) >= MAX_ACKS:
            raise DecodeError(f"an ack of {len(more_acks) + 1} messages; at most {MAX_ACKS}")
        for message_id, token in more_acks:
            _size("moreAcks id", message_id, ID_SIZE)
            _size("moreAcks token", token, TOKEN_SIZE)
    else:
        _size("replyTo of an error", reply_to, ID_SIZE)
    if more_acks and kind != "ack":
        raise DecodeError(f"a {kind} carries no moreAcks")


def _flat_body(plaintext: bytes) -> tuple[bytes, bytes] | None:
    """Token and payload of a flat SealedBody (pointers 0 and 1), else None."""
    layout = flat.root(plaintext)
    fields = flat.blobs_at(plaintext, layout, 2) if layout is not None else None
    if fields is None:
        return None
    token, payload = fields
    return token, payload


def _read_body(reader: Any) -> tuple[bytes, bytes]:
    return bytes(reader.token), bytes(reader.payload)


def _read_error(reader: Any) -> tuple[str, str]:
    text = reader.message
    if not isinstance(text, str):
        raise DecodeError("ErrorBody.message is not text")
    return _ERROR_NAMES.get(int(reader.code.raw), "unknown"), text


def _unseal(header: Header, plaintext: bytes) -> Opened:
    """Check the authenticated envelope's contents against its kind (DecodeError)."""
    if header.kind == "ack":
        if plaintext or header.ack_hash or header.schema_id:
            raise DecodeError("an ack carries no sealed body, ackHash or schema id")
        return Opened(header, b"", b"", None)
    body = _flat_body(plaintext)
    token, payload = body if body is not None else schemas.decode(
        _rmb.SealedBody, bytes(plaintext), _read_body)
    if len(payload) > MAX_PAYLOAD:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if header.kind == "message":
        if len(token) != TOKEN_SIZE or not hmac.compare_digest(
            token_hash(token), header.ack_hash
        ):
            raise DecodeError("the sealed delivery token does not match ackHash")
        return Opened(header, payload, token, None)
    if token or header.ack_hash or header.ack_token:
        raise DecodeError("an error carries no delivery token, ackHash or ackToken")
    if header.schema_id != ERROR_SCHEMA_ID:
        raise DecodeError(f"an error's schema id must be ErrorBody's, not {header.schema_id}")
    return Opened(header, payload, b"", schemas.decode(_rmb.ErrorBody, payload, _read_error))
