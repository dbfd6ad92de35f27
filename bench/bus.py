"""The message bus end to end: twin → twin through real `pnicd` processes on 127.0.0.1.

Acked 100 B messages/s and 64 KiB MB/s with a window of sends in flight, and the
latency of single messages (send → `delivered`), via 2 NICs and via a 3-NIC line.
Ratios against the peer systems measured earlier in the same run (`bench.peers`).

Profiling: with `BENCH_PROFILE=DIR` in the environment every `pnicd` runs under
cProfile and this process profiles its twins too; `DIR/<nic>.prof`, `DIR/twins.prof`
and a top-functions summary per process (`DIR/summary.txt`) are written. Figures taken
under the profiler are slower: use them for the shape, not the numbers.
"""

from __future__ import annotations

import cProfile
import io
import itertools
import os
import pstats
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nacl.utils
import trio

from bench.floor import LARGE, SMALL
from bench.measure import Bound, Context, Figure, Goal, Stats, fmt_value, process_cpu
from twinmesh.bus.client import TWINS_SOCKET, BusClient, BusError
from twinmesh.control.admin_client import admin_call
from twinmesh.errors import AdminError
from twinmesh.identity.keys import Identity, PublicKey

TITLE = "Message bus (twin → twin through pnicd)"
# Messages sent and not yet delivered, at most. 64 KiB gets a smaller window: 256 of
# them (16 MiB) queue for longer than the outbox's first retry (0.25 s), and the
# retransmissions of messages still in the queue cost more than the window gains.
WINDOW = {SMALL: 256, LARGE: 32}
FINAL = ("delivered", "expired", "failed")
ACCEPT_SAMPLE = 8
SCHEMA_ID = 0xB0B0_0000_0000_0001  # any type id: the receiving twin accepts every schema
START_TIMEOUT = 20.0  # a pnicd answering `self` and serving twins.sock
READY_TIMEOUT = 20.0  # links up and the destination twin reachable
RUN_TIMEOUT = 60.0  # one throughput run
STATUS_TIMEOUT = 30.0  # one message's wait for `delivered`
LATENCY_BOUND = 30.0  # all single-message round trips of one topology
STOP_TIMEOUT = 5.0
DRAIN_TIMEOUT = 2.0  # B's application catching up after the last `delivered`
POLL = 0.01
PROFILE_ENV = "BENCH_PROFILE"
# (key, number of NICs, shown)
TOPOLOGIES = (("2nic", 2, "2 NICs"), ("3nic", 3, "3-NIC line"))


def plan(ctx: Context) -> dict[str, int]:
    return {
        "small": ctx.pick(5000, 1500),
        "large": ctx.pick(300, 100),
        "runs": ctx.pick(5, 2),
        "pings": ctx.pick(300, 100),
    }


# ------------------------------------------------------------------ processes


@dataclass
class Daemon:
    """One running pnicd and what it answered on its admin socket."""

    name: str
    state_dir: Path
    process: trio.Process
    key: str = ""
    listen: list[str] = field(default_factory=list)

    @property
    def pinned(self) -> str:
        return f"{self.listen[0]}?key={self.key}"

    def cpu_seconds(self) -> float:
        """user + system CPU time so far."""
        return process_cpu(self.process.pid)


def pnicd_command(profile: Path | None, name: str) -> list[str]:
    script = Path(sys.executable).with_name("pnicd")
    base = [str(script)] if script.exists() else ["-m", "twinmesh.nic.main"]
    if profile is not None:
        return [sys.executable, "-m", "cProfile", "-o", str(profile / f"{name}.prof"), *base]
    return base if script.exists() else [sys.executable, *base]


@asynccontextmanager
async def nic_line(root: Path, count: int, profile: Path | None) -> AsyncIterator[list[Daemon]]:
    """`count` pnicd processes in a line n1 ← n2 ← n3 (each dials the one before, key
    pinned), on 127.0.0.1 with kernel-chosen ports; all stopped when the block ends."""
    daemons: list[Daemon] = []
    try:
        for index in range(count):
            name = f"n{index + 1}"
            extra = ["--peer", daemons[-1].pinned] if daemons else []
            daemons.append(await _start(root / name, name, extra, profile))
        for daemon in daemons:
            await _wait_twins_socket(daemon)
        yield daemons
    finally:
        with trio.CancelScope(shield=True):
            await _stop(daemons)


async def _start(state_dir: Path, name: str, extra: list[str], profile: Path | None) -> Daemon:
    state_dir.mkdir(mode=0o700, parents=True)
    cmd = [*pnicd_command(profile, name), "--state-dir", str(state_dir),
           "--listen", "tcp://127.0.0.1:0", "--log-format", "json", *extra]
    with open(state_dir.with_suffix(".log"), "ab") as log:
        process = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                                   stderr=log)
    daemon = Daemon(name, state_dir, process)
    with trio.move_on_after(START_TIMEOUT):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"pnicd {name} exited with {process.returncode}:\n"
                                   f"{_log_tail(daemon)}")
            if (state_dir / "admin.sock").exists():
                try:
                    info = await admin_call(state_dir, "self")
                except AdminError:
                    pass
                else:
                    daemon.key, daemon.listen = info["key"], list(info["listen"])
                    return daemon
            await trio.sleep(POLL)
    process.kill()
    await process.wait()
    raise RuntimeError(f"pnicd {name} did not answer `self` within {START_TIMEOUT:g} s")


async def _wait_twins_socket(daemon: Daemon) -> None:
    # The admin socket answers before the twin port is serving.
    for _ in range(int(START_TIMEOUT / POLL)):
        if (daemon.state_dir / TWINS_SOCKET).exists():
            return
        await trio.sleep(POLL)
    raise RuntimeError(f"pnicd {daemon.name} did not serve {TWINS_SOCKET} in time")


async def _stop(daemons: list[Daemon]) -> None:
    for daemon in daemons:
        if daemon.process.returncode is None:
            daemon.process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_TIMEOUT):
        for daemon in daemons:
            await daemon.process.wait()
    for daemon in daemons:
        if daemon.process.returncode is None:
            daemon.process.kill()
            await daemon.process.wait()


def _log_tail(daemon: Daemon) -> str:
    try:
        return daemon.state_dir.with_suffix(".log").read_text("utf-8", "replace")[-2000:]
    except OSError:
        return ""


# ---------------------------------------------------------------------- twins


class Receiver:
    """The destination twin's application: takes every message, counts them."""

    def __init__(self, bus: BusClient) -> None:
        self.bus = bus
        self.count = 0
        self._until: tuple[int, trio.Event] | None = None

    async def run(self) -> None:
        while True:
            await self.bus.receive()
            self.count += 1
            if self._until is not None and self.count >= self._until[0]:
                self._until[1].set()

    async def wait_count(self, count: int) -> None:
        """Until the application has taken `count` messages in all."""
        if self.count < count:
            self._until = (count, trio.Event())
            await self._until[1].wait()


@dataclass
class RunResult:
    elapsed: float
    delivered: int
    failed: dict[str, int]
    accept_latency: list[float]  # send() → accepted (durable commit), seconds


async def pipelined(
    sender: BusClient, destination: PublicKey, payload: bytes, count: int, window: int,
    timeout: float,
) -> RunResult:
    """Send `count` messages with at most `window` of them not yet delivered; wait
    until every one of them is delivered (or failed, or `timeout`).

    One task keeps the window full with `send_soon` and counts the final statuses
    from `on_statuses`, as libp2p's and Reticulum's drivers keep theirs full from
    one loop (a task per message cost the twins' process ~25 µs per message)."""
    sent = delivered = 0
    failed: dict[str, int] = {}
    accept: list[float] = []
    open_ids: set[bytes] = set()
    room = trio.Event()

    def on_statuses(changes: list[tuple[bytes, str, str]]) -> None:
        nonlocal delivered
        for message_id, status, code in changes:
            if status in FINAL and message_id in open_ids:
                open_ids.discard(message_id)
                if status == "delivered":
                    delivered += 1
                else:
                    failed[code or status] = failed.get(code or status, 0) + 1
                room.set()

    def accepted_after(started: float) -> Callable[[BusError | None], None]:
        def done(error: BusError | None) -> None:
            if error is None:
                accept.append(time.perf_counter() - started)
            elif error.code == "offline":  # no status will come: stop the run
                failed["offline"] = failed.get("offline", 0) + 1
                room.set()
        return done

    previous, sender.on_statuses = sender.on_statuses, on_statuses
    started = time.perf_counter()
    try:
        with trio.move_on_after(timeout):
            while (sent < count or open_ids) and "offline" not in failed:
                while sent < count and len(open_ids) < window:
                    try:
                        # Every ACCEPT_SAMPLE-th message is timed until accepted
                        # (a callback each would cost more than the rest of the loop).
                        timed = sent % ACCEPT_SAMPLE == 0
                        open_ids.add(sender.send_soon(
                            destination, (SCHEMA_ID, payload),
                            done=accepted_after(time.perf_counter()) if timed else None))
                    except BusError as exc:
                        if exc.code != "overloaded":
                            raise
                        break  # the connection's backlog is full: wait for statuses
                    sent += 1
                if delivered + sum(failed.values()) >= count:
                    break
                room = trio.Event()
                await room.wait()
    finally:
        sender.on_statuses = previous
    return RunResult(time.perf_counter() - started, delivered, failed, accept)


async def wait_reachable(sender: BusClient, destination: PublicKey) -> float:
    """Until one message is delivered (the location record has spread); seconds taken."""
    started = time.perf_counter()
    with trio.move_on_after(READY_TIMEOUT):
        for _ in itertools.count():
            try:
                await sender.send(destination, (SCHEMA_ID, b"ready?"), wait="delivered",
                                  timeout=2.0)
                return time.perf_counter() - started
            except BusError:
                await trio.sleep(0.05)
    raise RuntimeError(f"the destination twin was not reachable within {READY_TIMEOUT:g} s")


class CpuMeter:
    """CPU seconds used by this process (both twins) and by each pnicd, per interval."""

    def __init__(self, daemons: list[Daemon]) -> None:
        self.daemons = daemons
        self.start = self._read()

    @staticmethod
    def _self() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def _read(self) -> list[float]:
        return [self._self(), *(d.cpu_seconds() for d in self.daemons)]

    def used(self) -> list[float]:
        """[twins (this process), n1, n2, ...] seconds since the meter was made."""
        return [b - a for a, b in zip(self.start, self._read(), strict=True)]


# ---------------------------------------------------------------------- run

_cpu_notes: dict[str, str] = {}  # figure key → where the CPU went (for the method text)
_cpu_total: dict[str, float] = {}  # figure key → CPU µs per message, all processes
_setup_notes: list[str] = []


async def run(ctx: Context) -> None:
    p = plan(ctx)
    profile_dir = Path(os.environ[PROFILE_ENV]) if os.environ.get(PROFILE_ENV) else None
    profiler: cProfile.Profile | None = None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        ctx.progress.note(f"profiling the bus into {profile_dir} (figures are slower)")
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        for key, count, shown in TOPOLOGIES:
            with tempfile.TemporaryDirectory(prefix="twinmesh-bench-bus-") as tmp:
                topo_profile = profile_dir / key if profile_dir is not None else None
                if topo_profile is not None:
                    topo_profile.mkdir(exist_ok=True)
                try:
                    await _topology(ctx, p, key, count, shown, Path(tmp), topo_profile)
                except (RuntimeError, BusError) as exc:
                    # One broken topology must not cost the rest of the run.
                    ctx.progress.note(f"bus via {shown} stopped: {exc}")
                    _setup_notes.append(f"{shown}: stopped early ({exc})")
    finally:
        if profiler is not None and profile_dir is not None:
            profiler.disable()
            profiler.dump_stats(profile_dir / "twins.prof")
            _write_profile_summary(profile_dir)
    _add_peer_ratios(ctx)


async def _topology(
    ctx: Context, p: dict[str, int], key: str, count: int, shown: str, root: Path,
    profile: Path | None,
) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with nic_line(root, count, profile) as daemons, twins(daemons, alice, bob) as (
            sender, receiver):
        ready = await wait_reachable(sender, bob.public)
        _setup_notes.append(f"{shown}: first message delivered {ready * 1e3:.0f} ms after "
                            "both twins attached")
        for size, n, label in ((SMALL, p["small"], "100b"), (LARGE, p["large"], "64k")):
            await _throughput(ctx, key, shown, daemons, sender, bob.public, receiver,
                              size, n, p["runs"], label)
        await _latency(ctx, key, shown, sender, bob.public, p["pings"])


@asynccontextmanager
async def twins(
    daemons: list[Daemon], alice: Identity, bob: Identity
) -> AsyncIterator[tuple[BusClient, Receiver]]:
    """Twin A on the first NIC, twin B (with its application task) on the last."""
    async with (
        BusClient.connect(alice, daemons[0].state_dir) as sender,
        BusClient.connect(bob, daemons[-1].state_dir) as receiving,
        trio.open_nursery() as nursery,
    ):
        receiver = Receiver(receiving)
        nursery.start_soon(receiver.run)
        yield sender, receiver
        nursery.cancel_scope.cancel()


async def _throughput(
    ctx: Context, key: str, shown: str, daemons: list[Daemon], sender: BusClient,
    destination: PublicKey, receiver: Receiver, size: int, count: int, runs: int, label: str,
) -> None:
    size_shown = "100 B" if size == SMALL else "64 KiB"
    window = WINDOW[size]
    ctx.progress.start(f"bus via {shown}: {size_shown} x {count} acked, window {window}, "
                       f"{runs} runs")
    payload = nacl.utils.random(size)
    rates: list[float] = []
    accept: list[float] = []
    cpu: list[list[float]] = []
    notes: list[str] = []
    for run_index in range(runs + 1):  # run 0 warms up
        n = max(window, count // 5) if run_index == 0 else count
        before = receiver.count
        meter = CpuMeter(daemons)
        result = await pipelined(sender, destination, payload, n, window, RUN_TIMEOUT)
        used = meter.used()
        # The last acks leave B before its application task has taken those messages.
        with trio.move_on_after(DRAIN_TIMEOUT):
            await receiver.wait_count(before + result.delivered)
        got = receiver.count - before
        if result.delivered < n:
            notes.append(f"a run ended after {result.elapsed:.1f} s with {result.delivered}/{n} "
                         f"delivered (failures: {result.failed or 'none'})")
            break
        if got != n:
            notes.append(f"the receiving twin got {got} messages for {n} delivered")
        if run_index:
            rates.append(n / result.elapsed)
            accept.extend(result.accept_latency)
            cpu.append([u / n * 1e6 for u in used])
    if not rates:
        ctx.progress.done(text="no complete run")
        for note in notes:
            ctx.progress.note(note)
        return
    msgs = Stats.of(rates)
    mb = Stats.of([r * size / 1e6 for r in rates])
    acc = Stats.of([a * 1e3 for a in accept])
    fig_key = f"bus.{key}.{label}"
    name = f"bus, acked {size_shown} msgs twin → twin, {shown}"
    per_part = [Stats.of([c[i] for c in cpu]).median for i in range(len(cpu[0]))]
    parts = ", ".join([f"twins {per_part[0]:.0f}",
                       *(f"{d.name} {v:.0f}" for d, v in zip(daemons, per_part[1:],
                                                               strict=True))])
    _cpu_notes[fig_key] = f"{shown}, {size_shown}: {parts}; {sum(per_part):.0f} µs in all"
    _cpu_total[fig_key] = sum(per_part)
    accepted = f"send_soon() → accepted median {acc.median:.2f} ms"
    if size == SMALL:
        figure = Figure(key=fig_key, group=TITLE, name=name, value=msgs.median, unit="msgs/s",
                        spread=(msgs.low, msgs.high), spread_kind=f"min-max of {msgs.n}",
                        detail=f"{mb.median:.2f} MB/s; {accepted}", notes=notes,
                        floor_key="floor.tcp_100b")
    else:
        figure = Figure(key=fig_key, group=TITLE, name=name, value=mb.median, unit="MB/s",
                        spread=(mb.low, mb.high), spread_kind=f"min-max of {mb.n}",
                        detail=f"{msgs.median:,.0f} msgs/s; {accepted}", notes=notes,
                        floor_key="floor.tcp_64k")
    ctx.add(figure)
    ctx.progress.done(figure)


async def _latency(
    ctx: Context, key: str, shown: str, sender: BusClient, destination: PublicKey, count: int
) -> None:
    ctx.progress.start(f"bus latency via {shown}: 100 B x {count}, one at a time")
    payload = nacl.utils.random(SMALL)
    samples: list[float] = []
    accept: list[float] = []
    bound = Bound(LATENCY_BOUND)
    notes: list[str] = []
    for index in range(10 + count):
        started = time.perf_counter()
        message_id = await sender.send(destination, (SCHEMA_ID, payload))
        accepted = time.perf_counter()
        status, code = await sender.wait_status(message_id, timeout=STATUS_TIMEOUT)
        took = time.perf_counter() - started
        if status != "delivered":
            notes.append(f"a message ended {status} ({code}); round trips stopped")
            break
        if index >= 10:
            samples.append(took * 1e3)
            accept.append((accepted - started) * 1e3)
        if bound.expired:
            notes.append(f"stopped after {len(samples)} samples at the {LATENCY_BOUND:g} s bound")
            break
    if not samples:
        ctx.progress.done(text="no sample")
        return
    stats = Stats.of(samples)
    acc = Stats.of(accept)
    figure = ctx.add(Figure(
        key=f"bus.{key}.latency", group=TITLE,
        name=f"bus latency, 100 B send → delivered, {shown}", value=stats.median, unit="ms",
        spread=(stats.p10, stats.p90), spread_kind="p10-p90",
        detail=f"p99 {stats.p99:.2f} ms, n={stats.n}; of which send() → accepted "
               f"{acc.median:.2f} ms (median)",
        notes=notes, floor_key="floor.echo_rtt"))
    ctx.add(Figure(
        key=f"bus.{key}.latency_p99", group=TITLE,
        name=f"bus latency p99, 100 B send → delivered, {shown}", value=stats.p99, unit="ms",
        detail=f"n={stats.n}", floor_key="floor.echo_rtt"))
    ctx.progress.done(figure)


# ---------------------------------------------------------- peer ratios

# (our figure, peer figure, goal or None, what the goal says)
PEER_RATIOS: tuple[tuple[str, str, float | None, str], ...] = (
    ("bus.2nic.100b", "peer.rns.channel.direct", 7.0,
     "issue 4: acked 100 B msgs/s ≥ 7x Reticulum"),
    ("bus.3nic.100b", "peer.rns.channel.2hop", 7.0,
     "issue 4: acked 100 B msgs/s ≥ 7x Reticulum"),
    ("bus.2nic.100b", "peer.libp2p.stream.100b", 2.5,
     "issue 4: acked 100 B msgs/s ≥ 2.5x libp2p's un-acked stream"),
    ("bus.2nic.64k", "peer.libp2p.stream.64k", 1.3,
     "issue 4: 64 KiB ≥ 1.3x libp2p"),
    ("bus.2nic.64k", "peer.rns.resource.64k", None, ""),
    ("bus.2nic.latency", "peer.rns.rtt", None, ""),
    ("bus.2nic.latency", "peer.libp2p.rtt", None, ""),
)


def _add_peer_ratios(ctx: Context) -> None:
    """One `x` figure per comparison: twinmesh ÷ peer (for times: peer ÷ twinmesh, so
    above 1x always means twinmesh is better)."""
    for ours_key, peer_key, goal, source in PEER_RATIOS:
        ours = ctx.get(ours_key)
        if ours is None:
            continue
        peer = ctx.get(peer_key)
        peer_name = PEER_NAMES.get(peer_key, peer_key)
        name = f"twinmesh ÷ {peer_name} ({_ratio_subject(ours)})"
        figure = Figure(key=f"ratio.{ours_key}.{peer_key}", group=TITLE, name=name,
                        value=float("nan"), unit="x",
                        goal=Goal(goal, source) if goal is not None else None)
        if peer is None or peer.missing:
            figure.missing = (peer.missing if peer is not None and peer.missing
                              else "the peer was not measured in this run")
        else:
            lower = ours.unit in ("s", "ms", "us")
            figure.value = peer.value / ours.value if lower else ours.value / peer.value
            figure.detail = (f"{fmt_value(ours.value, ours.unit)} ÷ "
                             f"{fmt_value(peer.value, peer.unit)}"
                             if not lower else
                             f"{fmt_value(peer.value, peer.unit)} ÷ "
                             f"{fmt_value(ours.value, ours.unit)} (times: peer ÷ ours)")
        ctx.add(figure)


PEER_NAMES = {
    "peer.rns.channel.direct": "Reticulum Channel, direct",
    "peer.rns.channel.2hop": "Reticulum Channel, 2 hops",
    "peer.rns.resource.64k": "Reticulum Resource 64 KiB",
    "peer.rns.rtt": "Reticulum delivery-proof RTT",
    "peer.libp2p.stream.100b": "libp2p stream 100 B (un-acked)",
    "peer.libp2p.stream.64k": "libp2p stream 64 KiB",
    "peer.libp2p.rtt": "libp2p stream echo RTT",
}


def _ratio_subject(figure: Figure) -> str:
    return figure.name.removeprefix("bus, ").removeprefix("bus ")


# ------------------------------------------------------------------ profile


def _write_profile_summary(profile_dir: Path) -> None:
    out = io.StringIO()
    for path in sorted(profile_dir.rglob("*.prof")):
        out.write(f"==== {path.relative_to(profile_dir)}\n")
        try:
            stats = pstats.Stats(str(path), stream=out)
        except (OSError, TypeError, EOFError) as exc:
            out.write(f"(unreadable: {exc})\n")
            continue
        stats.sort_stats("tottime").print_stats(25)
    (profile_dir / "summary.txt").write_text(out.getvalue(), "utf-8")


# ------------------------------------------------------------------- method


def method(ctx: Context) -> str:
    p = plan(ctx)
    setup = (" In this run: " + "; ".join(_setup_notes) + ".") if _setup_notes else ""
    return f"""\
Real `pnicd` processes (the console script of this venv), each with a fresh state
directory, `--listen tcp://127.0.0.1:0` and default settings (outbox in sqlite, WAL,
`synchronous=FULL`, group commit; JSON logs at info level to a file). *2 NICs*: n2
dials n1 (key pinned). *3-NIC line*: n2 dials n1, n3 dials n2, so messages cross n2
as a transit hop. Two twins in this process, each a `BusClient` on its NIC's
`twins.sock`: the sender A on n1, the receiver B on the last NIC (receiving, no
inbox store, so dedup is in memory). B's application task takes every message
with `receive()`. Before timing, A sends until one message is delivered (B's location
record has reached n1).{setup}

- **acked msgs/s (100 B) and MB/s (64 KiB)**: one sender task keeps a window of
  messages ({WINDOW[SMALL]} for 100 B, {WINDOW[LARGE]} for 64 KiB) in flight: it calls
  `send_soon()` (sealed in the twin, submission queued, no task waits for it) while
  fewer than a window are open, and a message closes when its status, reported
  through `on_statuses`, says `delivered` (B's end-to-end ack has reached n1 and
  closed the outbox entry). Timed from the first `send_soon()` to the last `delivered`;
  {p["small"]} x 100 B or {p["large"]} x 64 KiB per run, median and min-max of
  {p["runs"]} runs after a warm-up run. A run counts only if every message was
  delivered within {RUN_TIMEOUT:g} s; B's application count is checked against it
  (exactly once). The detail's *accepted* is `send_soon()` → n1 has committed the
  message to its outbox (every {ACCEPT_SAMPLE}th message is timed). MB/s counts
  payload bytes (10⁶ B). Ratio: against the raw TCP floor for the same size (one way,
  no acks, no crypto). 64 KiB has the smaller window because 256 x 64 KiB queue for
  longer than the outbox's first retry (0.25 s): the
  NIC then retransmits messages that are still queued, and the run gets slower.
- **latency**: one 100 B message at a time (no other traffic): `send()` →
  `delivered`, {p["pings"]} messages after 10 warm-up ones; median, p10-p90, p99. The
  detail gives the part until `send()` returned (the durable commit at n1).
  Ratio: against the trio TCP echo RTT floor.
- **twinmesh ÷ peer**: our figure divided by the peer's figure from the same run (for
  latencies the peer's divided by ours), so above 1x means twinmesh is ahead.
  Reticulum's `Channel` is acked end to end like the bus (but not durable); libp2p's
  stream is not acked per message at all (see *Peer systems*).
{reading(ctx)}
How the CPU per message was cut (issue 4; profiles of every process with cProfile,
`BENCH_PROFILE=DIR python -m bench --only bus` writes `DIR/*/n*.prof`,
`DIR/twins.prof` and `DIR/summary.txt`): before, 2 NICs, 100 B took 769 µs of CPU
per message in all (twins 295, n1 303, n2 170) and 1.9 k msgs/s; 64 KiB 2700 µs.

- Everything that piles up while a task sleeps goes out together, so wake-ups,
  system calls and Cap'n Proto frames are shared by many messages: a twin's
  submissions go out as one `submits` frame from one writer task (no lock hand-off
  between sender tasks); the NIC answers with `results`, `statusUpdates` and
  `deliveries` list frames; the envelopes queued for one NIC travel as one overlay
  packet (`NicBus.envelopes`, one link frame and one AEAD for all of them).
- One ack envelope answers every message of a `deliveries` frame from one source
  (`Envelope.moreAcks`), and acks get no `result` (request id 0).
- The source NIC no longer hands the ack to the sending twin (its `delivered` status
  update says it), and "accepted" carries the first "sent" (one item, not two).
- Envelopes and sealed bodies are written and read as flat Cap'n Proto messages by a
  few lines of `struct` (`bus.crypto`): pycapnp costs about 1 µs per field, and each
  NIC reads two headers per message; anything not flat still goes through pycapnp,
  and a property test checks both read the same.
- The outbox's sqlite file no longer zeroes freed pages (`secure_delete = FAST`):
  each acked 64 KiB envelope was written twice more. The first retry follows the ack
  delays (srtt + 4 rttvar, Karn), so a busy NIC does not resend what is only queued.
- One task keeps the benchmark's window full with `send_soon` (a task per message
  cost ~25 µs of the twins' CPU per message), and the sending twin writes a long
  burst every 64 submissions as it seals it (`EARLY_WRITE_ITEMS`), so n1 commits and
  forwards the first part while the twin seals the rest (~30% more msgs/s).
  Smaller batches in every process (at most 64 items per frame) were tried earlier and
  cost more CPU per message than they gained in overlap.

What is left: the processes overlap only in part (1.2-1.6 of the 2 cores busy), and
the CPU per message is spread thin: sealing and opening, pycapnp list items
(results, status updates), the outbox core's bookkeeping, sqlite's two B-trees
(7-9 µs to insert and 3.5-5 µs to finish each message, `executemany` no faster),
hashing of keys, and for 64 KiB the four AEAD passes (~210 µs), the copies at every
layer and the sqlite write of each envelope.
"""


def reading(ctx: Context) -> str:
    """What this run's figures say about where the CPU goes and what the goals need."""
    lines: list[str] = []
    if _cpu_notes:
        lines.append("- CPU per delivered message in µs (user + system, median of the runs; "
                     "*twins* is this process: both `BusClient`s, sealing, opening and "
                     "acking, and the harness):")
        lines += [f"  - {note}" for note in _cpu_notes.values()]
    small = ctx.get("bus.2nic.100b")
    total = _cpu_total.get("bus.2nic.100b")
    if small is not None and total:
        cores = len(os.sched_getaffinity(0))
        lines.append(
            f"- 2 NICs, 100 B: {total:.0f} µs of CPU per message in all means at most "
            f"{cores * 1e6 / total:,.0f} msgs/s on {cores} cores if every process ran "
            f"flat out in parallel; measured {small.value:,.0f} msgs/s "
            f"(other work on the machine takes its share: see *load* above).")
        for ratio_key, factor in (("ratio.bus.2nic.100b.peer.rns.channel.direct", 7.0),
                                  ("ratio.bus.2nic.100b.peer.libp2p.stream.100b", 2.5)):
            ratio = ctx.get(ratio_key)
            if ratio is None or ratio.missing:
                continue
            target = small.value / ratio.value * factor
            budget = cores * 1e6 / target
            gap = (f"{total / budget:.1f}x less than now" if budget < total else
                   f"more than the {total:.0f} µs it takes now; at that CPU cost it needs "
                   f"{total * target / 1e6:.2f} of the {cores} cores busy on average (this "
                   f"run kept {total * small.value / 1e6:.2f} busy)")
            lines.append(
                f"- The goal {factor:g}x {PEER_NAMES[ratio_key.split('.', 4)[-1]]} means "
                f"{target:,.0f} msgs/s here: at most {budget:.0f} µs of CPU per message "
                f"across all processes if they ran in parallel on every core, {gap}.")
    direct, two_hops = ctx.get("peer.rns.channel.direct"), ctx.get("peer.rns.channel.2hop")
    if (small is not None and direct is not None and two_hops is not None
            and not direct.missing and not two_hops.missing and two_hops.value > direct.value):
        lines.append(
            f"- Reticulum's Channel was faster across 2 hops ({two_hops.value:,.0f} msgs/s) "
            f"than direct ({direct.value:,.0f}) in this run: on direct loopback its "
            "retransmission timers fire more often here (see the detail of its row), its "
            "window shrinks and it backs off. Against its 2-hop figure twinmesh's 2-NIC "
            f"rate is {small.value / two_hops.value:.2f}x.")
    if not lines:
        return ""
    return "\nReading the figures:\n\n" + "\n".join(lines) + "\n"
