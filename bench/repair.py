"""Repair time: how long traffic stops when a link is cut silently or a NIC is killed.

Five real `pnicd` processes in a ring of Linux network namespaces (see
`twinmesh.testing.netns`). Needs root; without it the group records why it was
skipped and adds no figures.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bench.measure import Context, Figure, Goal, Stats
from twinmesh.proto.link import LinkConfig
from twinmesh.testing import netns
from twinmesh.testing.netns import Lab, LabNics, open_lab, open_lab_nics, ring
from twinmesh.testing.processes import write_config

TITLE = "Repair after a cut link or a killed NIC"
N = 5
REPAIR_BOUND = 15.0  # seconds one repair may take before it counts as failed
RESTORE_BOUND = 20.0  # for a restored link or restarted NIC to be back in the ring
PING_TIMEOUT = 0.2  # each probe ping; probes go back to back
DETECT_POLL = 0.01  # `peers` polling for the moment the NIC declares the link down
GOAL = Goal(2.0, "issue 3: traffic flows again ≤ 2 s after a link is cut")


@dataclass(frozen=True)
class Timers:
    """One pnicd config under test: the link timers, and fast reconnects (for restoring)."""

    name: str
    keepalive_interval: float
    dead_after: float

    def toml(self) -> str:
        return (f"[link]\nkeepalive_interval = {self.keepalive_interval:g}\n"
                f"dead_after = {self.dead_after:g}\n\n"
                "[reconnect]\ninitial = 0.2\nmax = 2.0\n")

    @property
    def shown(self) -> str:
        return f"keepalive {self.keepalive_interval:g} s, dead_after {self.dead_after:g} s"


TUNED = Timers("tuned", keepalive_interval=0.25, dead_after=1.0)
# Read from LinkConfig itself, so the figure follows the defaults pnicd ships with.
DEFAULTS = Timers("default", keepalive_interval=LinkConfig().keepalive_interval,
                  dead_after=LinkConfig().dead_after)


@dataclass
class Samples:
    both: list[float] = field(default_factory=list)  # until both ends reach each other
    first: list[float] = field(default_factory=list)  # until the first of the two does
    detect: list[float] = field(default_factory=list)  # until a side declares the link dead
    rejoin: list[float] = field(default_factory=list)  # restarted NIC reached directly again
    hops: set[int] = field(default_factory=set)
    failed: int = 0


_skipped: str | None = None  # why the group did not run (set by `run`)


def plan(ctx: Context) -> dict[str, int]:
    return {
        "cuts": ctx.pick(5, 2),
        "kills": ctx.pick(3, 1),
        "default_cuts": ctx.pick(3, 1),
    }


def method(ctx: Context) -> str:
    p = plan(ctx)
    if _skipped is not None:
        return (f"**Skipped in this run: {_skipped}.** This group builds Linux network "
                "namespaces and needs root; run `make bench` as root to measure it.\n")
    return f"""\
Unlike the groups above, this one is not on loopback: five real `pnicd` processes
run in a ring of five Linux network namespaces (`twinmesh.testing.netns`), one veth
pair per ring link with a private /24 on it; each NIC listens on its two link
addresses and the first node of each link dials the second, pinned with `?key=`.
The bench drives them from the host through their admin sockets (in-process admin
calls, no `twinctl` start-up in the timings). Before each repetition every NIC has a
route to every other and the link or NIC under test is back in use.

- **link cut**: `ip link set down` on both ends of one ring link (a silent cut:
  nothing is sent, no RST; the TCP connection just goes quiet). The clock starts just
  before the first `ip` command. Then both ends ping each other over the overlay back
  to back (`ping`, -W {PING_TIMEOUT:g} s each) until a reply arrives (it now comes the
  other way round, 4 hops). The figure is the time until *both* directions got a
  reply; the detail gives the first direction and *detection*: the time until one
  end's `peers` (polled every {DETECT_POLL * 1e3:g} ms) no longer shows the link up.
  The link is brought up again and the ring re-converges before the next cut; each
  repetition cuts the next link round the ring. {p["cuts"]} cuts with the tuned timers,
  {p["default_cuts"]} with the defaults.
- **kill -9**: SIGKILL of one NIC, then its two neighbours ping each other back to
  back as above until both directions get a reply (3 hops, round the other side). The
  detail gives the *rejoin* time: the NIC restarted on the same state dir and ports
  until both neighbours reach it directly again (process start-up, the neighbour's
  dial backoff, routing). {p["kills"]} kill(s), of a different NIC each time.
- **timers**: *tuned* = `[link] keepalive_interval = {TUNED.keepalive_interval:g}`,
  `dead_after = {TUNED.dead_after:g}` (what the namespace tests use); *default* = the
  `LinkConfig` defaults, keepalive {DEFAULTS.keepalive_interval:g} s and dead_after
  {DEFAULTS.dead_after:g} s. Both with `[reconnect] initial = 0.2`, `max = 2.0` (only
  affects how fast a restored link comes back, not the repair).
- A repair not seen within {REPAIR_BOUND:g} s counts as failed (noted, not averaged).
Median and min-max of the repetitions; the goal is the issue's: traffic flows again
≤ {GOAL.value:g} s after a link is cut.
{reading(ctx)}"""


def reading(ctx: Context) -> str:
    """Where the repair time goes, from this run's figures."""
    lines: list[str] = []
    for timers in (TUNED, DEFAULTS):
        figure = ctx.get(f"repair.cut.{timers.name}")
        detect = _detect.get(timers.name)
        if figure is None or detect is None or figure.value != figure.value:  # NaN: none
            continue
        lines.append(
            f"- {timers.name} timers ({timers.shown}): repair {figure.value:.2f} s = "
            f"dead-link detection {detect:.2f} s + {figure.value - detect:.2f} s for the "
            "routers to switch (a seqno request to the far end and its fresh announcement "
            "back round the ring) and for the probes to get through."
        )
    if lines:
        lines.insert(0, "\nReading the figures:\n")
        lines.append(
            "- A silent cut is noticed only by the link keepalives: a link is declared "
            "dead `dead_after` after the last frame it received. Keepalives and their "
            "acks flow both ways, so that last frame is at most one keepalive interval "
            "older than the cut, and detection takes between dead_after minus one "
            "keepalive interval and dead_after (plus the few ms of the `ip` command, "
            "inside the clock). No routing change can beat that: with "
            "the default dead_after of 2 s the goal cannot be met; with 1 s it is, with "
            "the routers' share (about 0.1-0.3 s) to spare."
        )
        lines.append(
            "- A probe in flight when the route changes is lost and costs its "
            f"{PING_TIMEOUT:g} s timeout, so a single repetition carries up to "
            f"{PING_TIMEOUT:g} s of probe granularity (visible in the kill figure: the "
            "first direction gets through in tens of milliseconds)."
        )
        lines.append(
            "- A NIC killed outright is different: its kernel closes the TCP connections "
            "(FIN), so its neighbours see the links end at once and reroute within "
            "milliseconds, whatever the timers."
        )
    return "\n".join(lines) + ("\n" if lines else "")


_detect: dict[str, float] = {}  # median detection per timer set, for `reading`


async def run(ctx: Context) -> None:
    global _skipped
    ok, why = netns.available()
    if not ok:
        _skipped = why
        ctx.progress.note(f"repair: skipped ({why})")
        return
    _skipped = None
    p = plan(ctx)
    for timers, cuts, kills in ((TUNED, p["cuts"], p["kills"]),
                                (DEFAULTS, p["default_cuts"], 0)):
        what = f"repair: {cuts} link cut(s)" + (f", {kills} kill(s)" if kills else "")
        ctx.progress.start(f"{what}, {timers.name} timers, 5-NIC namespace ring")
        with tempfile.TemporaryDirectory(prefix="twinmesh-bench-repair-") as tmp:
            cut, kill = await _ring_run(Path(tmp), timers, cuts, kills)
        figure = _add(ctx, "cut", timers, cut)
        if kills:
            _add(ctx, "kill", timers, kill)
        ctx.progress.done(figure)


async def _ring_run(root: Path, timers: Timers, cuts: int, kills: int) -> tuple[Samples, Samples]:
    config = write_config(root / "pnicd.toml", timers.toml())
    cut, kill = Samples(), Samples()
    with trio.fail_after(60 + (cuts + kills) * (REPAIR_BOUND + RESTORE_BOUND)):
        async with (
            open_lab(N, ring(N)) as lab,
            open_lab_nics(lab, root, config=config) as nics,
        ):
            await nics.wait_converged(timeout=RESTORE_BOUND)
            for rep in range(cuts):
                await _cut_once(lab, nics, rep % N, (rep + 1) % N, cut)
            for rep in range(kills):
                await _kill_once(nics, (2 + rep) % N, kill)
    return cut, kill


async def _both_ways(nics: LabNics, a: int, b: int, since: float, into: Samples) -> None:
    """Ping a->b and b->a back to back until each got a reply; record both times."""
    took: dict[int, float | None] = {}

    async def probe(src: int, dst: int) -> None:
        took[src] = await netns.measure_until(
            lambda: nics.reaches(src, dst, timeout=PING_TIMEOUT), REPAIR_BOUND, since=since)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe, a, b)
        nursery.start_soon(probe, b, a)
    times = [t for t in took.values() if t is not None]
    if len(times) < 2:
        into.failed += 1
        return
    into.both.append(max(times))
    into.first.append(min(times))
    reply = await nics[a].ping(nics.keys[b], timeout=1.0)
    if reply["rtt"] is not None:
        into.hops.add(int(reply["hops"]))


async def _cut_once(lab: Lab, nics: LabNics, a: int, b: int, into: Samples) -> None:
    async def detected() -> bool:
        row = await nics[a].peer(nics.keys[b])
        return row is None or row["state"] != "up"

    started = time.monotonic()
    await lab.set_link(a, b, up=False)
    async with trio.open_nursery() as nursery:

        async def detect() -> None:
            seen = await netns.measure_until(detected, REPAIR_BOUND, interval=DETECT_POLL,
                                             since=started)
            if seen is not None:
                into.detect.append(seen)

        nursery.start_soon(detect)
        await _both_ways(nics, a, b, started, into)
    await lab.set_link(a, b, up=True)
    await _wait(lambda: nics.reaches(a, b, 1), "the restored link carries traffic again")
    await nics.wait_converged(timeout=RESTORE_BOUND)


async def _kill_once(nics: LabNics, victim: int, into: Samples) -> None:
    left, right = (victim - 1) % N, (victim + 1) % N
    started = time.monotonic()
    await nics.kill(victim)
    await _both_ways(nics, left, right, started, into)
    restarted = time.monotonic()
    await nics.start(victim)
    await _wait(lambda: nics.reaches(left, victim, 1), "left neighbour reaches the restarted NIC")
    await _wait(lambda: nics.reaches(right, victim, 1),
                "right neighbour reaches the restarted NIC")
    into.rejoin.append(time.monotonic() - restarted)
    await nics.wait_converged(timeout=RESTORE_BOUND)


async def _wait(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    took = await netns.measure_until(predicate, RESTORE_BOUND, interval=0.02)
    if took is None:
        raise RuntimeError(f"repair bench: {what}: not within {RESTORE_BOUND:g} s")


def _add(ctx: Context, kind: str, timers: Timers, samples: Samples) -> Figure:
    key = f"repair.{kind}.{timers.name}"
    if kind == "cut":
        name = f"link cut → traffic both ways again ({timers.name} timers)"
    else:
        name = f"kill -9 of a NIC → its neighbours reach each other ({timers.name} timers)"
    notes = []
    if samples.failed:
        notes.append(f"{samples.failed} repetition(s) did not repair within {REPAIR_BOUND:g} s")
    if not samples.both:
        return ctx.add(Figure(key=key, group=TITLE, name=name, value=float("nan"), unit="s",
                              notes=[*notes, "no repetition repaired"]))
    both, first = Stats.of(samples.both), Stats.of(samples.first)
    detail = [f"n={both.n}", f"first direction {first.median:.2f} s"]
    if kind == "cut" and samples.detect:
        detect = Stats.of(samples.detect)
        _detect[timers.name] = detect.median
        detail.append(f"detection {detect.median:.2f} s ({detect.low:.2f}-{detect.high:.2f})")
    if samples.rejoin:
        detail.append(f"rejoin after restart {Stats.of(samples.rejoin).median:.2f} s")
    if samples.hops:
        detail.append(f"hops after repair {sorted(samples.hops)}")
    detail.append(timers.shown)
    return ctx.add(
        Figure(key=key, group=TITLE, name=name, value=both.median, unit="s",
               spread=(both.low, both.high), spread_kind=f"min-max of {both.n}",
               detail="; ".join(detail), goal=GOAL if kind == "cut" else None, notes=notes)
    )
