"""Handshake time: a fresh link over loopback TCP and websocket, dial → LinkUp; and the
CPU the handshake costs in the sans-I/O core alone."""

from __future__ import annotations

import time

import trio

from bench.measure import Bound, Context, Figure, Goal, Stats
from twinmesh.carriers.base import Carrier
from twinmesh.carriers.tcp import TcpCarrier
from twinmesh.carriers.uri import PeerUri
from twinmesh.carriers.ws import WebSocketCarrier
from twinmesh.identity.keys import Identity
from twinmesh.nic.session import LinkSession
from twinmesh.proto.link import Link, LinkDown, LinkUp

TITLE = "Link handshake"
GOAL_MS = 2.0
ROUND_TIMEOUT = 5.0
GOAL = Goal(GOAL_MS, "issue: handshake over loopback TCP ≤ 2 ms median")


def plan(ctx: Context) -> dict[str, int]:
    return {"rounds": ctx.pick(200, 30), "core": ctx.pick(500, 100), "warmup": 5}


def method(ctx: Context) -> str:
    p = plan(ctx)
    return f"""\
- **dial → LinkUp (TCP, ws)**: two `LinkSession`s (`twinmesh.nic.session`, the shell
  `pnicd` runs) in this process, the responder behind the carrier's own listener
  (`TcpCarrier.serve` / `WebSocketCarrier.serve`). One round, as `Nic` dials: entering
  `carrier.connect()` (TCP connect; for ws also the HTTP upgrade), a fresh initiator
  `Link`, the session started, until the initiator's `LinkUp` reaches the observer.
  This is the full 1-RTT handshake: both ephemeral keypairs, two ed25519 signatures and
  two verifications, two X25519, the key derivation. *Both ends up* goes on until the
  responder's `LinkUp` too (the initiator's first encrypted frame confirms the
  handshake). Each round then closes the link and waits for both sessions to finish,
  outside the timing. {p["rounds"]} rounds after {p["warmup"]} warm-up rounds; median,
  p10-p90 and p90. Logging as in `pnicd` (structlog, JSON, info level, written to
  /dev/null). Goal: ≤ {GOAL_MS:g} ms median over TCP. Ratio: against the trio TCP echo
  RTT floor (the handshake needs one round trip plus a TCP connect).
- **core only (CPU)**: the same handshake between two `proto.link.Link` cores with
  the bytes handed across directly: no sockets, no tasks. Timed from creating the
  initiator (its ephemeral key and signed hello) to the responder's `LinkUp`.
  {p["core"]} handshakes; median, p10-p90. The detail splits it by side. Ratio: against
  the ed25519 sign+verify floor (the handshake does two of each, plus two X25519).
{reading(ctx)}"""


def reading(ctx: Context) -> str:
    """Where the handshake's time goes, computed from this run's figures."""
    core, tcp, ws = (ctx.get(k) for k in ("handshake.core", "handshake.tcp", "handshake.ws"))
    sign, x25519 = ctx.get("floor.ed25519"), ctx.get("floor.x25519")
    if core is None or tcp is None:
        return ""
    lines = ["", "Reading the figures:", ""]
    crypto = ""
    if sign is not None and x25519 is not None:
        public_key_ops = 2 * sign.value + 2 * x25519.value
        crypto = (f"; {public_key_ops:.0f} µs of that is the public-key work alone "
                  f"(2 x ed25519 sign+verify + 2 x X25519 floors)")
    lines.append(
        f"- The core's CPU, both sides, is {core.value:.0f} µs: "
        f"{100 * core.value / 1e3 / tcp.value:.0f}% of the TCP handshake's "
        f"{tcp.value:.2f} ms{crypto}. The rest is the TCP connect, starting the session "
        "tasks on both ends, trio scheduling and socket I/O, all on one thread here."
    )
    if ws is not None:
        lines.append(
            f"- The websocket carrier adds {ws.value - tcp.value:.2f} ms (the HTTP upgrade "
            "round trip before the link's hello)."
        )
    return "\n".join(lines) + "\n"


async def run(ctx: Context) -> None:
    p = plan(ctx)
    _core_only(ctx, p["core"])
    await _over_carrier(ctx, TcpCarrier(), "tcp://127.0.0.1:0", p["rounds"], p["warmup"])
    await _over_carrier(
        ctx, WebSocketCarrier(), "ws://127.0.0.1:0/pnic", p["rounds"], p["warmup"]
    )


# ---------------------------------------------------------------- over carriers


class _Round:
    """Events of the round in progress; the observer of both ends reports here."""

    def __init__(self) -> None:
        self.initiator_up = trio.Event()
        self.responder_up = trio.Event()
        self.responder: LinkSession | None = None
        self.failure: str | None = None


class _Observer:
    """`LinkObserver` for one end of the benchmark's links."""

    def __init__(self, rounds: list[_Round], role: str) -> None:
        self._rounds = rounds  # the last element is the round in progress
        self._role = role

    def link_up(self, session: LinkSession) -> None:
        current = self._rounds[-1]
        (current.initiator_up if self._role == "initiator" else current.responder_up).set()

    def link_data(self, session: LinkSession, data: bytes) -> None:
        pass

    def link_down(self, session: LinkSession, down: LinkDown) -> None:
        if session.up_since is None:
            current = self._rounds[-1]
            current.failure = f"{self._role}: {down.reason}"
            current.initiator_up.set()
            current.responder_up.set()


async def _over_carrier(
    ctx: Context, carrier: Carrier, listen: str, rounds: int, warmup: int
) -> None:
    scheme = carrier.scheme
    ctx.progress.start(f"handshake over {scheme}: {rounds} rounds")
    initiator_id, responder_id = Identity.generate(), Identity.generate()
    history: list[_Round] = [_Round()]
    responder_observer = _Observer(history, "responder")
    initiator_observer = _Observer(history, "initiator")

    async def accept(stream: trio.abc.Stream, remote: str) -> None:
        core = Link(responder_id, initiator=False, now=trio.current_time())
        session = LinkSession(core, stream, responder_observer, direction="inbound",
                              uri=f"{scheme}://{remote}", carrier=scheme)
        history[-1].responder = session
        await session.run()

    up: list[float] = []
    both: list[float] = []
    bound = Bound(60.0)
    async with trio.open_nursery() as nursery:
        bound_uri = await nursery.start(carrier.serve, PeerUri.parse(listen), accept)
        target = PeerUri(scheme, bound_uri.host, bound_uri.port, bound_uri.path,
                         responder_id.public)
        for index in range(warmup + rounds):
            current = _Round()
            history[:] = [current]
            with trio.fail_after(ROUND_TIMEOUT):
                # As `Nic._link` does it: the link lives inside `carrier.connect()`.
                started = time.perf_counter()
                async with carrier.connect(target) as stream, trio.open_nursery() as inner:
                    core = Link(initiator_id, initiator=True, now=trio.current_time(),
                                expected_peer=responder_id.public)
                    session = LinkSession(core, stream, initiator_observer,
                                          direction="outbound", uri=str(target), carrier=scheme)
                    inner.start_soon(session.run)
                    await current.initiator_up.wait()
                    linked = time.perf_counter()
                    await current.responder_up.wait()
                    confirmed = time.perf_counter()
                    if current.failure is not None:
                        raise RuntimeError(f"handshake over {scheme} failed: {current.failure}")
                    session.close("benchmark round done")
                if current.responder is not None:
                    await current.responder.wait_finished()
            if index >= warmup:
                up.append((linked - started) * 1e3)
                both.append((confirmed - started) * 1e3)
            if bound.expired:
                break
        nursery.cancel_scope.cancel()

    stats = Stats.of(up)
    both_stats = Stats.of(both)
    shown = "TCP" if scheme == "tcp" else "websocket"
    notes = [] if stats.n == rounds else [f"stopped after {stats.n}/{rounds} rounds (60 s bound)"]
    figure = ctx.add(
        Figure(
            key=f"handshake.{scheme}",
            group=TITLE,
            name=f"handshake, loopback {shown}, dial → LinkUp",
            value=stats.median,
            unit="ms",
            spread=(stats.p10, stats.p90),
            spread_kind="p10-p90",
            detail=f"p90 {stats.p90:.3f} ms, n={stats.n}",
            goal=GOAL if scheme == "tcp" else None,
            floor_key="floor.echo_rtt",
            notes=notes,
        )
    )
    ctx.progress.done(figure)
    ctx.add(
        Figure(
            key=f"handshake.{scheme}.both",
            group=TITLE,
            name=f"handshake, loopback {shown}, dial → both ends up",
            value=both_stats.median,
            unit="ms",
            spread=(both_stats.p10, both_stats.p90),
            spread_kind="p10-p90",
            detail=f"p90 {both_stats.p90:.3f} ms, n={both_stats.n}",
            floor_key="floor.echo_rtt",
        )
    )


# -------------------------------------------------------------------- core only


def _core_only(ctx: Context, count: int) -> None:
    ctx.progress.start(f"handshake, core only (CPU): {count} handshakes")
    initiator_id, responder_id = Identity.generate(), Identity.generate()
    total: list[float] = []
    initiator_side: list[float] = []
    responder_side: list[float] = []
    bound = Bound(20.0)
    for index in range(count + 10):
        t0 = time.perf_counter()
        initiator = Link(initiator_id, initiator=True, now=0.0,
                         expected_peer=responder_id.public)
        hello = initiator.data_to_send()
        t1 = time.perf_counter()
        responder = Link(responder_id, initiator=False, now=0.0)
        responder.receive_data(hello, 0.0)
        accept = responder.data_to_send()
        t2 = time.perf_counter()
        events = initiator.receive_data(accept, 0.0)
        confirm = initiator.data_to_send()
        t3 = time.perf_counter()
        events += responder.receive_data(confirm, 0.0)
        responder.data_to_send()  # the keepalive ack
        t4 = time.perf_counter()
        if sum(isinstance(e, LinkUp) for e in events) != 2:
            raise RuntimeError(f"core handshake did not bring both ends up: {events}")
        if index >= 10:
            total.append((t4 - t0) * 1e6)
            initiator_side.append(((t1 - t0) + (t3 - t2)) * 1e6)
            responder_side.append(((t2 - t1) + (t4 - t3)) * 1e6)
        if bound.expired:
            break
    stats = Stats.of(total)
    figure = ctx.add(
        Figure(
            key="handshake.core",
            group=TITLE,
            name="handshake, core only (CPU, both sides)",
            value=stats.median,
            unit="us",
            spread=(stats.p10, stats.p90),
            spread_kind="p10-p90",
            detail=(
                f"initiator {Stats.of(initiator_side).median:.0f} µs + responder "
                f"{Stats.of(responder_side).median:.0f} µs, n={stats.n}"
            ),
            floor_key="floor.ed25519",
        )
    )
    ctx.progress.done(figure)
