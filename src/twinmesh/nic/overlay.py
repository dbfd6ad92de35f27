"""The trio shell around the routing core: link events in, router outputs out.

The NIC tells the `Overlay` when a peer's link comes up or goes down and hands it every
payload a link delivers. The overlay feeds the `proto.router.Router`, sends what it
returns on the right links, sleeps until `router.get_timer()`, and turns the router's
events into deliveries, ping answers and log lines.

Routing messages must not be lost (a lost retraction is a stale route), so they use
`LinkSession.send_control`. Forwarded data packets use `send_nowait` and are dropped
(and counted) when a link's queue is full: congestion is the layer above's business.
Packets this NIC originates wait for room instead (back-pressure to the sender).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
import trio

from twinmesh.errors import LinkClosedError, LocalProtocolError, NoRouteError
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.nic.internal_errors import OVERLAY_TIMER, TIMER_ERROR_PAUSE, InternalErrors
from twinmesh.nic.session import LinkSession
from twinmesh.proto.attach import Location
from twinmesh.proto.router import (
    Delivered,
    Output,
    PongReceived,
    Router,
    RouterConfig,
    RouteRow,
    SendTo,
    Unreachable,
    Violation,
)

PacketHandler = Callable[[PublicKey, bytes, int], None]


@dataclass(frozen=True)
class PingReply:
    rtt: float | None  # seconds; None when lost or unreachable
    hops: int
    error: str  # "" | "timeout" | "noRoute" | "hopLimitExceeded"
    reported_by: PublicKey | None = None


class Overlay:
    def __init__(
        self,
        identity: Identity,
        sessions: Mapping[PublicKey, LinkSession],
        config: RouterConfig | None = None,
        on_packet: PacketHandler | None = None,
        *,
        internal_errors: InternalErrors | None = None,
    ) -> None:
        self.identity = identity
        self.sessions = sessions  # the NIC's live links by peer; read only here
        self.config = config or RouterConfig()
        self.on_packet = on_packet
        self.router: Router | None = None
        # Data packets dropped here: a full link queue, or the link gone meanwhile.
        self.dropped = 0
        self.violations = 0
        self._ping_ids = itertools.count(1)
        self._pings: dict[int, trio.MemorySendChannel[PingReply]] = {}
        self._timer_scope: trio.CancelScope | None = None
        self.log = structlog.get_logger("twinmesh.overlay").bind(node=identity.public.short)
        self.internal_errors = internal_errors or InternalErrors(self.log)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Create the router and run its timers until cancelled."""
        # Seed our seqno from the wall clock so a restarted NIC outruns what it
        # announced in its previous life.
        now = trio.current_time()
        self.router = Router(
            self.identity, now=now, seqno=int(time.time() * 1000), config=self.config,
            wall_offset=time.time() - now,
        )
        task_status.started()
        while True:
            with trio.CancelScope(deadline=self.router.get_timer()) as self._timer_scope:
                await trio.sleep_forever()
            self._timer_scope = None
            try:
                self._handle(self.router.handle_timer(trio.current_time()))
            except Exception as exc:  # a bug: skip this step, keep routing
                self.internal_errors.record(OVERLAY_TIMER, exc)
                await trio.sleep(TIMER_ERROR_PAUSE)

    # ---------------------------------------------------------- from the NIC

    def neighbor_up(self, peer: PublicKey) -> None:
        if self.router is not None:
            self._handle(self.router.neighbor_up(peer, trio.current_time()))

    def neighbor_down(self, peer: PublicKey) -> None:
        if self.router is not None:
            self._handle(self.router.neighbor_down(peer, trio.current_time()))

    def receive(self, peer: PublicKey, data: bytes) -> None:
        if self.router is not None:
            self._handle(self.router.receive(peer, data, trio.current_time()))

    # -------------------------------------------------------------- sending

    async def send(self, destination: PublicKey, payload: bytes) -> None:
        """Send a payload packet across the overlay, waiting on the first link's queue.

        Raises NoRouteError when there is no route, LocalProtocolError when too large.
        """
        for session, data in self._route(destination, payload):
            try:
                await session.send(data)
            except LinkClosedError:
                self.dropped += 1
                raise NoRouteError(f"the link towards {destination.text} went down") from None

    def send_nowait(self, destination: PublicKey, payload: bytes) -> bool:
        """`send` without waiting: False when the first link's queue is full (the
        caller then uses `send`, which waits for room). Raises as `send` does."""
        router = self._router()
        # Check for room before routing: routing counts the packet as sent, and the
        # caller's `send` would route (and count) it again.
        next_hop = router.next_hop(destination)
        first = self.sessions.get(next_hop) if next_hop is not None else None
        if first is not None and not first.has_room():
            return False
        for session, data in self._route(destination, payload):
            try:
                session.send_nowait(data)
            except LinkClosedError:
                self.dropped += 1
                raise NoRouteError(f"the link towards {destination.text} went down") from None
        return True

    def _route(self, destination: PublicKey, payload: bytes) -> list[tuple[LinkSession, bytes]]:
        """Where a payload packet goes first: NoRouteError when nowhere."""
        sends = []
        for output in self._router().send_payload(destination, payload, trio.current_time()):
            if isinstance(output, SendTo):
                session = self.sessions.get(output.peer)
                if session is None:
                    self.dropped += 1
                    raise NoRouteError(f"no route to {destination.text}")
                sends.append((session, output.data))
            elif isinstance(output, Unreachable):
                raise NoRouteError(f"no route to {destination.text}")
            else:
                self._handle([output])
        return sends

    async def ping(self, destination: PublicKey, timeout: float = 2.0) -> PingReply:
        """One overlay ping: RTT and hop count, or why it failed."""
        router = self._router()
        ping_id = next(self._ping_ids)
        send, receive = trio.open_memory_channel[PingReply](1)
        self._pings[ping_id] = send
        try:
            self._handle(router.ping(destination, ping_id, trio.current_time()))
            with trio.move_on_after(timeout):
                return await receive.receive()
            return PingReply(None, 0, "timeout")
        finally:
            del self._pings[ping_id]

    # ------------------------------------------------------------- outputs

    def _handle(self, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, SendTo):
                self._send(output)
            elif isinstance(output, Delivered):
                if self.on_packet is not None:
                    self.on_packet(output.source, output.payload, output.hops)
            elif isinstance(output, PongReceived):
                self._answer(output.ping_id, PingReply(output.rtt, output.hops, ""))
            elif isinstance(output, Unreachable):
                if output.ping_id:
                    self._answer(output.ping_id, PingReply(
                        None, 0, output.code, output.reported_by))
            elif isinstance(output, Violation):
                self.violations += 1
                self.log.warning("bad overlay message", peer=output.peer.text,
                                 reason=output.reason)
        self._rearm()

    def _send(self, output: SendTo) -> None:
        session = self.sessions.get(output.peer)
        if session is None or not session.is_up:
            # The router hears about the link going down right after.
            self.dropped += not output.control
            return
        try:
            if output.control:
                session.send_control(output.data)
            else:
                session.send_nowait(output.data)
        except trio.WouldBlock:
            self.dropped += 1
        except (LinkClosedError, LocalProtocolError) as exc:
            self.dropped += not output.control
            self.log.info("overlay send failed", peer=output.peer.short, reason=str(exc))

    def _answer(self, ping_id: int, reply: PingReply) -> None:
        channel = self._pings.get(ping_id)
        if channel is not None:
            # A second answer (a duplicate pong) finds the channel full: the first counts.
            with contextlib.suppress(trio.WouldBlock):
                channel.send_nowait(reply)

    def _rearm(self) -> None:
        # Only ever earlier (setting a deadline costs, even to the same value); the
        # router's `handle_timer` does nothing when woken before anything is due.
        scope = self._timer_scope
        if scope is not None and self.router is not None:
            deadline = self.router.get_timer()
            if deadline < scope.deadline:
                scope.deadline = deadline

    def _router(self) -> Router:
        if self.router is None:
            raise LocalProtocolError("the overlay is not running yet")
        return self.router

    # ----------------------------------------------------------- locations

    def publish_location(self, location: Location) -> bool:
        """Keep and flood a twin's signed location record; False when refused."""
        outputs = self._router().publish_location(location, trio.current_time())
        if outputs is None:
            return False
        self._handle(outputs)
        return True

    def locate(self, twin: PublicKey) -> PublicKey | None:
        if self.router is None:
            return None
        return self.router.locate(twin, trio.current_time())

    # --------------------------------------------------------- inspection

    def routes(self) -> list[RouteRow]:
        return self._router().routes(trio.current_time())

    def lookup(self, destination: PublicKey) -> RouteRow | None:
        return self._router().lookup(destination, trio.current_time())

