"""findDigitalTwinById: `BusClient.find` latency, rounds and hops in a 20-NIC mesh.

Twenty real `pnicd` processes on 127.0.0.1 in a seeded random mesh, one twin on each;
twins on a few NICs look up random other twins, one lookup at a time.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from bench.bus import Daemon, _start, _stop, _wait_twins_socket
from bench.measure import Bound, Context, Figure, Goal, Stats
from twinmesh.bus.client import BusClient, BusError, Found
from twinmesh.control.admin_client import admin_call
from twinmesh.errors import AdminError
from twinmesh.identity.keys import Identity
from twinmesh.proto.dht import DhtConfig

TITLE = "Twin lookup (findDigitalTwinById)"
NICS = 20
EXTRA_LINKS = 10  # on top of a random spanning tree: degree ~3, a few hops across
SOURCES = 5  # NICs whose twins ask
SEED = 5
READY_TIMEOUT = 60.0  # every NIC routes to every other; every twin findable
RUN_BOUND = 120.0
GOAL = Goal(5.0, "issue 5: a few ms on loopback")

_notes: list[str] = []


def plan(ctx: Context) -> dict[str, int]:
    return {"lookups": ctx.pick(400, 100)}


def mesh_edges(rng: random.Random) -> list[tuple[int, int]]:
    """(dialler, listener): each NIC after the first dials one earlier NIC (a random
    tree), plus `EXTRA_LINKS` random chords."""
    edges = {(i, rng.randrange(i)) for i in range(1, NICS)}
    while len(edges) < NICS - 1 + EXTRA_LINKS:
        a, b = rng.sample(range(NICS), 2)
        if (a, b) not in edges and (b, a) not in edges:
            edges.add((max(a, b), min(a, b)))
    return sorted(edges)


async def _mesh(root: Path, edges: list[tuple[int, int]], stack: AsyncExitStack) -> list[Daemon]:
    daemons: list[Daemon] = []
    stack.push_async_callback(_stop, daemons)
    for index in range(NICS):
        extra: list[str] = []
        for dialler, listener in edges:
            if dialler == index:
                extra += ["--peer", daemons[listener].pinned]
        name = f"n{index + 1}"
        daemons.append(await _start(root / name, name, extra, None))
    for daemon in daemons:
        await _wait_twins_socket(daemon)
    return daemons


async def _all_routes(daemons: list[Daemon]) -> None:
    with trio.fail_after(READY_TIMEOUT):
        for daemon in daemons:
            while True:
                try:
                    rows = await admin_call(daemon.state_dir, "routes")
                except AdminError:
                    rows = []
                if len(rows) >= NICS:
                    break
                await trio.sleep(0.05)


async def _findable(client: BusClient, twins: list[Identity]) -> None:
    with trio.fail_after(READY_TIMEOUT):
        for twin in twins:
            while True:
                try:
                    await client.find(twin.public)
                    break
                except BusError:
                    await trio.sleep(0.1)


async def run(ctx: Context) -> None:
    p = plan(ctx)
    rng = random.Random(SEED)
    edges = mesh_edges(rng)
    ctx.progress.start(f"lookup: {NICS} pnicd in a random mesh, {p['lookups']} finds")
    twins = [Identity.generate() for _ in range(NICS)]
    samples: list[float] = []
    nic_side: list[float] = []
    answers: list[Found] = []
    failed = 0
    try:
        with tempfile.TemporaryDirectory(prefix="twinmesh-bench-lookup-") as tmp:
            async with AsyncExitStack() as stack:
                daemons = await _mesh(Path(tmp), edges, stack)
                await _all_routes(daemons)
                clients = [await stack.enter_async_context(
                    BusClient.connect(twin, daemon.state_dir, receive=False))
                    for twin, daemon in zip(twins, daemons, strict=True)]
                await _findable(clients[0], twins)
                sources = rng.sample(range(NICS), SOURCES)
                bound = Bound(RUN_BOUND)
                for index in range(p["lookups"]):
                    source = sources[index % SOURCES]
                    target = rng.choice([t for t in range(NICS) if t != source])
                    started = time.perf_counter()
                    try:
                        found = await clients[source].find(twins[target].public)
                    except BusError:
                        failed += 1
                        continue
                    samples.append((time.perf_counter() - started) * 1e3)
                    nic_side.append(found.elapsed * 1e3)
                    answers.append(found)
                    if bound.expired:
                        _notes.append(f"stopped after {index + 1} lookups at the "
                                      f"{RUN_BOUND:g} s bound")
                        break
    except (RuntimeError, BusError, trio.TooSlowError) as exc:
        _notes.append(f"stopped early: {exc or 'timeout'}")
    if not samples:
        ctx.progress.done(text="no sample")
        return
    stats, nic = Stats.of(samples), Stats.of(nic_side)
    rounds = [a.rounds for a in answers]
    hops = [a.hops for a in answers]
    queried = [a.queried for a in answers]
    detail = (f"p99 {stats.p99:.2f} ms, n={stats.n}, {failed} not found; NIC side "
              f"{nic.median:.2f} ms; rounds {statistics.fmean(rounds):.2f} mean / "
              f"{max(rounds)} max; NICs asked {statistics.fmean(queried):.1f}; "
              f"overlay hops to the twin {statistics.fmean(hops):.2f} / {max(hops)}")
    figure = ctx.add(Figure(
        key="lookup.20nic", group=TITLE,
        name=f"twin lookup, BusClient.find, {NICS}-NIC mesh", value=stats.median, unit="ms",
        spread=(stats.p10, stats.p90), spread_kind="p10-p90", detail=detail, goal=GOAL,
        notes=list(_notes), floor_key="floor.echo_rtt"))
    ctx.add(Figure(
        key="lookup.20nic.p99", group=TITLE,
        name=f"twin lookup p99, BusClient.find, {NICS}-NIC mesh", value=stats.p99,
        unit="ms", detail=f"n={stats.n}", floor_key="floor.echo_rtt"))
    ctx.progress.done(figure)


def method(ctx: Context) -> str:
    p = plan(ctx)
    config = DhtConfig()
    return f"""\
{NICS} real `pnicd` processes (default settings, `--listen tcp://127.0.0.1:0`), linked
in a random mesh drawn with seed {SEED}: each NIC dials one earlier NIC (a random
spanning tree, keys pinned) plus {EXTRA_LINKS} random extra links. Once every NIC has a
route to every other, one twin attaches to each NIC (`BusClient.connect` in this
process, which publishes its signed location record: the NIC floods it and stores it
on the k = {config.k} NICs closest to the twin key), and the bench waits until n1 can
find every twin. Then the twins of {SOURCES} NICs (chosen with the seed) take turns
to look up a random other twin, one `BusClient.find` at a time, {p["lookups"]} in all.

The figure is the time from `find()` to its answer in the twin (Unix socket both
ways, the NIC's DHT lookup over the overlay, the record's signature checked in the
twin); *NIC side* is what the NIC measured for its lookup alone. Each find is a real
DHT lookup (alpha = {config.alpha} queries in flight, stops once {config.value_quorum}
NICs, the asking one included, returned a record, or when the k closest have all
answered): a NIC does not answer from what it already holds. *Rounds* is the longest
chain of answers a lookup waited for; *overlay hops* is the route metric from the
asking NIC to the NIC in the record. With {NICS} NICs and k = {config.k}, each NIC
learns every other from its route table, so a lookup asks the closest NICs directly:
one round. How rounds grow with the NIC count is in docs/SCALING.md (the same core at
100 and 1 000 NICs on the simulator). Ratio: against the trio TCP echo RTT floor.
"""
