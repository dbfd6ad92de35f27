"""The NIC-to-NIC link protocol: handshake and encrypted session (sans-I/O).

Theory of operation
-------------------
A `Link` is one end of a link between two NICs over any reliable, ordered byte
stream (TCP, a websocket, an in-memory pipe). It never touches a socket or a clock:
the shell feeds it received bytes with `receive_data(data, now)`, sends whatever
`data_to_send()` returns, and calls `handle_timer(now)` once `get_timer()` is due.
Every call that can change the state returns the events it produced.

Handshake (1 round trip, then the initiator's first encrypted frame confirms it)::

    initiator                                         responder
    Hello(version, s_i, e_i, sig_i(e_i))  ------->    verify sig_i, allow-list, version
                                          <-------    Accept(version, s_r, e_r,
                                                             sig_r(H(hello), e_r))
    verify sig_r, pinned key                          (keys derived, link not yet up)
    keys = KDF(X25519(e_i, e_r), H(hello|accept))
    LinkUp; first encrypted frame (keepalive) ---->   decrypts: LinkUp

Both sides prove their static ed25519 key by signature: the responder signs a hash
of the initiator's hello together with its own ephemeral key, so its proof is
fresh; the initiator's signature only binds its ephemeral key, and it proves
freshness by sending the first frame under keys only the holder of that ephemeral
private key can derive. A replayed hello therefore never brings a link up. The
ephemeral X25519 keys are discarded after the handshake: forward secrecy.

Session frames carry an explicit 8-byte counter, which is also the AEAD nonce. The
carriers are ordered and reliable, so the receiver demands exactly the next counter:
a replayed, reordered, dropped or tampered frame closes the link.

Liveness: a side that has sent nothing for `keepalive_interval` sends a keepalive,
which the peer answers at once with an ack. Any frame sent pushes the next keepalive
out (an ack further: halfway to `dead_after`, so that the answering side does not
fire just as the next keepalive arrives), so an idle link carries one keepalive and
one ack per interval, not two of each, and a busy one none. The acks measure the
RTT; every side sends a keepalive at least each `rtt_interval` so that both keep a
fresh one. A side that has received nothing for `dead_after` declares it dead.

Errors never escape `receive_data` or `handle_timer`: they become a `LinkDown` event
whose `error` is a `RemoteProtocolError` (or None for a clean close or a timeout),
and any goodbye the peer should see (a `Refuse`, a `Close`) is queued for sending.
Misusing the core (sending before `LinkUp`) raises `LocalProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

import nacl.bindings as sodium
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.utils
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from twinmesh.errors import (
    AuthenticationError,
    DecodeError,
    HandshakeRefused,
    LocalProtocolError,
    RemoteProtocolError,
)
from twinmesh.identity.keys import KEY_SIZE, SIGNATURE_SIZE, Identity, PublicKey
from twinmesh.wire import flat, schemas
from twinmesh.wire.framing import (
    DEFAULT_MAX_FRAME,
    PREFIX,
    PREFIX_SIZE,
    FrameDecoder,
    encode_frame,
)

VERSION = 1
HELLO_CONTEXT = b"twinmesh/link/v1/hello"
ACCEPT_CONTEXT = b"twinmesh/link/v1/accept"
COUNTER = struct.Struct(">Q")
TAG_SIZE = sodium.crypto_aead_chacha20poly1305_ietf_ABYTES
# A session frame's length prefix and counter; the nonce is the counter, zero-padded.
_SESSION_HEAD = struct.Struct(">IQ")
_NONCE = struct.Struct(">4xQ")
_TAG_ROOM = bytes(TAG_SIZE)
# Close the link long before the 64-bit nonce space could wrap.
MAX_COUNTER = 1 << 62
# The smallest maxFrame either side may announce. The field is not signed, so a
# smaller value (from a peer or from anyone on the path) is refused, never obeyed.
MIN_MAX_FRAME = 1024
# Bytes a payload grows by inside a session frame: counter, AEAD tag and the Cap'n
# Proto envelope of LinkMessage.data. A payload too big for the builder's first
# segment lands in a second one, so the worst case is: segment table for two segments
# (16), root pointer (8), struct with union tag and list pointer (16), far-pointer
# landing pad (8) and up to 7 bytes padding the payload to a whole word.
SESSION_OVERHEAD = COUNTER.size + TAG_SIZE + 16 + 8 + 16 + 8 + 7

_link = schemas.link


class State(enum.Enum):
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    CLOSED = "closed"


class DownKind(enum.Enum):
    CLOSED_BY_PEER = "closed-by-peer"
    CLOSED_LOCALLY = "closed-locally"
    PROTOCOL_ERROR = "protocol-error"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class LinkUp:
    peer: PublicKey
    handshake_time: float


@dataclass(frozen=True)
class DataReceived:
    data: bytes


@dataclass(frozen=True)
class RttMeasured:
    rtt: float


@dataclass(frozen=True)
class LinkDown:
    kind: DownKind
    reason: str
    error: RemoteProtocolError | None = None


Event = LinkUp | DataReceived | RttMeasured | LinkDown


@dataclass(frozen=True)
class LinkConfig:
    max_frame: int = DEFAULT_MAX_FRAME
    keepalive_interval: float = 0.4
    dead_after: float = 1.5  # a silent cut is rerouted within the 2 s goal
    handshake_timeout: float = 5.0
    rtt_interval: float = 5.0  # a keepalive at least this often, for a fresh RTT

    def __post_init__(self) -> None:
        if self.dead_after <= self.keepalive_interval:
            raise ValueError("dead_after must be longer than keepalive_interval")
        if self.rtt_interval < self.keepalive_interval:
            raise ValueError("rtt_interval must be at least keepalive_interval")
        if self.max_frame < MIN_MAX_FRAME:
            raise ValueError(f"max_frame must be at least {MIN_MAX_FRAME} bytes")


@dataclass
class LinkStats:
    bytes_in: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    frames_out: int = 0


@dataclass
class _Keys:
    send: bytes
    recv: bytes
    send_counter: int = 0
    recv_counter: int = 0


@dataclass
class _Handshake:
    ephemeral_private: bytes
    ephemeral_public: bytes
    hello_body: bytes = b""


class Link:
    """One end of a NIC-to-NIC link. See the module docstring for the protocol."""

    def __init__(
        self,
        identity: Identity,
        *,
        initiator: bool,
        now: float,
        expected_peer: PublicKey | None = None,
        allowed: frozenset[PublicKey] | None = None,
        config: LinkConfig | None = None,
    ) -> None:
        self.identity = identity
        self.initiator = initiator
        self.expected_peer = expected_peer
        self.allowed = allowed
        self.config = config or LinkConfig()
        self.state = State.HANDSHAKING
        self.peer: PublicKey | None = None
        self.peer_max_frame = self.config.max_frame
        self.rtt: float | None = None
        self.stats = LinkStats()
        self.down: LinkDown | None = None
        self._started = now
        self._decoder = FrameDecoder(self.config.max_frame)
        self._outgoing: list[bytes | bytearray] = []
        self._keys: _Keys | None = None
        self._confirmed = False
        self._last_received = now
        self._next_keepalive = now
        self._next_rtt = now
        self._keepalive_seq = 0
        self._hs: _Handshake | None = _new_handshake()
        if initiator:
            self._send_hello()

    # ----------------------------------------------------------------- public API

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes read from the carrier. Afterwards call `data_to_send()`."""
        if self.state is State.CLOSED:
            return []
        events: list[Event] = []
        try:
            frames = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            return self._fail(exc, events)
        for body in frames:
            self.stats.frames_in += 1
            self.stats.bytes_in += PREFIX_SIZE + len(body)
            try:
                self._receive_frame(body, now, events)
            except RemoteProtocolError as exc:
                return self._fail(exc, events)
            if self.state is State.CLOSED:  # type: ignore[comparison-overlap]
                break
        return events

    def send_data(self, payload: bytes, now: float) -> None:
        """Queue `payload` for the peer. Afterwards call `data_to_send()`.

        Raises LocalProtocolError before `LinkUp`, after close, or when the payload
        exceeds `max_payload`.
        """
        if self.state is not State.ESTABLISHED or not self._confirmed:
            raise LocalProtocolError(f"cannot send on a link that is {self.state.value}")
        if len(payload) > self.max_payload:
            raise LocalProtocolError(
                f"payload of {len(payload)} bytes exceeds the link maximum of {self.max_payload}"
            )
        self._send_plaintext(_data_parts(payload), now)

    def close(self, reason: str, now: float) -> list[Event]:
        """Close the link, telling the peer why if the session is up."""
        if self.state is State.CLOSED:
            return []
        if self._keys is not None and self._confirmed:
            message = _link.LinkMessage.new_message()
            message.init("close").reason = reason[:200]
            self._send_message(message, now)
        return self._go_down(LinkDown(DownKind.CLOSED_LOCALLY, reason), [])

    def data_to_send(self) -> bytes | bytearray:
        """All bytes queued for the carrier since the last call, in order. The caller
        owns them: a bytearray is never touched by the core again."""
        outgoing = self._outgoing
        if not outgoing:
            return b""
        # One frame (the usual case at low load) goes out as it is, without a copy.
        data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
        outgoing.clear()
        return data

    @property
    def frames_to_send(self) -> int:
        """How many frames `data_to_send()` would return (a shell bounds its backlog)."""
        return len(self._outgoing)

    @property
    def has_data_to_send(self) -> bool:
        """True when `data_to_send()` would return bytes (a shell may skip its write)."""
        return bool(self._outgoing)

    def get_timer(self) -> float | None:
        """When `handle_timer` next needs to run, or None when closed."""
        if self.state is State.CLOSED:
            return None
        if not self._confirmed:
            return self._started + self.config.handshake_timeout
        return min(self._next_keepalive, self._next_rtt,
                   self._last_received + self.config.dead_after)

    def handle_timer(self, now: float) -> list[Event]:
        """Send keepalives and detect a dead peer. Afterwards call `data_to_send()`."""
        if self.state is State.CLOSED:
            return []
        if not self._confirmed:
            if now >= self._started + self.config.handshake_timeout:
                return self._go_down(
                    LinkDown(
                        DownKind.TIMEOUT,
                        f"handshake did not complete within {self.config.handshake_timeout:g} s",
                    ),
                    [],
                )
            return []
        if now >= self._last_received + self.config.dead_after:
            silent = now - self._last_received
            return self._go_down(
                LinkDown(DownKind.TIMEOUT, f"link dead: nothing received for {silent:.1f} s"), []
            )
        if now >= self._next_keepalive or now >= self._next_rtt:
            self._send_keepalive(now)
        return []

    @property
    def max_payload(self) -> int:
        """The largest payload `send_data` accepts on this link."""
        return self.peer_max_frame - SESSION_OVERHEAD

    @property
    def is_up(self) -> bool:
        return self.state is State.ESTABLISHED and self._confirmed

    # --------------------------------------------------------------- handshake

    def _send_hello(self) -> None:
        hs = self._hs
        assert hs is not None
        handshake = _link.Handshake.new_message()
        hello = handshake.init("hello")
        hello.version = VERSION
        hello.staticKey = self.identity.public.raw
        hello.ephemeralKey = hs.ephemeral_public
        hello.signature = self.identity.sign(HELLO_CONTEXT + hs.ephemeral_public)
        hello.maxFrame = self.config.max_frame
        hs.hello_body = handshake.to_bytes()
        self._queue_frame(hs.hello_body)

    def _receive_frame(self, body: bytes, now: float, events: list[Event]) -> None:
        if self._keys is not None:
            self._receive_session_frame(body, now, events)
        elif self.initiator:
            self._receive_accept(body, now, events)
        else:
            self._receive_hello(body, now)

    def _receive_hello(self, body: bytes, now: float) -> None:
        hs = self._hs
        assert hs is not None
        try:
            which, fields = schemas.decode(_link.Handshake, body, _read_hello_or_accept)
        except DecodeError:
            self._refuse("malformed", "hello did not decode")
            raise
        if which != "hello":
            self._refuse("malformed", f"expected hello, got {which}")
            raise DecodeError(f"expected a hello, got {which}")
        version, static, ephemeral, signature, max_frame = fields
        if version != VERSION:
            self._refuse("badVersion", f"version {version} not supported (want {VERSION})")
            raise HandshakeRefused(f"peer speaks link version {version}, we speak {VERSION}")
        if max_frame < MIN_MAX_FRAME:
            self._refuse("malformed", f"maxFrame {max_frame} is below {MIN_MAX_FRAME}")
            raise DecodeError(f"hello maxFrame {max_frame} is below the minimum {MIN_MAX_FRAME}")
        try:
            peer = _check_key_material(static, ephemeral, signature)
        except DecodeError as exc:
            self._refuse("malformed", str(exc))
            raise
        if not peer.verify(signature, HELLO_CONTEXT + ephemeral):
            self._refuse("badSignature", "hello signature does not verify")
            raise AuthenticationError(f"hello from {peer.short}: signature does not verify")
        if peer == self.identity.public:
            self._refuse("selfLink", "a NIC cannot link to itself")
            raise HandshakeRefused("peer has our own key (a NIC dialled itself)")
        if self.allowed is not None and peer not in self.allowed:
            self._refuse("notAllowed", "your key is not on this NIC's allow-list")
            raise HandshakeRefused(f"peer {peer.text} is not on the allow-list")
        self.peer = peer
        self.peer_max_frame = min(max_frame, self.config.max_frame)

        handshake = _link.Handshake.new_message()
        accept = handshake.init("accept")
        accept.version = VERSION
        accept.staticKey = self.identity.public.raw
        accept.ephemeralKey = hs.ephemeral_public
        accept.signature = self.identity.sign(ACCEPT_CONTEXT + _hash(body) + hs.ephemeral_public)
        accept.maxFrame = self.config.max_frame
        accept_body = handshake.to_bytes()
        self._queue_frame(accept_body)
        self._derive_keys(ephemeral, _hash(body + accept_body))

    def _receive_accept(self, body: bytes, now: float, events: list[Event]) -> None:
        hs = self._hs
        assert hs is not None
        which, fields = schemas.decode(_link.Handshake, body, _read_hello_or_accept)
        if which == "refuse":
            code, reason = fields
            raise HandshakeRefused(f"refused by peer ({code}): {reason}")
        if which != "accept":
            raise DecodeError(f"expected an accept, got {which}")
        version, static, ephemeral, signature, max_frame = fields
        if version != VERSION:
            raise HandshakeRefused(f"peer answered with link version {version}, want {VERSION}")
        if max_frame < MIN_MAX_FRAME:
            raise DecodeError(f"accept maxFrame {max_frame} is below the minimum {MIN_MAX_FRAME}")
        peer = _check_key_material(static, ephemeral, signature)
        if not peer.verify(signature, ACCEPT_CONTEXT + _hash(hs.hello_body) + ephemeral):
            raise AuthenticationError(f"accept from {peer.short}: signature does not verify")
        if self.expected_peer is not None and peer != self.expected_peer:
            raise HandshakeRefused(
                f"peer key {peer.text} is not the pinned key {self.expected_peer.text}"
            )
        if peer == self.identity.public:
            raise HandshakeRefused("peer has our own key (a NIC dialled itself)")
        if self.allowed is not None and peer not in self.allowed:
            raise HandshakeRefused(f"peer {peer.text} is not on the allow-list")
        self.peer = peer
        self.peer_max_frame = min(max_frame, self.config.max_frame)
        self._derive_keys(ephemeral, _hash(hs.hello_body + body))
        self._become_up(now, events)
        # The first encrypted frame confirms the handshake to the responder.
        self._send_keepalive(now)

    def _derive_keys(self, peer_ephemeral: bytes, transcript: bytes) -> None:
        hs = self._hs
        assert hs is not None
        try:
            shared = sodium.crypto_scalarmult(hs.ephemeral_private, peer_ephemeral)
        except nacl.exceptions.RuntimeError:
            raise AuthenticationError("peer ephemeral key is a low-order point") from None
        if shared == bytes(32):
            raise AuthenticationError("peer ephemeral key is a low-order point")
        i2r = nacl.hash.blake2b(
            transcript, key=shared, person=b"twinmesh-l-i2r", encoder=nacl.encoding.RawEncoder
        )
        r2i = nacl.hash.blake2b(
            transcript, key=shared, person=b"twinmesh-l-r2i", encoder=nacl.encoding.RawEncoder
        )
        self._keys = _Keys(send=i2r, recv=r2i) if self.initiator else _Keys(send=r2i, recv=i2r)
        # Forget the ephemeral secret as soon as the session keys exist.
        self._hs = None

    def _become_up(self, now: float, events: list[Event]) -> None:
        assert self.peer is not None
        self.state = State.ESTABLISHED
        self._confirmed = True
        self._last_received = now
        events.append(LinkUp(self.peer, now - self._started))

    def _refuse(self, code: str, reason: str) -> None:
        handshake = _link.Handshake.new_message()
        refuse = handshake.init("refuse")
        refuse.code = code
        refuse.reason = reason
        self._queue_frame(handshake.to_bytes())

    # ----------------------------------------------------------------- session

    def _receive_session_frame(self, body: bytes, now: float, events: list[Event]) -> None:
        keys = self._keys
        assert keys is not None
        if len(body) < COUNTER.size + TAG_SIZE:
            raise DecodeError(f"session frame of {len(body)} bytes is too short")
        (counter,) = COUNTER.unpack_from(body)
        if counter != keys.recv_counter:
            raise AuthenticationError(
                f"replayed or reordered frame: counter {counter}, expected {keys.recv_counter}"
            )
        plaintext = _open(body, counter, keys.recv)
        if plaintext is None:
            raise AuthenticationError("frame failed authentication (tampered or wrong key)")
        keys.recv_counter += 1
        if keys.recv_counter >= MAX_COUNTER:
            raise AuthenticationError("receive counter exhausted; the link must be re-keyed")
        self._last_received = now
        if not self._confirmed:
            self._become_up(now, events)
        data = read_data(plaintext)
        if data is not None:  # the hot path: an overlay payload in canonical form
            events.append(DataReceived(data))
            return
        which, value = schemas.decode(_link.LinkMessage, plaintext[:], _read_link_message)
        if which == "data":
            events.append(DataReceived(value))
        elif which == "keepalive":
            reply = _link.LinkMessage.new_message()
            ack = reply.init("keepaliveAck")
            ack.sentAt, ack.seq = value
            self._send_message(reply, now)
            # The peer keeps the keepalives going: ours would fire just as its next one
            # arrives (both sides sending, as if neither had answered). Wait longer, but
            # not so long that the peer, if it stops asking, thinks us dead.
            self._next_keepalive = now + (self.config.keepalive_interval
                                          + self.config.dead_after) / 2
        elif which == "keepaliveAck":
            sent_at, _seq = value
            if 0.0 <= now - sent_at <= self.config.handshake_timeout + self.config.dead_after:
                self.rtt = now - sent_at
                events.append(RttMeasured(self.rtt))
        elif which == "close":
            self._go_down(LinkDown(DownKind.CLOSED_BY_PEER, f"closed by peer: {value}"), events)
        else:
            # A union member from a newer peer that this version does not know: skip it.
            pass

    def _send_keepalive(self, now: float) -> None:
        message = _link.LinkMessage.new_message()
        keepalive = message.init("keepalive")
        keepalive.sentAt = now
        keepalive.seq = self._keepalive_seq
        self._keepalive_seq = (self._keepalive_seq + 1) & 0xFFFFFFFF
        self._next_rtt = now + self.config.rtt_interval
        self._send_message(message, now)

    def _send_message(self, message: Any, now: float) -> None:
        self._send_plaintext((message.to_bytes(),), now)

    def _send_plaintext(self, plaintext: tuple[bytes, ...], now: float) -> None:
        """Encrypt the concatenation of `plaintext` into one session frame."""
        # Anything sent tells the peer we are alive, so the keepalive waits a full
        # interval after it: a link busy with data, or answering the peer's keepalives,
        # sends none of its own (half the idle frames and wake-ups of both sending).
        self._next_keepalive = now + self.config.keepalive_interval
        keys = self._keys
        assert keys is not None
        counter = keys.send_counter
        if counter >= MAX_COUNTER:
            raise LocalProtocolError("send counter exhausted; the link must be re-keyed")
        keys.send_counter += 1
        frame = _seal(plaintext, counter, keys.send)
        if len(frame) - PREFIX_SIZE > self.peer_max_frame:
            raise LocalProtocolError(
                f"frame of {len(frame) - PREFIX_SIZE} bytes exceeds the cap of "
                f"{self.peer_max_frame}"
            )
        self._count_frame(frame)

    def _queue_frame(self, body: bytes) -> None:
        self._count_frame(encode_frame(body, self.peer_max_frame))

    def _count_frame(self, frame: bytes | bytearray) -> None:
        self.stats.frames_out += 1
        self.stats.bytes_out += len(frame)
        self._outgoing.append(frame)

    # ------------------------------------------------------------------ ending

    def _fail(self, error: RemoteProtocolError, events: list[Event]) -> list[Event]:
        return self._go_down(LinkDown(DownKind.PROTOCOL_ERROR, str(error), error), events)

    def _go_down(self, down: LinkDown, events: list[Event]) -> list[Event]:
        self.state = State.CLOSED
        self.down = down
        self._keys = None
        self._hs = None
        events.append(down)
        return events


def _new_handshake() -> _Handshake:
    private = nacl.utils.random(KEY_SIZE)
    return _Handshake(private, sodium.crypto_scalarmult_base(private))


# LinkMessage's union tag for `data`, in the canonical data section of one word.
_DATA_TAG = 3
_DATA_SECTION = flat.U16.pack(_DATA_TAG) + bytes(6)


# Segment table, root pointer, data section and the Data pointer of `encode_data`.
_DATA_HEAD = struct.Struct("<IIQ8sQ")
_DATA_ROOT = flat.struct_pointer(0, 1, 1)
_BYTE_LIST_POINTER = 1 | (2 << 32)
_PAD = [bytes(-size & 7) for size in range(8)]


def encode_data(payload: bytes) -> bytes:
    """A `LinkMessage` whose member is `data = payload`, as pycapnp lays it out."""
    return b"".join(_data_parts(payload))


def _data_parts(payload: bytes) -> tuple[bytes, ...]:
    # flat.message's layout for one blob, in pieces: the payload is copied once, into
    # the frame, not first into a message and then into the frame.
    size = len(payload)
    if not size:
        return (_DATA_HEAD.pack(0, 3, _DATA_ROOT, _DATA_SECTION, 0),)
    head = _DATA_HEAD.pack(0, 3 + ((size + 7) >> 3), _DATA_ROOT, _DATA_SECTION,
                           _BYTE_LIST_POINTER | (size << 35))
    return head, payload, _PAD[size & 7]


def read_data(plaintext: Any) -> bytes | None:
    """The payload of a flat `LinkMessage.data`, exactly as pycapnp reads it; None for
    any other member or layout (then pycapnp decodes it). `plaintext`: bytes, or a
    buffer whose slices are bytes."""
    layout = flat.root(plaintext)
    if layout is None or layout[3] < 1 or flat.union_tag(plaintext, layout) != _DATA_TAG:
        return None
    return flat.blob_at(plaintext, layout[2])


# libsodium called directly: nacl's wrappers re-check sizes that are ours (a 32-byte
# key, a 12-byte nonce), allocate zeroed buffers and copy the result out again.
# Output buffers are not zeroed first: libsodium writes every byte of them.
_allocate = _ffi.new_allocator(should_clear_after_alloc=False)


def _seal(plaintext: tuple[bytes, ...], counter: int, key: bytes) -> bytearray:
    """A whole session frame (prefix, counter, ciphertext, tag) of the concatenated
    `plaintext`, encrypted in place: the plaintext is copied once, into the frame."""
    frame = bytearray().join((_SESSION_HEAD.pack(0, counter), *plaintext, _TAG_ROOM))
    size = len(frame) - _SESSION_HEAD.size - TAG_SIZE
    PREFIX.pack_into(frame, 0, len(frame) - PREFIX_SIZE)
    buffer = _ffi.from_buffer("unsigned char[]", frame)
    at = buffer + _SESSION_HEAD.size
    _lib.crypto_aead_chacha20poly1305_ietf_encrypt(
        at, _ffi.NULL, at, size, _ffi.NULL, 0, _ffi.NULL, _NONCE.pack(counter), key)
    return frame


def _open(body: bytes, counter: int, key: bytes) -> Any | None:
    """The plaintext of session frame `body` (at least counter and tag long) as a
    buffer whose slices are bytes, or None when it does not authenticate."""
    size = len(body) - COUNTER.size - TAG_SIZE
    out = _allocate("unsigned char[]", max(size, 1))
    sealed = _ffi.from_buffer("unsigned char[]", body) + COUNTER.size
    if _lib.crypto_aead_chacha20poly1305_ietf_decrypt(
            out, _ffi.NULL, _ffi.NULL, sealed, size + TAG_SIZE, _ffi.NULL, 0,
            _NONCE.pack(counter), key) != 0:
        return None
    return _ffi.buffer(out, size)


def _hash(data: bytes) -> bytes:
    return nacl.hash.blake2b(data, digest_size=32, encoder=nacl.encoding.RawEncoder)


def _check_key_material(static: bytes, ephemeral: bytes, signature: bytes) -> PublicKey:
    if len(static) != KEY_SIZE or len(ephemeral) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise DecodeError(
            f"handshake key material has wrong sizes ({len(static)}, {len(ephemeral)}, "
            f"{len(signature)})"
        )
    return PublicKey(static)


def _read_hello_or_accept(reader: Any) -> tuple[str, tuple[Any, ...]]:
    which = str(reader.which())
    if which == "refuse":
        refuse = reader.refuse
        try:
            code = str(refuse.code)
        except RuntimeError:  # a code added by a newer peer: still a refusal
            code = f"code {refuse.code.raw}"
        return which, (code, str(refuse.reason)[:200])
    if which not in ("hello", "accept"):
        return which, ()
    msg = getattr(reader, which)
    return which, (
        int(msg.version),
        bytes(msg.staticKey),
        bytes(msg.ephemeralKey),
        bytes(msg.signature),
        int(msg.maxFrame),
    )


def _read_link_message(reader: Any) -> tuple[str, Any]:
    which = str(reader.which())
    if which == "data":
        return which, bytes(reader.data)
    if which in ("keepalive", "keepaliveAck"):
        keepalive = getattr(reader, which)
        return which, (float(keepalive.sentAt), int(keepalive.seq))
    if which == "close":
        return which, str(reader.close.reason)[:200]
    return which, None

