"""The twin's side of the message bus: what twind, twinctl and benchmarks use.

    async with BusClient.connect(identity, nic_state_dir, inbox=InboxStore(path)) as bus:
        message_id = await bus.send(bob, text_message("hi"))            # queued, durable
        await bus.send(bob, text_message("hi"), wait="delivered")        # until acked
        reply = await bus.request(bob, ping_builder, timeout=5)          # request/reply
        message = await bus.receive()                                     # exactly once
        await bus.status(message_id)                                     # "delivered"...

The client attaches to the NIC (proving the twin key), publishes the twin's signed
location record (re-published before it expires), seals every message for its
destination (`bus.crypto`) and hands it to the NIC's outbox. Incoming envelopes are
opened here, recorded in the inbox store before they are acknowledged (so a crash
never loses one the sender thinks delivered) and deduplicated by id there (so a
retried message is acknowledged again but delivered once).

Typed messages: `send` takes a Cap'n Proto message builder (its struct's type id
travels as `schemaId`), or `(schema_id, payload_bytes)`. A receiver that registered
`accepted` struct types answers any other schema, or a payload that does not decode
as its type, with a `rejectedSchema` error reply; the sender sees
`failed(rejectedSchema)`.

Batching: submissions queued by concurrent tasks while a write is in progress go out
as one `submits` frame; the NIC answers with list frames (`results`, `statusUpdates`,
`deliveries`, asked for at attach); the envelopes of one `deliveries` frame are
opened, recorded (one inbox transaction) and acked (one `submits` frame, request id
0: no result) together.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from twinmesh.bus import local_frames
from twinmesh.bus.crypto import MAX_PAYLOAD, Header, Opened, TwinCrypto, read_header
from twinmesh.bus.inbox_store import InboxStore, IncomingMessage
from twinmesh.bus.loop_round import loop_rounds
from twinmesh.carriers.unix import connect_unix
from twinmesh.control.framed import FramedStream
from twinmesh.errors import (
    AuthenticationError,
    DecodeError,
    ExpiredError,
    RemoteProtocolError,
    StorageError,
    TwinmeshError,
)
from twinmesh.group_sync import GroupSync
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.proto.attach import Location, sign_attach
from twinmesh.proto.outbox import ACK_GRACE
from twinmesh.wire import schemas
from twinmesh.wire.framing import frame_prefix

TWINS_SOCKET = "twins.sock"
LOCATION_TTL = 3600.0
REQUEST_TIMEOUT = 30.0
# How often the inbox store forgets expired ids and trims its history (`prune`): a
# bounded file at the cost of one short transaction a minute per twin.
PRUNE_INTERVAL = 60.0
# Envelope bytes and items in one `submits` frame (the NIC reads frames up to 512 KiB;
# it starts on one frame while later ones are on their way).
SUBMITS_BATCH = 256 * 1024
SUBMITS_ITEMS = 1024
WRITE_BACKLOG = 4 * 1024 * 1024  # bytes queued for the NIC before writers wait
EARLY_WRITE_ITEMS = 64  # a burst's queued items written without waiting for its end
_local = schemas.local
_FINAL = ("delivered", "expired", "failed")
_TEXT_ID = schemas.rmb.TextMessage.schema.node.id


class BusError(TwinmeshError):
    """The bus refused or could not deliver a message; `code` says why (docs/BUS.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


@dataclass(frozen=True)
class Received:
    """A message for this twin, opened and checked."""

    id: bytes
    source: PublicKey
    schema_id: int
    payload: bytes
    reply_to: bytes
    deadline: float
    # The payload as a dict, when the client already decoded it (to check its type).
    fields: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def decode(self, struct: Any) -> dict[str, Any]:
        """The payload as a dict of `struct`'s fields; BusError(rejectedSchema) when
        it is another type or does not decode as this one."""
        if struct.schema.node.id != self.schema_id:
            raise BusError("rejectedSchema", f"payload is type {self.schema_id:#x}, not "
                                             f"{struct.schema.node.id:#x}")
        if self.fields is not None:
            return dict(self.fields)  # a copy: the caller may change it
        try:
            # A plain copy: never `as_builder()` on bytes from the network (pycapnp
            # aborts the process on some malformed pointers there).
            fields: dict[str, Any] = schemas.decode(struct, self.payload,
                                                    lambda reader: reader.to_dict())
        except DecodeError as exc:
            raise BusError("rejectedSchema", str(exc)) from None
        return fields


@dataclass(frozen=True)
class Found:
    """findDigitalTwinById: the newest valid location record of a twin."""

    location: Location
    hops: int  # overlay hops from our NIC to the twin's NIC
    rounds: int  # DHT lookup rounds
    queried: int  # NICs asked
    elapsed: float  # seconds our NIC spent looking


class BusClient:
    def __init__(
        self,
        identity: Identity,
        framed: FramedStream,
        nic: PublicKey,
        *,
        inbox: InboxStore | None,
        accepted: Iterable[Any] | None,
        group_sync: GroupSync | None = None,
        crypto: TwinCrypto | None = None,
    ) -> None:
        self.identity = identity
        self.key = identity.public
        self.nic = nic
        # Shared with whoever else seals for this twin (twind): one epoch and one
        # set of cached keys per twin, so a message and its ack cost one key exchange.
        self.crypto = crypto if crypto is not None else TwinCrypto(identity)
        self.inbox = inbox
        # Shared by the twins of one process, so their inbox fsyncs go in rounds.
        self.group_sync = group_sync if group_sync is not None else GroupSync()
        self.accepted = None if accepted is None else {s.schema.node.id: s for s in accepted}
        self._framed = framed
        # What waits for the writer task, in order: ("frame", encoded LocalMessage),
        # ("submit", (request id, envelope, reliable, fail fast, payload size)) or
        # ("bytes", the rest of a write the socket took only part of).
        self._unsent: list[tuple[str, Any]] = []
        self._writing = False  # the writer task is sending
        # The scheduling round in which a write last went out inline: later writes of
        # that round (the other tasks woken by the same frame) queue, and the writer
        # task sends them together at the start of the next round.
        self._rounds = loop_rounds()
        self._inline_round = -1
        self._unsent_bytes = 0
        self._unsent_ready = trio.Event()
        self._drained = trio.Event()  # set (and replaced) after every write
        self._queued_writes = 0  # `_write` calls so far
        self._written = 0  # of which the writer has sent this many
        self._request_ids = itertools.count(1)
        self._results: dict[int, _Reply] = {}
        self._answered: list[_Reply] = []  # callback requests answered in this frame
        self._requests_made = trio.Event()  # wakes the watchdog
        self._watchdog_wake = math.inf  # when the watchdog wakes next (trio time)
        self._statuses: dict[bytes, tuple[str, str]] = {}
        self._found: dict[int, Found] = {}
        # Told of the status changes of this twin's messages, (id, status, code) in
        # order (twind records them): those of one frame from the NIC together, in the
        # reader task, so recording them costs no task switch and one transaction.
        self.on_statuses: Callable[[list[tuple[bytes, str, str]]], None] | None = None
        self._status_batch: list[tuple[bytes, str, str]] | None = None  # during a frame
        # Offered each new message (not a reply to a `request`) in the reader task,
        # once it is acked, when nothing is queued ahead of it for `receive()`: True
        # means it was handled there and then (it counts as consumed, marked with the
        # next inbox transaction: `InboxStore.consume_soon`, so the handler must
        # dedup by id), so a message a handler can finish synchronously (twind's
        # chat) costs no task switch. False: it goes to `receive()` as usual.
        self.on_message: Callable[[Received], bool] | None = None
        # Asked about every new message before it is acked: (code, reason) refuses it
        # with a typed error reply (e.g. twind's "contacts only"), None accepts it.
        self.screen: Callable[[PublicKey, int], tuple[str, str] | None] | None = None
        # One event per message someone waits on (set on its next status change), so a
        # change wakes only that message's waiters, not every `wait_status` in flight.
        self._status_waiters: dict[bytes, trio.Event] = {}
        # Heap of (deadline, sequence, message id, event) of the `wait_status` calls in
        # flight: the watchdog sets an event whose deadline passed, so a wait needs no
        # cancel scope of its own. Entries of waits that ended stay until they are due
        # or the heap is rebuilt (`_watch_status`).
        self._status_deadlines: list[tuple[float, int, bytes, trio.Event]] = []
        self._status_sequence = itertools.count()
        self._replies: dict[bytes, trio.MemorySendChannel[Received]] = {}
        self._incoming_in, self._incoming_out = trio.open_memory_channel[Received](1024)
        self._seen: dict[bytes, float] = {}  # dedup without an inbox store
        self._prune_at = time.time() + PRUNE_INTERVAL  # when the inbox store is pruned
        self._seen_expiry: list[tuple[float, bytes]] = []  # heap of (deadline, id) in _seen
        self._closed = False
        self._queued: set[bytes] = set()  # ids waiting in the in-memory incoming queue
        # Held while a new message is stored and marked `_queued`, and while `receive()`
        # reads the store: so a message is handed out from memory or from the store,
        # never from both.
        self._handoff = trio.Lock()
        self._spilled = inbox is not None  # the inbox store may hold undelivered messages
        self._replay: list[Any] = []  # stored messages being handed out
        self._last: bytes | None = None  # handed out, consumed at the next receive()
        self.log = structlog.get_logger("twinmesh.bus").bind(twin=self.key.short)

    # ------------------------------------------------------------- connect

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        identity: Identity,
        nic_path: Path,
        *,
        inbox: InboxStore | None = None,
        receive: bool = True,
        accepted: Iterable[Any] | None = None,
        group_sync: GroupSync | None = None,
        crypto: TwinCrypto | None = None,
    ) -> AsyncIterator[BusClient]:
        """Attach to the NIC at `nic_path` (its state dir or `twins.sock`); `crypto`:
        the twin's own `TwinCrypto` when it seals messages itself too."""
        socket_path = nic_path / TWINS_SOCKET if nic_path.is_dir() else nic_path
        try:
            stream = await connect_unix(socket_path)
        except OSError as exc:
            raise BusError("offline", f"cannot reach the NIC at {socket_path}: "
                                      f"{exc.strerror or exc} (is pnicd running?)") from None
        async with stream:
            framed = FramedStream(stream)
            nic = await _attach(framed, identity, receive)
            client = cls(identity, framed, nic, inbox=inbox, accepted=accepted,
                         group_sync=group_sync, crypto=crypto)
            try:
                async with trio.open_nursery() as nursery:
                    if group_sync is None and inbox is not None:
                        # Its own: the rounds' thread lives as long as the connection.
                        await nursery.start(client.group_sync.run)
                    nursery.start_soon(client._reader)
                    nursery.start_soon(client._writer)
                    nursery.start_soon(client._watchdog)
                    await client.publish_location()
                    nursery.start_soon(client._republish)
                    try:
                        yield client
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                # Whatever ended it: every request made with a callback hears back.
                client._closed = True
                client._end_requests()

    async def publish_location(self) -> None:
        """Tell the overlay this twin is at this NIC (signed, newest seqno wins)."""
        now = time.time()
        location = Location.sign(self.identity, self.nic, seqno=int(now * 1000),
                                 expires=now + LOCATION_TTL)
        message = _local.LocalMessage.new_message()
        record = message.init("publish")
        record.twin = location.twin.raw
        record.nic = location.nic.raw
        record.seqno = location.seqno
        record.expires = location.expires
        record.signature = location.signature
        ok, code, text, _ = await self._call(message)
        if not ok:
            raise BusError(code, text)

    async def _republish(self) -> None:
        while True:
            await trio.sleep(LOCATION_TTL / 2)
            try:
                await self.publish_location()
            except BusError as exc:
                # The NIC is gone: `receive()` and `send()` say so; nothing to do here.
                self.log.warning("location not re-published", reason=str(exc))
                return

    # ---------------------------------------------------------------- send

    async def send(
        self,
        destination: PublicKey,
        message: Any,
        *,
        ttl: float = 300.0,
        wait: str | None = None,
        fail_fast: bool = False,
        reply_to: bytes = b"",
        timeout: float | None = None,
    ) -> bytes:
        """Seal and queue a message; returns its id once the NIC stored it durably.

        `wait="delivered"` also waits for the destination's ack (until the deadline
        or `timeout`). Raises BusError with the code on refusal or failure."""
        schema_id, payload = _typed(message)
        _check_size(payload)
        envelope, header = self.crypto.seal_message(
            destination, payload, schema_id, now=time.time(), ttl=ttl, reply_to=reply_to)
        ok, code, text, status = await self._submit(envelope, len(payload), reliable=True,
                                                    fail_fast=fail_fast)
        if not ok:
            raise BusError(code, text)
        self._accepted(header.id, status)
        if wait == "delivered":
            # The NIC says "expired" only ACK_GRACE after the deadline (an ack may be late).
            limit = (header.deadline + ACK_GRACE + 1.0 - time.time() if timeout is None
                     else timeout)
            status, code = await self.wait_status(header.id, timeout=max(0.0, limit))
            if status != "delivered":
                raise BusError(code or status, f"message {header.id.hex()} {status}")
        return header.id

    def send_soon(
        self,
        destination: PublicKey,
        message: Any,
        *,
        ttl: float = 300.0,
        fail_fast: bool = False,
        reply_to: bytes = b"",
        done: Callable[[BusError | None], None] | None = None,
    ) -> bytes:
        """`send` without a task waiting: seals the message, queues its submission
        and returns its id at once, so one task can keep thousands in flight (a
        task per message costs more CPU than sealing it).

        Its status changes reach `on_statuses` and `wait_status` as for `send`; a
        refusal by the NIC (`overloaded`, `tooLarge`, ...) is the status
        `failed` with its code. `done`, if given, is called once as for
        `submit_sealed_soon`. Raises BusError `overloaded` when this connection's
        unsent backlog is full (wait for statuses to come back, then send more) and
        `offline` when the connection is gone; nothing was queued then."""
        if self._closed:
            raise BusError("offline", "the connection to the NIC is gone")
        schema_id, payload = _typed(message)
        _check_size(payload)
        envelope, header = self.crypto.seal_message(
            destination, payload, schema_id, now=time.time(), ttl=ttl, reply_to=reply_to)
        message_id = header.id

        def submitted(error: BusError | None) -> None:
            if error is not None and error.code != "offline":
                self._set_status(message_id, "failed", error.code)
            if done is not None:
                done(error)

        if not self.submit_sealed_soon(envelope, len(payload), message_id, submitted,
                                       fail_fast=fail_fast):
            if self._closed:
                raise BusError("offline", "the connection to the NIC is gone")
            raise BusError("overloaded", "the connection to the NIC has too much unsent; "
                                         "wait for statuses before sending more")
        # Known here, so `wait_status` need not ask the NIC about it.
        self._statuses.setdefault(message_id, ("queued", ""))
        return message_id

    async def submit_sealed(self, envelope: bytes, payload_size: int, *,
                            fail_fast: bool = False, message_id: bytes | None = None) -> None:
        """Hand an envelope sealed earlier (`crypto.seal_message`, e.g. while no NIC was
        reachable) to the NIC's outbox; returns once it is stored durably there.
        `message_id`: its header's id, when the caller has it (else read from it)."""
        ok, code, text, status = await self._submit(envelope, payload_size, reliable=True,
                                                    fail_fast=fail_fast)
        if not ok:
            raise BusError(code, text)
        if message_id is None:
            try:
                message_id = read_header(envelope).id
            except DecodeError:
                return
        self._accepted(message_id, status)

    def submit_sealed_soon(self, envelope: bytes, payload_size: int, message_id: bytes,
                           done: Callable[[BusError | None], None], *,
                           fail_fast: bool = False) -> bool:
        """`submit_sealed` without a task waiting for the NIC: `done` is called once,
        in the client's reader task (after the status changes of the result's frame,
        its "sent" among them, went to `on_statuses`), with None once the NIC stored
        the envelope durably, else the BusError: the NIC's refusal, or `offline`
        when the connection breaks, the NIC does not answer within REQUEST_TIMEOUT
        or the client ends. False (and `done` is never called): it cannot go out
        without waiting (the connection is gone, or the NIC is not reading); use
        `submit_sealed`."""
        if self._closed or self._unsent_bytes > WRITE_BACKLOG:
            return False
        request_id = next(self._request_ids)

        def accepted(result: tuple[bool, str, str, str]) -> None:
            if result[0]:  # as the frame is read: its "sent" goes with the frame's statuses
                self._accepted(message_id, result[3])

        def answered(reply: _Reply) -> None:
            result = reply.result
            if result is None:
                done(reply.error())
                return
            ok, code, text, _ = result
            if not ok:
                done(BusError(code, text))
                return
            done(None)

        try:
            self._write_now([("submit", (request_id, envelope, True, fail_fast, payload_size))])
        except trio.ClosedResourceError:
            return False
        # Registered after the write (nothing can answer in between): a write that
        # breaks the connection ends the open requests, and this is not one yet.
        reply = _Reply(trio.current_time() + REQUEST_TIMEOUT, answered)
        reply.on_result = accepted
        self._results[request_id] = reply
        if self._watchdog_wake == math.inf:
            self._requests_made.set()
        return True

    def _accepted(self, message_id: bytes, status: str) -> None:
        """The NIC stored it; its answer may say it already went out ("sent")."""
        current = self._statuses.get(message_id)
        if status == "sent" and (current is None or current[0] not in _FINAL):
            self._set_status(message_id, "sent", "")
        else:
            self._statuses.setdefault(message_id, ("queued", ""))

    async def request(
        self, destination: PublicKey, message: Any, *, ttl: float = 60.0,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Received:
        """Send a message and wait for the reply that names it in `replyTo`."""
        send, receive = trio.open_memory_channel[Received](1)
        schema_id, payload = _typed(message)
        _check_size(payload)
        envelope, header = self.crypto.seal_message(
            destination, payload, schema_id, now=time.time(), ttl=ttl)
        self._replies[header.id] = send
        try:
            ok, code, text, status = await self._submit(envelope, len(payload),
                                                        reliable=True, fail_fast=False)
            if not ok:
                raise BusError(code, text)
            self._accepted(header.id, status)
            with trio.move_on_after(timeout):
                try:
                    return await receive.receive()
                except trio.EndOfChannel:  # `_set_status` closed it: no reply will come
                    status, code = self._statuses.get(header.id, ("queued", ""))
                    raise BusError(code or status, f"request {header.id.hex()} {status}"
                                   ) from None
            raise BusError("expired", f"no reply within {timeout:g} s")
        finally:
            del self._replies[header.id]

    async def reply(self, to: Received, message: Any, *, ttl: float = 60.0) -> bytes:
        return await self.send(to.source, message, ttl=min(ttl, max(1.0, to.deadline -
                                                                    time.time())),
                               reply_to=to.id)

    # -------------------------------------------------------------- lookup

    async def find(self, twin: PublicKey) -> Found:
        """Look a twin up (findDigitalTwinById) through our NIC; BusError(unknownTwin)
        when no valid record is found."""
        message = _local.LocalMessage.new_message()
        message.find = twin.raw
        request_id = next(self._request_ids)
        ok, code, text, _ = await self._call(message, request_id)
        found = self._found.pop(request_id, None)
        if not ok or found is None:
            raise BusError(code or "unknownTwin", text)
        if found.location.twin != twin or not found.location.verify():
            raise BusError("unknownTwin", "the NIC answered with a record that does not verify")
        return found

    # -------------------------------------------------------------- status

    async def status(self, message_id: bytes) -> tuple[str, str]:
        """(status, code): queued, sent, delivered, expired, failed, unknown."""
        local = self._statuses.get(message_id)
        if local is not None and local[0] in ("delivered", "expired", "failed"):
            return local
        message = _local.LocalMessage.new_message()
        message.init("status").messageId = message_id
        _, code, _, status = await self._call(message)
        return status, code

    async def wait_status(self, message_id: bytes, *, timeout: float) -> tuple[str, str]:
        """Wait until the message is delivered, expired or failed (or `timeout`, or
        the connection to the NIC is gone). The NIC is asked first, so a message that
        ended while no client of this twin was attached is found too (e.g. one sent
        before a reconnect); later changes arrive as status updates."""
        deadline = trio.current_time() + timeout
        # Only for an id this client has not heard of: for its own sends the status
        # updates follow, and asking would cost a round trip to the NIC per message.
        if message_id not in self._statuses:
            with trio.move_on_at(deadline):
                with contextlib.suppress(BusError):
                    answer, code = await self.status(message_id)
                    if answer == "unknown":
                        return answer, code  # never accepted, or finished long ago
                    if answer in _FINAL:
                        self._set_status(message_id, answer, code)
        while True:
            status = self._statuses.get(message_id, ("queued", ""))
            if status[0] in _FINAL or self._closed or trio.current_time() >= deadline:
                return status
            event = self._status_waiters.get(message_id)
            if event is None:
                event = self._status_waiters[message_id] = trio.Event()
            self._watch_status(deadline, message_id, event)
            await event.wait()

    def _watch_status(self, deadline: float, message_id: bytes, event: trio.Event) -> None:
        """Have the watchdog set `event` at `deadline` (unless it is set before)."""
        heap = self._status_deadlines
        if len(heap) > 2 * len(self._status_waiters) + 64:
            # Mostly waits that ended: drop them (amortised over as many pushes).
            heap[:] = [entry for entry in heap if not entry[3].is_set()]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline, next(self._status_sequence), message_id, event))
        if deadline < self._watchdog_wake:
            self._requests_made.set()

    # ------------------------------------------------------------- receive

    async def receive(self) -> Received:
        """The next message for this twin, each exactly once. With an inbox store, the
        previous message counts as consumed when the next one is asked for (a crash in
        between delivers it again after the restart: never lost)."""
        await self._consume_last()
        while True:
            if self.inbox is not None and self._spilled and not self._replay:
                # What waits in the inbox store but not in memory: arrivals from before
                # a restart, or while the application was far behind.
                self._spilled = False
                async with self._handoff:
                    pending = await trio.to_thread.run_sync(self.inbox.pending, 1000)
                    self._replay = [m for m in pending if m.id not in self._queued]
            if self._replay:
                received = _from_inbox(self._replay.pop(0))
                break
            try:
                received = await self._incoming_out.receive()
            except trio.EndOfChannel:
                raise BusError("offline", "the client is closed") from None
            self._queued.discard(received.id)
            break
        self._last = received.id
        return received

    async def incoming(self) -> AsyncIterator[Received]:
        """`receive()` in a loop (close it with `contextlib.aclosing` when breaking out)."""
        while True:
            yield await self.receive()

    async def _consume_last(self) -> None:
        last, self._last = self._last, None
        if last is not None and self.inbox is not None:
            # No fsync (see inbox_store): cheaper inline than a thread hop.
            self._consume(self.inbox, last, time.time())

    def _consume(self, inbox: InboxStore, message_id: bytes, now: float, *,
                 soon: bool = False) -> None:
        if soon:
            inbox.consume_soon(message_id, now)
        else:
            inbox.consume(message_id, now)
        if now >= self._prune_at:
            self._prune_at = now + PRUNE_INTERVAL
            try:
                inbox.prune(now)
            except StorageError as exc:  # nothing is lost: the next prune tries again
                self.log.warning("inbox not pruned", reason=str(exc))

    # ------------------------------------------------------------ internals

    async def _submit(
        self, envelope: bytes, payload_size: int, *, reliable: bool, fail_fast: bool
    ) -> tuple[bool, str, str, str]:
        request_id = next(self._request_ids)
        return await self._request(request_id, "submit", (
            request_id, envelope, reliable, fail_fast, payload_size))

    async def _call(
        self, message: Any, request_id: int | None = None
    ) -> tuple[bool, str, str, str]:
        if request_id is None:
            request_id = next(self._request_ids)
        message.requestId = request_id
        return await self._request(request_id, "frame", message.to_bytes())

    async def _request(self, request_id: int, kind: str, value: Any) -> tuple[bool, str, str, str]:
        """Queue one request and wait for the NIC's result for `request_id` (at most
        REQUEST_TIMEOUT: `_watchdog` gives up on it then)."""
        reply = self._results[request_id] = _Reply(trio.current_time() + REQUEST_TIMEOUT)
        if self._watchdog_wake == math.inf:
            self._requests_made.set()
        try:
            if self._closed:
                raise BusError("offline", "the connection to the NIC is gone")
            await self._write([(kind, value)])
            await reply.done.wait()
            if reply.result is None:
                raise reply.error()
            return reply.result
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise BusError("offline", "the connection to the NIC is gone") from None
        finally:
            del self._results[request_id]

    async def _watchdog(self) -> None:
        """Ends the requests the NIC has not answered within REQUEST_TIMEOUT and the
        `wait_status` calls past their timeout: one task for all of them rather than a
        cancel scope each. `_results` is in the order the requests were made, so the
        oldest open one says when to look next: the task wakes about once per
        REQUEST_TIMEOUT while requests come and go, not per request, and sleeps while
        none is open (a host runs hundreds of clients)."""
        while True:
            now = trio.current_time()
            wake = min(self._expire_requests(now) or math.inf, self._expire_status_waits(now))
            self._watchdog_wake = wake
            self._requests_made = trio.Event()
            with trio.move_on_at(wake):
                await self._requests_made.wait()

    def _expire_status_waits(self, now: float) -> float:
        """Wake the `wait_status` calls past their deadline; the next deadline."""
        heap = self._status_deadlines
        while heap and heap[0][0] <= now:
            _, _, message_id, event = heapq.heappop(heap)
            if not event.is_set():
                # Its other waiters, if any, wait again under a new event.
                if self._status_waiters.get(message_id) is event:
                    del self._status_waiters[message_id]
                event.set()
        return heap[0][0] if heap else math.inf

    def _expire_requests(self, now: float) -> float | None:
        """Time out the open requests past their deadline; the deadline of the oldest
        one still open (None: none is)."""
        expired: list[int] = []
        for request_id, reply in self._results.items():
            if reply.done.is_set():
                continue  # answered or timed out, its waiter not yet back
            if reply.deadline > now:
                break
            reply.timed_out = True
            expired.append(request_id)
        for request_id in expired:
            self._end_request(request_id)
        for reply in self._results.values():
            if not reply.done.is_set():
                return reply.deadline
        return None

    async def _reader(self) -> None:
        while True:
            try:
                body = await self._framed.receive()
            except (RemoteProtocolError, trio.BrokenResourceError) as exc:
                self.log.warning("NIC connection broken", reason=str(exc))
                body = None
            if body is None:
                self._closed = True
                self._end_requests()  # no result: "offline"
                for event in self._status_waiters.values():
                    event.set()  # they return what they have
                self._incoming_in.close()  # receive() says "offline" once drained
                return
            which, value = (local_frames.read(body)
                            or schemas.decode(_local.LocalMessage, body, _read_local))
            self._status_batch = [] if self.on_statuses is not None else None
            try:
                await self._handle_frame(which, value)
            finally:
                batch, self._status_batch = self._status_batch, None
                if batch and self.on_statuses is not None:
                    self.on_statuses(batch)
                # After the frame's status changes (a result's "sent" among them): a
                # callback that records its message records it as it stands now, in
                # one write, not a second one for a status told after it.
                answered, self._answered = self._answered, []
                for reply in answered:
                    self._call_back(reply)

    async def _handle_frame(self, which: str, value: Any) -> None:
        if which == "result":
            self._result(*value)
        elif which == "results":
            for request_id, result in value:
                self._result(request_id, result)
        elif which == "statusUpdate":
            self._set_status(*value)
        elif which == "statusUpdates":
            for update in value:
                self._set_status(*update)
        elif which == "found":
            request_id, found = value
            reply = self._results.get(request_id)
            if reply is not None:
                self._found[request_id] = found
                reply.set((True, "", "", "found"))
        elif which == "deliver":
            await self._delivered([value])
        elif which == "deliveries":
            await self._delivered(value)

    def _result(self, request_id: int, result: tuple[bool, str, str, str]) -> None:
        reply = self._results.get(request_id)
        if reply is None:
            return
        if reply.callback is None:
            reply.set(result)
        elif reply.result is None:
            reply.result = result
            del self._results[request_id]
            if reply.on_result is not None:
                reply.on_result(result)
            self._answered.append(reply)  # called back at the end of the frame

    def _end_request(self, request_id: int) -> None:
        """No result for this request (it is `timed_out`, or the connection is gone)."""
        reply = self._results[request_id]
        if reply.callback is None:
            reply.done.set()
        else:
            del self._results[request_id]
            self._call_back(reply)

    def _end_requests(self) -> None:
        for request_id in list(self._results):
            self._end_request(request_id)

    def _call_back(self, reply: _Reply) -> None:
        assert reply.callback is not None
        try:
            reply.callback(reply)
        except Exception:  # a bug in the callback must not stop the reader
            self.log.exception("request callback failed")

    def _set_status(self, message_id: bytes, status: str, code: str) -> None:
        current = self._statuses.get(message_id)
        if current is not None and current[0] == "failed":
            return  # an error reply is more precise than the ack that came with it
        self._statuses[message_id] = (status, code)
        if self.on_statuses is not None:
            if self._status_batch is not None:
                self._status_batch.append((message_id, status, code))
            else:
                self.on_statuses([(message_id, status, code)])
        if len(self._statuses) > 100_000:
            self._statuses.pop(next(iter(self._statuses)))
        event = self._status_waiters.pop(message_id, None)
        if event is not None:
            event.set()
        if status in ("expired", "failed"):
            waiter = self._replies.get(message_id)
            if waiter is not None:
                waiter.close()  # its `request` stops waiting (a reply already in stays)

    async def _delivered(self, envelopes: list[bytes]) -> None:
        """Open what the NIC delivered in one frame; record, hand out and ack the
        messages among it together."""
        now = time.time()
        messages: list[Opened] = []
        for envelope in envelopes:
            try:
                opened = self.crypto.open(envelope, now=now)
            except ExpiredError as exc:
                # Routine: a retry or an ack that arrived after its deadline.
                self.log.debug("envelope refused", reason=str(exc))
                continue
            except (AuthenticationError, DecodeError) as exc:
                self.log.warning("envelope refused", reason=str(exc))
                continue
            header = opened.header
            if header.kind == "ack":
                # Sent on by a NIC that did not hold the message (we moved NICs).
                for message_id, _token in header.acked():
                    self._set_status(message_id, "delivered", "")
            elif header.kind == "error":
                code, text = opened.error or ("unknown", "")
                self._set_status(header.reply_to, "failed", code)
                self.log.info("error reply", code=code, message=text)
            else:
                messages.append(opened)
        if messages:
            await self._messages(messages, now)

    async def _messages(self, batch: list[Opened], now: float) -> None:
        # Each copy has its own answer: a frame may carry a message twice (a retry
        # that caught up with the first copy), and only the first one is new.
        # (opened, error code, why refused: None when it is for the application)
        checked: list[tuple[Opened, str, str | None]] = []
        decoded: dict[bytes, dict[str, Any]] = {}  # payloads as dicts, by message id
        room = self._incoming_room()
        for opened in batch:
            code = "rejectedSchema"
            rejection, fields = self._check_schema(opened.header.schema_id, opened.payload)
            if fields is not None:
                decoded[opened.header.id] = fields
            if rejection is None and self.screen is not None:
                refused = self.screen(opened.header.source, opened.header.schema_id)
                if refused is not None:
                    code, rejection = refused
            if rejection is None and self.inbox is None:
                if room <= 0:
                    continue  # no room and no store: not acked, so the sender's NIC retries
                room -= 1
            checked.append((opened, code, rejection))
        keep = [opened for opened, _, rejection in checked if rejection is None]
        news: list[bool | None] = []
        if keep:
            try:
                # The lock is nearly always free: taken without a checkpoint then.
                try:
                    self._handoff.acquire_nowait()
                except trio.WouldBlock:
                    await self._handoff.acquire()
                try:
                    news = await self._remember(keep, now)
                    for opened, new in zip(keep, news, strict=True):
                        if new:
                            self._queued.add(opened.header.id)  # handed out from memory
                finally:
                    self._handoff.release()
            except StorageError as exc:
                # Not acked: the sender's NIC retries later. If the commit went in but
                # its fsync failed, the retry is a duplicate; the store still offers
                # the message to `receive()` (pending, not yet handed out).
                self.log.warning("inbox refused messages", reason=str(exc), count=len(keep))
                self._spilled = True
                checked = [item for item in checked if item[2] is not None]
                keep, news = [], []
        answers = iter(news)
        replies: list[bytes] = []
        acks: list[tuple[Header, bytes]] = []
        handed: list[Received] = []
        for opened, code, rejection in checked:
            header = opened.header
            if rejection is not None:
                # The errors first, then the acks that stop the retries: on the one path
                # between us they arrive in this order, and "failed" is final at the
                # sender.
                replies.append(self.crypto.seal_error(header, code, rejection, now=now))
            else:
                new = next(answers)
                if new is None:
                    continue  # the inbox is full: not acked, the sender's NIC retries
                if new:
                    handed.append(Received(header.id, header.source, header.schema_id,
                                           opened.payload, header.reply_to,
                                           header.deadline, decoded.get(header.id)))
            acks.append((header, opened.token))
        # One ack envelope per source for the whole frame (duplicates acked again too).
        replies += self.crypto.seal_acks(acks, now=now)
        await self._reply(replies)
        for received in handed:
            await self._hand_out(received, now)

    async def _hand_out(self, received: Received, now: float) -> None:
        waiter = self._replies.get(received.reply_to) if received.reply_to else None
        if waiter is not None:
            # A second reply, or one after the request gave up, is dropped.
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                waiter.send_nowait(received)
            try:
                if self.inbox is not None:
                    self._consume(self.inbox, received.id, now)
            finally:
                self._queued.discard(received.id)
            return
        if (self.on_message is not None and not self._spilled and not self._replay
                and self._incoming_in.statistics().current_buffer_used == 0
                and self.on_message(received)):
            # Handled in order: nothing was queued ahead of it for `receive()`.
            self._queued.discard(received.id)
            if self.inbox is not None:
                try:
                    # Written with the next accept: the handler dedups by id, so a
                    # mark lost to a crash costs only an offer after the restart.
                    self._consume(self.inbox, received.id, now, soon=True)
                except StorageError as exc:
                    # Still pending in the store: offered again after a restart, which
                    # a handler that dedups by id (twind's chat) absorbs.
                    self.log.warning("handled message not marked consumed", reason=str(exc))
            return
        try:
            self._incoming_in.send_nowait(received)
        except trio.WouldBlock:
            # The application is far behind: the message waits in the inbox store and
            # `incoming()` picks it up from there.
            self._queued.discard(received.id)
            self._spilled = True

    def _incoming_room(self) -> int:
        stats = self._incoming_in.statistics()
        return int(stats.max_buffer_size - stats.current_buffer_used)

    def _check_schema(self, schema_id: int, payload: bytes
                      ) -> tuple[str | None, dict[str, Any] | None]:
        """(why the payload is refused, None if not; the payload as a dict once decoded
        to check it, so the application need not decode it again)."""
        if self.accepted is None:
            return None, None
        struct = self.accepted.get(schema_id)
        if struct is None:
            return f"schema {schema_id:#x} is not accepted by this twin", None
        if schema_id == _TEXT_ID:  # chat: most of what a twin gets, read without pycapnp
            body = local_frames.read_text_payload(payload)
            if body is not None:
                return None, {"body": body}
        try:
            fields: dict[str, Any] = schemas.decode(struct, payload,
                                                    lambda reader: reader.to_dict())
        except DecodeError as exc:
            return f"payload does not decode as {schema_id:#x}: {exc}", None
        return None, fields

    async def _remember(self, batch: list[Opened], now: float) -> list[bool | None]:
        """For each message: True new, False seen before (or expired), None not stored
        (the inbox is full)."""
        if self.inbox is None:
            expiry = self._seen_expiry
            while expiry and expiry[0][0] < now:
                del self._seen[heapq.heappop(expiry)[1]]
            news: list[bool | None] = []
            for opened in batch:
                header = opened.header
                if header.id in self._seen:
                    news.append(False)
                    continue
                self._seen[header.id] = header.deadline
                heapq.heappush(expiry, (header.deadline, header.id))
                news.append(True)
            return news
        inbox = self.inbox
        incoming = [IncomingMessage(o.header.id, o.header.source.raw, o.header.deadline,
                                    o.header.schema_id, o.payload, o.header.reply_to)
                    for o in batch]
        # Committed here without an fsync (microseconds), then made power safe in a
        # group with the other twins of this process before anything is acked. A
        # duplicate waits for the round too: its first copy may not be on disk yet.
        answers = inbox.accept_many(incoming, now, power_safe=False)
        await self.group_sync.sync(inbox.path)
        return answers

    async def _reply(self, envelopes: list[bytes]) -> None:
        """Send acks and error replies without waiting for the NIC's result (request id
        0: none comes): this runs in the reader task, which is the one that would read
        it. Best effort: a lost ack means the message comes again, and is acked again."""
        if not envelopes:
            return
        try:
            await self._write([("submit", (0, envelope, False, False, 0))
                               for envelope in envelopes])
            # Out before the application sees the messages: a twin that stops right
            # after `receive()` has still acked what it got.
            written = self._queued_writes
            while self._written < written and not self._closed:
                await self._drained.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closed = True

    async def _write(self, items: list[tuple[str, Any]]) -> None:
        """Send frames and submissions in order (submissions in `submits` lists).
        The first write of a scheduling round, while nothing else waits to go out,
        sends what the socket takes at once right here (no task switch); later writes
        of the round (the other tasks woken by the same frame) and any rest queue for
        the writer task, which sends everything queued in one write at the start of
        the next round (one system call and one wake-up of the NIC for a burst of
        sends, not one per send); a burst that queues EARLY_WRITE_ITEMS goes out
        then, without waiting for its end. Returns at once unless more than
        WRITE_BACKLOG bytes wait (the NIC is not reading): then once they are out. Raises
        trio.ClosedResourceError when the connection is gone."""
        self._write_now(items)
        while self._unsent_bytes > WRITE_BACKLOG and not self._closed:
            await self._drained.wait()

    def _write_now(self, items: list[tuple[str, Any]]) -> None:
        """`_write` without waiting for a backlog to drain."""
        if self._closed:
            raise trio.ClosedResourceError("the connection to the NIC is gone")
        self._queued_writes += 1
        rounds = self._rounds
        if (not self._unsent and not self._writing
                and self._inline_round != rounds.round):
            data = _encode(items, self._framed.max_frame)
            sent = self._send_inline(data)
            # No task to wake: the round counter says when this round is over.
            self._inline_round = rounds.round
            if sent == len(data):
                self._written = self._queued_writes
                return
            items = [("bytes", data[sent:])]
        self._unsent.extend(items)
        self._unsent_bytes += sum(_item_size(kind, value) for kind, value in items)
        unsent = self._unsent
        if (len(unsent) >= EARLY_WRITE_ITEMS and not self._writing
                and unsent[0][0] != "bytes"):
            # A long burst made in one scheduling round: what is queued goes out now,
            # so the NIC works on it while the rest of the burst is sealed. Not after
            # a write the socket took only part of: the writer task waits for room
            # then, and writing again here would only copy the backlog again.
            self._write_unsent_now()
        else:
            self._unsent_ready.set()

    def _write_unsent_now(self) -> None:
        items, self._unsent = self._unsent, []
        self._unsent_bytes = 0
        queued = self._queued_writes
        data = _encode(items, self._framed.max_frame)
        sent = self._send_inline(data)
        if sent == len(data):
            self._written = queued
            self._drained.set()  # for waits on what was queued before (acks, backlog)
            self._drained = trio.Event()
            return
        self._unsent = [("bytes", data[sent:])]
        self._unsent_bytes = len(data) - sent
        self._unsent_ready.set()

    def _send_inline(self, data: bytes) -> int:
        """What the socket takes of `data` at once, from the calling task."""
        try:
            sent: int = self._framed.send_now(data)
        except trio.BrokenResourceError as exc:
            self._broken(str(exc))
            raise trio.ClosedResourceError("the connection to the NIC is gone") from None
        return sent

    async def _writer(self) -> None:
        while True:
            await self._unsent_ready.wait()
            self._unsent_ready = trio.Event()
            while self._unsent:
                items, self._unsent = self._unsent, []
                self._unsent_bytes = 0
                queued = self._queued_writes
                self._writing = True
                try:
                    data = _encode(items, self._framed.max_frame)
                    # What the socket takes at once, without trio's socket wrapper.
                    sent = self._framed.send_now(data)
                    if sent < len(data):
                        await self._framed.stream.send_all(memoryview(data)[sent:])
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._broken(str(exc))
                    return
                self._writing = False
                self._written = queued
                self._drained.set()
                self._drained = trio.Event()

    def _broken(self, reason: str) -> None:
        self.log.warning("NIC connection broken", reason=reason)
        self._closed = True
        self._end_requests()  # no result: "offline"
        self._drained.set()


class _Reply:
    """The NIC's result for one request (None: the connection is gone, or no answer
    came by `deadline`, a trio time). A task waits on `done`; or, for a request made
    with a `callback`, the client calls that once with the reply (`_finish`)."""

    __slots__ = ("callback", "deadline", "done", "on_result", "result", "timed_out")

    def __init__(self, deadline: float,
                 callback: Callable[[_Reply], None] | None = None) -> None:
        self.deadline = deadline
        self.done = trio.Event()
        self.result: tuple[bool, str, str, str] | None = None
        self.timed_out = False
        self.callback = callback
        # Told of the result as soon as it is read, before `callback`.
        self.on_result: Callable[[tuple[bool, str, str, str]], None] | None = None

    def set(self, result: tuple[bool, str, str, str]) -> None:
        if self.result is None:
            self.result = result
            self.done.set()

    def error(self) -> BusError:
        """Why there is no result."""
        if self.timed_out:
            return BusError("offline", "the NIC did not answer")
        return BusError("offline", "the connection to the NIC is gone")


def _item_size(kind: str, value: Any) -> int:
    return len(value[1]) if kind == "submit" else len(value)


def _encode(items: list[tuple[str, Any]], max_frame: int) -> bytes:
    """Frames for queued items: runs of submissions as `submits` lists of at most
    about SUBMITS_BATCH envelope bytes, other frames as they are; joined once, so an
    envelope is copied once on its way to the socket."""
    parts: list[bytes] = []
    run: list[tuple[int, bytes, bool, bool, int]] = []
    size = 0

    def close_run() -> None:
        nonlocal size
        if not run:
            return
        body, length = local_frames.submits_parts(run)
        parts.append(frame_prefix(length, max_frame))
        parts.extend(body)
        run.clear()
        size = 0

    for kind, value in items:
        if kind != "submit":
            close_run()
            if kind == "bytes":
                parts.append(value)
            else:
                parts += (frame_prefix(len(value), max_frame), value)
            continue
        if run and (size + len(value[1]) > SUBMITS_BATCH or len(run) >= SUBMITS_ITEMS):
            close_run()
        run.append(value)
        size += len(value[1])
    close_run()
    return b"".join(parts)


async def _attach(framed: FramedStream, identity: Identity, receive: bool) -> PublicKey:
    body = await framed.receive()
    if body is None:
        raise BusError("offline", "the NIC closed the connection")
    which, value = schemas.decode(_local.LocalMessage, body, _read_local)
    if which != "challenge":
        raise BusError("unauthorized", f"expected a challenge from the NIC, got {which}")
    nic_raw, nonce = value
    nic = PublicKey(nic_raw)
    message = _local.LocalMessage.new_message()
    attach = message.init("attach")
    attach.twinKey = identity.public.raw
    attach.signature = sign_attach(identity, nic, nonce)
    attach.receive = receive
    attach.batches = True
    await framed.send(message.to_bytes())
    body = await framed.receive()
    if body is None:
        raise BusError("unauthorized", "the NIC closed the connection during attach")
    which, value = schemas.decode(_local.LocalMessage, body, _read_local)
    if which == "refused":
        raise BusError("unauthorized", f"the NIC refused the attach: {value}")
    if which != "attached":
        raise BusError("unauthorized", f"expected attached, got {which}")
    return nic


def _read_local(reader: Any) -> tuple[str, Any]:
    which = str(reader.which())
    if which == "challenge":
        challenge = reader.challenge
        if len(challenge.nicKey) != 32:
            raise DecodeError("challenge with a malformed NIC key")
        return which, (bytes(challenge.nicKey), bytes(challenge.nonce))
    if which == "result":
        return which, _read_result(reader.result)
    if which == "results":
        return which, [_read_result(r) for r in reader.results]
    if which == "statusUpdate":
        return which, _read_update(reader.statusUpdate)
    if which == "statusUpdates":
        return which, [_read_update(u) for u in reader.statusUpdates]
    if which == "deliver":
        return which, bytes(reader.deliver)
    if which == "deliveries":
        return which, [bytes(envelope) for envelope in reader.deliveries]
    if which == "refused":
        return which, str(reader.refused.reason)
    if which == "found":
        f = reader.found
        return which, (int(reader.requestId), Found(
            Location.read(f.location), int(f.hops), int(f.rounds), int(f.queried),
            float(f.elapsed)))
    return which, None


def _read_result(r: Any) -> tuple[int, tuple[bool, str, str, str]]:
    return int(r.requestId), (bool(r.ok), str(r.code), str(r.message), str(r.status))


def _read_update(u: Any) -> tuple[bytes, str, str]:
    return bytes(u.messageId), str(u.status), str(u.code)


def _typed(message: Any) -> tuple[int, bytes]:
    if isinstance(message, tuple):
        schema_id, payload = message
        return int(schema_id), bytes(payload)
    return int(message.schema.node.id), bytes(message.to_bytes())


def _check_size(payload: bytes) -> None:
    if len(payload) > MAX_PAYLOAD:
        raise BusError("tooLarge", f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")


def _from_inbox(stored: Any) -> Received:
    return Received(stored.id, PublicKey(stored.source), stored.schema_id, stored.payload,
                    stored.reply_to, stored.deadline)


def text_message(body: str) -> Any:
    """A `TextMessage` payload builder (the simplest typed message)."""
    message = schemas.rmb.TextMessage.new_message()
    message.body = body
    return message

