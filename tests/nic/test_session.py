"""The trio shell around one link core, over in-memory streams and real sockets."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.lowlevel
import trio.testing

from twinmesh.errors import LinkClosedError, LocalProtocolError
from twinmesh.identity.keys import Identity
from twinmesh.nic.session import MAX_CONTROL_BACKLOG, LinkSession
from twinmesh.proto.link import DownKind, Link, LinkConfig, LinkDown, LinkUp
from twinmesh.testing.memnet import MemoryNetwork

CONFIG = LinkConfig(keepalive_interval=0.5, dead_after=2.0, handshake_timeout=3.0)


@dataclass
class Recorder:
    ups: int = 0
    data: list[bytes] = field(default_factory=list)
    downs: list[LinkDown] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def link_up(self, session: LinkSession) -> None:
        self.ups += 1
        self._poke()

    def link_data(self, session: LinkSession, data: bytes) -> None:
        self.data.append(data)
        self._poke()

    def link_down(self, session: LinkSession, down: LinkDown) -> None:
        self.downs.append(down)
        self._poke()

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


def make_pair(
    net: MemoryNetwork, send_queue: int = 256
) -> tuple[LinkSession, Recorder, LinkSession, Recorder]:
    ia, ib = Identity.generate(), Identity.generate()
    sa, sb = net.stream_pair("a", "b")
    ra, rb = Recorder(), Recorder()
    now = trio.current_time()
    a = LinkSession(Link(ia, initiator=True, now=now, config=CONFIG), sa, ra,
                    direction="outbound", uri="memory://b", carrier="memory",
                    send_queue=send_queue)
    b = LinkSession(Link(ib, initiator=False, now=now, config=CONFIG), sb, rb,
                    direction="inbound", uri="memory://a", carrier="memory")
    return a, ra, b, rb


async def wait_until(recorder: Recorder, predicate: object) -> None:
    while not predicate():  # type: ignore[operator]
        await recorder.changed.wait()


async def test_sessions_come_up_and_carry_data_both_ways() -> None:
    net = MemoryNetwork()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            a, ra, b, rb = make_pair(net)
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await wait_until(rb, lambda: rb.ups == 1)
            await wait_until(ra, lambda: ra.ups == 1)
            for i in range(100):
                await a.send(b"a%d" % i)
            await b.send(b"from b")
            await wait_until(rb, lambda: len(rb.data) == 100)
            await wait_until(ra, lambda: len(ra.data) == 1)
            assert rb.data == [b"a%d" % i for i in range(100)]
            assert ra.data == [b"from b"]
            assert a.up_since is not None and a.peer == b.core.identity.public
            nursery.cancel_scope.cancel()


async def test_send_before_up_and_oversized_payloads_are_local_errors() -> None:
    net = MemoryNetwork()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            a, ra, b, rb = make_pair(net)
            with pytest.raises(LocalProtocolError, match="not up"):
                await a.send(b"too early")
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await wait_until(ra, lambda: ra.ups == 1)
            with pytest.raises(LocalProtocolError, match="exceeds"):
                await a.send(b"x" * (a.core.max_payload + 1))
            await a.send(b"x" * a.core.max_payload)
            await wait_until(rb, lambda: len(rb.data) == 1)
            nursery.cancel_scope.cancel()


async def test_full_send_queue_pushes_back_instead_of_growing() -> None:
    # The peer stops reading: the carrier buffer fills, the writer blocks, the
    # bounded queue fills, and further sends wait or raise WouldBlock.
    net = MemoryNetwork(buffer_size=16 * 1024)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ia, ib = Identity.generate(), Identity.generate()
            sa, sb = net.stream_pair("a", "b")
            ra = Recorder()
            a = LinkSession(Link(ia, initiator=True, now=trio.current_time(), config=CONFIG),
                            sa, ra, direction="outbound", uri="memory://b", carrier="memory",
                            send_queue=4)
            peer = Link(ib, initiator=False, now=trio.current_time(), config=CONFIG)
            nursery.start_soon(a.run)
            # Drive the peer's handshake by hand, then never read again.
            peer.receive_data(await sb.receive_some(), trio.current_time())
            await sb.send_all(peer.data_to_send())
            await wait_until(ra, lambda: ra.ups == 1)
            sent = 0
            with pytest.raises(trio.WouldBlock):
                for _ in range(10_000):
                    a.send_nowait(b"y" * 1000)
                    sent += 1
                    await trio.lowlevel.checkpoint()
            # Bounded: the carrier buffer plus the queue, not 10 000 payloads.
            assert sent < 60
            assert a.queue_statistics().current_buffer_used == 4
            with trio.move_on_after(0.5) as blocked:
                await a.send(b"z")
            assert blocked.cancelled_caught
            nursery.cancel_scope.cancel()


async def test_local_close_reaches_the_peer_with_its_reason() -> None:
    net = MemoryNetwork()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            a, _ra, b, rb = make_pair(net)
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await wait_until(rb, lambda: rb.ups == 1)
            a.close("operator said so")
            await wait_until(rb, lambda: bool(rb.downs))
            assert rb.downs[0].kind is DownKind.CLOSED_BY_PEER
            assert "operator said so" in rb.downs[0].reason
            await a.wait_finished()
            await b.wait_finished()
            with pytest.raises(LinkClosedError):
                await a.send(b"after close")


async def test_cancelled_session_says_goodbye() -> None:
    net = MemoryNetwork()
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            a, _ra, b, rb = make_pair(net)
            outer.start_soon(b.run)
            async with trio.open_nursery() as inner:
                inner.start_soon(a.run)
                await wait_until(rb, lambda: rb.ups == 1)
                inner.cancel_scope.cancel()  # e.g. the NIC is stopping
            await wait_until(rb, lambda: bool(rb.downs))
            assert "NIC shutting down" in rb.downs[0].reason


async def test_peer_vanishing_is_reported_once(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, ra, b, rb = make_pair(net)
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await wait_until(rb, lambda: rb.ups == 1)
            net.partition("a", "b")
            await wait_until(ra, lambda: bool(ra.downs))
            await wait_until(rb, lambda: bool(rb.downs))
            await trio.sleep(10)
            assert len(ra.downs) == len(rb.downs) == 1
            assert ra.downs[0].kind is DownKind.TIMEOUT


# Small kernel buffers: a large payload only partly fits, so writes leave bytes behind.
SMALL_BUFFER = 4096
# No keepalive during a test: nothing but the session's own wake-ups flushes leftovers.
QUIET = LinkConfig(keepalive_interval=60.0, dead_after=120.0, handshake_timeout=3.0,
                   rtt_interval=60.0)


def shrink(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)


@asynccontextmanager
async def socket_pair(kind: str) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """Two connected real sockets (a Unix socket pair or loopback TCP), small buffers."""
    if kind == "unix":
        left, right = trio.socket.socketpair()
        shrink(left)
        shrink(right)
    else:
        listener = trio.socket.socket()
        shrink(listener)  # an accepted socket inherits the listener's buffers
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        left = trio.socket.socket()
        shrink(left)
        await left.connect(listener.getsockname())
        right, _ = await listener.accept()
        listener.close()
    async with trio.SocketStream(left) as a, trio.SocketStream(right) as b:
        yield a, b


def socket_sessions(
    sa: trio.SocketStream, sb: trio.SocketStream, send_queue: int = 256
) -> tuple[LinkSession, Recorder, LinkSession, Recorder]:
    now = trio.current_time()
    ra, rb = Recorder(), Recorder()
    a = LinkSession(Link(Identity.generate(), initiator=True, now=now, config=QUIET), sa, ra,
                    direction="outbound", uri="tcp://b", carrier="tcp", send_queue=send_queue)
    b = LinkSession(Link(Identity.generate(), initiator=False, now=now, config=QUIET), sb, rb,
                    direction="inbound", uri="tcp://a", carrier="tcp")
    return a, ra, b, rb


@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_payloads_larger_than_the_socket_buffer_arrive_whole_once_in_order(
    kind: str,
) -> None:
    # The first large payload is written straight to the socket, which takes only part
    # of it; the sends after it (data, control, nowait) must queue behind the rest.
    with trio.fail_after(20):
        async with socket_pair(kind) as (sa, sb), trio.open_nursery() as nursery:
            a, ra, b, rb = socket_sessions(sa, sb)
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await wait_until(ra, lambda: ra.ups == 1)
            expected: list[bytes] = []
            for i in range(30):
                big = bytes([i]) * (20_000 + 997 * i)
                await a.send(big)
                a.send_control(b"control %d" % i)
                a.send_nowait(b"small %d" % i)
                expected += [big, b"control %d" % i, b"small %d" % i]
                if i % 3 == 2:  # let the writer drain now and then: direct writes again
                    await trio.lowlevel.checkpoint()
            await wait_until(rb, lambda: len(rb.data) >= len(expected) or bool(rb.downs))
            # A lone one, nothing after it: the writer alone must write its rest.
            expected.append(b"L" * 300_000)
            await a.send(expected[-1])
            await wait_until(rb, lambda: len(rb.data) >= len(expected) or bool(rb.downs))
            assert not rb.downs and not ra.downs
            assert rb.data == expected
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_a_socket_peer_that_stops_reading_gets_bounded_back_pressure(kind: str) -> None:
    with trio.fail_after(20):
        async with socket_pair(kind) as (sa, sb), trio.open_nursery() as nursery:
            ra = Recorder()
            a = LinkSession(Link(Identity.generate(), initiator=True, now=trio.current_time(),
                                 config=CONFIG),
                            sa, ra, direction="outbound", uri="tcp://b", carrier="tcp",
                            send_queue=4)
            peer = Link(Identity.generate(), initiator=False, now=trio.current_time(),
                        config=CONFIG)
            nursery.start_soon(a.run)
            # Drive the peer's handshake by hand, then never read again.
            peer.receive_data(await sb.receive_some(), trio.current_time())
            await sb.send_all(peer.data_to_send())
            await wait_until(ra, lambda: ra.ups == 1)
            sent = 0
            for _ in range(5):  # TCP may find a little more room meanwhile: try again
                with pytest.raises(trio.WouldBlock):
                    for _ in range(10_000):
                        a.send_nowait(b"y" * 10_000)
                        sent += 1
                        await trio.lowlevel.checkpoint()
                assert a.queue_statistics().current_buffer_used == 4
                with trio.move_on_after(0.5) as blocked:
                    await a.send(b"z")
                if blocked.cancelled_caught:
                    break
            assert blocked.cancelled_caught
            # Bounded: the kernel's buffers plus the queue, not 10 000 payloads.
            assert sent < 300
            # Control is never dropped, but a peer that takes none of it is not there.
            for i in range(MAX_CONTROL_BACKLOG + 1):
                a.send_control(b"route %d" % i)
            await wait_until(ra, lambda: bool(ra.downs))
            assert "control backlog overflow" in ra.downs[0].reason
            with pytest.raises(LinkClosedError):
                a.send_nowait(b"after")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_sends_that_yield_between_them_keep_their_order(kind: str) -> None:
    # Every send yields, so the writer is caught at each point of its loop (holding a
    # payload it took from the queue, writing under the lock, parked): a direct write
    # must never overtake a payload already handed to it.
    with trio.fail_after(20):
        async with socket_pair(kind) as (sa, sb), trio.open_nursery() as nursery:
            a, ra, b, rb = socket_sessions(sa, sb)
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await wait_until(ra, lambda: ra.ups == 1)
            expected = [b"%d:" % i + b"x" * (i * 7919 % 30_000) for i in range(400)]
            for payload in expected:
                await a.send(payload)
                await trio.lowlevel.checkpoint()
            await wait_until(rb, lambda: len(rb.data) >= len(expected) or bool(rb.downs))
            assert rb.data == expected
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_a_send_right_after_the_writer_takes_a_payload_goes_after_it(kind: str) -> None:
    # The writer takes a queued payload and yields before writing it: a direct write in
    # that moment would overtake it. Which task runs first is trio's (random) choice,
    # so the moment is made many times.
    with trio.fail_after(20):
        async with socket_pair(kind) as (sa, sb), trio.open_nursery() as nursery:
            a, ra, b, rb = socket_sessions(sa, sb)
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await wait_until(ra, lambda: ra.ups == 1)
            expected: list[bytes] = []
            for i in range(30):
                big = b"B%d" % i * 50_000
                await a.send(big)  # the kernel takes part; the writer is woken for the rest
                await trio.lowlevel.checkpoint()  # it now writes the rest, blocking until b reads
                await a.send(b"first %d" % i)  # queued behind that write
                while a.queue_statistics().current_buffer_used:  # the writer took it
                    await trio.lowlevel.checkpoint()
                await a.send(b"second %d" % i)
                expected += [big, b"first %d" % i, b"second %d" % i]
                want = len(expected)
                await wait_until(rb, lambda: len(rb.data) >= want or bool(rb.downs))  # noqa: B023
            assert rb.data == expected
            nursery.cancel_scope.cancel()


@dataclass
class Echo(Recorder):
    """Answers every packet on the link it came from, while the read is handed out."""

    def link_data(self, session: LinkSession, data: bytes) -> None:
        super().link_data(session, data)
        session.send_nowait(b"echo " + data)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_both_ends_answering_a_burst_never_wait_on_each_other(kind: str) -> None:
    # A burst lands in few reads of many frames each; the answers to one read are
    # written together once it is handed out, more than the small socket buffers take.
    # A reader that waited to write them while the other end's reader did the same
    # would hang both. 200 payloads: fewer than the send queue holds, none is dropped.
    with trio.fail_after(20):
        async with socket_pair(kind) as (sa, sb), trio.open_nursery() as nursery:
            a, ra, b, _ = socket_sessions(sa, sb)
            echo = Echo()
            b._observer = echo
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await wait_until(ra, lambda: ra.ups == 1)
            await wait_until(echo, lambda: echo.ups == 1)
            sent = [b"%d:" % i + b"x" * (i * 7919 % 20_000) for i in range(200)]
            for payload in sent:
                await a.send(payload)
            await wait_until(ra, lambda: len(ra.data) >= len(sent) or bool(ra.downs))
            assert ra.data == [b"echo " + payload for payload in sent]
            assert echo.data == sent
            nursery.cancel_scope.cancel()



async def test_a_peer_that_sends_but_never_reads_is_closed_not_buffered_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every keepalive is answered by the core itself; the reader does not wait for the
    # peer to read those answers, so their backlog is what bounds memory.
    monkeypatch.setattr("twinmesh.nic.session.MAX_CORE_BACKLOG", 200)
    with trio.fail_after(20):
        async with socket_pair("unix") as (sa, sb), trio.open_nursery() as nursery:
            a, ra, _, _ = socket_sessions(sa, sb)
            nursery.start_soon(a.run)
            # The peer: a bare link core on the other socket, driven by hand.
            flood = Link(Identity.generate(), initiator=False, now=trio.current_time(),
                         config=QUIET)
            while not any(isinstance(e, LinkUp) for e in flood.receive_data(
                    bytes(await sb.receive_some(65536)), trio.current_time())):
                await sb.send_all(flood.data_to_send())
            await sb.send_all(flood.data_to_send())
            await wait_until(ra, lambda: ra.ups == 1)
            # Up: now it only sends keepalives, and never reads again.
            for _ in range(20_000):
                flood._send_keepalive(trio.current_time())
                with trio.move_on_after(0.5) as stuck:
                    try:
                        await sb.send_all(flood.data_to_send())
                    except trio.BrokenResourceError:
                        break
                if stuck.cancelled_caught or ra.downs:
                    break
            await wait_until(ra, lambda: bool(ra.downs))
            assert "does not read" in ra.downs[0].reason
            nursery.cancel_scope.cancel()
