"""Raw link throughput and round trip between two in-process `Nic`s (TCP and websocket),
and the per-message CPU cost of the link core's data path."""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import nacl.utils
import trio

from bench.floor import LARGE, SMALL, label_key
from bench.measure import Bound, Context, Figure, Stats, cpu_time_per_op
from twinmesh.carriers.uri import PeerUri
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.nic.config import NicConfig
from twinmesh.nic.node import Nic
from twinmesh.nic.overlay import PacketHandler
from twinmesh.proto.link import Link

TITLE = "Link data path"
RUN_TIMEOUT = 20.0  # seconds one throughput run may take before it is cut short
LINK_TIMEOUT = 10.0  # for a pair of NICs to link up
POLL = 0.002
CARRIERS = ("tcp", "ws")
SHOWN = {"tcp": "TCP", "ws": "websocket"}
LISTEN = {"tcp": "tcp://127.0.0.1:0", "ws": "ws://127.0.0.1:0/pnic"}


def plan(ctx: Context) -> dict[str, int]:
    return {
        "small": ctx.pick(50000, 10000),
        "large": ctx.pick(5000, 1000),
        "runs": ctx.pick(7, 3),
        "pings": ctx.pick(5000, 500),
    }


def method(ctx: Context) -> str:
    p = plan(ctx)
    return f"""\
Two `twinmesh.nic.node.Nic` objects in this process (one trio loop, so the figures
include both the sending and the receiving side's CPU), default `NicConfig` (send queue
256 payloads, keepalive 0.5 s): B listens on 127.0.0.1 (kernel-chosen port), A has B as
its configured peer (key pinned) and links through its dialer, the way `pnicd` does.
Every figure is taken on an established link.

- **throughput, 100 B / 64 KiB**: one task calls `await nic_a.send(b, payload)` in a
  loop as fast as back-pressure allows; B's `on_packet` callback counts payloads (each
  is an overlay packet addressed to the neighbour, routed over the link). Timed
  from the first send to the last payload counted. {p["small"]} x 100 B or
  {p["large"]} x 64 KiB per run; median and min-max of {p["runs"]} runs after a warm-up
  run. MB/s counts payload bytes (10⁶ B); encryption, framing and the Cap'n Proto
  envelope are extra bytes on the wire. Ratio: against the raw TCP floor for the same
  payload size (length-prefixed frames, one `send_all` each, no crypto).
- **RTT, 100 B**: A sends 100 B; B's `on_packet` hands it to an echo task that
  `await nic_b.send()`s it back; A's `on_packet` wakes the pinging task. Timed from A's
  `send` to the echo arriving in A's `on_packet` consumer. {p["pings"]} round trips after
  50 warm-up ones; median, p10-p90, p99. Ratio: against the trio TCP echo RTT floor.
- **core data path (CPU)**: `Link.send_data` + `data_to_send` on one core and
  `receive_data` on its peer for one 100 B payload (encode, encrypt, frame; unframe,
  decrypt, decode), no I/O, no tasks. Ratio: against the AEAD 100 B floor.
{reading(ctx)}"""


def reading(ctx: Context) -> str:
    """Where a message's time goes, computed from this run's figures."""
    lines: list[str] = []
    core = ctx.get("link.core.100b")
    small = ctx.get("link.tcp.100b")
    if core is not None and small is not None:
        per_msg = 1e6 / small.value
        lines.append(
            f"- 100 B over TCP: {per_msg:.1f} µs per message, sender and receiver together. "
            f"The core's encode+encrypt+frame and unframe+decrypt+decode is {core.value:.1f} µs "
            f"({100 * core.value / per_msg:.0f}%); the rest is the session's tasks (the send "
            "queue hand-off and a scheduler pass per `send`), trio scheduling and socket "
            "I/O. The raw TCP floor writes once per message; the link batches what is "
            "queued into one write."
        )
    large, aead = ctx.get("link.tcp.64k"), ctx.get("floor.aead_64k")
    if large is not None and aead is not None:
        per_msg = 65536 / large.value
        lines.append(
            f"- 64 KiB over TCP: {per_msg:.0f} µs per message; ChaCha20-Poly1305 alone "
            f"(encrypt + decrypt floor) is {aead.value:.0f} µs of it "
            f"({100 * aead.value / per_msg:.0f}%). Copies of the payload (Cap'n Proto "
            "envelope, framing, buffers) and I/O make up the rest."
        )
    ratios = []
    for size, label in (("100b", "100 B"), ("64k", "64 KiB"), ("rtt", "RTT")):
        tcp, ws = ctx.get(f"link.tcp.{size}"), ctx.get(f"link.ws.{size}")
        if tcp is not None and ws is not None:
            ratios.append(f"{ws.value / tcp.value:.2f}x for {label}")
    if ratios:
        lines.append(
            f"- websocket ÷ TCP: {', '.join(ratios)}. The difference is the websocket "
            "carrier: framing and masking in `websockets`' sans-I/O protocol and the "
            "carrier's own receive buffer."
        )
    if not lines:
        return ""
    return "\nReading the figures:\n\n" + "\n".join(lines) + "\n"


async def run(ctx: Context) -> None:
    p = plan(ctx)
    _core_data_path(ctx)
    for scheme in CARRIERS:
        sink = _Sink()
        async with nic_pair(scheme, sink.a_received, sink.b_received) as (a, b):
            for size, count in ((SMALL, p["small"]), (LARGE, p["large"])):
                await _throughput(ctx, scheme, a, b.key, sink, size, count, p["runs"])
            await _rtt(ctx, scheme, a, b, sink, p["pings"])


@asynccontextmanager
async def nic_pair(
    scheme: str,
    on_data_a: PacketHandler,
    on_data_b: PacketHandler,
) -> AsyncIterator[tuple[Nic, Nic]]:
    """Two running NICs, A linked to B over `scheme`; both stop when the block ends."""
    with tempfile.TemporaryDirectory(prefix="twinmesh-bench-") as tmp:
        async with trio.open_nursery() as nursery:
            b = Nic(Identity.generate(),
                    NicConfig(state_dir=Path(tmp) / "b", listen=(PeerUri.parse(LISTEN[scheme]),)),
                    on_packet=on_data_b)
            await nursery.start(b.run)
            target = replace(b.listening[0], key=b.key)
            a = Nic(Identity.generate(), NicConfig(state_dir=Path(tmp) / "a", peers=(target,)),
                    on_packet=on_data_a)
            await nursery.start(a.run)
            for _ in range(int(LINK_TIMEOUT / POLL)):
                if _up(a, b.key) and _up(b, a.key):
                    break
                await trio.sleep(POLL)
            else:
                raise RuntimeError(f"two NICs did not link over {scheme} in {LINK_TIMEOUT:g} s")
            yield a, b
            nursery.cancel_scope.cancel()


def _up(nic: Nic, peer: PublicKey) -> bool:
    session = nic.by_peer.get(peer)
    return session is not None and session.is_up


class _Sink:
    """Both NICs' `on_packet`: B counts (or echoes), A hands echoes to the pinger."""

    def __init__(self) -> None:
        self.target = 0
        self.count = 0
        self.done = trio.Event()
        self.echo = False
        self.echo_in, self.echo_out = trio.open_memory_channel[tuple[PublicKey, bytes]](16)
        self.pong_in, self.pong_out = trio.open_memory_channel[bytes](16)

    def expect(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.done = trio.Event()

    def b_received(self, peer: PublicKey, data: bytes, hops: int) -> None:
        if self.echo:
            self.echo_in.send_nowait((peer, data))
            return
        self.count += 1
        if self.count == self.target:
            self.done.set()

    def a_received(self, peer: PublicKey, data: bytes, hops: int) -> None:
        self.pong_in.send_nowait(data)


async def _throughput(
    ctx: Context, scheme: str, a: Nic, b_key: PublicKey, sink: _Sink, size: int, count: int,
    runs: int,
) -> None:
    label = "100 B" if size == SMALL else "64 KiB"
    ctx.progress.start(f"link over {scheme}: {label} x {count}, {runs} runs")
    payload = nacl.utils.random(size)
    rates: list[float] = []
    notes: list[str] = []
    for run_index in range(runs + 1):  # run 0 warms up
        n = max(1, count // 10) if run_index == 0 else count
        sink.expect(n)
        started = time.perf_counter()
        with trio.move_on_after(RUN_TIMEOUT) as scope:
            for _ in range(n):
                await a.send(b_key, payload)
            await sink.done.wait()
        elapsed = time.perf_counter() - started
        if scope.cancelled_caught:
            # Payloads still queued would land in the next run: stop measuring here.
            notes.append(f"a run was cut at {RUN_TIMEOUT:g} s after {sink.count}/{n} msgs")
            break
        if run_index:
            rates.append(n / elapsed)
    if not rates:
        ctx.progress.done(text="no complete run")
        return
    msgs = Stats.of(rates)
    mb = Stats.of([r * size / 1e6 for r in rates])
    key = f"link.{scheme}.{label_key(size)}"
    floor_key = f"floor.tcp_{label_key(size)}"
    name = f"link throughput over {SHOWN[scheme]}, {label} msgs, one way"
    if size == SMALL:
        figure = Figure(key=key, group=TITLE, name=name, value=msgs.median, unit="msgs/s",
                        spread=(msgs.low, msgs.high), spread_kind=f"min-max of {msgs.n}",
                        detail=f"{mb.median:.1f} MB/s", floor_key=floor_key, notes=notes)
    else:
        figure = Figure(key=key, group=TITLE, name=name, value=mb.median, unit="MB/s",
                        spread=(mb.low, mb.high), spread_kind=f"min-max of {mb.n}",
                        detail=f"{msgs.median:,.0f} msgs/s", floor_key=floor_key, notes=notes)
    ctx.add(figure)
    ctx.progress.done(figure)


async def _rtt(ctx: Context, scheme: str, a: Nic, b: Nic, sink: _Sink, count: int) -> None:
    ctx.progress.start(f"link RTT over {scheme}: 100 B x {count}")
    payload = nacl.utils.random(SMALL)
    samples: list[float] = []
    bound = Bound(30.0)

    async def echo() -> None:
        async for peer, data in sink.echo_out:
            await b.send(peer, data)

    sink.echo = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        for index in range(50 + count):
            with trio.fail_after(5.0):
                started = time.perf_counter()
                await a.send(b.key, payload)
                reply = await sink.pong_out.receive()
                took = time.perf_counter() - started
            if reply != payload:
                raise RuntimeError("echo came back changed")
            if index >= 50:
                samples.append(took * 1e3)
            if bound.expired:
                break
        nursery.cancel_scope.cancel()
    sink.echo = False
    stats = Stats.of(samples)
    figure = ctx.add(
        Figure(
            key=f"link.{scheme}.rtt",
            group=TITLE,
            name=f"link RTT over {SHOWN[scheme]}, 100 B app-level echo",
            value=stats.median,
            unit="ms",
            spread=(stats.p10, stats.p90),
            spread_kind="p10-p90",
            detail=f"p99 {stats.p99:.3f} ms, n={stats.n}",
            floor_key="floor.echo_rtt",
        )
    )
    ctx.progress.done(figure)


def _core_data_path(ctx: Context) -> None:
    ctx.progress.start("link core data path, 100 B (CPU)")
    left_id, right_id = Identity.generate(), Identity.generate()
    left = Link(left_id, initiator=True, now=0.0)
    right = Link(right_id, initiator=False, now=0.0)
    right.receive_data(left.data_to_send(), 0.0)
    left.receive_data(right.data_to_send(), 0.0)
    right.receive_data(left.data_to_send(), 0.0)
    left.receive_data(right.data_to_send(), 0.0)
    assert left.is_up and right.is_up
    payload = nacl.utils.random(SMALL)

    def one() -> object:
        left.send_data(payload, 0.0)
        return right.receive_data(left.data_to_send(), 0.0)

    stats, _ = cpu_time_per_op(one, ops=2000, batches=ctx.pick(9, 5), bound=Bound(5.0))
    figure = ctx.add(
        Figure(key="link.core.100b", group=TITLE,
               name="link core data path, 100 B send+receive (CPU)", value=stats.median,
               unit="us", spread=(stats.low, stats.high),
               spread_kind=f"min-max of {stats.n} batches",
               detail=f"≈ {1e6 / stats.median:,.0f} msgs/s if nothing else ran",
               floor_key="floor.aead_100b")
    )
    ctx.progress.done(figure)
