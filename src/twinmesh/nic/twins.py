"""The NIC side of the message bus: twins attach on `twins.sock`, envelopes flow.

What runs here (all in the NIC's nursery):

- the Unix socket where twins attach (challenge-response, `proto.attach`) and then
  submit sealed envelopes, ask for status, and receive envelopes and status updates;
- the outbox core (`proto.outbox`), its timer, and one writer task that commits
  everything the core asks to persist in batches (group commit) before the twins
  that submitted hear "accepted" (on the loop while commits are quick, in a worker
  thread after a slow one: `commit_placement`);
- one sender task that hands envelopes to the overlay, addressed to the NIC where the
  destination twin is (the location records; our own twins are served directly);
- the receiving end: envelopes from the overlay go to the attached sessions of their
  destination twin, or a `Notice(offline)` goes back to the source NIC; acks close
  outbox entries (their delivery token must match) and are passed on to the twin.

Sending to the overlay is best effort on purpose: the outbox retries until an ack
arrives or the deadline passes, so a dropped transmission costs a retry, not a message.

Batching (the cost of a message is mostly wake-ups, system calls and Cap'n Proto
frames, not crypto): everything that piles up while a task sleeps goes out together.
The sender packs the envelopes queued for one NIC into one overlay packet
(`NicBus.envelopes`); each twin session has a `Mailbox` whose pump writes what is
waiting as one frame per kind (`results`, `statusUpdates`, `deliveries`) when the
twin attached with `batches`; a twin submits many envelopes in one `submits` frame,
and acks it sends with requestId 0 get no result. An ack that closed an outbox entry
here is not handed to the source twin: the `delivered` status update says it all.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import struct
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from twinmesh.bus.crypto import Header, read_header
from twinmesh.carriers.base import nowait_writer
from twinmesh.carriers.unix import serve_unix
from twinmesh.commit_placement import CommitPlacement, StallClock
from twinmesh.control.framed import CONTROL_MAX_FRAME, FramedStream
from twinmesh.errors import (
    DecodeError,
    NoRouteError,
    RemoteProtocolError,
    StorageError,
)
from twinmesh.identity.keys import PublicKey
from twinmesh.nic import twin_frames
from twinmesh.nic.health import Metric, outbox_metrics
from twinmesh.nic.internal_errors import (
    OUTBOX_COMMIT,
    OUTBOX_TIMER,
    TIMER_ERROR_PAUSE,
    TRANSMIT,
    TWIN_FRAME,
    TWIN_PUMP,
    InternalErrors,
)
from twinmesh.nic.outbox_store import OutboxStore
from twinmesh.proto.attach import NONCE_SIZE, Location, verify_attach
from twinmesh.proto.outbox import (
    ACK_GRACE,
    FINAL,
    Forget,
    Outbox,
    OutboxConfig,
    Persist,
    Refused,
    StatusChanged,
    Transmit,
)
from twinmesh.wire import flat, schemas
from twinmesh.wire.framing import PREFIX_SIZE, frame_prefix

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

TWINS_SOCKET = "twins.sock"
OUTBOX_FILE = "outbox.sqlite3"
LOCAL_VERSION = 1
ATTACH_TIMEOUT = 10.0
SESSION_QUEUE = 1024  # envelopes and updates waiting for one twin session
# Per session: submissions waiting for their group commit. The session keeps reading
# while they wait (so one commit covers many of them); past this many it stops reading.
COMMITS_IN_FLIGHT = 1024
PUMP_BATCH = 256 * 1024  # bytes of queued frames written to a twin in one send
TRANSMIT_QUEUE = 4096
# Envelope bytes packed into one overlay packet (well under a link's maximum payload).
PACKET_BATCH = 256 * 1024
# Items in one list frame or packet, at most. Smaller batches (64) were measured: they
# cost more CPU per message in every process (more wake-ups, commits and writes) than
# they gain by letting the next process start earlier.
BATCH_ITEMS = 1024
REARM_SLACK = 0.005  # seconds: a later outbox timer is moved only by more
NOTICE_CODES = frozenset({"offline", "unknownTwin"})  # what a destination NIC may answer
MAX_ENVELOPE = 96 * 1024  # a 64 KiB payload plus header and sealing overhead
# The largest frame a twin may send: a `submits` list of envelopes (the client keeps
# its lists under SUBMITS_BATCH; one envelope is still capped by MAX_ENVELOPE).
SESSION_MAX_FRAME = 512 * 1024

_local = schemas.local


class Mailbox:
    """What waits to be written to one twin session, in order, as (kind, value) items:
    "frame" (an encoded LocalMessage), "result", "status" or "deliver". Bounded: past
    `limit` items `send_nowait`/`put` raise trio.WouldBlock, except results, which
    must not be lost (`put(..., force=True)`; they are bounded by the requests a
    session may have in flight). After `close()` they raise trio.BrokenResourceError.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: deque[tuple[str, Any]] = deque()
        self.closed = False
        self._ready = trio.Event()
        self._room = trio.Event()
        # Set by the pump: how to write without blocking (None: no such path), the
        # twin's frame options, and whether the pump is parked waiting for items.
        self.write_nowait: Callable[[bytes], int] | None = None
        self.batches = False
        self.max_frame = SESSION_MAX_FRAME
        self.idle = False
        self.unsent = b""  # written bytes the kernel did not take: they go first

    def send_nowait(self, frame: bytes) -> None:
        """Queue an encoded LocalMessage (as a memory channel would)."""
        self.put("frame", frame)

    def put(self, kind: str, value: Any, *, force: bool = False, wake: bool = True) -> None:
        """Queue an item; with `wake=False` the caller promises a `flush()` soon."""
        if self.closed:
            raise trio.BrokenResourceError("the twin session is gone")
        if not force and len(self.items) >= self.limit:
            raise trio.WouldBlock
        self.items.append((kind, value))
        if wake:
            self._ready.set()

    def flush(self) -> None:
        """Write what is queued now when the pump is parked and the kernel takes it
        (no wake-up); otherwise wake the pump."""
        if not self.items or self.closed:
            return
        if not self.idle or self.unsent or self.write_nowait is None:
            self._ready.set()
            return
        data = b"".join(_frames(self.items, self.batches, self.max_frame))
        self.took()
        try:
            written = self.write_nowait(data)
        except OSError:
            written = len(data)  # the twin is gone: its reader ends the session
        if written < len(data):
            self.unsent = data[written:]
        if self.items or self.unsent:
            self._ready.set()

    async def wait_room(self) -> None:
        while len(self.items) >= self.limit and not self.closed:
            await self._room.wait()

    async def wait_items(self) -> None:
        while not self.items and not self.unsent:
            if self.closed:
                raise trio.ClosedResourceError
            self.idle = True
            try:
                await self._ready.wait()
            finally:
                self.idle = False
            self._ready = trio.Event()

    def took(self) -> None:
        """The pump took items: wake whoever waits for room."""
        self._room.set()
        self._room = trio.Event()

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._room.set()


@dataclass(eq=False)
class TwinSession:
    """One attached connection of a twin."""

    id: int
    twin: PublicKey
    receive: bool
    outgoing: Mailbox
    batches: bool = False  # the twin reads list frames (Attach.batches)
    # Submissions waiting for their group commit; past COMMITS_IN_FLIGHT the session
    # stops reading (released by the writer once their commit is done).
    commits: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(
        COMMITS_IN_FLIGHT))


@dataclass(frozen=True)
class FindAnswer:
    """What a twin lookup (findDigitalTwinById) found, and what it cost."""

    location: Location
    hops: int  # overlay hops to the NIC the record points at
    rounds: int
    queried: int
    elapsed: float  # seconds


@dataclass(frozen=True)
class _Waiting:
    """A submission waiting for its group commit before the twin hears "accepted"."""

    session: TwinSession
    request_id: int
    transmits: list[Transmit]
    # Its first "sent": told to the submitting session with "accepted" (one item, not
    # two), to the twin's other sessions as a status update.
    sent: StatusChanged | None = None


class TwinPort:
    def __init__(
        self,
        nic: Nic,
        state_dir: Path,
        *,
        locate: Callable[[PublicKey], PublicKey | None],
        publish: Callable[[Location], bool],
        config: OutboxConfig | None = None,
    ) -> None:
        self.nic = nic
        self.socket_path = state_dir / TWINS_SOCKET
        self.store_path = state_dir / OUTBOX_FILE
        self.locate = locate  # twin -> NIC key from location records
        self.publish = publish  # floods a verified location record; False when refused
        # Twin lookups (the DHT, `nic.lookup`): `find` answers a twin's find request
        # (None: not found); `on_dht` takes DHT messages other NICs sent us.
        self.find: Callable[[PublicKey], Awaitable[FindAnswer | None]] | None = None
        self.on_dht: Callable[[PublicKey, bytes, int], None] | None = None
        self.outbox = Outbox(config or OutboxConfig(ack_grace=ACK_GRACE))
        self.sessions: dict[PublicKey, list[TwinSession]] = defaultdict(list)
        self.counters: dict[str, int] = defaultdict(int)
        self._store: OutboxStore | None = None
        self._batch: list[Persist | Forget] = []
        self._waiting: list[_Waiting] = []
        self._batch_ready = trio.Event()
        self._committing = False  # the writer holds a batch (its store use is running)
        # Whether a power-safe commit runs on the loop or in a thread, and the clock
        # its durations are measured with (only the writer task touches either).
        self.commit_placement = CommitPlacement()
        self._stall_clock = StallClock()
        self.commit_clock: Callable[[], float] = self._stall_clock
        # A "step" (`_step()`) is one burst of synchronous work: a twin's frame, an
        # overlay packet, a commit. What it produces for other tasks waits until its end
        # and is then done from here when that task is idle, sparing a wake-up each:
        # packets for other NICs, a batch of acks to commit, frames for twin sessions.
        self._step_depth = 0
        self._stepping = _Step(self)
        self._step_packets: list[tuple[PublicKey, str, bytes]] = []
        self._step_mailboxes: dict[int, Mailbox] = {}
        # The outbox timer wants re-arming (`_rearm`): done once at the end of a step
        # or of a twin's frame, not once per message.
        self._rearm_due = False
        # (NIC, "envelope" | "frame", bytes): envelopes are packed many to a packet.
        self._transmit_in, self._transmit_out = trio.open_memory_channel[
            tuple[PublicKey, str, bytes]](TRANSMIT_QUEUE)
        # Items handed to the sender that it has not taken yet (cheaper to keep than
        # to ask the channel for its statistics on every step).
        self._transmit_queued = 0
        self._timer_scope: trio.CancelScope | None = None
        self._session_ids = itertools.count(1)
        self.log = structlog.get_logger("twinmesh.twins").bind(node=nic.key.short)
        self.internal_errors: InternalErrors = nic.internal_errors
        nic.metric_sources.append(self.metrics)

    def metrics(self) -> list[Metric]:
        """The outbox's families for the NIC's `/metrics`."""
        return outbox_metrics(self.counters, self.outbox)

    # ---------------------------------------------------------------- running

    async def serve(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        self._store = await trio.to_thread.run_sync(OutboxStore, self.store_path)
        try:
            restored = await trio.to_thread.run_sync(self._store.load)
            now = _unix_now()
            for entry in restored:
                self._apply(self.outbox.restore(entry, now))
            if restored:
                self.log.info("outbox restored", messages=len(self.outbox),
                              finished=len(restored) - len(self.outbox))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._sender)
                nursery.start_soon(self._timer)
                await nursery.start(
                    lambda task_status: serve_unix(
                        self.socket_path, self._connection, mode=0o600, task_status=task_status
                    )
                )
                task_status.started(self.socket_path)
        finally:
            store, self._store = self._store, None
            self._stall_clock.close()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(store.close)

    async def _timer(self) -> None:
        while True:
            deadline = self.outbox.get_timer()
            # The outbox lives on the wall clock (deadlines are unix times).
            wait = float("inf") if deadline is None else max(0.0, deadline - _unix_now())
            with trio.move_on_after(wait) as self._timer_scope:
                await trio.sleep_forever()
            self._timer_scope = None
            try:
                with self._step():
                    self._apply(self.outbox.handle_timer(_unix_now()))
            except Exception as exc:  # a bug: skip this step, keep the outbox running
                self.internal_errors.record(OUTBOX_TIMER, exc)
                await trio.sleep(TIMER_ERROR_PAUSE)

    def _rearm_if_due(self) -> None:
        if self._rearm_due:
            self._rearm_due = False
            self._rearm()

    def _rearm(self) -> None:
        # Later too, not only earlier: every message sets a retry timer that its ack
        # makes moot, and a timer left at the moot time wakes the process (on a busy
        # box, a wake-up costs ~50x the heap push of moving it). Moves under
        # REARM_SLACK are not worth even the push.
        scope = self._timer_scope
        if scope is None:
            return
        deadline = self.outbox.get_timer()
        if deadline is None:
            wake = math.inf
        else:
            wake = trio.current_time() + max(0.0, deadline - _unix_now())
        if wake < scope.deadline or wake > scope.deadline + REARM_SLACK:
            scope.deadline = wake

    async def _writer(self) -> None:
        """Group commit: everything persisted while the last commit ran goes in one;
        then the twins that submitted hear "accepted" and the envelopes go out."""
        while True:
            await self._batch_ready.wait()
            self._batch_ready = trio.Event()
            batch, self._batch = self._batch, []
            waiting, self._waiting = self._waiting, []
            if not batch:
                continue
            assert self._store is not None
            error = ""
            if waiting:  # new submissions: power safe (an fsync)
                error = await self._commit_power_safe(batch)
            else:  # acks and retries: no fsync, cheaper inline than a thread hop
                self._commit_now(batch)
            try:
                with self._step():
                    self._committed(waiting, error)
            except Exception as exc:  # a bug: these twins' requests time out, no more
                self.internal_errors.record(OUTBOX_COMMIT, exc)

    async def _commit_power_safe(self, batch: list[Persist | Forget]) -> str:
        """Commit a batch with new submissions, durably: on the loop while such commits
        are quick (`CommitPlacement`), else in a thread, while the loop gathers the
        next batch. Returns the error ("": committed)."""
        assert self._store is not None
        start = self.commit_clock()
        if self.commit_placement.inline(start, len(batch)):
            self.counters["outbox_commits_inline"] += 1
            failure: StorageError | None = None
            try:
                self._store.apply(batch, _unix_now())
            except StorageError as exc:
                failure = exc
            end = self.commit_clock()
            self.commit_placement.inline_took(end - start, end)
            return "" if failure is None else self._commit_failed(batch, failure)
        self.counters["outbox_commits_threaded"] += 1
        self._committing = True
        try:
            await trio.to_thread.run_sync(self._store.apply, batch, _unix_now())
        except StorageError as exc:
            return self._commit_failed(batch, exc)
        finally:
            self._committing = False
        return ""

    def _commit_now(self, batch: list[Persist | Forget]) -> None:
        """Commit acks and retries (no new submission) on the loop: no fsync."""
        assert self._store is not None
        try:
            self._store.apply(batch, power_safe=False)
        except StorageError as exc:
            self._commit_failed(batch, exc)

    def _commit_failed(self, batch: list[Persist | Forget], exc: StorageError) -> str:
        error = str(exc)
        self.log.error("outbox commit failed", error=error, batch=len(batch))
        for item in batch:
            if isinstance(item, Persist):
                self.outbox.drop(item.entry.id)
        return error

    def _committed(self, waiting: list[_Waiting], error: str) -> None:
        """The submissions in a commit: answer them, and send their envelopes."""
        if error:
            for submitted in waiting:
                self._answer(submitted.session, submitted.request_id, ok=False,
                             code="overloaded",
                             message=f"the NIC could not store the message: {error}")
                submitted.session.commits.release()
            return
        self.counters["outbox_accepted"] += len(waiting)
        sessions = self.sessions
        for submitted in waiting:
            session = submitted.session
            for transmit in submitted.transmits:
                self._transmit(transmit)
            sent = submitted.sent
            self._answer(session, submitted.request_id, ok=True,
                         status="queued" if sent is None else sent.status.value)
            # The twin's other sessions hear "sent" too (the submitting one just did).
            if sent is not None and len(sessions.get(session.twin, ())) > 1:
                self._status_update(sent, but=session)
            session.commits.release()

    def _step(self) -> _Step:
        return self._stepping

    def _end_step(self) -> None:
        self._rearm_if_due()
        if self._batch:
            if self._waiting or self._committing or self._store is None:
                self._batch_ready.set()
            else:  # only acks and retries, and the writer is idle: commit them here
                batch, self._batch = self._batch, []
                self._commit_now(batch)
        if self._step_packets:
            packets, self._step_packets = self._step_packets, []
            self._send_packets(packets)
        if self._step_mailboxes:
            mailboxes, self._step_mailboxes = self._step_mailboxes, {}
            for mailbox in mailboxes.values():
                mailbox.flush()

    def _send_packets(self, items: list[tuple[PublicKey, str, bytes]]) -> None:
        """Hand a step's packets to the overlay now when the sender is idle; what would
        have to wait for room (and all after it) goes to the sender instead."""
        queued: list[tuple[PublicKey, str, bytes]] = []
        if self._transmit_queued:
            queued = items  # the sender has work: keep the order behind it
        else:
            for nic_key, packet in _packed(items):
                if not queued:
                    try:
                        if self.nic.send_nowait(nic_key, packet):
                            continue
                    except NoRouteError:
                        self.counters["transmit_no_route"] += 1
                        continue
                queued.append((nic_key, "frame", packet))
        for item in queued:
            self._queue_transmit(item)

    def _queue_transmit(self, item: tuple[PublicKey, str, bytes]) -> bool:
        """Hand an item to the sender; False when its queue is full (dropped)."""
        try:
            self._transmit_in.send_nowait(item)
        except trio.WouldBlock:
            self.counters["transmit_dropped"] += 1  # the outbox will retry
            return False
        self._transmit_queued += 1
        return True

    async def _sender(self) -> None:
        """Hands what is queued for other NICs to the overlay: the envelopes for one
        NIC packed into as few packets as fit, other frames as they are, in order."""
        async for first in self._transmit_out:
            items = [first]
            while len(items) < TRANSMIT_QUEUE:
                try:
                    items.append(self._transmit_out.receive_nowait())
                except trio.WouldBlock:
                    break
            self._transmit_queued -= len(items)
            try:
                for nic_key, packet in _packed(items):
                    try:
                        await self.nic.send(nic_key, packet)
                    except NoRouteError:
                        self.counters["transmit_no_route"] += 1
            except Exception as exc:  # a bug: these packets are lost, the outbox retries
                self.internal_errors.record(TRANSMIT, exc)

    # --------------------------------------------------------- outbox outputs

    def _apply(self, outputs: list[Any]) -> None:
        """Carry out what the outbox core asked for (except for new submissions, whose
        Transmits wait for their commit in `_submit`)."""
        for output in outputs:
            if isinstance(output, Persist | Forget):
                self._batch.append(output)
                if not self._step_depth:  # else the step's end decides
                    self._batch_ready.set()
            elif isinstance(output, Transmit):
                self._transmit(output)
            elif isinstance(output, StatusChanged):
                if output.status in FINAL:
                    self.counters[f"outbox_{output.status.value}"] += 1
                self._status_update(output)
        self._rearm_due = True
        if not self._step_depth:  # else the step's end does it
            self._rearm_if_due()

    def _transmit(self, transmit: Transmit) -> None:
        if transmit.attempt > 1:
            self.counters["outbox_retries"] += 1
        destination = transmit.destination
        if destination in self.sessions:
            self._deliver_local(destination, transmit.envelope)
            return
        nic_key = self.locate(destination)
        if nic_key is None:
            self._apply(self.outbox.error(transmit.id, "noRoute", _unix_now()))
            return
        if nic_key == self.nic.key:
            # Our twin, but not attached right now: keep it queued, try again soon.
            self._apply(self.outbox.error(transmit.id, "offline", _unix_now()))
            return
        if self._send_to_nic(nic_key, transmit.envelope, kind="envelope"):
            self.counters["outbox_transmissions"] += 1

    def send_dht(self, nic_key: PublicKey, message: bytes) -> None:
        """Send a DHT message to another NIC (best effort, like every bus frame)."""
        self._send_to_nic(nic_key, _nic_bus("dht", message))

    def _send_to_nic(self, nic_key: PublicKey, data: bytes, *, kind: str = "frame") -> bool:
        """Queue for the sender: an envelope (packed with others) or a NicBus frame.
        False when the queue is full and it was dropped."""
        if self._step_depth:
            if len(self._step_packets) >= TRANSMIT_QUEUE:
                self.counters["transmit_dropped"] += 1
                return False
            self._step_packets.append((nic_key, kind, data))
            return True
        return self._queue_transmit((nic_key, kind, data))

    def _status_update(self, change: StatusChanged, *, but: TwinSession | None = None) -> None:
        # A final status is never dropped for a full mailbox: the twin would wait for
        # it until its own timeout. They are bounded by the messages the twin may have
        # in the outbox (`max_per_source`), each ending once; "sent" may be dropped.
        self._to_twin(change.source, "status", (change.id, change.status.value, change.code),
                      receivers_only=False, but=but, force=change.status in FINAL)

    # ------------------------------------------------------- from the overlay

    def on_packet(self, source_nic: PublicKey, payload: bytes, hops: int) -> None:
        """An overlay payload packet arrived for this NIC."""
        with self._step():
            self._on_packet(source_nic, payload, hops)

    def _on_packet(self, source_nic: PublicKey, payload: bytes, hops: int) -> None:
        try:
            which, value = read_nic_bus(payload)
        except DecodeError as exc:
            self.counters["bad_bus_frames"] += 1
            self.log.warning("bad bus frame", nic=source_nic.short, reason=str(exc))
            return
        if which == "dht":
            if self.on_dht is not None:
                self.on_dht(source_nic, value, hops)
            return
        if which == "notice":
            message_id, _twin, code = value
            # Only the NIC where the destination twin is may say it is not there (any
            # NIC on the path sees the ids); anything else a NIC says is not its word.
            destination = self.outbox.destination(message_id)
            if (code not in NOTICE_CODES or destination is None
                    or self.locate(destination) != source_nic):
                self.counters["notices_refused"] += 1
                return
            self._apply(self.outbox.error(message_id, code, _unix_now()))
            return
        for envelope in value if which == "envelopes" else (value,):
            try:
                header = read_header(envelope)
            except DecodeError as exc:
                self.counters["bad_envelopes"] += 1
                self.log.warning("bad envelope", nic=source_nic.short, reason=str(exc))
                continue
            self._arrived(header, envelope, source_nic)

    def _arrived(self, header: Header, envelope: bytes, source_nic: PublicKey | None) -> None:
        """An envelope for one of our twins (from the overlay, or from a local twin)."""
        if header.kind == "ack":
            # We may be the NIC of the twin that sent the messages: close their outbox
            # entries (a no-op unless the delivery token matches). The source twin then
            # hears `delivered` as a status update and needs no copy of the ack; an ack
            # of a message this outbox does not know (the twin sent it through another
            # NIC) goes on.
            now = _unix_now()
            elsewhere = False
            outbox = self.outbox
            closed: list[Any] = []
            for message_id, token in header.acked():
                outputs = outbox.acked(message_id, token, now)
                if outputs:
                    closed += outputs
                elif outbox.status(message_id) is None:
                    elsewhere = True
            if closed:
                self._apply(closed)
            if not elsewhere:
                return
        if self._receivers(header.destination):
            self._deliver_local(header.destination, envelope)
        elif header.kind == "message" and source_nic is not None:
            code = "offline" if self._knows(header.destination) else "unknownTwin"
            self._send_to_nic(source_nic, _nic_bus("notice", (header.id, header.destination,
                                                              code)))

    def _knows(self, twin: PublicKey) -> bool:
        return self.locate(twin) == self.nic.key

    def _deliver_local(self, twin: PublicKey, envelope: bytes) -> None:
        self._to_twin(twin, "deliver", envelope, receivers_only=True)

    def _receivers(self, twin: PublicKey) -> list[TwinSession]:
        return [s for s in self.sessions.get(twin, ()) if s.receive]

    def _to_twin(self, twin: PublicKey, kind: str, value: Any, *, receivers_only: bool,
                 but: TwinSession | None = None, force: bool = False) -> None:
        sessions = self._receivers(twin) if receivers_only else self.sessions.get(twin, [])
        # Deliveries go to the newest receiving session only (exactly one consumer);
        # status updates go to every session of the twin.
        for session in sessions[-1:] if receivers_only else sessions:
            if session is but:
                continue
            try:
                self._put(session, kind, value, force=force)
            except trio.WouldBlock:
                # A twin that does not read: the sender's outbox retries the message.
                self.counters["session_overflow"] += 1
            except trio.BrokenResourceError:
                pass

    # ------------------------------------------------------------ twin sessions

    async def _connection(self, stream: trio.abc.Stream, remote: str) -> None:
        framed = FramedStream(stream, SESSION_MAX_FRAME)
        nonce = os.urandom(NONCE_SIZE)
        hello = _local.LocalMessage.new_message()
        challenge = hello.init("challenge")
        challenge.version = LOCAL_VERSION
        challenge.nicKey = self.nic.key.raw
        challenge.nonce = nonce
        await framed.send(hello.to_bytes())
        try:
            with trio.fail_after(ATTACH_TIMEOUT):
                body = await framed.receive()
            if body is None:
                return
            twin_raw, signature, receive, batches = schemas.decode(
                _local.LocalMessage, body, _read_attach)
            twin = verify_attach(self.nic.key, nonce, twin_raw, signature)
        except (trio.TooSlowError, RemoteProtocolError, ValueError) as exc:
            self.counters["attach_refused"] += 1
            self.log.warning("twin attach refused", reason=str(exc) or "timeout")
            await _send_refused(framed, str(exc) or "attach timed out")
            return
        mailbox = Mailbox(SESSION_QUEUE)
        session = TwinSession(next(self._session_ids), twin, receive, mailbox, batches)
        self.sessions[twin].append(session)
        log = self.log.bind(twin=twin.short, session=session.id)
        log.info("twin attached", receive=receive, batches=batches)
        attached = _local.LocalMessage.new_message()
        attached.init("attached").sessionId = session.id
        await framed.send(attached.to_bytes())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, session, framed, self.internal_errors)
                await self._serve_session(session, framed, log, nursery)
                nursery.cancel_scope.cancel()
        finally:
            self.sessions[twin].remove(session)
            if not self.sessions[twin]:
                del self.sessions[twin]
            mailbox.close()
            log.info("twin detached")

    async def _serve_session(
        self, session: TwinSession, framed: FramedStream, log: Any, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                body = await framed.receive()
            except (RemoteProtocolError, trio.BrokenResourceError) as exc:
                log.warning("twin session dropped", reason=str(exc))
                return
            if body is None:
                return
            try:
                await self._handle_frame(session, body, nursery)
            except Exception as exc:  # a bug: drop this frame, keep the session
                self.internal_errors.record(TWIN_FRAME, exc)

    async def _handle_frame(self, session: TwinSession, body: bytes,
                            nursery: trio.Nursery) -> None:
        """One frame a twin sent: decode it and do what it asks."""
        submits = twin_frames.read_submits(body)
        if submits is not None:  # nearly every frame: read without pycapnp
            for item_id, envelope, reliable, fail_fast, payload_size in submits[1]:
                await self._submit(session, item_id, envelope, reliable, fail_fast,
                                   payload_size)
            self._rearm_if_due()
            return
        try:
            request_id, which, value = schemas.decode(
                _local.LocalMessage, body, _read_request)
        except DecodeError as exc:
            await self._result(session, 0, ok=False, code="malformed", message=str(exc))
            return
        if which == "submit":
            await self._submit(session, request_id, *value)
            self._rearm_if_due()
        elif which == "submits":
            for item_id, *fields in value:
                await self._submit(session, item_id, *fields)
            self._rearm_if_due()
        elif which == "status":
            state = self.outbox.status(value)
            status = state[0].value if state else "unknown"
            await self._result(session, request_id, ok=True, status=status,
                               code=state[1] if state else "")
        elif which == "publish":
            location = value
            if location.twin != session.twin or location.nic != self.nic.key:
                await self._result(session, request_id, ok=False, code="unauthorized",
                                   message="a twin may only publish its own location "
                                           "at this NIC")
            elif not self.publish(location):
                await self._result(session, request_id, ok=False, code="unauthorized",
                                   message="location record refused (signature, "
                                           "seqno or expiry)")
            else:
                await self._result(session, request_id, ok=True)
        elif which == "find":
            # A lookup takes network round trips: answered from its own task.
            nursery.start_soon(self._find, session, request_id, value)
        else:
            await self._result(session, request_id, ok=False, code="malformed",
                               message=f"{which} is not a request a twin may send")

    async def _find(self, session: TwinSession, request_id: int, twin: PublicKey) -> None:
        try:
            await self._answer_find(session, request_id, twin)
        except Exception as exc:  # a bug: this find goes unanswered, the session runs on
            self.internal_errors.record(TWIN_FRAME, exc)

    async def _answer_find(self, session: TwinSession, request_id: int,
                           twin: PublicKey) -> None:
        if self.find is None:
            await self._result(session, request_id, ok=False, code="unknownTwin",
                               message="this NIC has no lookup service")
            return
        answer = await self.find(twin)
        if answer is None:
            await self._result(session, request_id, ok=False, code="unknownTwin",
                               message=f"no location record found for {twin.text}")
            return
        message = _local.LocalMessage.new_message()
        message.requestId = request_id
        found = message.init("found")
        location = found.init("location")
        answer.location.fill(location)
        found.hops = min(answer.hops, 255)
        found.rounds = min(answer.rounds, 255)
        found.queried = min(answer.queried, 65535)
        found.elapsed = answer.elapsed
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
            session.outgoing.send_nowait(message.to_bytes())

    async def _submit(
        self, session: TwinSession, request_id: int, envelope: bytes, reliable: bool,
        fail_fast: bool, payload_size: int,
    ) -> None:
        """Admit one submission. Answers the twin at once, or once its group commit is
        done (`_writer`); a best-effort submission with request id 0 is not answered."""
        try:
            header = read_header(envelope)
        except DecodeError as exc:
            await self._result(session, request_id, ok=False, code="malformed",
                               message=str(exc))
            return
        if header.source != session.twin:
            await self._result(session, request_id, ok=False, code="unauthorized",
                               message="the envelope's source is not the attached twin")
            return
        now = _unix_now()
        if not reliable:
            # Acks and error replies: one best-effort send, no outbox.
            with self._step():
                self._route_once(header, envelope)
            if request_id:
                await self._result(session, request_id, ok=True, status="sent")
            return
        at = self.locate(header.destination)
        if fail_fast and at == self.nic.key and header.destination not in self.sessions:
            # Our own twin, and it is away: say so now rather than queueing.
            await self._result(session, request_id, ok=False, code="offline",
                               message=f"{header.destination.text} is not attached")
            return
        routable = header.destination in self.sessions or at is not None
        refused, outputs = self.outbox.submit(
            id=header.id, source=header.source, destination=header.destination,
            deadline=header.deadline, ack_hash=header.ack_hash, envelope=envelope,
            payload_size=payload_size, now=now, routable=bool(routable), fail_fast=fail_fast,
        )
        if refused is not None:
            await self._refused(session, request_id, refused)
            return
        transmits: list[Transmit] = []
        sent: StatusChanged | None = None
        rest: list[Any] = []
        persisted = False
        for output in outputs:
            if isinstance(output, Transmit):
                transmits.append(output)
            elif isinstance(output, StatusChanged):
                if sent is None:
                    sent = output
            else:
                persisted = persisted or isinstance(output, Persist)
                rest.append(output)
        if not persisted:
            self._apply(rest)
            await self._result(session, request_id, ok=True, status="queued")  # resubmission
            return
        # The timer is re-armed once per frame (`_handle_frame`).
        self._rearm_due = True
        # Answered once committed, without holding up the next request; past
        # COMMITS_IN_FLIGHT waiting ones the session stops reading.
        try:
            session.commits.acquire_nowait()
        except trio.WouldBlock:
            self._rearm_if_due()
            await session.commits.acquire()
        # The Persist joins the batch with its waiting twin, never in a commit before
        # it (that one would skip the fsync, and the writer drops a waiting list that
        # comes without a batch).
        self._batch += rest
        self._waiting.append(_Waiting(session, request_id, transmits, sent))
        self._batch_ready.set()

    def _route_once(self, header: Header, envelope: bytes) -> None:
        nic_key = self.locate(header.destination)
        if header.destination in self.sessions or nic_key == self.nic.key:
            self._arrived(header, envelope, None)
        elif nic_key is not None:
            self._send_to_nic(nic_key, envelope, kind="envelope")

    async def _refused(self, session: TwinSession, request_id: int, refused: Refused) -> None:
        self.counters[f"refused_{refused.code}"] += 1
        await self._result(session, request_id, ok=False, code=refused.code,
                           message=refused.message)

    async def _result(
        self, session: TwinSession, request_id: int, *, ok: bool, code: str = "",
        message: str = "", status: str = "",
    ) -> None:
        if len(session.outgoing.items) >= session.outgoing.limit:
            # Results must not be lost: wait for room (the twin is reading slowly).
            self._rearm_if_due()
            await session.outgoing.wait_room()
        self._answer(session, request_id, ok=ok, code=code, message=message, status=status)

    def _answer(
        self, session: TwinSession, request_id: int, *, ok: bool, code: str = "",
        message: str = "", status: str = "",
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            self._put(session, "result", (request_id, ok, code, message[:500], status),
                      force=True)

    def _put(self, session: TwinSession, kind: str, value: Any, *, force: bool = False) -> None:
        """Queue an item for a twin session; within a step it is written at the end."""
        mailbox = session.outgoing
        if self._step_depth:
            mailbox.put(kind, value, force=force, wake=False)
            self._step_mailboxes[id(mailbox)] = mailbox
        else:
            mailbox.put(kind, value, force=force)


class _Step:
    """`TwinPort._step()`: a plain context manager (a generator-based one costs a few
    µs per use, and every frame and packet is a step)."""

    __slots__ = ("port",)

    def __init__(self, port: TwinPort) -> None:
        self.port = port

    def __enter__(self) -> None:
        self.port._step_depth += 1

    def __exit__(self, *_: object) -> None:
        port = self.port
        port._step_depth -= 1
        if not port._step_depth:
            port._end_step()


async def _pump(session: TwinSession, framed: FramedStream, errors: InternalErrors) -> None:
    """Writes what waits in the session's mailbox: everything queued goes out in one
    write (one system call and one wake-up of the twin for a burst of results, status
    updates and deliveries), as one list frame per run of one kind to a twin that reads
    them."""
    # A twin that hangs up while frames are on their way to it ends only its own
    # session (the reader sees the end of the stream): the error must not escape the
    # session's nursery, where an exception group would take the whole TwinPort down.
    mailbox = session.outgoing
    mailbox.write_nowait = nowait_writer(framed.stream)
    mailbox.batches = session.batches
    mailbox.max_frame = framed.max_frame
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while True:
            await mailbox.wait_items()
            data, mailbox.unsent = mailbox.unsent, b""
            if mailbox.items:
                try:
                    data = b"".join((data, *_frames(mailbox.items, session.batches,
                                                    framed.max_frame)))
                except Exception as exc:  # a bug: the items taken are lost, the rest go
                    errors.record(TWIN_PUMP, exc)
                mailbox.took()
            await framed.stream.send_all(data)


def _frames(items: deque[tuple[str, Any]], batches: bool, max_frame: int) -> list[bytes]:
    """Take up to about PUMP_BATCH bytes of items off the front and encode them: runs
    of one kind become one list frame for a twin that reads them (`batches`). Returns
    the parts to join: every envelope delivered is copied once, into the write."""
    parts: list[bytes] = []
    size = 0
    while items and size < PUMP_BATCH:
        kind, value = items.popleft()
        if kind == "frame":
            parts.append(frame_prefix(len(value), max_frame))
            parts.append(value)
            size += PREFIX_SIZE + len(value)
            continue
        run = [value]
        run_size = _item_size(kind, value)
        while (batches and items and items[0][0] == kind and len(run) < BATCH_ITEMS
               and size + run_size < PUMP_BATCH):
            value = items.popleft()[1]
            run.append(value)
            run_size += _item_size(kind, value)
        body, body_size = _local_frame_parts(kind, run)
        # A list frame may exceed the NIC's own cap (an envelope): the twin's
        # reader takes up to CONTROL_MAX_FRAME, and a run stops at PUMP_BATCH.
        parts.append(frame_prefix(body_size, CONTROL_MAX_FRAME))
        parts += body
        size += PREFIX_SIZE + body_size
    return parts


def _item_size(kind: str, value: Any) -> int:
    return len(value) if kind == "deliver" else 64


def _local_frame(kind: str, run: list[Any]) -> bytes:
    """One LocalMessage for a run of results, status updates or deliveries (see
    `_local_frame_parts`)."""
    parts, _ = _local_frame_parts(kind, run)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _local_frame_parts(kind: str, run: list[Any]) -> tuple[list[bytes], int]:
    """One LocalMessage for a run of results, status updates or deliveries: the single
    member for one, the list member for more. In one segment: the twin reads
    one-segment frames of these kinds without pycapnp (bus/local_frames). Written
    without pycapnp too (`twin_frames`, `flat`; for deliveries pycapnp copied each
    envelope into its builder, and that out again, into a zeroed segment as big as all
    of them): as parts to join."""
    if kind == "deliver":
        if len(run) == 1:
            return flat.message_parts(_DELIVER_SECTION, run)
        return flat.blob_list_parts(_DELIVERIES_SECTION, run)
    if kind == "status":
        return twin_frames.updates_parts(run)
    return twin_frames.results_parts(run)


def _packed(items: list[tuple[PublicKey, str, bytes]]) -> list[tuple[PublicKey, bytes]]:
    """(NIC, packet) for queued items: each NIC's envelopes packed (`_packets`)."""
    by_nic: dict[PublicKey, list[tuple[str, bytes]]] = {}
    for nic_key, kind, data in items:
        by_nic.setdefault(nic_key, []).append((kind, data))
    return [(nic_key, packet) for nic_key, queued in by_nic.items()
            for packet in _packets(queued)]


def _packets(queued: list[tuple[str, bytes]]) -> list[bytes]:
    """NicBus packets for what is queued for one NIC, in order: runs of envelopes
    packed into `envelopes` lists of at most about PACKET_BATCH bytes."""
    packets: list[bytes] = []
    run: list[bytes] = []
    size = 0

    def close_run() -> None:
        nonlocal size
        if len(run) == 1:
            packets.append(_nic_bus("envelope", run[0]))
        elif run:
            packets.append(flat.blob_list_message(_ENVELOPES_SECTION, run))
        run.clear()
        size = 0

    for kind, data in queued:
        if kind != "envelope":
            close_run()
            packets.append(data)
            continue
        if run and (size + len(data) > PACKET_BATCH or len(run) >= BATCH_ITEMS):
            close_run()
        run.append(data)
        size += len(data)
    close_run()
    return packets


async def _send_refused(framed: FramedStream, reason: str) -> None:
    message = _local.LocalMessage.new_message()
    message.init("refused").reason = reason[:300]
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await framed.send(message.to_bytes())


def _nic_bus(which: str, value: Any) -> bytes:
    if which == "envelope":
        return flat.message(_ENVELOPE_SECTION, (value,))
    message = _local.NicBus.new_message()
    if which == "dht":
        message.dht = value
    else:
        message_id, twin, code = value
        notice = message.init("notice")
        notice.messageId = message_id
        notice.twin = twin.raw
        notice.code = code
    return bytes(message.to_bytes())


# LocalMessage's data section (requestId 0, then the union tag) for deliveries.
_LOCAL_TAGS = schemas.union_tags(_local.LocalMessage)
_DELIVER_SECTION = struct.pack("<IH2x", 0, _LOCAL_TAGS["deliver"])
_DELIVERIES_SECTION = struct.pack("<IH2x", 0, _LOCAL_TAGS["deliveries"])

# NicBus union tags of the hot members, in the data section of a flat NicBus.
_ENVELOPE_TAG = 0
_ENVELOPES_TAG = 3
_ENVELOPE_SECTION = flat.U16.pack(_ENVELOPE_TAG) + bytes(6)
_ENVELOPES_SECTION = flat.U16.pack(_ENVELOPES_TAG) + bytes(6)


def read_nic_bus(payload: bytes) -> tuple[str, Any]:
    """A NicBus frame as `_read_nic_bus` reads it: envelopes in the flat layout
    directly, anything else through pycapnp. Raises DecodeError."""
    layout = flat.root(payload)
    if layout is not None and layout[3] >= 1:
        tag = flat.union_tag(payload, layout)
        if tag == _ENVELOPE_TAG:
            envelope = flat.blob_at(payload, layout[2])
            if envelope is not None:
                return "envelope", envelope
        elif tag == _ENVELOPES_TAG:
            envelopes = flat.blob_list_at(payload, layout[2])
            if envelopes is not None:
                return "envelopes", envelopes
    return schemas.decode(_local.NicBus, payload, _read_nic_bus)


def _read_nic_bus(reader: Any) -> tuple[str, Any]:
    which = str(reader.which())
    if which == "envelope":
        return which, bytes(reader.envelope)
    if which == "envelopes":
        return which, [bytes(envelope) for envelope in reader.envelopes]
    if which == "notice":
        notice = reader.notice
        return which, (bytes(notice.messageId), bytes(notice.twin), str(notice.code))
    if which == "dht":
        return which, bytes(reader.dht)
    raise DecodeError(f"bus frame {which!r} unknown to this version")


def _read_attach(reader: Any) -> tuple[bytes, bytes, bool, bool]:
    if str(reader.which()) != "attach":
        raise DecodeError("expected an attach")
    attach = reader.attach
    return (bytes(attach.twinKey), bytes(attach.signature), bool(attach.receive),
            bool(attach.batches))


def _read_request(reader: Any) -> tuple[int, str, Any]:
    which = str(reader.which())
    request_id = int(reader.requestId)
    if which == "submit":
        s = reader.submit
        return request_id, which, (bytes(s.envelope), bool(s.reliable), bool(s.failFast),
                                   int(s.payloadSize))
    if which == "submits":
        return request_id, which, [
            (int(s.requestId), bytes(s.envelope), bool(s.reliable), bool(s.failFast),
             int(s.payloadSize)) for s in reader.submits]
    if which == "status":
        return request_id, which, bytes(reader.status.messageId)
    if which == "publish":
        p = reader.publish
        if len(p.twin) != 32 or len(p.nic) != 32:
            raise DecodeError("location record with malformed keys")
        return request_id, which, Location(PublicKey(bytes(p.twin)), PublicKey(bytes(p.nic)),
                                           int(p.seqno), float(p.expires), bytes(p.signature))
    if which == "find":
        if len(reader.find) != 32:
            raise DecodeError("find with a malformed twin key")
        return request_id, which, PublicKey(bytes(reader.find))
    return request_id, which, None


def _unix_now() -> float:
    # Deadlines in envelopes are unix times, so the outbox runs on the wall clock.
    return time.time()
