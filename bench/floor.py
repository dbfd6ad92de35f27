"""Floors: what loopback TCP under trio, and the crypto and encoding a link needs, cost
on this machine, measured in the same run. Link figures are reported as ratios of these.

Both ends of every TCP floor live in this one process and one trio loop, exactly like
the link figures they are compared with, so the comparison is like for like. The one
exception is the second echo floor, whose server is a child process (bench/echo_server.py):
the floor for figures that cross between real processes, such as pings between pnicds.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings as sodium
import nacl.utils
import trio

from bench import echo_server
from bench.measure import Bound, Context, Figure, Stats, process_cpu
from twinmesh.identity.keys import Identity
from twinmesh.wire import schemas

TITLE = "Floors"

PREFIX = struct.Struct(">I")
SMALL = 100
LARGE = 64 * 1024
READ_SIZE = 256 * 1024
RUN_TIMEOUT = 20.0  # seconds one throughput run may take before it is cut short
ECHO_WARMUP = 50
ECHO_BOUND = 30.0  # seconds one echo series may take
CHILD_TIMEOUT = 20.0  # seconds the echo child may take to print its port, or to exit
ROOT = Path(__file__).resolve().parent.parent  # where `-m bench.echo_server` resolves
# The wake floor: frames this far apart, as a process of the 1000-twin scale run sees
# them (a NIC there handles a few hundred frames a second, one per wake-up).
WAKE_PAUSE = 0.005
WAKE_BATCHES = 5

TcpHandler = Callable[[trio.SocketStream], Awaitable[None]]


def plan(ctx: Context) -> dict[str, int]:
    return {
        "echo": ctx.pick(5000, 500),
        "small": ctx.pick(50000, 10000),
        "large": ctx.pick(5000, 1000),
        "runs": ctx.pick(7, 3),
        "batches": ctx.pick(15, 5),
        "wake": ctx.pick(1000, 300),  # frames per batch, back to back
        "wake_paced": ctx.pick(200, 60),  # frames per batch, WAKE_PAUSE apart
    }


def method(ctx: Context) -> str:
    p = plan(ctx)
    return f"""\
The physical limit of this machine for the same kind of work, re-measured in every run.
Both ends of each TCP floor run in this process on one trio loop, on 127.0.0.1, with
trio's default `TCP_NODELAY`.

- **trio TCP echo RTT**: one client task sends 100 B, an echo task in the same loop
  sends it back; the client times write → full reply read. {p["echo"]} round trips after
  {ECHO_WARMUP} warm-up ones; median, p10-p90, p99.
- **trio TCP echo RTT across two processes**: the same client loop and counts, but the
  echo task runs on its own trio loop in a child process (`python -m
  bench.echo_server`, started fresh, serving this one connection). Each round trip
  crosses between two processes and wakes the other one, as a ping between two pnicds
  does; the pnicd ping figures give their ratio to it in their detail.
- **CPU of a process woken by a frame**: the same echo child, measured by its own CPU
  (the kernel's nanosecond count, /proc/PID/schedstat) per 100 B frame it reads and
  sends back: {WAKE_BATCHES} batches of {p["wake"]} frames back to back, and
  {WAKE_BATCHES} of {p["wake_paced"]} frames {WAKE_PAUSE * 1e3:g} ms apart, so that it
  sleeps before each one; median and min-max of the batches. Every frame that crosses
  from one twinmesh process to another wakes the receiver like this, so this is the
  least CPU such a crossing costs on this machine, before any work is done with the
  frame; `make scale` uses it for the ceiling its crossings allow.
- **raw TCP 100 B / 64 KiB**: the sender writes length-prefixed frames (4-byte length +
  payload, no crypto, no encoding) with one `send_all` per message as fast as the socket
  takes them; the receiver task parses frames out of 256 KiB reads and copies each
  payload out. Timed from the first write to the last frame parsed; {p["small"]} x 100 B
  or {p["large"]} x 64 KiB per run, median and min-max of {p["runs"]} runs after a
  warm-up run. MB/s counts payload bytes (10⁶ B).
- **CPU floors** (no I/O; mean per operation over a batch, batches taken round-robin
  across the floors; median and min-max of {p["batches"]} batches): ChaCha20-Poly1305
  (IETF, the link's AEAD) encrypt + decrypt of 100 B and 64 KiB; the Cap'n Proto
  `LinkMessage.data` envelope built, serialized and read back (100 B); ed25519 sign +
  verify (the handshake does two of each); X25519 keypair + shared secret (the
  handshake does two of each).
"""


async def run(ctx: Context) -> None:
    p = plan(ctx)
    async with trio.open_nursery() as nursery:
        await _echo_rtt(ctx, nursery, p["echo"])
        await _echo_rtt_procs(ctx, p["echo"])
        await _wake_cpu(ctx, p["wake"], p["wake_paced"])
        await _pipelined(ctx, nursery, SMALL, p["small"], p["runs"])
        await _pipelined(ctx, nursery, LARGE, p["large"], p["runs"])
        nursery.cancel_scope.cancel()
    _cpu_floors(ctx)


async def serve_loopback(nursery: trio.Nursery, handler: TcpHandler) -> int:
    """Listen on 127.0.0.1 (kernel-chosen port) until `nursery` is cancelled."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, handler, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


# ------------------------------------------------------------------------- echo


async def _echo_rtt(ctx: Context, nursery: trio.Nursery, count: int) -> None:
    ctx.progress.start(f"floor: trio TCP echo RTT, 100 B x {count}")
    port = await serve_loopback(nursery, echo_server.echo)
    samples, notes = await _echo_samples(port, count)
    _add_echo(ctx, "floor.echo_rtt", "trio TCP echo RTT, 100 B", "trio echo", samples, notes)


async def _echo_rtt_procs(ctx: Context, count: int) -> None:
    ctx.progress.start(f"floor: trio TCP echo RTT across two processes, 100 B x {count}")
    async with _echo_child() as (port, _pid):
        samples, notes = await _echo_samples(port, count)
    _add_echo(ctx, "floor.echo_rtt_procs", "trio TCP echo RTT across two processes, 100 B",
              "trio echo (2 procs)", samples, notes)


async def _echo_samples(port: int, count: int) -> tuple[list[float], list[str]]:
    """Round trips of 100 B to the echo server on `port`, one at a time, in ms."""
    payload = nacl.utils.random(SMALL)
    samples: list[float] = []
    notes: list[str] = []
    bound = Bound(ECHO_BOUND)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        for i in range(ECHO_WARMUP + count):
            started = time.perf_counter()
            await _round_trip(stream, payload)
            if i >= ECHO_WARMUP:
                samples.append((time.perf_counter() - started) * 1e3)
            if bound.expired:
                notes.append(f"stopped after {len(samples)} samples at the {ECHO_BOUND:g} s "
                             "bound")
                break
    return samples, notes


async def _round_trip(stream: trio.SocketStream, payload: bytes) -> None:
    """Send `payload` to the echo server and read all of it back."""
    await stream.send_all(payload)
    got = 0
    while got < len(payload):
        chunk = await stream.receive_some(READ_SIZE)
        if not chunk:
            raise RuntimeError("echo server hung up")
        got += len(chunk)


@dataclass(frozen=True)
class WakeCost:
    """CPU in µs of a trio process per 100 B frame that wakes it and that it answers:
    per-batch means, frames back to back and frames `WAKE_PAUSE` apart."""

    back_to_back: Stats
    paced: Stats


async def wake_cost(count: int, paced_count: int, batches: int = WAKE_BATCHES) -> WakeCost:
    """Measure `WakeCost` with a fresh echo child (a few seconds: bounded by the
    counts and by ECHO_BOUND per series)."""
    payload = nacl.utils.random(SMALL)
    async with _echo_child() as (port, pid), \
            await trio.open_tcp_stream("127.0.0.1", port) as stream:

        async def series(frames: int, pause: float) -> list[float]:
            means: list[float] = []
            bound = Bound(ECHO_BOUND)
            for _ in range(batches):
                before = _thread_cpu(pid)
                for _ in range(frames):
                    await _round_trip(stream, payload)
                    if pause:
                        await trio.sleep(pause)
                means.append((_thread_cpu(pid) - before) / frames * 1e6)
                if bound.expired:
                    break
            return means

        for _ in range(ECHO_WARMUP):
            await _round_trip(stream, payload)
        back_to_back = await series(count, 0.0)
        paced = await series(paced_count, WAKE_PAUSE)
    return WakeCost(Stats.of(back_to_back), Stats.of(paced))


def _thread_cpu(pid: int) -> float:
    """CPU seconds of the main thread of `pid`, in nanoseconds' resolution where the
    kernel counts them (the echo child has no other thread)."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as stat:
            return int(stat.read().split()[0]) / 1e9
    except (FileNotFoundError, IndexError, ValueError):
        return process_cpu(pid)


async def _wake_cpu(ctx: Context, count: int, paced_count: int) -> None:
    ctx.progress.start(f"floor: CPU of a process woken by a frame, {WAKE_BATCHES} x "
                       f"{count} back to back, {WAKE_BATCHES} x {paced_count} "
                       f"{WAKE_PAUSE * 1e3:g} ms apart")
    cost = await wake_cost(count, paced_count)
    for key, name, stats in (
            ("floor.wake_cpu", "CPU of a trio process per frame that wakes it, back to back",
             cost.back_to_back),
            ("floor.wake_cpu_paced", "CPU of a trio process per frame that wakes it, "
             f"frames {WAKE_PAUSE * 1e3:g} ms apart", cost.paced)):
        figure = ctx.add(Figure(
            key=key, group=TITLE, name=name, value=stats.median, unit="us",
            spread=(stats.low, stats.high), spread_kind=f"min-max of {stats.n}",
            detail="100 B read and sent back by the echo child; its CPU only"))
        ctx.progress.done(figure)


@asynccontextmanager
async def _echo_child() -> AsyncIterator[tuple[int, int]]:
    """A `bench.echo_server` child process; yields its port and PID, reaps it on the
    way out."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.echo_server"], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(CHILD_TIMEOUT):
            while not line.endswith(b"\n") and len(line) < 64:
                chunk = await process.stdout.receive_some(64)
                if not chunk:
                    break
                line += chunk
        if not line.strip().isdigit():
            raise RuntimeError(f"echo child printed {line!r}, not a port "
                               f"(exit status {process.poll()})")
        yield int(line), process.pid
    finally:
        # The child exits once our connection is closed; kill it if it does not.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CHILD_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


def _add_echo(
    ctx: Context, key: str, name: str, short: str, samples: list[float], notes: list[str]
) -> None:
    stats = Stats.of(samples)
    figure = ctx.add(
        Figure(
            key=key,
            group=TITLE,
            name=name,
            value=stats.median,
            unit="ms",
            spread=(stats.p10, stats.p90),
            spread_kind="p10-p90",
            detail=f"p99 {stats.p99:.3f} ms, n={stats.n}",
            notes=notes,
            short=short,
        )
    )
    ctx.progress.done(figure)


# -------------------------------------------------------------------- pipelined


class _FrameSink:
    """The receiving end of a raw-TCP floor run: counts whole frames."""

    def __init__(self) -> None:
        self.target = 0
        self.count = 0
        self.done = trio.Event()

    def expect(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.done = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        while data := await stream.receive_some(READ_SIZE):
            buf += data
            offset = 0
            end = len(buf)
            while end - offset >= PREFIX.size:
                (length,) = PREFIX.unpack_from(buf, offset)
                stop = offset + PREFIX.size + length
                if stop > end:
                    break
                bytes(buf[offset + PREFIX.size : stop])  # hand the payload out: a copy
                offset = stop
                self.count += 1
                if self.count == self.target:
                    self.done.set()
            del buf[:offset]


async def _pipelined(
    ctx: Context, nursery: trio.Nursery, size: int, count: int, runs: int
) -> None:
    label = "100 B" if size == SMALL else "64 KiB"
    ctx.progress.start(f"floor: raw TCP, {label} x {count}, {runs} runs")
    sink = _FrameSink()
    port = await serve_loopback(nursery, sink.serve)
    frame = PREFIX.pack(size) + nacl.utils.random(size)
    rates: list[float] = []
    notes: list[str] = []
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        for run_index in range(runs + 1):  # run 0 warms up
            n = max(1, count // 10) if run_index == 0 else count
            sink.expect(n)
            started = time.perf_counter()
            with trio.move_on_after(RUN_TIMEOUT) as scope:
                for _ in range(n):
                    await stream.send_all(frame)
                await sink.done.wait()
            elapsed = time.perf_counter() - started
            if scope.cancelled_caught:
                notes.append(f"a run was cut at {RUN_TIMEOUT:g} s after {sink.count}/{n} msgs")
                break
            if run_index:
                rates.append(n / elapsed)
    _add_rate(ctx, f"floor.tcp_{label_key(size)}", f"raw TCP, {label} msgs, one way", rates,
              size, notes, short=f"raw TCP {label}")


def label_key(size: int) -> str:
    return "100b" if size == SMALL else "64k"


def _add_rate(
    ctx: Context, key: str, name: str, rates: list[float], size: int, notes: list[str],
    short: str,
) -> None:
    if not rates:
        ctx.progress.done(text="no complete run")
        return
    stats = Stats.of(rates)
    mbps = [r * size / 1e6 for r in rates]
    if size == SMALL:
        figure = Figure(key=key, group=TITLE, name=name, value=stats.median, unit="msgs/s",
                        spread=(stats.low, stats.high), spread_kind=f"min-max of {stats.n}",
                        detail=f"{Stats.of(mbps).median:.1f} MB/s", notes=notes, short=short)
    else:
        mb = Stats.of(mbps)
        figure = Figure(key=key, group=TITLE, name=name, value=mb.median, unit="MB/s",
                        spread=(mb.low, mb.high), spread_kind=f"min-max of {mb.n}",
                        detail=f"{stats.median:,.0f} msgs/s", notes=notes, short=short)
    ctx.add(figure)
    ctx.progress.done(figure)


# -------------------------------------------------------------------------- CPU


def _cpu_floors(ctx: Context) -> None:
    key = nacl.utils.random(32)
    nonce = bytes(12)
    small = nacl.utils.random(SMALL)
    large = nacl.utils.random(LARGE)
    identity = Identity.generate()
    public = identity.public
    peer_point = public.to_x25519()
    link = schemas.link

    def aead(payload: bytes) -> Callable[[], object]:
        def op() -> object:
            sealed = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(payload, None, nonce, key)
            return sodium.crypto_aead_chacha20poly1305_ietf_decrypt(sealed, None, nonce, key)

        return op

    def envelope() -> object:
        message = link.LinkMessage.new_message()
        message.data = small
        data = message.to_bytes()
        with link.LinkMessage.from_bytes(data) as reader:
            return (str(reader.which()), bytes(reader.data))

    def sign_verify() -> object:
        return public.verify(identity.sign(small), small)

    def x25519() -> object:
        private = nacl.utils.random(32)
        sodium.crypto_scalarmult_base(private)
        return sodium.crypto_scalarmult(private, peer_point)

    cases: list[tuple[str, str, str, Callable[[], object], int]] = [
        ("floor.aead_100b", "ChaCha20-Poly1305 encrypt+decrypt, 100 B", "AEAD 100 B",
         aead(small), 2000),
        ("floor.aead_64k", "ChaCha20-Poly1305 encrypt+decrypt, 64 KiB", "AEAD 64 KiB",
         aead(large), 100),
        ("floor.capnp", "Cap'n Proto data envelope build+serialize+read", "envelope",
         envelope, 2000),
        ("floor.ed25519", "ed25519 sign+verify", "ed25519 sign+verify", sign_verify, 200),
        ("floor.x25519", "X25519 keypair + shared secret", "X25519", x25519, 200),
    ]
    # Batches run round-robin across the cases, so a burst of other work on the machine
    # spoils one batch of each floor rather than every batch of one floor.
    batches = plan(ctx)["batches"]
    ctx.progress.start(f"floor: {len(cases)} CPU floors, {batches} interleaved batches each")
    means: dict[str, list[float]] = {key_name: [] for key_name, *_ in cases}
    bound = Bound(20.0)
    for _, _, _, op, _ in cases:
        op()  # warm caches and lazy initialisation
    for _ in range(batches):
        for key_name, _, _, op, ops in cases:
            started = time.perf_counter()
            for _ in range(ops):
                op()
            means[key_name].append((time.perf_counter() - started) / ops * 1e6)
        if bound.expired:
            break
    ctx.progress.done(text="done")
    for key_name, name, short, _, ops in cases:
        stats = Stats.of(means[key_name])
        ctx.add(
            Figure(key=key_name, group=TITLE, name=name, value=stats.median, unit="us",
                   spread=(stats.low, stats.high), spread_kind=f"min-max of {stats.n} batches",
                   detail=f"{ops} ops per batch", short=short)
        )
        ctx.progress.note(f"{name}: {stats.median:.2f} µs")
