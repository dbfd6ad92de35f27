"""`python -m bench.scale`: many twins on real NICs, each sending at a steady rate.

    python -m bench.scale [--twins 1000] [--nics 20] [--hosts 4] [--rate 1]
                          [--duration 30] [--push 2,5,10] [--out docs/BENCHMARKS.md]

Deploys `--nics` real pnicd processes in a random connected mesh on loopback (each NIC
links to the one before it and to one random earlier NIC), then `--hosts` twind
processes in hosting mode, which between them run `--twins` twins spread round robin
over the NICs. Deployment time runs from the first pnicd start until every twin is
attached and every NIC can route to every other.

Before any load the driver waits (bounded) until the NICs' DHT is quiet: no store
lookup running or waiting on any NIC, read from each pnicd's /metrics.

Load: the driver holds a control connection to every twin and makes each one send a
chat message to a random other twin `--rate` times a second (random phase) for
`--duration` seconds, then waits (bounded) for the deliveries. It is open-loop: one
scheduler task writes the `send` requests when they are due and reads the twins'
answers after the run (errors count as refused), so the driver's own CPU stays small
next to what it measures. Latency is the time from the sender recording a message to
the receiver recording it (both in their twin stores, one machine, one clock; read
back after each run through the twins' control API, `inbox` since the run began: the
stores are the twins' alone). CPU and RSS per NIC and per twin come from /proc; NIC
counters (outbox retries, link frames, DHT messages) from /metrics.

Before deploying (the machine still quiet) it measures the wake floor of
`bench.floor.wake_cost`: the CPU a bare trio process spends on a frame that wakes it,
frames a few ms apart as here. Each message wakes a process at least
`LOCAL_CROSSINGS` times plus once per link frame, so that floor times the crossings is
the least CPU a message can cost with this layout of processes, and the cores divided
by it the most messages/s the machine could carry if every process did nothing else.
`--push` then repeats shorter runs at higher per-twin rates and reports the highest
rate that still delivered everything with p99 under 100 ms. `--profile DIR` runs every
pnicd and twind under cProfile (wall-clock: for where the time goes, not the figures).

Every loop is bounded in count and time; every process started is stopped.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import random
import sys
import time
import urllib.request
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import trio

from bench.floor import WAKE_PAUSE, WakeCost, wake_cost
from bench.measure import percentile, process_cpu
from bench.report import machine
from twinmesh.carriers.unix import connect_unix
from twinmesh.control.admin_client import admin_call
from twinmesh.control.framed import CONTROL_MAX_FRAME, FramedStream
from twinmesh.control.twin_client import connect_twin
from twinmesh.errors import AdminError, ApiError
from twinmesh.testing.processes import console_script, run_pnicd, wait_until
from twinmesh.twin.service import CONTROL_SOCKET
from twinmesh.wire.framing import encode_frame

BEGIN = "<!-- scale:begin -->"
END = "<!-- scale:end -->"
P99_GOAL = 0.100
SETTLE_LIMIT = 60.0
ANSWER_LIMIT = 30.0  # reading back the answers to one run's requests
INBOX_PAGE = 2000  # chat entries per `inbox` answer when collecting (the API's cap: 10 000)
MAX_INBOX_PAGES = 100  # per twin and collection (the twin keeps 100 000 entries at most)
# NIC counters summed over all NICs and reported per message sent.
COUNTERS = {
    "retries": "twinmesh_outbox_retries_total",
    "link frames": 'twinmesh_link_frames_total{direction="out"}',
    "DHT msgs": 'twinmesh_dht_messages_total{direction="out"}',
}
PAGE = os.sysconf("SC_PAGE_SIZE")
# Frames per message that wake another process, besides the link frames: driver →
# sender's twind (send), twind → its NIC (submit), NIC → twind (accepted), receiver's
# NIC → its twind (delivery), twind → NIC (ack), sender's NIC → twind (delivered).
# The answers to the driver are read after the run (no wake-up per message).
LOCAL_CROSSINGS = 6
WAKE_FRAMES = (300, 100)  # back to back, paced: frames per batch of the wake floor


@dataclass
class Run:
    rate: float  # per twin, messages/s
    duration: float
    sent: int = 0
    refused: int = 0
    delivered: int = 0
    latencies: list[float] = field(default_factory=list)
    nic_cpu: float = 0.0  # seconds of CPU per NIC per second of load
    twin_cpu: float = 0.0  # per twin
    driver_cpu: float = 0.0
    elapsed: float = 0.0  # how long the load really took to send
    nic_ms: float = 0.0  # CPU per message sent, all NICs together
    twin_ms: float = 0.0  # all twind processes together
    driver_ms: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)  # COUNTERS per message

    @property
    def crossings(self) -> float:
        """Frames per message that wake a process (NaN without link frame counts)."""
        return LOCAL_CROSSINGS + self.counters.get("link frames", math.nan)

    @property
    def offered(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0

    def p(self, pct: float) -> float:
        ordered = sorted(self.latencies)
        return percentile(ordered, pct) if ordered else float("nan")

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.delivered == self.sent and self.p(99) < P99_GOAL


@dataclass
class Deployment:
    nics: list[Any]
    hosts: list[trio.Process]
    twin_dirs: list[Path]
    twin_ids: list[str]
    seconds: float
    settled: float = 0.0  # seconds until the DHT was quiet, after deployment
    wake: WakeCost | None = None  # measured before deploying


# ------------------------------------------------------------------ deploy

def _profiled(profile: Path | None, name: str) -> list[str]:
    """`python -m cProfile -o PROFILE/NAME.prof` in front of a console script, or nothing."""
    if profile is None:
        return []
    return [sys.executable, "-m", "cProfile", "-o", str(profile / f"{name}.prof")]


async def deploy(stack: AsyncExitStack, root: Path, nics: int, twins: int, hosts: int,
                 rng: random.Random, profile: Path | None = None) -> Deployment:
    started = time.perf_counter()
    nic_procs: list[Any] = []
    for i in range(nics):
        peers: list[str] = []
        if i > 0:
            peers += ["--peer", nic_procs[i - 1].uri("tcp")]
        if i > 2:
            peers += ["--peer", nic_procs[rng.randrange(0, i - 2)].uri("tcp")]
        nic = await stack.enter_async_context(
            run_pnicd(root / f"nic-{i:02d}", *peers,
                      prefix=_profiled(profile, f"nic-{i:02d}")))
        nic_procs.append(nic)
    keys = {n.key for n in nic_procs}

    async def routed() -> bool:
        for nic in nic_procs:
            try:
                routes = await admin_call(nic.state_dir / "admin.sock", "routes")
            except AdminError:
                return False
            if len({r["destination"] for r in routes} & keys) < len(keys) - 1:
                return False
        return True

    await wait_until(routed, 60, interval=0.2, what="every NIC routes to every other")
    per_host = -(-twins // hosts)
    host_procs: list[trio.Process] = []
    twin_dirs: list[Path] = []
    for h in range(hosts):
        count = min(per_host, twins - h * per_host)
        if count <= 0:
            break
        # Rotate the NIC list so host h's twins start on different NICs.
        offset = (h * per_host) % nics
        order = nic_procs[offset:] + nic_procs[:offset]
        argv = [*_profiled(profile, f"host-{h}"), *console_script("twind"), "--host",
                str(count), "--state-root", str(root / f"host-{h}"), "--log-level", "warning"]
        for nic in order:
            argv += ["--nic", str(nic.state_dir)]
        log = open(root / f"host-{h}.log", "ab")  # noqa: SIM115 (the process keeps it)
        process = await trio.lowlevel.open_process(argv, stdout=log, stderr=log)
        stack.push_async_callback(_stop, process)
        host_procs.append(process)
        twin_dirs += [root / f"host-{h}" / f"twin-{i:04d}" for i in range(count)]
    ids: list[str] = []
    for directory in twin_dirs:
        status = await wait_until(lambda d=directory: _attached(d), 120, interval=0.05,
                                  what=f"twin in {directory} attached")
        ids.append(status["twin"])
    return Deployment(nic_procs, host_procs, twin_dirs, ids, time.perf_counter() - started)


async def _attached(directory: Path) -> dict[str, Any] | None:
    if not (directory / "control.sock").exists():
        return None
    try:
        async with connect_twin(directory) as client:
            status: dict[str, Any] = await client.call("status")
    except ApiError:
        return None
    return status if status["connected"] else None


async def _stop(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


# -------------------------------------------------------------------- load

class Driver:
    """Raw control connections, one per twin: requests are written when due, without
    waiting for answers; the answers are read back after the run."""

    def __init__(self, streams: list[trio.SocketStream]) -> None:
        self.streams = streams
        self.framed = [FramedStream(s, max_frame=CONTROL_MAX_FRAME) for s in streams]
        self.unanswered = [0] * len(streams)
        self._ids = itertools.count(1)

    async def send(self, i: int, destination: str, text: str) -> None:
        body = json.dumps({"id": next(self._ids),
                           "send": {"twin": destination, "text": text}}).encode()
        await self.streams[i].send_all(encode_frame(body, CONTROL_MAX_FRAME))
        self.unanswered[i] += 1

    async def call(self, i: int, which: str, value: Any) -> Any:
        """Ask twin `i` one request and return its answer's body (ApiError for an
        error answer). Answers to `send`s that come first (late ones, after `answers`
        stopped waiting) are passed over. One call per twin at a time."""
        request_id = next(self._ids)
        body = json.dumps({"id": request_id, which: value}).encode()
        await self.streams[i].send_all(encode_frame(body, CONTROL_MAX_FRAME))
        while True:
            frame = await self.framed[i].receive()
            if frame is None:
                raise ApiError("disconnected", f"twin {i} closed its control socket")
            answer = json.loads(frame)
            if answer.get("id") == request_id:
                break
            self.unanswered[i] = max(0, self.unanswered[i] - 1)
        if "error" in answer:
            raise ApiError(answer["error"]["code"], answer["error"]["message"])
        return answer[which]

    async def answers(self) -> tuple[int, int]:
        """(answered, refused): read every outstanding answer, bounded in time."""
        counts = [0, 0]

        async def drain(i: int) -> None:
            while self.unanswered[i]:
                body = await self.framed[i].receive()
                if body is None:
                    raise ApiError("disconnected", f"twin {i} closed its control socket")
                self.unanswered[i] -= 1
                counts["error" in json.loads(body)] += 1

        with trio.move_on_after(ANSWER_LIMIT):
            async with trio.open_nursery() as nursery:
                for i in range(len(self.streams)):
                    nursery.start_soon(drain, i)
        return counts[0] + counts[1], counts[1]


async def load(driver: Driver, ids: list[str], run: Run, rng: random.Random) -> None:
    """Every twin sends at `run.rate` (random phase) until `run.duration` is over; one
    task walks the schedule, so the driver wakes once per due batch, not per twin."""
    interval = 1.0 / run.rate
    start = trio.current_time()
    deadline = start + run.duration
    schedule = [(start + rng.uniform(0, interval), i) for i in range(len(ids))]
    heapq.heapify(schedule)
    while schedule[0][0] < deadline:
        due, i = schedule[0]
        if due > trio.current_time():
            await trio.sleep_until(due)
        heapq.heapreplace(schedule, (due + interval, i))
        target = rng.randrange(len(ids) - 1)
        target += target >= i  # anyone but itself
        await driver.send(i, ids[target], f"m{run.sent}")
        run.sent += 1
    _, refused = await driver.answers()
    run.refused = refused


async def collect(driver: Driver, since: float) -> tuple[dict[str, float], dict[str, float]]:
    """(sent id -> time, received id -> time) of the chat entries every twin recorded
    at or after `since`, asked of the twins over their control connections (their
    stores are theirs alone while they run), in pages, all twins at once."""
    sent: dict[str, float] = {}
    received: dict[str, float] = {}

    async def one(i: int) -> None:
        start = since
        for _ in range(MAX_INBOX_PAGES):
            page = await driver.call(i, "inbox", {"since": start, "limit": INBOX_PAGE})
            for entry in page:
                (sent if entry["outgoing"] else received)[entry["id"]] = entry["at"]
            if len(page) < INBOX_PAGE:
                return
            if page[-1]["at"] == start:  # a page of one instant: reading on cannot move
                raise ApiError("tooLarge", f"twin {i}: over {INBOX_PAGE} entries at {start}")
            start = page[-1]["at"]  # that instant's entries come again: counted once
        raise ApiError("tooLarge", f"twin {i}: over {MAX_INBOX_PAGES} pages of chat entries")

    with trio.fail_after(ANSWER_LIMIT):
        async with trio.open_nursery() as nursery:
            for i in range(len(driver.streams)):
                nursery.start_soon(one, i)
    return sent, received


async def measure(deployment: Deployment, driver: Driver, run: Run,
                  rng: random.Random) -> Run:
    since = time.time()
    counters_before = await nic_counters(deployment)
    cpu_before = _cpu(deployment)
    driver_before = time.process_time()
    started = time.perf_counter()
    await load(driver, deployment.twin_ids, run, rng)
    # An overloaded system takes longer than planned to take the load: rates and CPU
    # shares are over the time it really took.
    run.elapsed = max(run.duration, time.perf_counter() - started)
    cpu_after = _cpu(deployment)
    driver_cpu = time.process_time() - driver_before
    run.driver_cpu = driver_cpu / run.elapsed
    nics = len(deployment.nics)
    run.nic_cpu = (cpu_after[0] - cpu_before[0]) / run.elapsed / nics
    run.twin_cpu = (cpu_after[1] - cpu_before[1]) / run.elapsed / len(deployment.twin_ids)
    with trio.move_on_after(SETTLE_LIMIT):
        while True:
            sent, received = await collect(driver, since)
            if len(sent) >= run.sent and all(i in received for i in sent):
                break
            await trio.sleep(1.0)
    sent, received = await collect(driver, since)
    # What the twins recorded as sent counts (a call that timed out in the driver may
    # still have been accepted by its twin).
    run.sent = len(sent)
    run.delivered = sum(1 for i in sent if i in received)
    run.latencies = [received[i] - at for i, at in sent.items() if i in received]
    if run.sent:
        # CPU over the load window, per message the twins took (the deliveries that
        # trail the window are not in it: at the knee this undercounts a little).
        run.nic_ms = (cpu_after[0] - cpu_before[0]) / run.sent * 1000
        run.twin_ms = (cpu_after[1] - cpu_before[1]) / run.sent * 1000
        run.driver_ms = driver_cpu / run.sent * 1000
        counters_after = await nic_counters(deployment)
        run.counters = {label: (counters_after.get(name, math.nan)
                                - counters_before.get(name, math.nan)) / run.sent
                        for label, name in COUNTERS.items()}
    return run


def _scrape(url: str) -> dict[str, float]:
    """`name{labels}` -> value from one pnicd's /metrics (loopback)."""
    with urllib.request.urlopen(url + "metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


async def nic_counters(deployment: Deployment) -> dict[str, float]:
    """Every metric sample summed over the NICs."""
    total: dict[str, float] = {}
    for nic in deployment.nics:
        samples = await trio.to_thread.run_sync(_scrape, nic.health_url)
        for key, value in samples.items():
            total[key] = total.get(key, 0.0) + value
    return total


async def settle(deployment: Deployment) -> float:
    """Seconds until no NIC has a DHT store lookup running or waiting (bounded)."""
    started = time.perf_counter()

    async def quiet() -> bool:
        total = await nic_counters(deployment)
        return (total.get("twinmesh_dht_store_lookups_running", 1.0)
                + total.get("twinmesh_dht_store_lookups_waiting", 1.0)) == 0

    await wait_until(quiet, SETTLE_LIMIT, interval=0.5, what="the DHT to go quiet")
    return time.perf_counter() - started


def _cpu(deployment: Deployment) -> tuple[float, float]:
    nic = sum(process_cpu(n.process.pid) for n in deployment.nics)
    twin = sum(process_cpu(p.pid) for p in deployment.hosts)
    return nic, twin


def _rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


# ------------------------------------------------------------------ report

def markdown(args: argparse.Namespace, deployment: Deployment, base: Run, pushes: list[Run],
             rss_nic: float, rss_twin: float, elapsed: float) -> str:
    twins = len(deployment.twin_ids)
    best = max((r for r in [base, *pushes] if r.ok), key=lambda r: r.offered, default=None)
    lines = [
        BEGIN,
        "## Scale: many twins on one machine",
        "",
        f"`python -m bench.scale --twins {args.twins} --nics {args.nics} --hosts {args.hosts}"
        f" --rate {args.rate:g} --duration {args.duration:g}"
        + (f" --push {args.push}" if args.push else "") + "` (`make scale`), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s in all. "
        f"{args.nics} real pnicd processes in a random connected mesh on loopback; "
        f"{twins} twins in {len(deployment.hosts)} twind processes (hosting mode), spread "
        "round robin over the NICs; a driver process holds one control connection per twin "
        "and makes every twin send chat messages to random other twins at a steady rate "
        "(random phase, open loop: answers are read after each run), starting once the "
        "NICs' DHT is quiet. Latency: sender's twin store record → receiver's twin store "
        "record (same clock). CPU from /proc (user+system) over the load window; the "
        "driver's own CPU is on the same 2 cores; CPU per message is each tier's CPU over "
        "the load window divided by the messages sent. NIC counters (summed over the NICs, "
        "per message sent) from each pnicd's /metrics; n/a where a NIC does not export "
        "one. Machine: "
        + ", ".join(f"{k} {v}" for k, v in machine() if k in ("cpu", "cores", "memory"))
        + ".",
        "",
        "| figure | value | goal | verdict |",
        "|---|---|---|---|",
        f"| deployment ({args.nics} NICs + {twins} twins) | {deployment.seconds:.1f} s "
        f"| ≤ 60 s | {'met' if deployment.seconds <= 60 else 'missed'} |",
        f"| DHT quiet after deployment (no store lookup running or waiting) "
        f"| {deployment.settled:.1f} s later | | |",
        f"| delivered / sent at {base.rate:g} msg/s per twin ({base.offered:.0f} msgs/s) "
        f"| {base.delivered} / {base.sent} ({_pct(base)}) | 100 % "
        f"| {'met' if base.sent and base.delivered == base.sent else 'missed'} |",
        f"| latency p50 / p99 | {base.p(50) * 1000:.1f} / {base.p(99) * 1000:.1f} ms "
        f"| p99 < 100 ms | {'met' if base.p(99) < P99_GOAL else 'missed'} |",
        f"| CPU per NIC / per twin | {base.nic_cpu * 100:.1f} % / {base.twin_cpu * 100:.2f} % "
        "of a core | | |",
        f"| RSS per NIC / per twin | {rss_nic / 2**20:.0f} MiB / {rss_twin / 2**20:.2f} MiB "
        "| | |",
        f"| highest sustained rate (all delivered, p99 < 100 ms) | "
        f"{best.offered:.0f} msgs/s" if best else "| highest sustained rate | none met",
    ]
    lines[-1] += " | ≥ 10 000 msgs/s (seed: 5 000) | " + (
        "met" if best and best.offered >= 10_000 else "missed") + " |"
    wake = deployment.wake
    floor_ms = _floor_ms(base, wake)
    if wake is not None and floor_ms is not None:
        cores = len(os.sched_getaffinity(0))
        ceiling = cores / floor_ms * 1000
        lines += [
            f"| CPU of a bare trio process per frame that wakes it: back to back / "
            f"{WAKE_PAUSE * 1e3:g} ms apart (`bench.floor`, before deploying) "
            f"| {wake.back_to_back.median:.0f} / {wake.paced.median:.0f} µs | | |",
            f"| frames per message that wake a process ({LOCAL_CROSSINGS} local + link "
            f"frames, at {base.rate:g} msg/s per twin) | {base.crossings:.1f} | | |",
            f"| ceiling from those wake-ups alone ({cores} cores ÷ (frames x paced wake "
            f"CPU) = {floor_ms:.2f} ms per message) | {ceiling:,.0f} msgs/s "
            f"| ≥ 10 000 msgs/s | {'below' if ceiling < 10_000 else 'above'} the goal |"]
    lines += ["", "| msg/s per twin | sent msgs/s (load took) | delivered | p50 | p99 | NIC CPU | "
              "twin CPU | driver CPU | CPU ms per msg: NICs / twins / driver | "
              + " | ".join(f"{label} per msg" for label in COUNTERS)
              + " | CPU per msg ÷ wake floor |",
              "|---|---|---|---|---|---|---|---|---|" + "---|" * (len(COUNTERS) + 1)]
    for r in [base, *pushes]:
        lines.append(
            f"| {r.rate:g} | {r.offered:.0f} ({r.elapsed:.0f} s) | {_pct(r)} "
            f"| {r.p(50) * 1000:.1f} ms "
            f"| {r.p(99) * 1000:.1f} ms | {r.nic_cpu * 100:.1f} % | {r.twin_cpu * 100:.2f} % "
            f"| {r.driver_cpu * 100:.0f} % "
            f"| {r.nic_ms:.2f} / {r.twin_ms:.2f} / {r.driver_ms:.2f} | "
            + " | ".join(_counter(r.counters.get(label, math.nan)) for label in COUNTERS)
            + f" | {_above_floor(r, wake)} |")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def _floor_ms(run: Run, wake: WakeCost | None) -> float | None:
    """The least CPU a message of `run` can cost: its wake-ups at the paced floor."""
    if wake is None or math.isnan(run.crossings):
        return None
    return run.crossings * wake.paced.median / 1000


def _above_floor(run: Run, wake: WakeCost | None) -> str:
    """All the CPU a message took, as a multiple of its wake-ups' floor."""
    floor_ms = _floor_ms(run, wake)
    if floor_ms is None:
        return "n/a"
    return f"{(run.nic_ms + run.twin_ms + run.driver_ms) / floor_ms:.1f}x"


def _counter(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _pct(run: Run) -> str:
    return f"{100 * run.delivered / run.sent:.2f} %" if run.sent else "n/a"


def write_section(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


# -------------------------------------------------------------------- main

async def main_async(args: argparse.Namespace) -> str:
    rng = random.Random(args.seed)
    started = time.perf_counter()
    print("scale: measuring the wake floor …", file=sys.stderr, flush=True)
    wake = await wake_cost(*WAKE_FRAMES)
    with TemporaryDirectory(prefix="twinmesh-scale-") as tmp:
        async with AsyncExitStack() as stack:
            print(f"scale: deploying {args.nics} NICs and {args.twins} twins …",
                  file=sys.stderr, flush=True)
            deployment = await deploy(stack, Path(tmp), args.nics, args.twins, args.hosts, rng,
                                      args.profile)
            deployment.wake = wake
            print(f"scale: deployed in {deployment.seconds:.1f} s", file=sys.stderr, flush=True)
            streams = []
            for directory in deployment.twin_dirs:
                stream = await connect_unix(directory / CONTROL_SOCKET)
                stack.push_async_callback(stream.aclose)
                streams.append(stream)
            driver = Driver(streams)
            deployment.settled = await settle(deployment)
            print(f"scale: DHT quiet {deployment.settled:.1f} s later", file=sys.stderr,
                  flush=True)
            runs = []
            for rate, duration in itertools.chain(
                    [(args.rate, args.duration)],
                    [(float(r), min(args.duration, 10.0)) for r in
                     (args.push.split(",") if args.push else [])]):
                print(f"scale: {rate:g} msg/s per twin for {duration:g} s …",
                      file=sys.stderr, end="", flush=True)
                run = await measure(deployment, driver, Run(rate, duration), rng)
                print(f" {run.offered:.0f} msgs/s offered, {_pct(run)} delivered, "
                      f"p99 {run.p(99) * 1000:.1f} ms", file=sys.stderr, flush=True)
                runs.append(run)
                if run.delivered < run.sent:
                    break  # past the knee: higher rates only queue up more
            rss_nic = sum(_rss(n.process.pid) for n in deployment.nics) / len(deployment.nics)
            rss_twin = sum(_rss(p.pid) for p in deployment.hosts) / len(deployment.twin_ids)
            return markdown(args, deployment, runs[0], runs[1:], rss_nic, rss_twin,
                            time.perf_counter() - started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale",
                                     description="many twins on real NICs")
    parser.add_argument("--twins", type=int, default=1000)
    parser.add_argument("--nics", type=int, default=20)
    parser.add_argument("--hosts", type=int, default=4, help="twind processes")
    parser.add_argument("--rate", type=float, default=1.0, help="messages/s per twin")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--push", default="", help="higher per-twin rates to try, e.g. 2,5,10")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the section into this markdown file")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run every pnicd and twind under cProfile, writing DIR/NAME.prof "
                             "(slower: for the shape of the costs, not the figures)")
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    if not (2 <= args.twins <= 5000 and 1 <= args.nics <= 100 and 1 <= args.hosts <= 32):
        parser.error("twins 2-5000, nics 1-100, hosts 1-32")
    if not (0 < args.rate <= 100 and 1 <= args.duration <= 600):
        parser.error("rate 0-100 msg/s per twin, duration 1-600 s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    section = trio.run(main_async, args)
    print(section)
    if args.out is not None:
        write_section(args.out, section)
        print(f"scale: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
