import random

import pytest
import trio
import trio.testing

from twinmesh.carriers.uri import PeerUri
from twinmesh.testing import Conditions, MemoryNetwork, MemoryStream
from twinmesh.testing.carriers import CARRIER_CHECKS, receive_exactly, run_carrier_check


async def _echo(stream: trio.abc.Stream, remote: str) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


async def _nothing_arrives(stream: trio.abc.Stream, seconds: float = 10.0) -> bool:
    with trio.move_on_after(seconds):
        await stream.receive_some()
        return False
    return True


# The stream contract and the carrier contract


async def test_stream_contract() -> None:
    async def pair() -> tuple[MemoryStream, MemoryStream]:
        return MemoryNetwork().stream_pair("a", "b")

    async def clogged_pair() -> tuple[MemoryStream, MemoryStream]:
        a, b = MemoryNetwork(buffer_size=1).stream_pair("a", "b")
        await a.send_all(b"x")  # the buffer is full now
        await b.send_all(b"x")
        return a, b

    with trio.fail_after(30):
        await trio.testing.check_two_way_stream(pair, clogged_pair)


async def test_stream_contract_with_latency(autojump_clock: trio.testing.MockClock) -> None:
    async def pair() -> tuple[MemoryStream, MemoryStream]:
        return MemoryNetwork(latency=0.02).stream_pair("a", "b")

    with trio.fail_after(3600):
        await trio.testing.check_two_way_stream(pair, None)


@pytest.mark.parametrize("check", list(CARRIER_CHECKS))
async def test_conformance(check: str) -> None:
    net = MemoryNetwork()
    with trio.fail_after(10):
        await run_carrier_check(net.carrier("server"), PeerUri("memory", "server", 0), check)
    assert net.statistics().open_connections == 0


@pytest.mark.parametrize("check", list(CARRIER_CHECKS))
async def test_conformance_with_latency(check: str, autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=0.05, buffer_size=4096)
    with trio.fail_after(3600):
        await run_carrier_check(net.carrier("server"), PeerUri("memory", "server", 0), check)


# Dialing and listening


async def test_dial_serve_and_remote_names() -> None:
    net = MemoryNetwork()
    remotes: list[str] = []

    async def handler(stream: trio.abc.Stream, remote: str) -> None:
        remotes.append(remote)
        await _echo(stream, remote)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                net.carrier("b").serve, PeerUri.parse("memory://b"), handler
            )
            assert bound == PeerUri("memory", "b", 0)
            for _ in range(2):
                stream = await net.carrier("a").dial(PeerUri.parse("memory://b"))
                assert isinstance(stream, MemoryStream)
                assert (stream.local_node, stream.remote_node) == ("a", "b")
                async with stream:
                    await stream.send_all(b"hi")
                    assert await receive_exactly(stream, 2) == b"hi"
            nursery.cancel_scope.cancel()
    assert remotes == ["a:49152", "a:49153"]


async def test_dialing_an_unknown_name_is_refused() -> None:
    with trio.fail_after(10), pytest.raises(ConnectionRefusedError, match="nobody listens"):
        await MemoryNetwork().carrier("a").dial(PeerUri.parse("memory://nowhere"))


async def test_a_name_can_only_be_served_once() -> None:
    net = MemoryNetwork()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(net.carrier("b").serve, PeerUri.parse("memory://b"), _echo)
            with pytest.raises(OSError, match="already in use"):
                await net.carrier("b").serve(PeerUri.parse("memory://b"), _echo)
            nursery.cancel_scope.cancel()
        # Once the listener stops, the name is free and dialing it is refused.
        with pytest.raises(ConnectionRefusedError):
            await net.carrier("a").dial(PeerUri.parse("memory://b"))


# Delivery


async def test_delivery_keeps_order_even_when_latency_drops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(latency=1.0)
    a, b = net.stream_pair("a", "b")
    rng = random.Random(5)
    chunks = [rng.randbytes(rng.randint(1, 3000)) for _ in range(200)]
    sent = b"".join(chunks)
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                for i, chunk in enumerate(chunks):
                    if i == 100:  # later chunks must not overtake earlier ones
                        net.set_conditions("a", "b", latency=0.0)
                    await a.send_all(chunk)
                    await trio.sleep(0.001)

            nursery.start_soon(send)
            got = bytearray()
            while len(got) < len(sent):
                got += await b.receive_some(rng.randint(1, 5000))
    assert got == sent


async def test_latency_is_exact_on_a_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    net.set_conditions("a", "b", latency=0.030, one_way=True)
    net.set_conditions("b", "a", latency=0.070, one_way=True)
    assert net.conditions("a", "b") == Conditions(latency=0.030)
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(net.carrier("b").serve, PeerUri.parse("memory://b"), _echo)
            start = trio.current_time()
            stream = await net.carrier("a").dial(PeerUri.parse("memory://b"))
            assert trio.current_time() - start == pytest.approx(0.100)  # a round trip
            async with stream:
                start = trio.current_time()
                await stream.send_all(b"ping")
                assert trio.current_time() == start  # sending does not wait for delivery
                assert await receive_exactly(stream, 4) == b"ping"
                assert trio.current_time() - start == pytest.approx(0.100)
            nursery.cancel_scope.cancel()


async def test_sends_are_pipelined(autojump_clock: trio.testing.MockClock) -> None:
    a, b = MemoryNetwork(latency=0.5).stream_pair("a", "b")
    with trio.fail_after(3600):
        start = trio.current_time()
        for _ in range(10):
            await a.send_all(b"x")
        assert await receive_exactly(b, 10) == b"x" * 10
        assert trio.current_time() - start == pytest.approx(0.5)


async def test_eof_arrives_after_the_data(autojump_clock: trio.testing.MockClock) -> None:
    a, b = MemoryNetwork(latency=0.2).stream_pair("a", "b")
    with trio.fail_after(3600):
        await a.send_all(b"last words")
        await a.aclose()
        start = trio.current_time()
        assert await receive_exactly(b, 10) == b"last words"
        assert await b.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(0.2)
        with pytest.raises(trio.BrokenResourceError):
            await b.send_all(b"anyone?")
        await b.aclose()


# Partitions, resets, loss


async def test_partition_silences_both_ways_and_heal_restores(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(latency=0.1)
    a, b = net.stream_pair("a", "b")
    c, d = net.stream_pair("c", "d")
    with trio.fail_after(3600):
        await a.send_all(b"in the air")
        net.partition("b", "a")
        assert net.is_partitioned("a", "b")
        await a.send_all(b"lost")
        await b.send_all(b"lost too")
        assert await _nothing_arrives(b)
        assert await _nothing_arrives(a)
        # Other pairs are not affected.
        await c.send_all(b"fine")
        assert await receive_exactly(d, 4) == b"fine"
        # Dialing across the partition is refused.
        async with trio.open_nursery() as nursery:
            await nursery.start(net.carrier("b").serve, PeerUri.parse("memory://b"), _echo)
            with pytest.raises(ConnectionRefusedError, match="partitioned"):
                await net.carrier("a").dial(PeerUri.parse("memory://b"))
            nursery.cancel_scope.cancel()

        net.heal("a", "b")
        assert not net.is_partitioned("a", "b")
        await a.send_all(b"back")
        await b.send_all(b"again")
        assert await receive_exactly(b, 4) == b"back"
        assert await receive_exactly(a, 5) == b"again"
    assert net.statistics().chunks_dropped == 3


async def test_a_partition_unblocks_a_full_sender() -> None:
    net = MemoryNetwork(buffer_size=10)
    a, _b = net.stream_pair("a", "b")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.send_all, b"x" * 25)
            await trio.testing.wait_all_tasks_blocked()
            assert nursery.child_tasks  # blocked: nobody reads
            net.partition("a", "b")  # the rest vanishes, so the sender goes on


async def test_break_links_resets_both_ends() -> None:
    net = MemoryNetwork()
    a, b = net.stream_pair("a", "b")
    a2, b2 = net.stream_pair("b", "a")
    c, d = net.stream_pair("a", "c")
    with trio.fail_after(10):
        await a.send_all(b"unread")
        async with trio.open_nursery() as nursery:

            async def blocked_receive() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await a2.receive_some()

            nursery.start_soon(blocked_receive)
            await trio.testing.wait_all_tasks_blocked()
            assert net.break_links("a", "b") == 2
        for stream in (a, b, b2):
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"x")
        await c.send_all(b"ok")
        assert await receive_exactly(d, 2) == b"ok"
        for stream in (a, b, a2, b2):
            await stream.aclose()
    assert net.statistics().open_connections == 1


async def test_loss_is_seeded_and_drops_whole_chunks() -> None:
    async def received(seed: int) -> tuple[bytes, int]:
        net = MemoryNetwork(seed=seed)
        net.set_conditions("a", "b", loss=0.5)
        a, b = net.stream_pair("a", "b")
        for i in range(200):
            await a.send_all(bytes([i]) * 3)
        await a.aclose()
        got = bytearray()
        while data := await b.receive_some():
            got += data
        return bytes(got), net.statistics().chunks_dropped

    with trio.fail_after(10):
        first, dropped = await received(seed=1)
        again, _ = await received(seed=1)
        other, _ = await received(seed=2)
    assert first == again != other
    assert 60 < dropped < 140
    assert len(first) == 3 * (200 - dropped)
    # Chunks vanish whole and the survivors stay in order.
    survivors = [first[i] for i in range(0, len(first), 3)]
    assert survivors == sorted(survivors)
    assert all(first[i : i + 3] == bytes([first[i]]) * 3 for i in range(0, len(first), 3))


# Back-pressure


async def test_a_full_buffer_blocks_the_sender_until_the_receiver_reads() -> None:
    net = MemoryNetwork(buffer_size=1000)
    a, b = net.stream_pair("a", "b")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def send() -> None:
                await a.send_all(b"x" * 2500)
                done.set()

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            assert await b.receive_some(400) == b"x" * 400
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # the next chunk (1000 bytes) still does not fit
            assert len(await receive_exactly(b, 600)) == 600
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            assert len(await receive_exactly(b, 1000)) == 1000
            await done.wait()
            assert len(await receive_exactly(b, 500)) == 500


async def test_bytes_in_the_air_count_against_the_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = MemoryNetwork(latency=1.0, buffer_size=100).stream_pair("a", "b")
    with trio.fail_after(3600):
        start = trio.current_time()
        await a.send_all(b"x" * 100)
        with trio.move_on_after(5) as scope:
            await a.wait_send_all_might_not_block()
        assert scope.cancelled_caught  # full until the receiver reads
        assert await receive_exactly(b, 100) == b"x" * 100
        assert trio.current_time() - start == pytest.approx(5)
        await a.wait_send_all_might_not_block()


# Knobs


def test_conditions_are_validated() -> None:
    with pytest.raises(ValueError, match="latency"):
        Conditions(latency=-1)
    with pytest.raises(ValueError, match="loss"):
        Conditions(loss=1.5)
    net = MemoryNetwork()
    with pytest.raises(ValueError):
        net.set_conditions("a", "b", loss=-0.1)
    with pytest.raises(ValueError):
        MemoryNetwork(buffer_size=0)


def test_set_conditions_changes_only_what_it_names() -> None:
    net = MemoryNetwork(latency=0.5, loss=0.1)
    net.set_conditions("a", "b", latency=0.2)
    assert net.conditions("a", "b") == net.conditions("b", "a") == Conditions(0.2, 0.1)
    net.set_conditions("a", "b", loss=0.0, one_way=True)
    assert net.conditions("a", "b") == Conditions(0.2, 0.0)
    assert net.conditions("b", "a") == Conditions(0.2, 0.1)
    assert net.conditions("a", "c") == Conditions(0.5, 0.1)
