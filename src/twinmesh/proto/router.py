"""Routing by public key over NIC links, and packet forwarding (sans-I/O).

Theory of operation
-------------------
A distance-vector protocol in the spirit of Babel (RFC 8966), chosen because it is
loop-free at every instant, not just after convergence, without a global view, and
because its state machine is small enough to test exhaustively in a simulator.
Yggdrasil's tree/greedy scheme scales further (state O(degree) instead of O(N)) and is
the planned next step; docs/SCALING.md has the numbers behind that choice.

*Announcements.* Every NIC signs `(its key, seqno)` with its ed25519 key. Others carry
that announcement unchanged and add a metric (hops). A NIC therefore cannot announce a
route to a key it does not hold: a route's existence is proven by the destination's
own signature. A replayed announcement is an old seqno, and old seqnos never win (see
feasibility); a forged one fails verification and is dropped. Metrics are not signed:
a neighbour can lie about distance (as in Babel with per-link authentication); the
links under us authenticate who the neighbour is.

*Feasibility (no loops, no counting to infinity).* For every destination we remember
the feasibility distance FD = (seqno, best metric we ever advertised with it). An
update (s, m) is feasible when s > FD.seqno, or s == FD.seqno and m < FD.metric, m
being the metric the neighbour advertised, before we add the link's cost (so the
route we advertised stays feasible when its next hop refreshes it). Only
feasible routes are selected; every update we send lowers or keeps FD. A loop would
need some node to select a route whose metric is not below what it advertised
earlier, which the condition forbids, so there is no loop at any time.

*Healing.* When a link goes down (or a neighbour retracts), every destination that
used it switches at once to the best feasible route through another neighbour. When
only infeasible routes remain, the NIC retracts the destination and sends a seqno
request towards the origin; the origin answers with a newer seqno, which is feasible
everywhere, and the route comes back on the new path within one round trip.

*Packets.* Data packets carry source, destination and a hop limit. Each NIC forwards
along its selected route; a packet without a route, or out of hops, turns into an
`unreachable` packet sent back to its source (never in answer to an `unreachable`),
so senders hear about it instead of silence.

*Bounds.* At most `max_routes` destinations; at most `max_batch` entries per routing
message; routing messages from one neighbour are rate limited by a token bucket;
pending seqno requests are deduplicated in a bounded table; our own seqno is re-signed
at most once per `min_reannounce` however many requests arrive.

The core takes `now` in every call, returns `Output`s (bytes for neighbours, events for
the NIC) and tells when it next needs `handle_timer` via `get_timer()`. It never
logs, never reads a clock, and never raises on remote input: a malformed message
becomes a `Violation` output.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twinmesh.errors import DecodeError
from twinmesh.identity.keys import KEY_SIZE, SIGNATURE_SIZE, Identity, PublicKey
from twinmesh.proto.attach import Location
from twinmesh.proto.directory import Directory, location_from_wire
from twinmesh.wire import flat, schemas

ANNOUNCE_CONTEXT = b"twinmesh/route/v1/announce"
INFINITY = 0xFFFF
# Every packet starts with this many hops; the receiver derives the hop count from it.
HOP_LIMIT = 64
_SEQNO = struct.Struct(">Q")
MAX_SEQNO = 2**64 - 1  # seqnos are UInt64 on the wire
_route = schemas.route


# ----------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class SendTo:
    """Send these overlay bytes to a directly linked neighbour."""

    peer: PublicKey
    data: bytes
    control: bool  # routing traffic (True) or a data packet (False)


@dataclass(frozen=True)
class Delivered:
    """A payload packet addressed to this NIC."""

    source: PublicKey
    payload: bytes
    hops: int


@dataclass(frozen=True)
class PongReceived:
    source: PublicKey
    ping_id: int
    rtt: float
    hops: int


@dataclass(frozen=True)
class Unreachable:
    """A packet we sent (or a ping) could not reach `destination`."""

    destination: PublicKey
    code: str  # "noRoute" | "hopLimitExceeded"
    reported_by: PublicKey
    ping_id: int


@dataclass(frozen=True)
class Violation:
    """A neighbour sent something invalid; the NIC logs it (and may close the link)."""

    peer: PublicKey
    reason: str


Output = SendTo | Delivered | PongReceived | Unreachable | Violation


# ------------------------------------------------------------------------ config


@dataclass(frozen=True)
class RouterConfig:
    update_delay: float = 0.02  # coalesce triggered updates for this long
    full_update_interval: float = 20.0  # resend the whole table to every neighbour
    # Resend every location record this often (a new neighbour gets them at once).
    # Records are only a fast path: a NIC that missed one finds it in the DHT, and
    # with 1000 twins resending them all every 20 s was ~10 % of an idle NIC's CPU.
    location_refresh_interval: float = 300.0
    route_hold: float = 70.0  # drop a route not refreshed for this long
    reannounce_interval: float = 60.0  # new own seqno (so old ones age out)
    min_reannounce: float = 0.05  # at most one own re-signing per this interval
    request_hold: float = 2.0  # suppress duplicate seqno requests this long
    max_routes: int = 100_000
    max_batch: int = 200
    max_pending_requests: int = 4096
    # Routing entries (updates, retractions, requests) accepted from one neighbour:
    # sustained per second, and the burst that a full table dump may use at once.
    rate_per_neighbor: float = 5_000.0
    burst_per_neighbor: float = 50_000.0


# ------------------------------------------------------------------------- state


@dataclass
class _Via:
    seqno: int
    metric: int  # including the cost of the link to the neighbour
    signature: bytes
    updated: float
    reported: int  # the metric the neighbour advertised: what feasibility compares


@dataclass
class _Destination:
    fd: tuple[int, int] | None = None  # feasibility distance (seqno, metric)
    via: dict[PublicKey, _Via] = field(default_factory=dict)
    selected: PublicKey | None = None
    advertised: tuple[int, int] | None = None  # what neighbours last heard from us
    gone_since: float | None = None  # unreachable since; the FD is kept for route_hold


@dataclass
class _Neighbor:
    cost: int
    tokens: float
    refilled: float


@dataclass(frozen=True)
class RouteRow:
    destination: PublicKey
    next_hop: PublicKey | None  # None for ourselves
    metric: int
    seqno: int
    age: float  # seconds since the selected route was last refreshed
    feasible_alternatives: int


class Router:
    """The routing table and packet forwarding of one NIC."""

    def __init__(
        self,
        identity: Identity,
        *,
        now: float,
        seqno: int,
        config: RouterConfig | None = None,
        verified: dict[tuple[bytes, int], bytes] | None = None,
        wall_offset: float = 0.0,
    ) -> None:
        """`seqno` seeds our own sequence number: pass the wall clock in milliseconds so
        a restarted NIC outruns what it announced before. `verified` may be shared by
        routers in one process (the simulator) to verify each signature once."""
        self.identity = identity
        self.key = identity.public
        self.config = config or RouterConfig()
        self.seqno = seqno
        self.stats: dict[str, int] = {
            "updates_in": 0, "updates_out": 0, "control_bytes_in": 0, "control_bytes_out": 0,
            "bad_signatures": 0, "rate_limited": 0, "packets_forwarded": 0,
            "packets_unroutable": 0, "routes_refused": 0,
            # Packets this NIC originated (payloads, pings, pongs, unreachable notices),
            # that arrived for it, and that it could not send for want of a route.
            "packets_sent": 0, "packets_delivered": 0, "packets_no_route": 0,
        }
        self._signature = self._sign(seqno)
        self._signed_at = now
        self._neighbors: dict[PublicKey, _Neighbor] = {}
        self._table: dict[PublicKey, _Destination] = {}
        self._dirty: set[PublicKey] = set()
        self._flush_at: float | None = None
        self._full_at = now + self.config.full_update_interval
        self._locations_at = now + self.config.location_refresh_interval
        self._reannounce_at = now + self.config.reannounce_interval
        # The sweep that expires routes also expires and retries seqno requests.
        self._expire_at = now + min(self.config.route_hold / 4, self.config.request_hold)
        self._requests: dict[tuple[PublicKey, int], float] = {}
        self._verified = verified if verified is not None else {}
        # Location records expire on the wall clock: wall time = now + wall_offset.
        self.wall_offset = wall_offset
        self.directory = Directory(self.config.max_routes)
        self._dirty_locations: set[PublicKey] = set()
        self._location_exclude: dict[PublicKey, PublicKey | None] = {}
        self._wanted_seqno: int | None = None

    # -------------------------------------------------------------- neighbours

    def neighbor_up(self, peer: PublicKey, now: float, cost: int = 1) -> list[Output]:
        """A link to `peer` is up: tell it everything we know."""
        self._neighbors[peer] = _Neighbor(cost, self.config.burst_per_neighbor, now)
        return self._full_dump([peer], now)

    def neighbor_down(self, peer: PublicKey, now: float) -> list[Output]:
        """The link to `peer` is gone: reroute everything that used it."""
        if self._neighbors.pop(peer, None) is None:
            return []
        out: list[Output] = []
        for origin, dest in list(self._table.items()):
            if dest.via.pop(peer, None) is not None:
                self._reselect(origin, dest, now, out)
        return out

    @property
    def neighbors(self) -> list[PublicKey]:
        return list(self._neighbors)

    # ----------------------------------------------------------------- receive

    def receive(self, peer: PublicKey, data: bytes, now: float) -> list[Output]:
        """Handle overlay bytes a neighbour sent over its link."""
        neighbor = self._neighbors.get(peer)
        if neighbor is None:
            return [Violation(peer, "overlay traffic from a peer that is not a neighbour")]
        out: list[Output]
        # The hot path: a payload, ping or pong packet in canonical form, read through
        # a view so that a packet only passing through is copied once, into the packet
        # forwarded.
        view = memoryview(data)
        fast = read_flat_packet(view)
        if fast is not None:
            (source, destination, hop_limit, (kind, value)), at = fast
            destination = bytes(destination)
            if kind == "payload" and destination == self.key.raw:
                value = bytes(value)
            out = []
            packet = (bytes(source), destination, hop_limit, (kind, value))
            self._receive_packet(peer, packet, now, out, raw=(view, at))
            return out
        try:
            which, value = schemas.decode(_route.Overlay, data, _read_overlay)
        except DecodeError as exc:
            return [Violation(peer, str(exc))]
        out = []
        if which == "routing":
            self.stats["control_bytes_in"] += len(data)
            updates, retractions, requests, locations = value
            entries = len(updates) + len(retractions) + len(requests) + len(locations)
            if entries > self.config.max_batch or not self._take_tokens(neighbor, entries, now):
                self.stats["rate_limited"] += 1
                return [Violation(peer, f"routing message of {entries} entries over the "
                                        "batch or rate limit; dropped")]
            for update in updates:
                self._receive_update(peer, neighbor, update, now, out)
            for origin_raw in retractions:
                self._receive_retraction(peer, origin_raw, now, out)
            for request in requests:
                self._receive_request(peer, request, now, out)
            for fields in locations:
                location = location_from_wire(*fields)
                if location is None:
                    out.append(Violation(peer, "location record with malformed keys"))
                elif self.directory.accept(location, now + self.wall_offset):
                    self._location_changed(location.twin, now, exclude=peer)
        elif which == "packet":
            self._receive_packet(peer, value, now, out)
        return out

    def _receive_update(
        self, peer: PublicKey, neighbor: _Neighbor, update: tuple[bytes, int, bytes, int],
        now: float, out: list[Output],
    ) -> None:
        origin_raw, seqno, signature, metric = update
        self.stats["updates_in"] += 1
        if len(origin_raw) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
            out.append(Violation(peer, "update with malformed key or signature"))
            return
        origin = PublicKey(origin_raw)
        if not self._verify(origin, seqno, signature):
            self.stats["bad_signatures"] += 1
            out.append(Violation(peer, f"update for {origin.short}: bad signature"))
            return
        if origin == self.key:
            if seqno > self.seqno:
                # An announcement of ours from before a restart whose clock was ahead:
                # jump past it so our fresh announcements win.
                self._bump_seqno(seqno + 1, now)
            return
        dest = self._table.get(origin)
        if dest is None:
            if len(self._table) >= self.config.max_routes:
                self.stats["routes_refused"] += 1
                return
            dest = self._table[origin] = _Destination()
        total = min(INFINITY, metric + neighbor.cost)
        if total >= INFINITY:
            if dest.via.pop(peer, None) is not None:
                self._reselect(origin, dest, now, out)
            return
        dest.via[peer] = _Via(seqno, total, signature, now, metric)
        self._reselect(origin, dest, now, out)
        self._answer_pending_request(origin, dest, out)

    def _receive_retraction(
        self, peer: PublicKey, origin_raw: bytes, now: float, out: list[Output]
    ) -> None:
        if len(origin_raw) != KEY_SIZE:
            out.append(Violation(peer, "retraction with a malformed key"))
            return
        origin = PublicKey(origin_raw)
        dest = self._table.get(origin)
        if dest is not None and dest.via.pop(peer, None) is not None:
            self._reselect(origin, dest, now, out)

    def _receive_request(
        self, peer: PublicKey, request: tuple[bytes, int, int], now: float, out: list[Output]
    ) -> None:
        origin_raw, seqno, hop_limit = request
        if len(origin_raw) != KEY_SIZE:
            out.append(Violation(peer, "seqno request with a malformed key"))
            return
        origin = PublicKey(origin_raw)
        if origin == self.key:
            if seqno > self.seqno:
                # Requests are not signed: move by one (as Babel does), never to the
                # asked value, or one request could spend our whole seqno space.
                self._bump_seqno(self.seqno + 1, now)
            else:
                self._mark_dirty(self.key, now)
            return
        dest = self._table.get(origin)
        selected = self._selected_via(dest)
        if selected is not None and dest is not None and dest.selected != peer \
                and selected.seqno >= seqno:
            # We can satisfy it: our route is new enough. Tell the asker directly.
            out.extend(self._updates_to(peer, [origin]))
            return
        # A request is held (deduplicated) until its `request_hold` deadline, not until
        # the next sweep of the table.
        if hop_limit <= 1 or self._requests.get((origin, seqno), now) > now:
            return
        if len(self._requests) >= self.config.max_pending_requests:
            return
        self._requests[(origin, seqno)] = now + self.config.request_hold
        # Forward towards the origin: along our route, or any neighbour that has one.
        target = dest.selected if dest is not None else None
        if target is None or target == peer:
            candidates = [n for n in (dest.via if dest is not None else {}) if n != peer]
            routes = dest.via if dest is not None else {}
            target = min(candidates, key=lambda n: routes[n].metric, default=None)
        if target is not None:
            out.append(self._routing_to(target, requests=[(origin, seqno, hop_limit - 1)]))

    # ------------------------------------------------------------------ select

    def _reselect(
        self, origin: PublicKey, dest: _Destination, now: float, out: list[Output]
    ) -> None:
        # Lowest metric wins; on a tie keep the current route (no flapping), then the
        # smallest key (deterministic, so simulations replay exactly).
        feasible = [n for n, v in dest.via.items() if _feasible(dest.fd, v.seqno, v.reported)]
        best = min(
            feasible,
            key=lambda n: (dest.via[n].metric, n != dest.selected, n.raw),
            default=None,
        )
        previous = dest.selected
        dest.selected = best
        if best is not None:
            dest.gone_since = None
            via = dest.via[best]
            if dest.advertised != (via.seqno, via.metric) or best != previous:
                self._mark_dirty(origin, now)
            return
        if previous is not None or dest.advertised is not None:
            self._mark_dirty(origin, now)  # becomes a retraction when flushed
        if dest.gone_since is None:
            dest.gone_since = now
        if dest.via:
            # Only infeasible routes left: ask the origin for a newer seqno.
            seqno = (dest.fd[0] if dest.fd else max(v.seqno for v in dest.via.values())) + 1
            seqno = min(seqno, MAX_SEQNO)  # an origin may have signed the largest seqno
            self._request_seqno(origin, dest, seqno, now, out)

    def _request_seqno(
        self, origin: PublicKey, dest: _Destination, seqno: int, now: float, out: list[Output]
    ) -> None:
        if self._requests.get((origin, seqno), now) > now:
            return
        if len(self._requests) >= self.config.max_pending_requests:
            return
        self._requests[(origin, seqno)] = now + self.config.request_hold
        targets = list(dest.via) or list(self._neighbors)
        for target in targets:
            out.append(
                self._routing_to(target, requests=[(origin, seqno, HOP_LIMIT)])
            )

    def _answer_pending_request(
        self, origin: PublicKey, dest: _Destination, out: list[Output]
    ) -> None:
        # A fresh enough route makes pending requests for this origin moot.
        selected = self._selected_via(dest)
        if selected is None:
            return
        for key in [k for k in self._requests if k[0] == origin and k[1] <= selected.seqno]:
            del self._requests[key]

    def _selected_via(self, dest: _Destination | None) -> _Via | None:
        if dest is None or dest.selected is None:
            return None
        return dest.via.get(dest.selected)

    # ------------------------------------------------------------------- send

    def _mark_dirty(self, origin: PublicKey, now: float) -> None:
        self._dirty.add(origin)
        if self._flush_at is None:
            self._flush_at = now + self.config.update_delay

    def _flush(self, now: float) -> list[Output]:
        """Send the coalesced triggered updates to every neighbour."""
        self._flush_at = None
        out = self._flush_locations(now)
        dirty, self._dirty = self._dirty, set()
        if not self._neighbors or not dirty:
            for origin in dirty:
                self._note_advertised(origin)
            return out
        for peer in self._neighbors:
            origins = [o for o in dirty if o != peer]
            # Poisoned reverse: our next hop hears a retraction, never its own route
            # back, so it cannot keep a stale route through us.
            retract = [o for o in origins if self._advert(o) is None or self._next_hop(o) == peer]
            update = [o for o in origins if o not in retract]
            out.extend(self._batches(peer, update, retract))
        for origin in dirty:
            self._note_advertised(origin)
        return out

    def _full_dump(self, peers: Iterable[PublicKey], now: float, *,
                   locations: bool = True) -> list[Output]:
        out: list[Output] = []
        peers = list(peers)
        records = self.directory.live(now + self.wall_offset) if locations else []
        for peer in peers:
            for start in range(0, len(records), self.config.max_batch):
                chunk = records[start : start + self.config.max_batch]
                out.append(self._routing_to(peer, locations=chunk))
        for peer in peers:
            origins = [self.key] + [
                o for o, d in self._table.items()
                if d.selected is not None and d.selected != peer and o != peer
            ]
            poisoned = [o for o, d in self._table.items() if d.selected == peer and o != peer]
            out.extend(self._batches(peer, origins, poisoned))
        for origin in [self.key, *self._table]:
            self._note_advertised(origin)
        return out

    def _updates_to(self, peer: PublicKey, origins: list[PublicKey]) -> list[Output]:
        out = self._batches(peer, origins, [])
        for origin in origins:
            self._note_advertised(origin)
        return out

    def _advert(self, origin: PublicKey) -> tuple[int, int, bytes] | None:
        """(seqno, metric, signature) we would advertise for `origin`, None if none."""
        if origin == self.key:
            return self.seqno, 0, self._signature
        via = self._selected_via(self._table.get(origin))
        if via is None:
            return None
        return via.seqno, via.metric, via.signature

    def _note_advertised(self, origin: PublicKey) -> None:
        # Advertising (s, m) makes FD = (s, m) for a newer seqno, or lowers FD.metric.
        dest = self._table.get(origin)
        if dest is None:
            return
        advert = self._advert(origin)
        if advert is None:
            dest.advertised = None
            return
        seqno, metric, _ = advert
        dest.advertised = (seqno, metric)
        if dest.fd is None or seqno > dest.fd[0] or (seqno == dest.fd[0] and metric < dest.fd[1]):
            dest.fd = (seqno, metric)

    def _batches(
        self, peer: PublicKey, update: list[PublicKey], retract: list[PublicKey]
    ) -> list[Output]:
        out: list[Output] = []
        size = self.config.max_batch
        adverts = [(o, a) for o in update if (a := self._advert(o)) is not None]
        # Updates then retractions, at most `size` entries per message in all: the
        # receiver counts both against its max_batch.
        first_gone = len(adverts)
        for start in range(0, len(adverts) + len(retract), size):
            chunk = adverts[start : start + size]
            gone = retract[max(0, start - first_gone) : max(0, start + size - first_gone)]
            if chunk or gone:
                out.append(self._routing_to(peer, updates=chunk, retractions=gone))
        return out

    def _routing_to(
        self,
        peer: PublicKey,
        *,
        updates: list[tuple[PublicKey, tuple[int, int, bytes]]] = (),  # type: ignore[assignment]
        retractions: list[PublicKey] = (),  # type: ignore[assignment]
        requests: list[tuple[PublicKey, int, int]] = (),  # type: ignore[assignment]
        locations: list[Location] = (),  # type: ignore[assignment]
    ) -> SendTo:
        message = _route.Overlay.new_message()
        routing = message.init("routing")
        items = routing.init("updates", len(updates))
        for item, (origin, (seqno, metric, signature)) in zip(items, updates, strict=True):
            announcement = item.init("announcement")
            announcement.origin = origin.raw
            announcement.seqno = seqno
            announcement.signature = signature
            item.metric = metric
        gone = routing.init("retractions", len(retractions))
        for i, origin in enumerate(retractions):
            gone[i] = origin.raw
        asks = routing.init("requests", len(requests))
        for item, (origin, seqno, hop_limit) in zip(asks, requests, strict=True):
            item.origin = origin.raw
            item.seqno = seqno
            item.hopLimit = hop_limit
        records = routing.init("locations", len(locations))
        for item, location in zip(records, locations, strict=True):
            item.twin = location.twin.raw
            item.nic = location.nic.raw
            item.seqno = location.seqno
            item.expires = location.expires
            item.signature = location.signature
        data = message.to_bytes()
        self.stats["updates_out"] += len(updates)
        self.stats["control_bytes_out"] += len(data)
        return SendTo(peer, data, control=True)

    # ----------------------------------------------------------------- packets

    def send_payload(self, destination: PublicKey, payload: bytes, now: float) -> list[Output]:
        """Originate a payload packet to `destination`."""
        return self._originate(destination, ("payload", payload), now)

    def ping(self, destination: PublicKey, ping_id: int, now: float) -> list[Output]:
        """Send a ping; a `PongReceived` or `Unreachable` output answers it later."""
        return self._originate(destination, ("ping", (ping_id, now, 0)), now)

    def _originate(self, destination: PublicKey, body: tuple[str, Any], now: float) -> list[Output]:
        packet = (self.key.raw, destination.raw, HOP_LIMIT, body)
        out: list[Output] = []
        if destination == self.key:
            kind, value = body
            if kind == "ping":
                out.append(PongReceived(self.key, value[0], 0.0, 0))
            else:
                self._arrive(packet, 0, now, out)
            return out
        next_hop = self._next_hop(destination)
        if next_hop is None:
            kind, value = body
            ping_id = value[0] if kind == "ping" else 0
            self.stats["packets_no_route"] += 1
            out.append(Unreachable(destination, "noRoute", self.key, ping_id))
            return out
        self.stats["packets_sent"] += 1
        out.append(SendTo(next_hop, _encode_packet(packet), control=False))
        return out

    def _receive_packet(
        self, peer: PublicKey, packet: tuple[bytes, bytes, int, tuple[str, Any]],
        now: float, out: list[Output], raw: tuple[memoryview, int] | None = None,
    ) -> None:
        """`raw`: the packet's flat encoding and where its hop limit lies in it, so
        forwarding patches one byte instead of encoding the packet again (a payload
        then is still a view into it, made bytes only if the packet is ours)."""
        source_raw, destination_raw, hop_limit, body = packet
        if len(source_raw) != KEY_SIZE or len(destination_raw) != KEY_SIZE:
            out.append(Violation(peer, "packet with a malformed address"))
            return
        if destination_raw == self.key.raw:
            # A sender may start above HOP_LIMIT: at least the one link it came over
            # (a negative count made the pong unencodable).
            self._arrive(packet, max(1, HOP_LIMIT - hop_limit + 1), now, out)
            return
        kind = body[0]
        if hop_limit <= 1:
            self._bounce(packet, "hopLimitExceeded", now, out)
            return
        next_hop = self._next_hop(PublicKey(destination_raw))
        if next_hop is None:
            self._bounce(packet, "noRoute", now, out)
            return
        if kind == "unreachable" and next_hop == peer:
            return  # never bounce an error back and forth
        self.stats["packets_forwarded"] += 1
        if raw is not None:
            data, at = raw
            forwarded = b"".join((data[:at], _HOP_BYTES[hop_limit - 1], data[at + 1:]))
        else:
            forwarded = _encode_packet((source_raw, destination_raw, hop_limit - 1, body))
        out.append(SendTo(next_hop, forwarded, control=False))

    def _arrive(
        self, packet: tuple[bytes, bytes, int, tuple[str, Any]], hops: int, now: float,
        out: list[Output],
    ) -> None:
        source_raw, _, _, (kind, value) = packet
        source = PublicKey(source_raw)
        self.stats["packets_delivered"] += 1
        if kind == "payload":
            out.append(Delivered(source, value, hops))
        elif kind == "ping":
            ping_id, sent_at, _ = value
            self._send_from_self(source, ("pong", (ping_id, sent_at, min(hops, 255))), out)
        elif kind == "pong":
            ping_id, sent_at, ping_hops = value
            out.append(PongReceived(source, ping_id, now - sent_at, ping_hops))
        elif kind == "unreachable":
            code, destination_raw, ping_id = value
            if len(destination_raw) == KEY_SIZE:
                out.append(Unreachable(PublicKey(destination_raw), code, source, ping_id))

    def _bounce(
        self, packet: tuple[bytes, bytes, int, tuple[str, Any]], code: str, now: float,
        out: list[Output],
    ) -> None:
        source_raw, destination_raw, _, (kind, value) = packet
        self.stats["packets_unroutable"] += 1
        if kind == "unreachable":
            return  # an error about an error: drop it
        ping_id = value[0] if kind == "ping" else 0
        self._send_from_self(
            PublicKey(source_raw), ("unreachable", (code, destination_raw, ping_id)), out
        )

    def _send_from_self(
        self, destination: PublicKey, body: tuple[str, Any], out: list[Output]
    ) -> None:
        if destination == self.key:
            return
        next_hop = self._next_hop(destination)
        if next_hop is not None:
            packet = (self.key.raw, destination.raw, HOP_LIMIT, body)
            self.stats["packets_sent"] += 1
            out.append(SendTo(next_hop, _encode_packet(packet), control=False))
        else:
            self.stats["packets_no_route"] += 1

    def _next_hop(self, destination: PublicKey) -> PublicKey | None:
        # A linked neighbour is reached directly, even before its announcement arrives:
        # the link handshake already proved its key, and a direct hop cannot loop.
        if destination in self._neighbors:
            return destination
        dest = self._table.get(destination)
        return dest.selected if dest is not None else None

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float:
        deadlines = [self._full_at, self._reannounce_at, self._expire_at]
        if self._flush_at is not None:
            deadlines.append(self._flush_at)
        return min(deadlines)

    def handle_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        if now >= self._reannounce_at:
            self._resign(max(self.seqno + 1, self._wanted_seqno or 0), now)
        if now >= self._expire_at:
            self._expire(now, out)
        if now >= self._full_at:
            self._full_at = now + self.config.full_update_interval
            self._dirty.discard(self.key)
            locations = now >= self._locations_at
            if locations:
                self._locations_at = now + self.config.location_refresh_interval
            out.extend(self._full_dump(list(self._neighbors), now, locations=locations))
        if self._flush_at is not None and now >= self._flush_at:
            out.extend(self._flush(now))
        return out

    def _expire(self, now: float, out: list[Output]) -> None:
        self._expire_at = now + min(self.config.route_hold / 4, self.config.request_hold)
        limit = now - self.config.route_hold
        for origin, dest in list(self._table.items()):
            stale = [n for n, v in dest.via.items() if v.updated < limit]
            for neighbor in stale:
                del dest.via[neighbor]
            if stale or (dest.selected is None and dest.via):
                # Only infeasible routes left: the seqno request, or its answer, may
                # have been lost; ask again (at most once per request_hold).
                self._reselect(origin, dest, now, out)
            if dest.selected is None and not dest.via and dest.gone_since is not None \
                    and dest.gone_since < limit and origin not in self._dirty:
                del self._table[origin]  # forgotten, feasibility distance included
        for key in [k for k, until in self._requests.items() if until <= now]:
            del self._requests[key]
        self.directory.purge(now + self.wall_offset)

    def _bump_seqno(self, at_least: int, now: float) -> None:
        if now >= self._signed_at + self.config.min_reannounce:
            self._resign(max(at_least, self.seqno + 1), now)
        else:
            # Many requests at once: sign once, when the interval is over.
            self._wanted_seqno = max(self._wanted_seqno or 0, at_least)
            self._reannounce_at = min(
                self._reannounce_at, self._signed_at + self.config.min_reannounce
            )

    def _resign(self, seqno: int, now: float) -> None:
        seqno = min(seqno, MAX_SEQNO)
        self.seqno = seqno  # always the seqno `_signature` signs
        self._wanted_seqno = None
        self._signature = self._sign(seqno)
        self._signed_at = now
        self._reannounce_at = now + self.config.reannounce_interval
        self._mark_dirty(self.key, now)

    # ------------------------------------------------------------------ crypto

    def _sign(self, seqno: int) -> bytes:
        return self.identity.sign(ANNOUNCE_CONTEXT + self.key.raw + _SEQNO.pack(seqno))

    def _verify(self, origin: PublicKey, seqno: int, signature: bytes) -> bool:
        cache_key = (origin.raw, seqno)
        if self._verified.get(cache_key) == signature:
            return True
        if not origin.verify(signature, ANNOUNCE_CONTEXT + origin.raw + _SEQNO.pack(seqno)):
            return False
        if len(self._verified) > 4 * self.config.max_routes:
            self._verified.clear()
        self._verified[cache_key] = signature
        return True

    def _take_tokens(self, neighbor: _Neighbor, count: int, now: float) -> bool:
        rate, burst = self.config.rate_per_neighbor, self.config.burst_per_neighbor
        neighbor.tokens = min(burst, neighbor.tokens + (now - neighbor.refilled) * rate)
        neighbor.refilled = now
        if neighbor.tokens < count:
            return False
        neighbor.tokens -= count
        return True

    # ------------------------------------------------------------ inspection

    def routes(self, now: float) -> list[RouteRow]:
        rows = [RouteRow(self.key, None, 0, self.seqno, now - self._signed_at, 0)]
        for origin, dest in self._table.items():
            via = self._selected_via(dest)
            if via is None:
                continue
            alternatives = sum(
                1 for n, v in dest.via.items()
                if n != dest.selected and _feasible(dest.fd, v.seqno, v.reported)
            )
            rows.append(RouteRow(origin, dest.selected, via.metric, via.seqno,
                                 now - via.updated, alternatives))
        return rows

    def lookup(self, destination: PublicKey, now: float) -> RouteRow | None:
        if destination == self.key:
            return RouteRow(self.key, None, 0, self.seqno, now - self._signed_at, 0)
        dest = self._table.get(destination)
        via = self._selected_via(dest)
        if dest is None or via is None:
            return None
        return RouteRow(destination, dest.selected, via.metric, via.seqno, now - via.updated, 0)

    def next_hop(self, destination: PublicKey) -> PublicKey | None:
        return self._next_hop(destination)

    # -------------------------------------------------------------- locations

    def publish_location(self, location: Location, now: float) -> list[Output] | None:
        """A twin attached here published where it is: keep and flood it. None when
        the record is refused (bad signature, not newer, expired)."""
        if not self.directory.accept(location, now + self.wall_offset):
            return None
        self._location_changed(location.twin, now, exclude=None)
        return []

    def locate(self, twin: PublicKey, now: float) -> PublicKey | None:
        """The NIC where `twin` said it is, from the newest unexpired record."""
        return self.directory.locate(twin, now + self.wall_offset)

    def _location_changed(self, twin: PublicKey, now: float, exclude: PublicKey | None) -> None:
        self._dirty_locations.add(twin)
        self._location_exclude[twin] = exclude
        if self._flush_at is None:
            self._flush_at = now + self.config.update_delay

    def _flush_locations(self, now: float) -> list[Output]:
        dirty, self._dirty_locations = self._dirty_locations, set()
        excluded, self._location_exclude = self._location_exclude, {}
        records = [loc for twin in dirty if (loc := self.directory.records.get(twin))]
        out: list[Output] = []
        for peer in self._neighbors:
            # Not back to the neighbour we heard it from: it has it already.
            mine = [loc for loc in records if excluded.get(loc.twin) != peer]
            size = self.config.max_batch
            for start in range(0, len(mine), size):
                out.append(self._routing_to(peer, locations=mine[start : start + size]))
        return out

    def table_size(self) -> int:
        return len(self._table)


def _feasible(fd: tuple[int, int] | None, seqno: int, metric: int) -> bool:
    if metric >= INFINITY:
        return False
    if fd is None:
        return True
    return seqno > fd[0] or (seqno == fd[0] and metric < fd[1])


# An Overlay message holding a packet, as pycapnp lays it out: segment table, root
# pointer, Overlay (tag `packet`, a pointer to the Packet right after it), Packet (hop
# limit, body tag; source, destination and body pointers), then what the pointers
# point to in the order they were set: the two addresses, then the payload or Ping.
_PACKET_HEAD = struct.Struct("<IIQH6xQBxH4x3Q")
_OVERLAY_ROOT = flat.struct_pointer(0, 1, 1)
_PACKET_POINTER = flat.struct_pointer(0, 1, 3)
_PACKET_TAG = 1
_PAYLOAD_TAG = 0
_PING_TAGS = {"ping": 1, "pong": 2}
_PING_KINDS = {tag: kind for kind, tag in _PING_TAGS.items()}
_PING = struct.Struct("<QdB7x")  # Ping: id, sentAt, hops; three data words
_PING_WORDS = _PING.size // 8
_HOP_BYTES = [bytes((hops,)) for hops in range(256)]


def encode_payload_packet(source: bytes, destination: bytes, hop_limit: int,
                          payload: bytes) -> bytes:
    """An `Overlay` packet carrying `payload`, byte for byte what pycapnp builds."""
    body, pointers = flat.lay_out((source, destination, payload))
    words = 7 + sum(len(b) for b in body) // 8
    return b"".join((_PACKET_HEAD.pack(0, words, _OVERLAY_ROOT, _PACKET_TAG, _PACKET_POINTER,
                                       hop_limit, _PAYLOAD_TAG, *pointers), *body))


def encode_ping_packet(source: bytes, destination: bytes, hop_limit: int, kind: str,
                       ping: tuple[int, float, int]) -> bytes:
    """An `Overlay` packet whose body is `kind` ("ping" or "pong") holding `ping`
    (id, sentAt, hops), byte for byte what pycapnp builds for non-empty addresses
    (pycapnp points an empty one at a zero-length list, this a null pointer: both read
    back as b"")."""
    # The empty third blob only makes the address pointers count the Ping's pointer.
    body, (source_pointer, destination_pointer, _) = flat.lay_out((source, destination, b""))
    blob_words = sum(len(b) for b in body) // 8
    return b"".join((
        _PACKET_HEAD.pack(0, 7 + blob_words + _PING_WORDS, _OVERLAY_ROOT, _PACKET_TAG,
                          _PACKET_POINTER, hop_limit, _PING_TAGS[kind], source_pointer,
                          destination_pointer, flat.struct_pointer(blob_words, _PING_WORDS, 0)),
        *body, _PING.pack(*ping),
    ))


def read_flat_packet(
    data: Any,
) -> tuple[tuple[Any, Any, int, tuple[str, Any]], int] | None:
    """A payload, ping or pong packet in the canonical flat layout (what the encoders
    above and pycapnp write) as `_read_overlay` returns it, with the byte offset of its
    hop limit; None for anything else, which pycapnp then decodes. `data`: bytes, or a
    memoryview (whose slices, the addresses and payload returned, are views too)."""
    layout = flat.root(data)
    if layout is None or layout[1] != 1 or layout[3] != 1 \
            or flat.union_tag(data, layout) != _PACKET_TAG:
        return None
    packet = flat.struct_at(data, layout[2])
    if packet is None or packet[1] != 1 or packet[3] != 3:
        return None
    start, _, pointers, _ = packet
    (tag,) = flat.U16.unpack_from(data, start + 2)  # the body's tag, after the hop limit
    source = flat.blob_at(data, pointers)
    destination = flat.blob_at(data, pointers + 8)
    if source is None or destination is None:
        return None
    body: tuple[str, Any]
    if tag == _PAYLOAD_TAG:
        payload = flat.blob_at(data, pointers + 16)
        if payload is None:
            return None
        body = ("payload", payload)
    else:
        kind = _PING_KINDS.get(tag)
        if kind is None:
            return None
        # Only a Ping of exactly its own size: an older or newer writer's goes to pycapnp.
        ping = flat.struct_at(data, pointers + 16)
        if ping is None or ping[1] != _PING_WORDS or ping[3] != 0:
            return None
        body = (kind, _PING.unpack_from(data, ping[0]))
    return (source, destination, data[start], body), start


def _encode_packet(packet: tuple[bytes, bytes, int, tuple[str, Any]]) -> bytes:
    source, destination, hop_limit, (kind, value) = packet
    if kind == "payload":
        return encode_payload_packet(source, destination, hop_limit, value)
    if kind in _PING_TAGS:
        return encode_ping_packet(source, destination, hop_limit, kind, value)
    message = _route.Overlay.new_message()
    p = message.init("packet")
    p.source = source
    p.destination = destination
    p.hopLimit = hop_limit
    code, destination_raw, ping_id = value
    unreachable = p.body.init("unreachable")
    unreachable.code = code
    unreachable.destination = destination_raw
    unreachable.pingId = ping_id
    return bytes(message.to_bytes())


def _read_overlay(reader: Any) -> tuple[str, Any]:
    which = str(reader.which())
    if which == "routing":
        routing = reader.routing
        updates = [
            (bytes(u.announcement.origin), int(u.announcement.seqno),
             bytes(u.announcement.signature), int(u.metric))
            for u in routing.updates
        ]
        retractions = [bytes(r) for r in routing.retractions]
        requests = [(bytes(r.origin), int(r.seqno), int(r.hopLimit)) for r in routing.requests]
        locations = [
            (bytes(r.twin), bytes(r.nic), int(r.seqno), float(r.expires), bytes(r.signature))
            for r in routing.locations
        ]
        return which, (updates, retractions, requests, locations)
    if which == "packet":
        p = reader.packet
        kind = str(p.body.which())
        value: Any
        if kind == "payload":
            value = bytes(p.body.payload)
        elif kind in ("ping", "pong"):
            ping = getattr(p.body, kind)
            value = (int(ping.id), float(ping.sentAt), int(ping.hops))
        elif kind == "unreachable":
            u = p.body.unreachable
            value = (str(u.code), bytes(u.destination), int(u.pingId))
        else:
            raise DecodeError(f"packet body {kind!r} unknown to this version")
        return which, (bytes(p.source), bytes(p.destination), int(p.hopLimit), (kind, value))
    raise DecodeError(f"overlay message {which!r} unknown to this version")


# Type of a function the simulator and tests may pass around.
OutputHandler = Callable[[Output], None]
