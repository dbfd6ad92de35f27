"""The Planetary NIC: one identity, its listeners, dialers and links.

`Nic.run()` owns one nursery for everything the NIC does; listeners, dialers and
link sessions all live in it, so cancelling `run()` stops the NIC cleanly. The link
tables (`sessions`, `by_peer`, `dialers`) are changed only from within this module,
on trio's single thread.

At most one link per peer key is kept. When two links to the same peer come up
(both NICs dialled each other), both ends keep the one initiated by the smaller key
and close the other, so they agree without talking about it.
"""

from __future__ import annotations

import collections
import functools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio

from twinmesh import __version__
from twinmesh.carriers.base import Carrier
from twinmesh.carriers.registry import default_carriers
from twinmesh.carriers.uri import PeerUri
from twinmesh.errors import (
    AuthenticationError,
    ConfigError,
    DecodeError,
    FrameTooLarge,
    HandshakeRefused,
)
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.nic.config import NicConfig
from twinmesh.nic.dialer import DIAL_TIMEOUT, Dialer
from twinmesh.nic.health import Metric, overlay_metrics
from twinmesh.nic.internal_errors import InternalErrors
from twinmesh.nic.overlay import Overlay, PacketHandler, PingReply
from twinmesh.nic.session import LinkSession, WriteBatch
from twinmesh.proto.link import DownKind, Link, LinkDown


@dataclass(frozen=True)
class PeerRow:
    """One line of the admin `peers` table."""

    key: str
    uri: str
    direction: str
    state: str
    up_since: float
    rtt: float
    bytes_in: int
    bytes_out: int
    frames_in: int
    frames_out: int
    last_error: str
    retry_in: float
    carrier: str


@dataclass(frozen=True)
class SelfRow:
    """What the admin `self` command reports."""

    key: str
    key_hex: str
    listen: list[str]
    uptime: float
    version: str
    pid: int


class Nic:
    def __init__(
        self,
        identity: Identity,
        config: NicConfig,
        carriers: dict[str, Carrier] | None = None,
        *,
        on_packet: PacketHandler | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.config = config
        self.carriers = carriers if carriers is not None else default_carriers()
        self.sessions: dict[int, LinkSession] = {}
        self.by_peer: dict[PublicKey, LinkSession] = {}
        self.dialers: dict[str, Dialer] = {}
        self.listening: list[PeerUri] = []
        self.handshake_failures: collections.Counter[str] = collections.Counter()
        self.links_established = 0
        # Traffic of links that have ended, so /metrics counters never go backwards.
        self.ended_traffic = collections.Counter[str]()
        # More /metrics families from parts running beside the NIC (the DHT's lookup shell).
        self.metric_sources: list[Callable[[], list[Metric]]] = []
        self._rng = rng or random.Random()
        self._nursery: trio.Nursery | None = None
        self._started_at = time.monotonic()
        self.log = structlog.get_logger("twinmesh.nic").bind(node=identity.public.short)
        # Bugs contained at the per-packet, per-frame and per-step boundaries.
        self.internal_errors = InternalErrors(self.log)
        self.overlay = Overlay(identity, self.by_peer, config.router, on_packet,
                               internal_errors=self.internal_errors)
        # Shared by all links: a packet forwarded while a read's packets are handed out
        # is written with the others bound for the same link.
        self._write_batch = WriteBatch()

    # --------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[Nic] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, dial the configured peers, and run until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started_at = time.monotonic()
            await nursery.start(self.overlay.run)
            for uri in self.config.listen:
                carrier = self._carrier(uri)
                handler = functools.partial(self._accept, uri.scheme)
                try:
                    bound = await nursery.start(carrier.serve, uri, handler)
                except OSError as exc:
                    # A busy or unavailable address is a setup mistake: one line, exit 2.
                    raise ConfigError(f"cannot listen on {uri}: "
                                      f"{exc.strerror or exc}") from None
                self.listening.append(bound)
                self.log.info("listening", uri=str(bound))
            for uri in self.config.peers:
                self.add_peer(uri)
            task_status.started(self)
            await trio.sleep_forever()

    @property
    def key(self) -> PublicKey:
        return self.identity.public

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started_at

    # ------------------------------------------------------------------ peers

    def add_peer(self, uri: PeerUri) -> bool:
        """Start keeping a link to `uri`. False when that URI is already configured."""
        self._carrier(uri)
        name = str(uri.without_key())
        if name in self.dialers:
            return False
        if self._nursery is None:
            raise RuntimeError("add_peer needs a running NIC")
        dialer = Dialer(uri, self.config.reconnect, self._link, self._standby, self._rng)
        self.dialers[name] = dialer
        self._nursery.start_soon(self._run_dialer, name, dialer)
        self.log.info("peer added", uri=str(uri))
        return True

    def remove_peer(self, text: str) -> int:
        """Forget a peer by key or by the URI it was added with; close its links."""
        removed = 0
        try:
            key: PublicKey | None = PublicKey.from_text(text)
        except ValueError:
            key = None
        if key is not None:
            for name, dialer in list(self.dialers.items()):
                # An unpinned dialer learns its key only when its first link ends.
                current = dialer.session.peer if dialer.session is not None else None
                if key in (dialer.learned_key, current):
                    self._stop_dialer(name, dialer)
                    removed += 1
            for session in list(self.sessions.values()):
                if session.peer == key and session.down is None:
                    session.close("peer removed by admin")
                    removed += 1
            return removed
        name = str(PeerUri.parse(text).without_key())
        found = self.dialers.get(name)
        if found is not None:
            self._stop_dialer(name, found)
            removed += 1
        return removed

    def _stop_dialer(self, name: str, dialer: Dialer) -> None:
        del self.dialers[name]
        if dialer.session is not None:
            # Queue the goodbye first; the session flushes it as the dialer is cancelled.
            dialer.session.close("peer removed by admin")
        dialer.stop()
        self.log.info("peer removed", uri=name)

    async def _run_dialer(self, name: str, dialer: Dialer) -> None:
        await dialer.run()

    async def _standby(self, dialer: Dialer) -> None:
        while True:
            key = dialer.learned_key
            existing = self.by_peer.get(key) if key is not None else None
            if existing is None:
                return
            dialer.state = "standby"
            await existing.wait_finished()

    async def _link(self, dialer: Dialer) -> None:
        """Dial `dialer.uri` and run the link until it ends (the dialer's task owns it)."""
        uri = dialer.uri
        async with self._carrier(uri).connect(uri, timeout=DIAL_TIMEOUT) as stream:
            session = self._new_session(
                stream, initiator=True, uri=str(uri), expected=uri.key, carrier=uri.scheme
            )
            dialer.attach(session)
            await self._run_session(session)

    async def _accept(self, scheme: str, stream: trio.abc.Stream, remote: str) -> None:
        if len(self.sessions) >= self.config.max_links:
            self.log.warning("inbound link refused: link limit reached", remote=remote,
                             max_links=self.config.max_links)
            self.handshake_failures["link-limit"] += 1
            await trio.aclose_forcefully(stream)
            return
        session = self._new_session(
            stream, initiator=False, uri=f"{scheme}://{remote}", expected=None, carrier=scheme
        )
        await self._run_session(session)

    def _new_session(
        self,
        stream: trio.abc.Stream,
        *,
        initiator: bool,
        uri: str,
        expected: PublicKey | None,
        carrier: str,
    ) -> LinkSession:
        core = Link(
            self.identity,
            initiator=initiator,
            now=trio.current_time(),
            expected_peer=expected,
            allowed=self.config.allow,
            config=self.config.link,
        )
        return LinkSession(
            core,
            stream,
            self,
            direction="outbound" if initiator else "inbound",
            uri=uri,
            carrier=carrier,
            send_queue=self.config.send_queue,
            internal_errors=self.internal_errors,
            batch=self._write_batch,
        )

    async def _run_session(self, session: LinkSession) -> None:
        self.sessions[session.id] = session
        try:
            await session.run()
        finally:
            del self.sessions[session.id]
            stats = session.core.stats
            self.ended_traffic.update(
                bytes_in=stats.bytes_in, bytes_out=stats.bytes_out,
                frames_in=stats.frames_in, frames_out=stats.frames_out,
            )

    # ------------------------------------------------------- LinkObserver API

    def link_up(self, session: LinkSession) -> None:
        peer = session.peer
        assert peer is not None
        self.links_established += 1
        existing = self.by_peer.get(peer)
        if existing is not None and existing is not session and existing.is_up:
            keep = self._preferred(existing, session)
            drop = session if keep is existing else existing
            drop.close("duplicate link")
            if keep is existing:
                return
        self.by_peer[peer] = session
        self.overlay.neighbor_up(peer)

    def link_data(self, session: LinkSession, data: bytes) -> None:
        peer = session.peer
        # Only the link we keep for a peer carries overlay traffic.
        if peer is not None and self.by_peer.get(peer) is session:
            self.overlay.receive(peer, data)

    def link_down(self, session: LinkSession, down: LinkDown) -> None:
        peer = session.peer
        if peer is not None and self.by_peer.get(peer) is session:
            del self.by_peer[peer]
            self.overlay.neighbor_down(peer)
        if session.up_since is None and down.kind is not DownKind.CLOSED_LOCALLY:
            self.handshake_failures[_failure_label(down)] += 1

    def _preferred(self, a: LinkSession, b: LinkSession) -> LinkSession:
        ia, ib = self._initiator(a), self._initiator(b)
        if ia == ib:
            return a  # same initiator: keep the older link
        return a if ia < ib else b

    def _initiator(self, session: LinkSession) -> PublicKey:
        assert session.peer is not None
        return self.key if session.direction == "outbound" else session.peer

    # ------------------------------------------------------------------- data

    async def send(self, destination: PublicKey, payload: bytes) -> None:
        """Send a payload packet to any NIC on the overlay, waiting on back-pressure.

        Raises NoRouteError when the overlay has no route to `destination`."""
        await self.overlay.send(destination, payload)

    def send_nowait(self, destination: PublicKey, payload: bytes) -> bool:
        """`send` without waiting: False when it would have to wait for room."""
        return self.overlay.send_nowait(destination, payload)

    async def ping(self, destination: PublicKey, timeout: float = 2.0) -> PingReply:
        return await self.overlay.ping(destination, timeout)

    # ---------------------------------------------------------- introspection

    def peer_rows(self) -> list[PeerRow]:
        now = trio.current_time()
        rows: list[PeerRow] = []
        shown: set[int] = set()
        for dialer in self.dialers.values():
            session = dialer.session
            if session is not None:
                shown.add(session.id)
                rows.append(self._session_row(session, dialer.last_error))
            else:
                retry = max(0.0, dialer.retry_at - now) if dialer.retry_at is not None else 0.0
                linked = self.by_peer.get(dialer.learned_key) if dialer.learned_key else None
                rows.append(
                    PeerRow(
                        key=dialer.learned_key.text if dialer.learned_key else "",
                        uri=str(dialer.uri), direction="outbound",
                        state="standby" if linked is not None else dialer.state,
                        up_since=0.0, rtt=-1.0, bytes_in=0, bytes_out=0, frames_in=0,
                        frames_out=0, last_error=dialer.last_error, retry_in=retry,
                        carrier=dialer.uri.scheme,
                    )
                )
        for session in self.sessions.values():
            if session.id not in shown and session.down is None:
                rows.append(self._session_row(session, ""))
        return rows

    def _session_row(self, session: LinkSession, last_error: str) -> PeerRow:
        core = session.core
        stats = core.stats
        if session.is_up:
            state = "up"
        elif session.down is not None:
            state = "down"
        else:
            state = "handshaking"
        return PeerRow(
            key=session.peer.text if session.peer else "",
            uri=session.uri, direction=session.direction, state=state,
            up_since=session.up_since or 0.0,
            rtt=core.rtt if core.rtt is not None else -1.0,
            bytes_in=stats.bytes_in, bytes_out=stats.bytes_out,
            frames_in=stats.frames_in, frames_out=stats.frames_out,
            last_error=last_error, retry_in=0.0, carrier=session.carrier,
        )

    def self_info(self) -> SelfRow:
        return SelfRow(
            key=self.key.text,
            key_hex=self.key.raw.hex(),
            listen=[str(u) for u in self.listening],
            uptime=self.uptime,
            version=__version__,
            pid=os.getpid(),
        )

    def healthy(self) -> bool:
        return self._nursery is not None and len(self.listening) == len(self.config.listen)

    def metrics(self) -> list[Metric]:
        live = collections.Counter[str]()
        for session in self.sessions.values():
            stats = session.core.stats
            live.update(bytes_in=stats.bytes_in, bytes_out=stats.bytes_out,
                        frames_in=stats.frames_in, frames_out=stats.frames_out)
        total = live + self.ended_traffic
        up = sum(1 for s in self.sessions.values() if s.is_up)
        failures = [({"reason": r}, float(n)) for r, n in sorted(self.handshake_failures.items())]
        router = self.overlay.router
        return [
            Metric("twinmesh_links_up", "gauge", "Links whose handshake completed and are up.",
                   [({}, float(up))]),
            Metric("twinmesh_links_established_total", "counter",
                   "Links that completed a handshake since start.",
                   [({}, float(self.links_established))]),
            Metric("twinmesh_link_frames_total", "counter", "Link frames sent and received.",
                   [({"direction": "in"}, float(total["frames_in"])),
                    ({"direction": "out"}, float(total["frames_out"]))]),
            Metric("twinmesh_link_bytes_total", "counter", "Link bytes sent and received.",
                   [({"direction": "in"}, float(total["bytes_in"])),
                    ({"direction": "out"}, float(total["bytes_out"]))]),
            Metric("twinmesh_handshake_failures_total", "counter",
                   "Links that ended before their handshake completed, by reason.",
                   failures or [({"reason": "none"}, 0.0)]),
            Metric("twinmesh_uptime_seconds", "gauge", "Seconds since the NIC started.",
                   [({}, self.uptime)]),
            *overlay_metrics(router.stats if router is not None else {}, self.overlay.dropped),
            *self.internal_errors.metrics(),
            *(metric for source in self.metric_sources for metric in source()),
        ]

    # ------------------------------------------------------------------ helpers

    def _carrier(self, uri: PeerUri) -> Carrier:
        carrier = self.carriers.get(uri.scheme)
        if carrier is None:
            raise ConfigError(f"{uri}: no {uri.scheme!r} carrier on this NIC")
        return carrier


def _failure_label(down: LinkDown) -> str:
    error = down.error
    if down.kind is DownKind.TIMEOUT:
        return "timeout"
    if isinstance(error, HandshakeRefused):
        return "refused"
    if isinstance(error, AuthenticationError):
        return "authentication"
    if isinstance(error, FrameTooLarge):
        return "too-large"
    if isinstance(error, DecodeError):
        return "malformed"
    return "closed"
