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
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from twinmesh.bus.crypto import MAX_PAYLOAD, Opened, TwinCrypto
from twinmesh.bus.inbox_store import InboxStore
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
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.proto.attach import Location, sign_attach
from twinmesh.proto.outbox import ACK_GRACE
from twinmesh.wire import schemas
from twinmesh.wire.framing import encode_frame

TWINS_SOCKET = "twins.sock"
LOCATION_TTL = 3600.0
REQUEST_TIMEOUT = 30.0
_local = schemas.local
_FINAL = ("delivered", "expired", "failed")


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

    def decode(self, struct: Any) -> dict[str, Any]:
        """The payload as a dict of `struct`'s fields; BusError(rejectedSchema) when
        it is another type or does not decode as this one."""
        if struct.schema.node.id != self.schema_id:
            raise BusError("rejectedSchema", f"payload is type {self.schema_id:#x}, not "
                                             f"{struct.schema.node.id:#x}")
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
    ) -> None:
        self.identity = identity
        self.key = identity.public
        self.nic = nic
        self.crypto = TwinCrypto(identity)
        self.inbox = inbox
        self.accepted = None if accepted is None else {s.schema.node.id: s for s in accepted}
        self._framed = framed
        self._send_lock = trio.Lock()
        self._unsent: list[bytes] = []  # encoded frames waiting for `_write`
        self._request_ids = itertools.count(1)
        self._results: dict[int, trio.MemorySendChannel[tuple[bool, str, str, str]]] = {}
        self._statuses: dict[bytes, tuple[str, str]] = {}
        self._found: dict[int, Found] = {}
        # Told of every status change of this twin's messages (twind records them).
        self.on_status: Callable[[bytes, str, str], None] | None = None
        # Asked about every new message before it is acked: (code, reason) refuses it
        # with a typed error reply (e.g. twind's "contacts only"), None accepts it.
        self.screen: Callable[[PublicKey, int], tuple[str, str] | None] | None = None
        # One event per message someone waits on (set on its next status change), so a
        # change wakes only that message's waiters, not every `wait_status` in flight.
        self._status_waiters: dict[bytes, trio.Event] = {}
        self._replies: dict[bytes, trio.MemorySendChannel[Received]] = {}
        self._incoming_in, self._incoming_out = trio.open_memory_channel[Received](1024)
        self._seen: dict[bytes, float] = {}  # dedup without an inbox store
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
    ) -> AsyncIterator[BusClient]:
        """Attach to the NIC at `nic_path` (its state dir or `twins.sock`)."""
        socket_path = nic_path / TWINS_SOCKET if nic_path.is_dir() else nic_path
        try:
            stream = await connect_unix(socket_path)
        except OSError as exc:
            raise BusError("offline", f"cannot reach the NIC at {socket_path}: "
                                      f"{exc.strerror or exc} (is pnicd running?)") from None
        async with stream:
            framed = FramedStream(stream)
            nic = await _attach(framed, identity, receive)
            client = cls(identity, framed, nic, inbox=inbox, accepted=accepted)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                await client.publish_location()
                nursery.start_soon(client._republish)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()

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
        ok, code, text, _ = await self._submit(envelope, len(payload), reliable=True,
                                               fail_fast=fail_fast)
        if not ok:
            raise BusError(code, text)
        self._statuses.setdefault(header.id, ("queued", ""))
        if wait == "delivered":
            # The NIC says "expired" only ACK_GRACE after the deadline (an ack may be late).
            limit = (header.deadline + ACK_GRACE + 1.0 - time.time() if timeout is None
                     else timeout)
            status, code = await self.wait_status(header.id, timeout=max(0.0, limit))
            if status != "delivered":
                raise BusError(code or status, f"message {header.id.hex()} {status}")
        return header.id

    async def submit_sealed(self, envelope: bytes, payload_size: int, *,
                            fail_fast: bool = False) -> None:
        """Hand an envelope sealed earlier (`crypto.seal_message`, e.g. while no NIC was
        reachable) to the NIC's outbox; returns once it is stored durably there."""
        ok, code, text, _ = await self._submit(envelope, payload_size, reliable=True,
                                               fail_fast=fail_fast)
        if not ok:
            raise BusError(code, text)

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
            ok, code, text, _ = await self._submit(envelope, len(payload), reliable=True,
                                                   fail_fast=False)
            if not ok:
                raise BusError(code, text)
            with trio.move_on_after(timeout):
                while True:
                    with trio.move_on_after(0.5):
                        return await receive.receive()
                    status, code = self._statuses.get(header.id, ("queued", ""))
                    if status in ("expired", "failed"):
                        raise BusError(code or status, f"request {header.id.hex()} {status}")
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
        with trio.move_on_after(timeout):
            # Only for an id this client has not heard of: for its own sends the status
            # updates follow, and asking would cost a round trip to the NIC per message.
            if message_id not in self._statuses:
                with contextlib.suppress(BusError):
                    answer, code = await self.status(message_id)
                    if answer == "unknown":
                        return answer, code  # never accepted, or finished long ago
                    if answer in _FINAL:
                        self._set_status(message_id, answer, code)
            while True:
                status = self._statuses.get(message_id, ("queued", ""))
                if status[0] in _FINAL or self._closed:
                    return status
                event = self._status_waiters.get(message_id)
                if event is None:
                    event = self._status_waiters[message_id] = trio.Event()
                await event.wait()
        return self._statuses.get(message_id, ("queued", ""))

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
            await trio.to_thread.run_sync(self.inbox.consume, last, time.time())

    # ------------------------------------------------------------ internals

    async def _submit(
        self, envelope: bytes, payload_size: int, *, reliable: bool, fail_fast: bool
    ) -> tuple[bool, str, str, str]:
        message = _local.LocalMessage.new_message()
        submit = message.init("submit")
        submit.envelope = envelope
        submit.reliable = reliable
        submit.failFast = fail_fast
        submit.payloadSize = payload_size
        return await self._call(message)

    async def _call(
        self, message: Any, request_id: int | None = None
    ) -> tuple[bool, str, str, str]:
        if request_id is None:
            request_id = next(self._request_ids)
        message.requestId = request_id
        send, receive = trio.open_memory_channel[tuple[bool, str, str, str]](1)
        self._results[request_id] = send
        try:
            if self._closed:
                raise BusError("offline", "the connection to the NIC is gone")
            await self._write(message.to_bytes())
            with trio.fail_after(REQUEST_TIMEOUT):
                return await receive.receive()
        except trio.TooSlowError:
            raise BusError("offline", "the NIC did not answer") from None
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
            raise BusError("offline", "the connection to the NIC is gone") from None
        finally:
            del self._results[request_id]

    async def _reader(self) -> None:
        while True:
            try:
                body = await self._framed.receive()
            except (RemoteProtocolError, trio.BrokenResourceError) as exc:
                self.log.warning("NIC connection broken", reason=str(exc))
                body = None
            if body is None:
                self._closed = True
                for waiting in self._results.values():
                    waiting.close()
                for event in self._status_waiters.values():
                    event.set()  # they return what they have
                self._incoming_in.close()  # receive() says "offline" once drained
                return
            which, value = schemas.decode(_local.LocalMessage, body, _read_local)
            if which == "result":
                request_id, result = value
                channel = self._results.get(request_id)
                if channel is not None:
                    channel.send_nowait(result)
            elif which == "statusUpdate":
                message_id, status, code = value
                self._set_status(message_id, status, code)
            elif which == "found":
                request_id, found = value
                channel = self._results.get(request_id)
                if channel is not None:
                    self._found[request_id] = found
                    channel.send_nowait((True, "", "", "found"))
            elif which == "deliver":
                await self._delivered(value)

    def _set_status(self, message_id: bytes, status: str, code: str) -> None:
        current = self._statuses.get(message_id)
        if current is not None and current[0] == "failed":
            return  # an error reply is more precise than the ack that came with it
        self._statuses[message_id] = (status, code)
        if self.on_status is not None:
            self.on_status(message_id, status, code)
        if len(self._statuses) > 100_000:
            self._statuses.pop(next(iter(self._statuses)))
        event = self._status_waiters.pop(message_id, None)
        if event is not None:
            event.set()

    async def _delivered(self, envelope: bytes) -> None:
        now = time.time()
        try:
            opened = self.crypto.open(envelope, now=now)
        except ExpiredError as exc:
            # Routine: a retry or an ack that arrived after its deadline.
            self.log.debug("envelope refused", reason=str(exc))
            return
        except (AuthenticationError, DecodeError) as exc:
            self.log.warning("envelope refused", reason=str(exc))
            return
        header = opened.header
        if header.kind == "ack":
            self._set_status(header.reply_to, "delivered", "")
            return
        if header.kind == "error":
            code, text = opened.error or ("unknown", "")
            self._set_status(header.reply_to, "failed", code)
            self.log.info("error reply", code=code, message=text)
            return
        await self._message(opened, now)

    async def _message(self, opened: Opened, now: float) -> None:
        header = opened.header
        rejection = self._check_schema(header.schema_id, opened.payload)
        code = "rejectedSchema"
        if rejection is None and self.screen is not None:
            refused = self.screen(header.source, header.schema_id)
            if refused is not None:
                code, rejection = refused
        if rejection is None and self.inbox is None and self._incoming_full():
            return  # no room and no store: not acked, so the sender's NIC retries later
        if rejection is None:
            try:
                async with self._handoff:
                    new = await self._remember(opened, now)
                    if new:
                        self._queued.add(header.id)  # handed out from memory, below
            except StorageError as exc:
                # Not stored, so not acked: the sender's NIC retries later.
                self.log.warning("inbox refused a message", reason=str(exc))
                return
        if rejection is not None:
            # The error first, then the ack that stops the retries: on the one path
            # between us they arrive in this order, and "failed" is final at the sender.
            await self._reply(self.crypto.seal_error(header, code, rejection,
                                                     now=now))
        await self._reply(self.crypto.seal_ack(header, opened.token, now=now))
        if rejection is not None:
            return
        if not new:
            return  # a retry of something we already have: acked again, not delivered
        received = Received(header.id, header.source, header.schema_id, opened.payload,
                            header.reply_to, header.deadline)
        waiter = self._replies.get(header.reply_to) if header.reply_to else None
        if waiter is not None:
            waiter.send_nowait(received)
            try:
                if self.inbox is not None:
                    await trio.to_thread.run_sync(self.inbox.consume, header.id, now)
            finally:
                self._queued.discard(header.id)
            return
        try:
            self._incoming_in.send_nowait(received)
        except trio.WouldBlock:
            # The application is far behind: the message waits in the inbox store and
            # `incoming()` picks it up from there.
            self._queued.discard(header.id)
            self._spilled = True

    def _incoming_full(self) -> bool:
        stats = self._incoming_in.statistics()
        return stats.current_buffer_used >= stats.max_buffer_size

    def _check_schema(self, schema_id: int, payload: bytes) -> str | None:
        if self.accepted is None:
            return None
        struct = self.accepted.get(schema_id)
        if struct is None:
            return f"schema {schema_id:#x} is not accepted by this twin"
        try:
            schemas.decode(struct, payload, lambda reader: reader.to_dict())
        except DecodeError as exc:
            return f"payload does not decode as {schema_id:#x}: {exc}"
        return None

    async def _remember(self, opened: Opened, now: float) -> bool:
        header = opened.header
        if self.inbox is None:
            expiry = self._seen_expiry
            while expiry and expiry[0][0] < now:
                del self._seen[heapq.heappop(expiry)[1]]
            if header.id in self._seen:
                return False
            self._seen[header.id] = header.deadline
            heapq.heappush(expiry, (header.deadline, header.id))
            return True
        return await trio.to_thread.run_sync(
            lambda: self.inbox.accept(  # type: ignore[union-attr]
                header.id, header.source.raw, header.deadline, header.schema_id,
                opened.payload, now, header.reply_to))

    async def _reply(self, envelope: bytes) -> None:
        """Send an ack or error reply without waiting for the NIC's result: this runs
        in the reader task, which is the one that would read that result. Best
        effort: a lost ack means the message comes again, and is acked again."""
        message = _local.LocalMessage.new_message()
        submit = message.init("submit")
        submit.envelope = envelope
        submit.reliable = False
        message.requestId = 0  # no one waits for this result
        try:
            await self._write(message.to_bytes())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closed = True

    async def _write(self, body: bytes) -> None:
        """Send one frame to the NIC. Frames queued by other tasks while a write is in
        progress go out together in the next one (one system call and one wake-up of
        the NIC for a burst of sends), in the order they were queued; a frame another
        task's write took along returns at once."""
        self._unsent.append(encode_frame(body, self._framed.max_frame))
        async with self._send_lock:
            if not self._unsent:
                return
            data = b"".join(self._unsent) if len(self._unsent) > 1 else self._unsent[0]
            self._unsent.clear()
            await self._framed.stream.send_all(data)


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
        r = reader.result
        return which, (int(r.requestId), (bool(r.ok), str(r.code), str(r.message),
                                          str(r.status)))
    if which == "statusUpdate":
        u = reader.statusUpdate
        return which, (bytes(u.messageId), str(u.status), str(u.code))
    if which == "deliver":
        return which, bytes(reader.deliver)
    if which == "refused":
        return which, str(reader.refused.reason)
    if which == "found":
        f = reader.found
        return which, (int(reader.requestId), Found(
            Location.read(f.location), int(f.hops), int(f.rounds), int(f.queried),
            float(f.elapsed)))
    return which, None


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

