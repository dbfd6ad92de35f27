"""Twin lookups in pnicd: the trio shell around the DHT core (`proto.dht.Dht`).

    port = TwinPort(nic, state_dir, locate=nic.overlay.locate,
                    publish=nic.overlay.publish_location)
    lookup = TwinLookup(nic, port)        # takes over the port's lookup hooks
    await nursery.start(lookup.run)       # before port.serve: twins publish at once
    await nursery.start(port.serve)

What it wires:

- `port.find` (a twin's `find` request) runs a DHT lookup and answers with the
  newest record, the overlay hops to the NIC it names (from the route table; 0 =
  this NIC, `NO_ROUTE` when there is no route right now), rounds, NICs asked and
  the time it took;
- `port.on_dht` feeds DHT messages from other NICs to the core; the core's
  messages go out with `port.send_dht` (best effort: a lost one is a query timeout);
- `port.publish` is wrapped: a twin's record still goes to the flooded directory
  (the router, which the bus uses to route envelopes) and, when that accepts it, into
  the DHT too (stored on the k NICs closest to the twin);
- `port.locate` is wrapped: when the flooded directory does not know a twin, the
  DHT's records and recent lookup results answer, and on a miss a lookup starts in
  the background (at most `MAX_BACKGROUND` at once) and the caller gets None now; the
  outbox retries `noRoute`, and its next attempt finds the result.

Metrics: the core's counters and gauges join the NIC's `/metrics`
(`nic.metric_sources`, rendered by `health.dht_metrics`).

Contacts: every NIC the route table knows is offered to the core (polled, faster
while the table changes), and NICs whose route went away are withdrawn. The core
runs on trio's clock; records expire on the wall clock (`wall_offset`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
import trio

from twinmesh.identity.keys import PublicKey
from twinmesh.nic.health import Metric, dht_metrics
from twinmesh.nic.internal_errors import DHT_TIMER, TIMER_ERROR_PAUSE
from twinmesh.nic.twins import FindAnswer, TwinPort
from twinmesh.proto.attach import Location
from twinmesh.proto.dht import Dht, DhtConfig, LookupDone, Output, SendDht, Violation

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

NO_ROUTE = 255  # FindResult.hops when the overlay has no route to the record's NIC
MAX_BACKGROUND = 128  # lookups started by `locate` misses, at once
ROUTE_POLL_MIN = 0.1  # route table polling while it changes ...
ROUTE_POLL_MAX = 5.0  # ... backing off to this while it does not
FIND_SLACK = 1.0  # a `find` waits this much past the core's own lookup_timeout


class TwinLookup:
    def __init__(self, nic: Nic, port: TwinPort, config: DhtConfig | None = None) -> None:
        self.nic = nic
        self.port = port
        self.config = config or DhtConfig()
        self.core: Dht | None = None  # created by `run`; only touched from trio tasks
        # What the port was given: the router's flooded directory. Public so a test
        # can take it away and watch the DHT alone.
        self.directory_locate: Callable[[PublicKey], PublicKey | None] = port.locate
        self.directory_publish: Callable[[Location], bool] = port.publish
        self._waiters: dict[int, trio.MemorySendChannel[LookupDone]] = {}
        self._background: dict[int, PublicKey] = {}
        self._known: set[PublicKey] = set()
        self._poll_every = ROUTE_POLL_MIN
        self._poll_at = 0.0
        self._timer_scope: trio.CancelScope | None = None
        self.log = structlog.get_logger("twinmesh.lookup").bind(node=nic.key.short)
        port.locate = self.locate
        port.publish = self.publish
        port.find = self.find
        port.on_dht = self.on_dht
        nic.metric_sources.append(self.metrics)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Create the core, then run its timers and the route polling until cancelled."""
        now = trio.current_time()
        self.core = Dht(self.nic.key, now=now, config=self.config,
                        wall_offset=time.time() - now)
        task_status.started()
        while True:
            core = self.core
            deadline = min(core.get_timer(), self._poll_at)
            with trio.CancelScope(deadline=deadline) as self._timer_scope:
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            try:
                if now >= self._poll_at:
                    self._poll_routes(now)
                self._handle(core.handle_timer(now))
            except Exception as exc:  # a bug: skip this step, keep the DHT running
                self.nic.internal_errors.record(DHT_TIMER, exc)
                await trio.sleep(TIMER_ERROR_PAUSE)

    # ------------------------------------------------------------ port hooks

    def publish(self, location: Location) -> bool:
        if not self.directory_publish(location):
            return False
        if self.core is not None:
            reason, outputs = self.core.publish(location, trio.current_time())
            if reason:
                self.log.info("location not stored in the DHT", twin=location.twin.short,
                              reason=reason)
            self._handle(outputs)
        return True

    def locate(self, twin: PublicKey) -> PublicKey | None:
        at = self.directory_locate(twin)
        if at is not None or self.core is None:
            return at
        now = trio.current_time()
        record = self.core.cached(twin, now)
        if record is not None:
            return record.nic
        if twin not in self._background.values() and len(self._background) < MAX_BACKGROUND:
            lookup_id, outputs = self.core.find(twin, now)
            self._background[lookup_id] = twin
            self._handle(outputs)
        return None

    async def find(self, twin: PublicKey) -> FindAnswer | None:
        if self.core is None:
            return None
        send, receive = trio.open_memory_channel[LookupDone](1)
        lookup_id, outputs = self.core.find(twin, trio.current_time())
        self._waiters[lookup_id] = send
        try:
            self._handle(outputs)
            with trio.move_on_after(self.config.lookup_timeout + FIND_SLACK):
                done = await receive.receive()
                return self._answer(done)
            return None
        finally:
            self._waiters.pop(lookup_id, None)

    def on_dht(self, source: PublicKey, data: bytes, hops: int) -> None:
        if self.core is not None:
            self._handle(self.core.receive(source, data, trio.current_time()))

    def metrics(self) -> list[Metric]:
        """The DHT's families for the NIC's `/metrics` (none before `run`)."""
        return dht_metrics(self.core) if self.core is not None else []

    # ---------------------------------------------------------------- outputs

    def _answer(self, done: LookupDone) -> FindAnswer | None:
        location = done.location
        if location is None:
            return None
        if location.nic == self.nic.key:
            hops = 0
        else:
            row = self.nic.overlay.lookup(location.nic)
            hops = NO_ROUTE if row is None else min(row.metric, NO_ROUTE)
        return FindAnswer(location, hops, done.rounds, done.queried, done.elapsed)

    def _handle(self, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, SendDht):
                self.port.send_dht(output.nic, output.data)
            elif isinstance(output, LookupDone):
                self._background.pop(output.lookup_id, None)
                waiter = self._waiters.get(output.lookup_id)
                if waiter is not None:
                    waiter.send_nowait(output)  # capacity 1, one LookupDone per id
            elif isinstance(output, Violation):
                self.log.warning("bad DHT message", nic=output.source.short,
                                 reason=output.reason)
        self._rearm()

    def _rearm(self) -> None:
        # Only ever earlier: the core's `handle_timer` does nothing before it is due.
        scope = self._timer_scope
        if scope is not None and self.core is not None:
            deadline = min(self.core.get_timer(), self._poll_at)
            if deadline < scope.deadline:
                scope.deadline = deadline

    # --------------------------------------------------------------- contacts

    def _poll_routes(self, now: float) -> None:
        assert self.core is not None
        router = self.nic.overlay.router
        routes = {row.destination for row in router.routes(now)} if router else set()
        routes.discard(self.nic.key)
        outputs: list[Output] = []
        for key in routes - self._known:
            outputs += self.core.add_contact(key, now)
        for key in self._known - routes:
            self.core.forget_contact(key)
        changed = routes != self._known
        self._known = routes
        self._poll_every = ROUTE_POLL_MIN if changed else min(ROUTE_POLL_MAX,
                                                               self._poll_every * 2)
        self._poll_at = now + self._poll_every
        self._handle(outputs)
