"""Real `pnicd` processes: startup time, the memory one holds while idle with one link,
and overlay ping round trips between them, direct and across 2 hops."""

from __future__ import annotations

import math
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.measure import Bound, Context, Figure, Goal, Stats
from twinmesh.control.admin_client import AdminClient, admin_call
from twinmesh.errors import AdminError

TITLE = "pnicd process"
START_TIMEOUT = 20.0
LINK_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
IDLE_SECONDS = 2.0
POLL = 0.005  # admin socket polling while waiting for startup
ROUTE_TIMEOUT = 15.0  # seconds for M to learn a route to Q (through P)
PING_WARMUP = 20
PING_TIMEOUT = 2.0  # seconds one ping may wait for its pong
PING_BOUND = 60.0  # seconds one series of pings may take in all
MAX_LOST = 10  # pings without a pong before a series is given up
PING_GOAL_FACTOR = 2.0  # issue 6: NIC ping ≤ 2x the trio echo floor


def plan(ctx: Context) -> dict[str, int]:
    return {"runs": ctx.pick(3, 1), "pings": ctx.pick(1000, 200)}


def method(ctx: Context) -> str:
    p = plan(ctx)
    return f"""\
Real processes started with the `pnicd` entry point of this venv, each with a fresh
state directory in a temporary directory (a new key is generated on first start), JSON
logs to a file, no health endpoint.

- A peer `pnicd` (P) is started first with `--listen tcp://127.0.0.1:0`. Then the
  measured `pnicd` (M) is started with `--listen tcp://127.0.0.1:0 --peer <P's
  URI>?key=<P's key>`.
- **startup time**: from just before M's process is spawned until its admin socket
  answers `self` (polled every {POLL * 1e3:g} ms); this includes the interpreter start,
  imports and schema loading, key generation, and binding the listener.
- **idle RSS**: once M's `peers` shows the link up, wait {IDLE_SECONDS:g} s (keepalives
  run), then read `VmRSS` from `/proc/<pid>/status` of M. The detail gives the peak
  (`VmHWM`) and P's RSS (P holds the inbound end of the link).
- {p["runs"]} run(s), each with new processes; median and min-max. The processes get
  SIGTERM afterwards.
- **NIC ping RTT**: in the last run, after RSS is read, a third `pnicd` (Q) is started
  with `--peer` P as well, so M → P → Q is a line of 2 hops. Once M's admin `routes`
  lists Q (polled every 20 ms, at most {ROUTE_TIMEOUT:g} s), pings go out one at a time
  through M's admin socket (`ping KEY`, as `twinctl nic ping -i 0` does), each sent as
  soon as the previous answer is back: {PING_WARMUP} warm-up pings, then {p["pings"]}
  to P (direct) and then {p["pings"]} to Q (2 hops). The RTT is the one M's NIC measures
  from sending the overlay ping until its pong arrives, so the admin socket round trip
  is not in it; it does include encrypting and routing in each NIC on the way and the
  wake-up of every process on the path. Median, p10-p90, p99; a lost ping (no pong in
  {PING_TIMEOUT:g} s) is counted in the detail, not in the samples. The ratio is to the
  trio echo floor in one process (as issue 6 states the goal: at most
  {PING_GOAL_FACTOR:g}x it); the detail also gives the ratio to the echo floor across two
  processes, which pays the same process wake-ups as a direct ping.
"""


async def run(ctx: Context) -> None:
    p = plan(ctx)
    startup: list[float] = []
    rss: list[float] = []
    peak: list[float] = []
    peer_rss: list[float] = []
    pings: Pings | None = None
    ctx.progress.start(f"pnicd: startup and idle RSS, {p['runs']} run(s); "
                       f"then {p['pings']} pings direct and over 2 hops")
    for index in range(p["runs"]):
        last = index == p["runs"] - 1
        with tempfile.TemporaryDirectory(prefix="twinmesh-bench-pnicd-") as tmp:
            result, run_pings = await _one_run(Path(tmp), p["pings"] if last else 0)
        pings = run_pings or pings
        startup.append(result["startup"])
        rss.append(result["rss"])
        peak.append(result["hwm"])
        peer_rss.append(result["peer_rss"])
    shown = ""
    if pings is not None and pings.direct.samples and pings.two_hops.samples:
        shown = (f", ping {Stats.of(pings.direct.samples).median:.2f} ms direct, "
                 f"{Stats.of(pings.two_hops.samples).median:.2f} ms 2 hops")
    ctx.progress.done(text=f"startup {Stats.of(startup).median:.0f} ms, "
                           f"RSS {Stats.of(rss).median:.1f} MiB{shown}")
    start = Stats.of(startup)
    ctx.add(
        Figure(key="pnicd.startup", group=TITLE,
               name="pnicd startup (spawn → admin `self` answers)", value=start.median,
               unit="ms", spread=(start.low, start.high), spread_kind=f"min-max of {start.n}",
               detail=f"n={start.n}")
    )
    mem = Stats.of(rss)
    ctx.add(
        Figure(key="pnicd.rss", group=TITLE, name="pnicd idle RSS, one link up",
               value=mem.median, unit="MiB", spread=(mem.low, mem.high),
               spread_kind=f"min-max of {mem.n}",
               detail=f"peak {Stats.of(peak).median:.1f} MiB; the peer: "
               f"{Stats.of(peer_rss).median:.1f} MiB")
    )
    if pings is not None:
        _add_ping(ctx, "direct", "direct (pnicd ↔ pnicd)", pings.direct)
        _add_ping(ctx, "2hop", "2 hops", pings.two_hops)


@dataclass
class PingSeries:
    """The pongs of one series of pings: RTTs in ms, the hop counts seen, what was lost."""

    samples: list[float] = field(default_factory=list)
    hops: set[int] = field(default_factory=set)
    lost: int = 0
    last_error: str = ""
    notes: list[str] = field(default_factory=list)
    missing: str = ""  # why there is no series at all


@dataclass
class Pings:
    direct: PingSeries
    two_hops: PingSeries


def _add_ping(ctx: Context, key: str, shown: str, series: PingSeries) -> None:
    floor = ctx.get("floor.echo_rtt")
    goal = (Goal(PING_GOAL_FACTOR * floor.value, "issue 6: NIC ping ≤ 2x the trio echo floor")
            if floor is not None and not floor.missing else None)
    name = f"NIC ping RTT, {shown}"
    p99_name = f"NIC ping RTT p99, {shown}"
    if not series.samples:
        why = series.missing or f"no pong ({series.last_error or 'no sample'})"
        for fig_key, fig_name, fig_goal in ((f"pnicd.ping_{key}", name, goal),
                                             (f"pnicd.ping_{key}_p99", p99_name, None)):
            ctx.add(Figure(key=fig_key, group=TITLE, name=fig_name, value=math.nan, unit="ms",
                           goal=fig_goal, floor_key="floor.echo_rtt", missing=why,
                           notes=series.notes))
        return
    stats = Stats.of(series.samples)
    hops = "/".join(str(h) for h in sorted(series.hops))
    detail = f"p99 {stats.p99:.3f} ms, n={stats.n}, hops={hops}"
    if series.lost:
        detail += f", {series.lost} lost ({series.last_error})"
    procs = ctx.get("floor.echo_rtt_procs")
    if procs is not None and not procs.missing and procs.value > 0:
        detail += f"; {stats.median / procs.value:.1f}x {procs.short or procs.name}"
    ctx.add(Figure(key=f"pnicd.ping_{key}", group=TITLE, name=name, value=stats.median,
                   unit="ms", spread=(stats.p10, stats.p90), spread_kind="p10-p90",
                   detail=detail, goal=goal, floor_key="floor.echo_rtt", notes=series.notes))
    ctx.add(Figure(key=f"pnicd.ping_{key}_p99", group=TITLE, name=p99_name, value=stats.p99,
                   unit="ms", detail=f"n={stats.n}", floor_key="floor.echo_rtt"))


def pnicd_command() -> list[str]:
    script = Path(sys.executable).with_name("pnicd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "twinmesh.nic.main"]


async def _one_run(root: Path, pings: int) -> tuple[dict[str, float], Pings | None]:
    """Start P and M (dialing P); measure M's startup and idle RSS. With `pings`, then
    start Q (dialing P) and ping P and Q from M."""
    processes: list[trio.Process] = []
    try:
        peer_dir = root / "peer"
        peer, _ = await _start(peer_dir, [], processes)
        peer_info = await _wait_self(peer_dir, peer, START_TIMEOUT)
        target = f"{peer_info['listen'][0]}?key={peer_info['key']}"
        measured_dir = root / "measured"
        measured, spawned = await _start(measured_dir, ["--peer", target], processes)
        await _wait_self(measured_dir, measured, START_TIMEOUT)
        startup = (time.perf_counter() - spawned) * 1e3
        with trio.fail_after(LINK_TIMEOUT):
            for _ in range(int(LINK_TIMEOUT / 0.02)):
                rows = await admin_call(measured_dir, "peers")
                if any(row["state"] == "up" for row in rows):
                    break
                await trio.sleep(0.02)
            else:
                raise RuntimeError(f"pnicd did not link to its peer within {LINK_TIMEOUT:g} s")
        await trio.sleep(IDLE_SECONDS)
        status = read_status(measured.pid)
        peer_status = read_status(peer.pid)
        result = {
            "startup": startup,
            "rss": status["VmRSS"],
            "hwm": status["VmHWM"],
            "peer_rss": peer_status["VmRSS"],
        }
        if not pings:
            return result, None
        far_dir = root / "far"
        far, _ = await _start(far_dir, ["--peer", target], processes)
        far_info = await _wait_self(far_dir, far, START_TIMEOUT)
        return result, await _ping_both(measured_dir, peer_info["key"], far_info["key"], pings)
    finally:
        await _stop(processes)


async def _ping_both(measured_dir: Path, near: str, far: str, count: int) -> Pings:
    """Wait until M has routes to P and Q, then ping P (direct), then Q (2 hops)."""
    missing = await _wait_routes(measured_dir, {near, far})
    if missing:
        return Pings(PingSeries(missing=missing), PingSeries(missing=missing))
    async with AdminClient(measured_dir) as client:
        direct = await _ping_series(client, near, count)
        two_hops = await _ping_series(client, far, count)
    return Pings(direct, two_hops)


async def _wait_routes(state_dir: Path, keys: set[str]) -> str:
    """Wait until `routes` of the NIC in `state_dir` lists every key of `keys`.

    Returns "" then, or why not once ROUTE_TIMEOUT has passed."""
    known: set[str] = set()
    with trio.move_on_after(ROUTE_TIMEOUT):
        while True:
            rows = await admin_call(state_dir, "routes")
            known = {row["destination"] for row in rows}
            if keys <= known:
                return ""
            await trio.sleep(0.02)
    return (f"no route to {len(keys - known)} of {len(keys)} NIC(s) after "
            f"{ROUTE_TIMEOUT:g} s")


async def _ping_series(client: AdminClient, key: str, count: int) -> PingSeries:
    series = PingSeries()
    bound = Bound(PING_BOUND)
    for index in range(PING_WARMUP + count):
        reply = await client.call("ping", key, timeout=PING_TIMEOUT)
        if reply["rtt"] is None:
            series.lost += 1
            series.last_error = reply["error"]
            if series.lost >= MAX_LOST:
                series.notes.append(f"stopped after {series.lost} pings without a pong "
                                    f"(last: {reply['error']})")
                break
        elif index >= PING_WARMUP:
            series.samples.append(reply["rtt"] * 1e3)
            series.hops.add(reply["hops"])
        if bound.expired:
            series.notes.append(f"stopped after {len(series.samples)} samples at the "
                                f"{PING_BOUND:g} s bound")
            break
    return series


async def _start(
    state_dir: Path, extra: list[str], processes: list[trio.Process]
) -> tuple[trio.Process, float]:
    state_dir.mkdir(mode=0o700)
    cmd = [*pnicd_command(), "--state-dir", str(state_dir), "--listen", "tcp://127.0.0.1:0",
           "--log-format", "json", *extra]
    log = open(state_dir / "pnicd.log", "ab")  # noqa: SIM115 (the child owns it)
    try:
        spawned = time.perf_counter()
        process = await trio.lowlevel.open_process(cmd, stdout=log, stderr=log)
    finally:
        log.close()  # the child holds its own copy of the descriptor
    processes.append(process)
    return process, spawned


async def _wait_self(state_dir: Path, process: trio.Process, timeout: float) -> Any:
    with trio.fail_after(timeout):
        for _ in range(int(timeout / POLL)):
            if process.poll() is not None:
                log = (state_dir / "pnicd.log").read_text("utf-8", "replace")[-2000:]
                raise RuntimeError(f"pnicd in {state_dir} exited with {process.returncode}:\n"
                                   f"{log}")
            if (state_dir / "admin.sock").exists():
                try:
                    return await admin_call(state_dir, "self")
                except AdminError:
                    pass
            await trio.sleep(POLL)
    raise RuntimeError(f"pnicd in {state_dir} did not answer `self` within {timeout:g} s")


async def _stop(processes: list[trio.Process]) -> None:
    with trio.CancelScope(shield=True):
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            for process in processes:
                await process.wait()
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()


def read_status(pid: int) -> dict[str, float]:
    """`Vm*` lines of /proc/PID/status, in MiB."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name.startswith("Vm") and rest.strip().endswith("kB"):
                values[name] = int(rest.split()[0]) / 1024
    return values

