"""The link handshake and session core (twinmesh.proto.link), driven synchronously.

Two `Link` cores are joined by handing each one's `data_to_send()` to the other's
`receive_data()`, with explicit `now` values: no I/O, no clock.
"""

from __future__ import annotations

from typing import Any

import nacl.bindings as sodium
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinmesh.errors import (
    AuthenticationError,
    DecodeError,
    FrameTooLarge,
    HandshakeRefused,
    LocalProtocolError,
)
from twinmesh.identity.keys import KEY_SIZE, Identity
from twinmesh.proto.link import (
    ACCEPT_CONTEXT,
    COUNTER,
    HELLO_CONTEXT,
    TAG_SIZE,
    DataReceived,
    DownKind,
    Event,
    Link,
    LinkConfig,
    LinkDown,
    LinkUp,
    RttMeasured,
    State,
    _hash,
    _read_link_message,
    encode_data,
    read_data,
)
from twinmesh.wire import schemas
from twinmesh.wire.framing import DEFAULT_MAX_FRAME, PREFIX, FrameDecoder, encode_frame

ALICE = Identity(b"\x01" * KEY_SIZE)
BOB = Identity(b"\x02" * KEY_SIZE)
CAROL = Identity(b"\x03" * KEY_SIZE)


# ------------------------------------------------------------------ helpers


def pump(a: Link, b: Link, now: float) -> tuple[list[Event], list[Event]]:
    """Carry bytes both ways until neither side has anything to send."""
    events_a: list[Event] = []
    events_b: list[Event] = []
    while True:
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return events_a, events_b
        if out_a:
            events_b += b.receive_data(out_a, now)
        if out_b:
            events_a += a.receive_data(out_b, now)


def link_pair(
    now: float = 0.0,
    *,
    initiator: Identity = ALICE,
    responder: Identity = BOB,
    expected_peer: Any = "responder",
    allowed: frozenset[Any] | None = None,
    config: LinkConfig | None = None,
    responder_config: LinkConfig | None = None,
) -> tuple[Link, Link]:
    pinned = responder.public if expected_peer == "responder" else expected_peer
    a = Link(initiator, initiator=True, now=now, expected_peer=pinned, config=config)
    b = Link(
        responder, initiator=False, now=now, allowed=allowed, config=responder_config or config
    )
    return a, b


def up_pair(now: float = 0.0, **kwargs: Any) -> tuple[Link, Link]:
    a, b = link_pair(now, **kwargs)
    events_a, events_b = pump(a, b, now)
    assert a.is_up, events_a
    assert b.is_up, events_b
    return a, b


def frames_of(data: bytes) -> list[bytes]:
    """Split a byte stream into whole frames (prefix included)."""
    return [encode_frame(body) for body in FrameDecoder().feed(data)]


def downs(events: list[Event]) -> list[LinkDown]:
    return [e for e in events if isinstance(e, LinkDown)]


def only_down(events: list[Event]) -> LinkDown:
    found = downs(events)
    assert len(found) == 1, events
    return found[0]


def received(events: list[Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, DataReceived)]


def handshake_which(frame_body: bytes) -> str:
    return schemas.decode(schemas.link.Handshake, frame_body, lambda r: str(r.which()))


def signed_accept(signer: Identity, hello_body: bytes, *, max_frame: int = 4096) -> bytes:
    """An accept frame, correctly signed by `signer`, for the given hello."""
    ephemeral = Identity.generate().public.to_x25519()  # any valid X25519 point
    handshake = schemas.link.Handshake.new_message()
    accept = handshake.init("accept")
    accept.version = 1
    accept.staticKey = signer.public.raw
    accept.ephemeralKey = ephemeral
    accept.signature = signer.sign(ACCEPT_CONTEXT + _hash(hello_body) + ephemeral)
    accept.maxFrame = max_frame
    return encode_frame(handshake.to_bytes())


def signed_hello(signer: Identity, *, max_frame: int = 4096, version: int = 1) -> bytes:
    ephemeral = Identity.generate().public.to_x25519()
    handshake = schemas.link.Handshake.new_message()
    hello = handshake.init("hello")
    hello.version = version
    hello.staticKey = signer.public.raw
    hello.ephemeralKey = ephemeral
    hello.signature = signer.sign(HELLO_CONTEXT + ephemeral)
    hello.maxFrame = max_frame
    return encode_frame(handshake.to_bytes())


# --------------------------------------------------------------- happy path


def test_happy_path_handshake_data_and_rtt() -> None:
    a = Link(ALICE, initiator=True, now=10.0, expected_peer=BOB.public)
    b = Link(BOB, initiator=False, now=10.0)
    assert a.state is b.state is State.HANDSHAKING
    assert not a.is_up and not b.is_up

    hello = a.data_to_send()
    assert handshake_which(FrameDecoder().feed(hello)[0]) == "hello"
    assert b.receive_data(hello, now=10.1) == []
    assert not b.is_up  # the responder waits for the initiator's first encrypted frame

    accept = b.data_to_send()
    assert handshake_which(FrameDecoder().feed(accept)[0]) == "accept"
    events_a = a.receive_data(accept, now=10.2)
    assert events_a == [LinkUp(BOB.public, pytest.approx(0.2))]
    assert a.is_up and a.peer == BOB.public

    confirm = a.data_to_send()  # the first encrypted frame: a keepalive
    events_b = b.receive_data(confirm, now=10.25)
    assert events_b == [LinkUp(ALICE.public, pytest.approx(0.25))]
    assert b.is_up and b.peer == ALICE.public

    ack = b.data_to_send()
    events_a = a.receive_data(ack, now=10.3)
    assert events_a == [RttMeasured(pytest.approx(0.1))]
    assert a.rtt == pytest.approx(0.1)

    a.send_data(b"ping from alice", now=10.4)
    a.send_data(b"", now=10.4)
    assert received(b.receive_data(a.data_to_send(), now=10.4)) == [b"ping from alice", b""]
    b.send_data(b"pong from bob", now=10.5)
    assert received(a.receive_data(b.data_to_send(), now=10.5)) == [b"pong from bob"]
    assert a.is_up and b.is_up
    assert a.down is None and b.down is None


def test_session_bytes_are_encrypted() -> None:
    a, b = up_pair()
    secret = b"the secret payload " * 4
    a.send_data(secret, now=0.0)
    wire = a.data_to_send()
    assert secret not in wire
    assert b"the secret" not in wire
    assert received(b.receive_data(wire, now=0.0)) == [secret]


def test_a_session_frame_is_the_counter_then_the_aead_of_the_link_message() -> None:
    # The layout every NIC version reads: length prefix, 8-byte counter, then
    # ChaCha20-Poly1305 (IETF; nonce: 4 zero bytes and the counter) of the LinkMessage.
    a, b = up_pair()
    a.data_to_send()
    keys = a._keys
    assert keys is not None
    for payload in (b"", b"x", b"y" * 1000, b"z" * 70_000):
        counter = keys.send_counter
        a.send_data(payload, now=0.0)
        wire = a.data_to_send()
        nonce = bytes(4) + COUNTER.pack(counter)
        sealed = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
            encode_data(payload), None, nonce, keys.send)
        assert wire == encode_frame(COUNTER.pack(counter) + sealed)
        assert received(b.receive_data(wire, now=0.0)) == [payload]


def test_each_link_has_its_own_keys() -> None:
    # Same identities, two handshakes: frames of one session are garbage to the other.
    a1, _b1 = up_pair()
    _a2, b2 = up_pair()
    a1.send_data(b"for link one", now=0.0)
    events = b2.receive_data(a1.data_to_send(), now=0.0)
    assert isinstance(only_down(events).error, AuthenticationError)


def test_unpinned_initiator_learns_the_peer_key() -> None:
    a, b = link_pair(expected_peer=None)
    events_a, events_b = pump(a, b, 0.0)
    assert events_a[0] == LinkUp(BOB.public, 0.0)
    assert events_b[0] == LinkUp(ALICE.public, 0.0)


def test_allowed_initiator_gets_in() -> None:
    _a, b = up_pair(allowed=frozenset({ALICE.public, CAROL.public}))
    assert b.peer == ALICE.public


def test_chunked_delivery_byte_by_byte() -> None:
    a, b = link_pair()
    events_a: list[Event] = []
    events_b: list[Event] = []
    for _ in range(4):
        for byte in a.data_to_send():
            events_b += b.receive_data(bytes([byte]), now=0.0)
        for byte in b.data_to_send():
            events_a += a.receive_data(bytes([byte]), now=0.0)
    assert [type(e) for e in events_a] == [LinkUp, RttMeasured]
    assert [type(e) for e in events_b] == [LinkUp]


# ------------------------------------------------------------------ refusals


def test_pinned_key_mismatch_brings_the_initiator_down() -> None:
    a, b = link_pair(expected_peer=CAROL.public)
    events_a, events_b = pump(a, b, 0.0)
    down = only_down(events_a)
    assert down.kind is DownKind.PROTOCOL_ERROR
    assert isinstance(down.error, HandshakeRefused)
    assert BOB.public.text in down.reason
    assert CAROL.public.text in down.reason
    assert not any(isinstance(e, LinkUp) for e in events_a)
    assert not a.is_up and a.state is State.CLOSED and a.down == down
    # The responder never gets the confirming frame.
    assert events_b == []
    assert not b.is_up


def test_allow_list_refusal_is_sent_to_the_initiator() -> None:
    a, b = link_pair(allowed=frozenset({CAROL.public}))
    events_b = b.receive_data(a.data_to_send(), now=0.0)
    down_b = only_down(events_b)
    assert isinstance(down_b.error, HandshakeRefused)
    assert ALICE.public.text in down_b.reason

    refusal = b.data_to_send()
    assert handshake_which(FrameDecoder().feed(refusal)[0]) == "refuse"
    down_a = only_down(a.receive_data(refusal, now=0.0))
    assert down_a.kind is DownKind.PROTOCOL_ERROR
    assert isinstance(down_a.error, HandshakeRefused)
    assert "refused by peer" in down_a.reason
    assert "notAllowed" in down_a.reason
    assert "allow-list" in down_a.reason
    assert not a.is_up and not b.is_up


def test_refusal_with_a_code_from_a_newer_peer_is_still_a_refusal() -> None:
    # Enums only ever grow: a refuse code we do not know must not break decoding.
    a = Link(ALICE, initiator=True, now=0.0)
    a.data_to_send()
    handshake = schemas.link.Handshake.new_message()
    refuse = handshake.init("refuse")
    refuse.code = 9
    refuse.reason = "a reason from the future"
    down = only_down(a.receive_data(encode_frame(handshake.to_bytes()), now=0.0))
    assert isinstance(down.error, HandshakeRefused)
    assert "refused by peer (code 9): a reason from the future" in down.reason


def test_initiator_allow_list_refuses_the_responder() -> None:
    a = Link(ALICE, initiator=True, now=0.0, allowed=frozenset({CAROL.public}))
    b = Link(BOB, initiator=False, now=0.0)
    events_a, _ = pump(a, b, 0.0)
    down = only_down(events_a)
    assert isinstance(down.error, HandshakeRefused)
    assert BOB.public.text in down.reason


def test_self_link_is_refused() -> None:
    a, b = link_pair(initiator=ALICE, responder=ALICE)
    events_a, events_b = pump(a, b, 0.0)
    down_b = only_down(events_b)
    assert isinstance(down_b.error, HandshakeRefused)
    assert "own key" in down_b.reason
    down_a = only_down(events_a)
    assert isinstance(down_a.error, HandshakeRefused)
    assert "refused by peer (selfLink)" in down_a.reason
    assert not a.is_up and not b.is_up


def test_initiator_refuses_an_accept_carrying_its_own_key() -> None:
    # Not reachable with an honest responder (it refuses first); forge the accept.
    a = Link(ALICE, initiator=True, now=0.0)
    (hello_body,) = FrameDecoder().feed(a.data_to_send())
    down = only_down(a.receive_data(signed_accept(ALICE, hello_body), now=0.0))
    assert isinstance(down.error, HandshakeRefused)
    assert "own key" in down.reason
    assert not a.is_up


def test_accept_signed_over_another_hello_is_refused() -> None:
    a = Link(ALICE, initiator=True, now=0.0)
    a.data_to_send()
    down = only_down(a.receive_data(signed_accept(BOB, b"some other hello"), now=0.0))
    assert isinstance(down.error, AuthenticationError)
    assert not a.is_up


def test_hello_with_wrong_version_is_refused() -> None:
    b = Link(BOB, initiator=False, now=0.0)
    down = only_down(b.receive_data(signed_hello(ALICE, version=2), now=0.0))
    assert isinstance(down.error, HandshakeRefused)
    a = Link(ALICE, initiator=True, now=0.0)
    a.data_to_send()
    down_a = only_down(a.receive_data(b.data_to_send(), now=0.0))
    assert "badVersion" in down_a.reason


def test_hello_signed_by_someone_else_is_refused() -> None:
    # Carol signs a hello that claims Alice's key.
    body = FrameDecoder().feed(signed_hello(CAROL))[0]
    forged = body.replace(CAROL.public.raw, ALICE.public.raw)
    assert forged != body
    b = Link(BOB, initiator=False, now=0.0)
    down = only_down(b.receive_data(encode_frame(forged), now=0.0))
    assert isinstance(down.error, AuthenticationError)
    assert not b.is_up


@pytest.mark.parametrize("max_frame", [0, 16, 200, 1023])
def test_hello_announcing_a_tiny_max_frame_is_refused(max_frame: int) -> None:
    # maxFrame is not covered by the hello signature, so anyone on the path can
    # change it. The responder must refuse it, not crash building its accept.
    b = Link(BOB, initiator=False, now=0.0)
    down = only_down(b.receive_data(signed_hello(ALICE, max_frame=max_frame), now=0.0))
    assert isinstance(down.error, DecodeError)
    assert "maxFrame" in down.reason
    assert not b.is_up


@pytest.mark.parametrize("max_frame", [0, 16, 200, 1023])
def test_accept_announcing_a_tiny_max_frame_is_refused(max_frame: int) -> None:
    a = Link(ALICE, initiator=True, now=0.0)
    (hello_body,) = FrameDecoder().feed(a.data_to_send())
    events = a.receive_data(signed_accept(BOB, hello_body, max_frame=max_frame), now=0.0)
    down = only_down(events)
    assert isinstance(down.error, DecodeError)
    assert "maxFrame" in down.reason
    assert not any(isinstance(e, LinkUp) for e in events)


def test_responder_expects_a_hello_not_an_accept() -> None:
    b = Link(BOB, initiator=False, now=0.0)
    down = only_down(b.receive_data(signed_accept(ALICE, b"x"), now=0.0))
    assert isinstance(down.error, DecodeError)
    assert handshake_which(FrameDecoder().feed(b.data_to_send())[0]) == "refuse"


# ---------------------------------------------------------- session attacks


def test_tampered_session_frame_is_an_authentication_error() -> None:
    a, b = up_pair()
    a.send_data(b"important", now=1.0)
    frame = bytearray(a.data_to_send())
    frame[-5] ^= 0x01  # inside the ciphertext / tag, not the counter
    events = b.receive_data(bytes(frame), now=1.0)
    down = only_down(events)
    assert down.kind is DownKind.PROTOCOL_ERROR
    assert isinstance(down.error, AuthenticationError)
    assert received(events) == []
    assert not b.is_up
    assert b.receive_data(a.data_to_send(), now=1.0) == []  # closed: ignores the rest


@pytest.mark.parametrize("offset", [4, 11, 12, 27, 28])
def test_any_flipped_byte_in_a_session_frame_closes_the_link(offset: int) -> None:
    a, b = up_pair()
    a.send_data(b"0123456789abcdef", now=1.0)
    frame = bytearray(a.data_to_send())
    frame[offset] ^= 0x80
    down = only_down(b.receive_data(bytes(frame), now=1.0))
    assert isinstance(down.error, AuthenticationError)


def test_replayed_frame_closes_the_link() -> None:
    a, b = up_pair()
    a.send_data(b"pay 10 euros", now=1.0)
    frame = a.data_to_send()
    assert received(b.receive_data(frame, now=1.0)) == [b"pay 10 euros"]
    events = b.receive_data(frame, now=1.1)
    down = only_down(events)
    assert isinstance(down.error, AuthenticationError)
    assert "replayed or reordered" in down.reason
    assert received(events) == []


def test_reordered_frames_close_the_link() -> None:
    a, b = up_pair()
    a.send_data(b"first", now=1.0)
    a.send_data(b"second", now=1.0)
    first, second = frames_of(a.data_to_send())
    events = b.receive_data(second + first, now=1.0)
    down = only_down(events)
    assert isinstance(down.error, AuthenticationError)
    assert "replayed or reordered" in down.reason
    assert received(events) == []


def test_dropped_frame_closes_the_link() -> None:
    a, b = up_pair()
    a.send_data(b"first", now=1.0)
    a.send_data(b"second", now=1.0)
    _first, second = frames_of(a.data_to_send())
    assert isinstance(only_down(b.receive_data(second, now=1.0)).error, AuthenticationError)


def test_partial_frame_waits_for_the_rest() -> None:
    a, b = up_pair()
    a.send_data(b"split across reads", now=1.0)
    frame = a.data_to_send()
    assert b.receive_data(frame[:-1], now=1.0) == []
    assert b.is_up
    assert received(b.receive_data(frame[-1:], now=1.0)) == [b"split across reads"]


@pytest.mark.parametrize("size", [0, 1, COUNTER.size, COUNTER.size + TAG_SIZE - 1])
def test_session_frame_shorter_than_counter_and_tag_is_a_decode_error(size: int) -> None:
    _a, b = up_pair()
    down = only_down(b.receive_data(encode_frame(b"\x00" * size), now=1.0))
    assert isinstance(down.error, DecodeError)
    assert "too short" in down.reason


def test_session_frame_of_only_counter_and_tag_fails_authentication() -> None:
    _a, b = up_pair()
    # Counter 1 is the one bob expects next from alice (0 was the confirming keepalive).
    body = COUNTER.pack(1) + b"\x00" * TAG_SIZE
    assert isinstance(
        only_down(b.receive_data(encode_frame(body), now=1.0)).error, AuthenticationError
    )


@pytest.mark.parametrize("stage", ["handshake", "session"])
def test_oversized_length_prefix_closes_the_link(stage: str) -> None:
    config = LinkConfig(max_frame=4096)
    if stage == "session":
        _a, b = up_pair(config=config)
    else:
        b = Link(BOB, initiator=False, now=0.0, config=config)
    # Only the 4-byte prefix arrives: the body is never needed to decide.
    down = only_down(b.receive_data(PREFIX.pack(4097), now=1.0))
    assert down.kind is DownKind.PROTOCOL_ERROR
    assert isinstance(down.error, FrameTooLarge)
    assert not b.is_up
    assert b.get_timer() is None


def test_frame_of_exactly_max_frame_is_read() -> None:
    # A max_frame body is accepted by the framing (and then fails authentication).
    _a, b = up_pair(config=LinkConfig(max_frame=4096))
    down = only_down(b.receive_data(encode_frame(b"\x00" * 4096), now=1.0))
    assert isinstance(down.error, AuthenticationError)


def test_replayed_hello_never_brings_a_new_responder_up() -> None:
    a, b = link_pair()
    hello = a.data_to_send()
    b.receive_data(hello, now=0.0)
    pump(a, b, 0.0)
    assert a.is_up and b.is_up
    a.send_data(b"hello bob", now=0.5)
    session_traffic = a.data_to_send()

    # An attacker recorded everything alice sent and replays it to a fresh responder.
    victim = Link(BOB, initiator=False, now=100.0)
    assert victim.receive_data(hello, now=100.0) == []
    assert victim.data_to_send()  # it answers with an accept for keys nobody else has
    assert victim.peer == ALICE.public
    assert not victim.is_up
    assert victim.get_timer() == 100.0 + victim.config.handshake_timeout

    # Alice's recorded confirming frame was made under another ephemeral key.
    replay_victim = Link(BOB, initiator=False, now=100.0)
    replay_victim.receive_data(hello, now=100.0)
    events = replay_victim.receive_data(session_traffic, now=100.1)
    assert not any(isinstance(e, LinkUp | DataReceived) for e in events)
    assert isinstance(only_down(events).error, AuthenticationError)

    # Without a confirming frame the responder gives up at the handshake timeout.
    assert victim.handle_timer(104.9) == []
    down = only_down(victim.handle_timer(105.0))
    assert down.kind is DownKind.TIMEOUT
    assert down.error is None
    assert not victim.is_up


def test_replayed_hello_to_an_established_responder_closes_the_link() -> None:
    a, b = link_pair()
    hello = a.data_to_send()
    b.receive_data(hello, now=0.0)
    pump(a, b, 0.0)
    # After the handshake every frame is a session frame: the hello is not one.
    assert isinstance(only_down(b.receive_data(hello, now=1.0)).error, AuthenticationError)


# -------------------------------------------------------------------- timers


def test_handshake_timeout() -> None:
    a = Link(ALICE, initiator=True, now=50.0, config=LinkConfig(handshake_timeout=3.0))
    assert a.data_to_send()
    assert a.get_timer() == 53.0
    assert a.handle_timer(52.99) == []
    assert a.data_to_send() == b""
    down = only_down(a.handle_timer(53.0))
    assert down.kind is DownKind.TIMEOUT
    assert down.error is None
    assert "3 s" in down.reason
    assert a.state is State.CLOSED
    assert a.get_timer() is None
    assert a.handle_timer(60.0) == []


def test_responder_handshake_timeout_after_accept() -> None:
    b = Link(BOB, initiator=False, now=0.0, config=LinkConfig(handshake_timeout=3.0))
    a = Link(ALICE, initiator=True, now=0.0)
    b.receive_data(a.data_to_send(), now=1.0)
    assert b.data_to_send()
    assert b.get_timer() == 3.0  # counted from the start, not from the hello
    assert only_down(b.handle_timer(3.0)).kind is DownKind.TIMEOUT


def test_keepalives_then_dead_link_detection() -> None:
    config = LinkConfig(keepalive_interval=0.5, dead_after=2.0)
    a, _b = up_pair(now=0.0, config=config)
    assert a.get_timer() == 0.5  # the confirming keepalive went out at 0.0

    # Bob goes silent. Alice keeps sending keepalives every interval...
    keepalive_frames = 0
    for t in (0.5, 1.0, 1.5):
        assert a.get_timer() == t
        assert a.handle_timer(t - 0.01) == []
        assert a.data_to_send() == b""
        assert a.handle_timer(t) == []
        sent = frames_of(a.data_to_send())
        assert len(sent) == 1
        keepalive_frames += 1
    assert keepalive_frames == 3
    # ...until dead_after seconds of silence since the last frame from bob (at 0.0).
    assert a.get_timer() == 2.0
    assert a.handle_timer(1.99) == []
    down = only_down(a.handle_timer(2.0))
    assert down.kind is DownKind.TIMEOUT
    assert down.error is None
    assert "nothing received" in down.reason
    assert not a.is_up
    assert a.get_timer() is None
    with pytest.raises(LocalProtocolError):
        a.send_data(b"too late", now=2.0)


def test_traffic_keeps_the_link_alive() -> None:
    config = LinkConfig(keepalive_interval=0.5, dead_after=2.0)
    a, b = up_pair(now=0.0, config=config)
    rtts: list[float] = []
    now = 0.0
    while now < 10.0:
        now = min(a.get_timer() or 99.0, b.get_timer() or 99.0)
        for link in (a, b):
            timer = link.get_timer()
            assert timer is not None
            if timer <= now:
                assert downs(link.handle_timer(now)) == []
        events_a, events_b = pump(a, b, now)
        assert downs(events_a + events_b) == []
        rtts += [e.rtt for e in events_a + events_b if isinstance(e, RttMeasured)]
    assert a.is_up and b.is_up
    assert len(rtts) >= 10
    assert all(rtt == 0.0 for rtt in rtts)  # delivered instantly in logical time


def run_both(a: Link, b: Link, until: float, start: float = 0.0,
             send_every: float | None = None) -> list[RttMeasured]:
    """Drive both ends' timers (and, with `send_every`, data from a) to `until`."""
    now, next_data, rtts = start, start, []

    def timer(link: Link) -> float:
        due = link.get_timer()
        assert due is not None
        return due

    while True:
        now = min(timer(a), timer(b), next_data if send_every is not None else until + 1)
        if now > until:
            return rtts
        if send_every is not None and now >= next_data:
            a.send_data(b"reading", now)
            next_data = now + send_every
        # One end at a time, each followed by delivery: as with any real latency, the
        # other end has seen the frame before its own timer for the same instant runs.
        for link in (a, b):
            if timer(link) <= now:
                assert downs(link.handle_timer(now)) == []
            events_a, events_b = pump(a, b, now)
            assert downs(events_a + events_b) == []
            rtts += [e for e in events_a + events_b if isinstance(e, RttMeasured)]


def test_an_idle_link_carries_one_keepalive_and_one_ack_per_interval() -> None:
    config = LinkConfig(keepalive_interval=0.5, dead_after=2.0, rtt_interval=5.0)
    a, b = up_pair(now=0.0, config=config)
    before = a.stats.frames_out + b.stats.frames_out
    rtts = run_both(a, b, until=20.0)
    # 40 intervals: 40 keepalives + 40 acks, and a few more for the RTT of the side
    # that only answers. Both sides keeping their own keepalive would send 160.
    sent = a.stats.frames_out + b.stats.frames_out - before
    assert 80 <= sent <= 90
    assert a.rtt is not None and b.rtt is not None  # both ends still measure an RTT
    assert len(rtts) >= 40


def test_only_one_side_keeps_the_keepalives_going() -> None:
    config = LinkConfig(keepalive_interval=0.5, dead_after=2.0, rtt_interval=5.0)
    a, b = up_pair(now=0.0, config=config)
    # No latency, so the answering side's timer is due exactly when the next keepalive
    # arrives: the race a real link runs into now and then.
    latency = 0.0
    in_flight: list[tuple[float, Link, bytes]] = []  # (arrives, to, bytes)
    before = a.stats.frames_out + b.stats.frames_out
    now = 0.0
    while now <= 20.0:
        timers = [(due, link) for link in (a, b) if (due := link.get_timer()) is not None]
        now = min([t for t, _ in timers] + [at for at, _, _ in in_flight])
        # A timer due at the instant a frame arrives runs first (the unlucky order).
        for due, link in timers:
            if due <= now:
                assert downs(link.handle_timer(now)) == []
        for at, to, data in [f for f in in_flight if f[0] <= now]:
            in_flight.remove((at, to, data))
            assert downs(to.receive_data(data, now)) == []
        for link, peer in ((a, b), (b, a)):
            if data := link.data_to_send():
                in_flight.append((now + latency, peer, data))
    # The side whose timer first fired asks every interval; the other only answers
    # (and asks once per rtt_interval for its own RTT): ~2 frames per interval.
    sent = a.stats.frames_out + b.stats.frames_out - before
    assert sent <= 2 * 40 + 2 * 4 + 4
    assert a.is_up and b.is_up


def test_a_link_busy_with_data_sends_no_keepalives_of_its_own() -> None:
    config = LinkConfig(keepalive_interval=0.5, dead_after=2.0, rtt_interval=5.0)
    a, b = up_pair(now=0.0, config=config)
    sent_before = a.stats.frames_out
    run_both(a, b, until=20.0, send_every=0.1)
    data_frames = 200
    # Alice's frames: her data, the acks of Bob's keepalives (he sends nothing else),
    # and one keepalive per rtt_interval. Nothing else.
    extra = a.stats.frames_out - sent_before - data_frames
    assert 0 < extra <= 40 + 4 + 1
    assert a.is_up and b.is_up


def test_rtt_interval_must_not_be_shorter_than_the_keepalive_interval() -> None:
    with pytest.raises(ValueError, match="rtt_interval"):
        LinkConfig(keepalive_interval=1.0, dead_after=3.0, rtt_interval=0.5)


def test_timer_is_none_once_closed() -> None:
    a, _b = up_pair()
    a.close("bye", now=1.0)
    assert a.get_timer() is None
    assert a.handle_timer(100.0) == []


# --------------------------------------------------------------------- close


def test_close_is_reported_by_the_peer_with_the_reason() -> None:
    a, b = up_pair()
    events_a = a.close("maintenance window", now=1.0)
    assert events_a == [LinkDown(DownKind.CLOSED_LOCALLY, "maintenance window")]
    assert a.state is State.CLOSED
    events_b = b.receive_data(a.data_to_send(), now=1.0)
    down = only_down(events_b)
    assert down.kind is DownKind.CLOSED_BY_PEER
    assert down.error is None
    assert "maintenance window" in down.reason
    assert b.state is State.CLOSED and b.down == down
    assert a.close("again", now=2.0) == []


def test_data_before_close_is_delivered_and_after_close_ignored() -> None:
    a, b = up_pair()
    a.send_data(b"last words", now=1.0)
    a.close("done", now=1.0)
    stream = a.data_to_send()
    events = b.receive_data(stream + b"\x00\x00\x00\x05trail", now=1.0)
    assert received(events) == [b"last words"]
    assert only_down(events).kind is DownKind.CLOSED_BY_PEER


def test_close_during_handshake_sends_nothing() -> None:
    a = Link(ALICE, initiator=True, now=0.0)
    a.data_to_send()
    assert only_down(a.close("cancelled", now=0.1)).kind is DownKind.CLOSED_LOCALLY
    assert a.data_to_send() == b""


def test_long_close_reason_is_cut() -> None:
    a, b = up_pair()
    a.close("x" * 1000, now=1.0)
    down = only_down(b.receive_data(a.data_to_send(), now=1.0))
    assert "x" * 200 in down.reason
    assert "x" * 201 not in down.reason


# --------------------------------------------------------------- misuse


def test_send_data_before_link_up_raises() -> None:
    a, b = link_pair()
    with pytest.raises(LocalProtocolError, match="handshaking"):
        a.send_data(b"too early", now=0.0)
    b.receive_data(a.data_to_send(), now=0.0)
    # The responder has keys but no confirmation yet: still too early.
    with pytest.raises(LocalProtocolError):
        b.send_data(b"too early", now=0.0)


def test_send_data_after_close_raises() -> None:
    a, _b = up_pair()
    a.close("bye", now=1.0)
    with pytest.raises(LocalProtocolError, match="closed"):
        a.send_data(b"x", now=1.0)


@pytest.mark.parametrize(
    "max_frame",
    [1024, 4096, 8192 + 100, 8192 + 200, 65536 + 79, DEFAULT_MAX_FRAME],
)
def test_payload_of_exactly_max_payload_fits_and_one_more_does_not(max_frame: int) -> None:
    a, b = up_pair(config=LinkConfig(max_frame=max_frame))
    for sender, receiver in ((a, b), (b, a)):
        assert sender.max_payload > max_frame * 0.9
        with pytest.raises(LocalProtocolError, match="exceeds"):
            sender.send_data(b"x" * (sender.max_payload + 1), now=1.0)
        payload = bytes(range(256)) * (sender.max_payload // 256) + b"z" * (
            sender.max_payload % 256
        )
        sender.send_data(payload, now=1.0)
        wire = sender.data_to_send()
        assert len(wire) <= 4 + max_frame
        assert received(receiver.receive_data(wire, now=1.0)) == [payload]
    assert a.is_up and b.is_up


def test_max_payload_follows_the_smaller_max_frame() -> None:
    a, b = up_pair(config=LinkConfig(max_frame=2048), responder_config=LinkConfig())
    assert a.max_payload == b.max_payload < 2048
    payload = b"p" * b.max_payload
    b.send_data(payload, now=1.0)
    assert received(a.receive_data(b.data_to_send(), now=1.0)) == [payload]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        LinkConfig(keepalive_interval=2.0, dead_after=2.0)
    with pytest.raises(ValueError):
        LinkConfig(max_frame=1023)


# --------------------------------------------------------------------- stats


def test_stats_add_up_on_both_sides() -> None:
    a, b = link_pair()
    wire_a_to_b = wire_b_to_a = 0
    now = 0.0
    for step in range(6):
        out_a = a.data_to_send()
        wire_a_to_b += len(out_a)
        b.receive_data(out_a, now)
        out_b = b.data_to_send()
        wire_b_to_a += len(out_b)
        a.receive_data(out_b, now)
        if a.is_up and b.is_up:
            a.send_data(b"a" * (step * 100), now)
            b.send_data(b"b" * step, now)
        now += 0.1
    out_a = a.data_to_send()
    wire_a_to_b += len(out_a)
    b.receive_data(out_a, now)
    out_b = b.data_to_send()
    wire_b_to_a += len(out_b)
    a.receive_data(out_b, now)
    assert a.data_to_send() == b""
    assert a.is_up and b.is_up
    assert a.stats.bytes_out == b.stats.bytes_in
    assert b.stats.bytes_out == a.stats.bytes_in
    assert a.stats.frames_out == b.stats.frames_in
    assert b.stats.frames_out == a.stats.frames_in
    assert a.stats.frames_out >= 6  # hello, keepalive, data...
    assert b.stats.frames_out >= 5  # accept, ack, data...
    # bytes count the whole frame on the wire, prefix included.
    assert a.stats.bytes_out == wire_a_to_b
    assert b.stats.bytes_out == wire_b_to_a


def test_stats_count_a_refusal() -> None:
    a, b = link_pair(allowed=frozenset())
    pump(a, b, 0.0)
    assert a.stats.frames_out == b.stats.frames_in == 1
    assert b.stats.frames_out == a.stats.frames_in == 1
    assert a.stats.bytes_out == b.stats.bytes_in > 100
    assert b.stats.bytes_out == a.stats.bytes_in > 0


# ------------------------------------------------------------- data frames


@given(payload=st.binary(min_size=1, max_size=3000))
def test_a_data_message_is_encoded_as_pycapnp_builds_it(payload: bytes) -> None:
    message = schemas.link.LinkMessage.new_message()
    message.data = payload
    assert encode_data(payload) == message.to_bytes()
    assert read_data(encode_data(payload)) == payload


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(max_size=200), keepalive=st.booleans(), data=st.data())
def test_the_data_shortcut_reads_what_pycapnp_reads_or_steps_aside(
    payload: bytes, keepalive: bool, data: st.DataObject
) -> None:
    message = schemas.link.LinkMessage.new_message()
    if keepalive:
        message.init("keepalive").seq = 3
    else:
        message.data = payload
    damaged = bytearray(message.to_bytes())
    for _ in range(data.draw(st.integers(0, 4))):
        position = data.draw(st.integers(0, min(len(damaged) - 1, 40)))
        damaged[position] = data.draw(st.integers(0, 255))
    fast = read_data(bytes(damaged))
    if fast is not None:
        assert schemas.decode(schemas.link.LinkMessage, bytes(damaged),
                              _read_link_message) == ("data", fast)
