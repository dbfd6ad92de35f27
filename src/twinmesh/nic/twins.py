"""The NIC side of the message bus: twins attach on `twins.sock`, envelopes flow.

What runs here (all in the NIC's nursery):

- the Unix socket where twins attach (challenge-response, `proto.attach`) and then
  submit sealed envelopes, ask for status, and receive envelopes and status updates;
- the outbox core (`proto.outbox`), its timer, and one writer task that commits
  everything the core asks to persist in batches (group commit) before the twins
  that submitted hear "accepted";
- one sender task that hands envelopes to the overlay, addressed to the NIC where the
  destination twin is (the location records; our own twins are served directly);
- the receiving end: envelopes from the overlay go to the attached sessions of their
  destination twin, or a `Notice(offline)` goes back to the source NIC; acks close
  outbox entries (their delivery token must match) and are passed on to the twin.

Sending to the overlay is best effort on purpose: the outbox retries until an ack
arrives or the deadline passes, so a dropped transmission costs a retry, not a message.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from twinmesh.bus.crypto import Header, read_header
from twinmesh.carriers.unix import serve_unix
from twinmesh.control.framed import FramedStream
from twinmesh.errors import (
    DecodeError,
    NoRouteError,
    RemoteProtocolError,
    StorageError,
)
from twinmesh.identity.keys import PublicKey
from twinmesh.nic.outbox_store import OutboxStore
from twinmesh.proto.attach import NONCE_SIZE, Location, verify_attach
from twinmesh.proto.outbox import (
    ACK_GRACE,
    Forget,
    Outbox,
    OutboxConfig,
    Persist,
    Refused,
    StatusChanged,
    Transmit,
)
from twinmesh.wire import schemas
from twinmesh.wire.framing import encode_frame

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
NOTICE_CODES = frozenset({"offline", "unknownTwin"})  # what a destination NIC may answer
MAX_ENVELOPE = 96 * 1024  # a 64 KiB payload plus header and sealing overhead

_local = schemas.local


@dataclass(eq=False)
class TwinSession:
    """One attached connection of a twin."""

    id: int
    twin: PublicKey
    receive: bool
    outgoing: trio.MemorySendChannel[bytes]


@dataclass(frozen=True)
class FindAnswer:
    """What a twin lookup (findDigitalTwinById) found, and what it cost."""

    location: Location
    hops: int  # overlay hops to the NIC the record points at
    rounds: int
    queried: int
    elapsed: float  # seconds


@dataclass
class _Pending:
    """A submission waiting for its group commit."""

    done: trio.Event = field(default_factory=trio.Event)
    error: str = ""


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
        self._waiting: list[tuple[list[Transmit], _Pending]] = []
        self._batch_ready = trio.Event()
        self._transmit_in, self._transmit_out = trio.open_memory_channel[
            tuple[PublicKey, bytes]](TRANSMIT_QUEUE)
        self._timer_scope: trio.CancelScope | None = None
        self._session_ids = itertools.count(1)
        self.log = structlog.get_logger("twinmesh.twins").bind(node=nic.key.short)

    # ---------------------------------------------------------------- running

    async def serve(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        self._store = await trio.to_thread.run_sync(OutboxStore, self.store_path)
        try:
            restored = await trio.to_thread.run_sync(self._store.load)
            now = _unix_now()
            for entry in restored:
                self._apply(self.outbox.restore(entry, now))
            if restored:
                self.log.info("outbox restored", messages=len(restored))
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
            self._apply(self.outbox.handle_timer(_unix_now()))

    def _rearm(self) -> None:
        scope = self._timer_scope
        deadline = self.outbox.get_timer()
        if scope is not None and deadline is not None:
            scope.deadline = min(scope.deadline, trio.current_time() + max(
                0.0, deadline - _unix_now()))

    async def _writer(self) -> None:
        """Group commit: everything persisted while the last commit ran goes in one."""
        while True:
            await self._batch_ready.wait()
            self._batch_ready = trio.Event()
            batch, self._batch = self._batch, []
            waiting, self._waiting = self._waiting, []
            if not batch:
                continue
            assert self._store is not None
            error = ""
            try:
                await trio.to_thread.run_sync(self._store.apply, batch)
            except StorageError as exc:
                error = str(exc)
                self.log.error("outbox commit failed", error=error, batch=len(batch))
                for item in batch:
                    if isinstance(item, Persist):
                        self.outbox.drop(item.entry.id)
            for transmits, pending in waiting:
                pending.error = error
                if not error:
                    for transmit in transmits:
                        self._transmit(transmit)
                pending.done.set()

    async def _sender(self) -> None:
        async for nic_key, data in self._transmit_out:
            try:
                await self.nic.send(nic_key, data)
            except NoRouteError:
                self.counters["transmit_no_route"] += 1

    # --------------------------------------------------------- outbox outputs

    def _apply(self, outputs: list[Any]) -> None:
        """Carry out what the outbox core asked for (except for new submissions, whose
        Transmits wait for their commit in `_submit`)."""
        for output in outputs:
            if isinstance(output, Persist | Forget):
                self._batch.append(output)
                self._batch_ready.set()
            elif isinstance(output, Transmit):
                self._transmit(output)
            elif isinstance(output, StatusChanged):
                self._status_update(output)
        self._rearm()

    def _transmit(self, transmit: Transmit) -> None:
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
        self._send_to_nic(nic_key, _nic_bus("envelope", transmit.envelope))

    def send_dht(self, nic_key: PublicKey, message: bytes) -> None:
        """Send a DHT message to another NIC (best effort, like every bus frame)."""
        self._send_to_nic(nic_key, _nic_bus("dht", message))

    def _send_to_nic(self, nic_key: PublicKey, data: bytes) -> None:
        try:
            self._transmit_in.send_nowait((nic_key, data))
        except trio.WouldBlock:
            self.counters["transmit_dropped"] += 1  # the outbox will retry

    def _status_update(self, change: StatusChanged) -> None:
        message = _local.LocalMessage.new_message()
        update = message.init("statusUpdate")
        update.messageId = change.id
        update.status = change.status.value
        update.code = change.code
        self._to_twin(change.source, message.to_bytes(), receivers_only=False)

    # ------------------------------------------------------- from the overlay

    def on_packet(self, source_nic: PublicKey, payload: bytes, hops: int) -> None:
        """An overlay payload packet arrived for this NIC."""
        try:
            which, value = schemas.decode(_local.NicBus, payload, _read_nic_bus)
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
        envelope = value
        try:
            header = read_header(envelope)
        except DecodeError as exc:
            self.counters["bad_envelopes"] += 1
            self.log.warning("bad envelope", nic=source_nic.short, reason=str(exc))
            return
        self._arrived(header, envelope, source_nic)

    def _arrived(self, header: Header, envelope: bytes, source_nic: PublicKey | None) -> None:
        """An envelope for one of our twins (from the overlay, or from a local twin)."""
        if header.kind == "ack":
            # We may be the NIC of the twin that sent the message: close its outbox
            # entry (a no-op unless the delivery token matches).
            self._apply(self.outbox.acked(header.reply_to, header.ack_token, _unix_now()))
        if self._receivers(header.destination):
            self._deliver_local(header.destination, envelope)
        elif header.kind == "message" and source_nic is not None:
            code = "offline" if self._knows(header.destination) else "unknownTwin"
            self._send_to_nic(source_nic, _nic_bus("notice", (header.id, header.destination,
                                                              code)))

    def _knows(self, twin: PublicKey) -> bool:
        return self.locate(twin) == self.nic.key

    def _deliver_local(self, twin: PublicKey, envelope: bytes) -> None:
        message = _local.LocalMessage.new_message()
        message.deliver = envelope
        self._to_twin(twin, message.to_bytes(), receivers_only=True)

    def _receivers(self, twin: PublicKey) -> list[TwinSession]:
        return [s for s in self.sessions.get(twin, ()) if s.receive]

    def _to_twin(self, twin: PublicKey, frame: bytes, *, receivers_only: bool) -> None:
        sessions = self._receivers(twin) if receivers_only else self.sessions.get(twin, [])
        # Deliveries go to the newest receiving session only (exactly one consumer);
        # status updates go to every session of the twin.
        for session in sessions[-1:] if receivers_only else sessions:
            try:
                session.outgoing.send_nowait(frame)
            except trio.WouldBlock:
                # A twin that does not read: the sender's outbox retries the message.
                self.counters["session_overflow"] += 1
            except trio.BrokenResourceError:
                pass

    # ------------------------------------------------------------ twin sessions

    async def _connection(self, stream: trio.abc.Stream, remote: str) -> None:
        framed = FramedStream(stream, MAX_ENVELOPE + 4096)
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
            twin_raw, signature, receive = schemas.decode(
                _local.LocalMessage, body, _read_attach)
            twin = verify_attach(self.nic.key, nonce, twin_raw, signature)
        except (trio.TooSlowError, RemoteProtocolError, ValueError) as exc:
            self.counters["attach_refused"] += 1
            self.log.warning("twin attach refused", reason=str(exc) or "timeout")
            await _send_refused(framed, str(exc) or "attach timed out")
            return
        send, receive_channel = trio.open_memory_channel[bytes](SESSION_QUEUE)
        session = TwinSession(next(self._session_ids), twin, receive, send)
        self.sessions[twin].append(session)
        log = self.log.bind(twin=twin.short, session=session.id)
        log.info("twin attached", receive=receive)
        attached = _local.LocalMessage.new_message()
        attached.init("attached").sessionId = session.id
        await framed.send(attached.to_bytes())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, receive_channel, framed)
                await self._serve_session(session, framed, log, nursery)
                nursery.cancel_scope.cancel()
        finally:
            self.sessions[twin].remove(session)
            if not self.sessions[twin]:
                del self.sessions[twin]
            send.close()
            log.info("twin detached")

    async def _serve_session(
        self, session: TwinSession, framed: FramedStream, log: Any, nursery: trio.Nursery
    ) -> None:
        commits = trio.Semaphore(COMMITS_IN_FLIGHT)
        while True:
            try:
                body = await framed.receive()
            except (RemoteProtocolError, trio.BrokenResourceError) as exc:
                log.warning("twin session dropped", reason=str(exc))
                return
            if body is None:
                return
            try:
                request_id, which, value = schemas.decode(
                    _local.LocalMessage, body, _read_request)
            except DecodeError as exc:
                await self._result(session, 0, ok=False, code="malformed", message=str(exc))
                continue
            if which == "submit":
                envelope, reliable, fail_fast, payload_size = value
                pending = await self._submit(session, request_id, envelope, reliable,
                                             fail_fast, payload_size)
                if pending is not None:
                    # Answer once it is committed, without holding up the next request.
                    await commits.acquire()
                    nursery.start_soon(self._answer_after_commit, session, request_id,
                                       pending, commits)
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
    ) -> _Pending | None:
        """Admit one submission. Answers the twin at once, or returns the `_Pending`
        whose group commit must finish before the answer (`_answer_after_commit`)."""
        try:
            header = read_header(envelope)
        except DecodeError as exc:
            await self._result(session, request_id, ok=False, code="malformed",
                               message=str(exc))
            return None
        if header.source != session.twin:
            await self._result(session, request_id, ok=False, code="unauthorized",
                               message="the envelope's source is not the attached twin")
            return None
        now = _unix_now()
        if not reliable:
            # Acks and error replies: one best-effort send, no outbox.
            self._route_once(header, envelope)
            await self._result(session, request_id, ok=True, status="sent")
            return None
        at = self.locate(header.destination)
        if fail_fast and at == self.nic.key and header.destination not in self.sessions:
            # Our own twin, and it is away: say so now rather than queueing.
            await self._result(session, request_id, ok=False, code="offline",
                               message=f"{header.destination.text} is not attached")
            return None
        routable = header.destination in self.sessions or at is not None
        refused, outputs = self.outbox.submit(
            id=header.id, source=header.source, destination=header.destination,
            deadline=header.deadline, ack_hash=header.ack_hash, envelope=envelope,
            payload_size=payload_size, now=now, routable=bool(routable), fail_fast=fail_fast,
        )
        if refused is not None:
            await self._refused(session, request_id, refused)
            return None
        transmits = [o for o in outputs if isinstance(o, Transmit)]
        self._apply([o for o in outputs if not isinstance(o, Transmit)])
        if not any(isinstance(o, Persist) for o in outputs):
            await self._result(session, request_id, ok=True, status="queued")  # resubmission
            return None
        pending = _Pending()
        self._waiting.append((transmits, pending))
        self._batch_ready.set()
        return pending

    async def _answer_after_commit(
        self, session: TwinSession, request_id: int, pending: _Pending,
        commits: trio.Semaphore,
    ) -> None:
        try:
            await pending.done.wait()
            if pending.error:
                await self._result(session, request_id, ok=False, code="overloaded",
                                   message=f"the NIC could not store the message: "
                                           f"{pending.error}")
            else:
                await self._result(session, request_id, ok=True, status="queued")
        finally:
            commits.release()

    def _route_once(self, header: Header, envelope: bytes) -> None:
        nic_key = self.locate(header.destination)
        if header.destination in self.sessions or nic_key == self.nic.key:
            self._arrived(header, envelope, None)
        elif nic_key is not None:
            self._send_to_nic(nic_key, _nic_bus("envelope", envelope))

    async def _refused(self, session: TwinSession, request_id: int, refused: Refused) -> None:
        self.counters[f"refused_{refused.code}"] += 1
        await self._result(session, request_id, ok=False, code=refused.code,
                           message=refused.message)

    async def _result(
        self, session: TwinSession, request_id: int, *, ok: bool, code: str = "",
        message: str = "", status: str = "",
    ) -> None:
        frame = _local.LocalMessage.new_message()
        frame.requestId = request_id
        result = frame.init("result")
        result.requestId = request_id
        result.ok = ok
        result.code = code
        result.message = message[:500]
        result.status = status
        try:
            session.outgoing.send_nowait(frame.to_bytes())
        except trio.WouldBlock:
            # Results must not be lost: wait for room (the twin is reading slowly).
            await session.outgoing.send(frame.to_bytes())


async def _pump(channel: trio.MemoryReceiveChannel[bytes], framed: FramedStream) -> None:
    # A twin that hangs up while frames are on their way to it ends only its own
    # session (the reader sees the end of the stream): the error must not escape the
    # session's nursery, where an exception group would take the whole TwinPort down.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async for frame in channel:
            # What is already queued goes out in the same write: one system call and
            # one wake-up of the twin for a burst of results, status updates and
            # deliveries, instead of one each.
            frames = [encode_frame(frame, framed.max_frame)]
            size = len(frames[0])
            while size < PUMP_BATCH:
                try:
                    frame = channel.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                frames.append(encode_frame(frame, framed.max_frame))
                size += len(frames[-1])
            await framed.stream.send_all(b"".join(frames) if len(frames) > 1 else frames[0])


async def _send_refused(framed: FramedStream, reason: str) -> None:
    message = _local.LocalMessage.new_message()
    message.init("refused").reason = reason[:300]
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await framed.send(message.to_bytes())


def _nic_bus(which: str, value: Any) -> bytes:
    message = _local.NicBus.new_message()
    if which == "envelope":
        message.envelope = value
    elif which == "dht":
        message.dht = value
    else:
        message_id, twin, code = value
        notice = message.init("notice")
        notice.messageId = message_id
        notice.twin = twin.raw
        notice.code = code
    return bytes(message.to_bytes())


def _read_nic_bus(reader: Any) -> tuple[str, Any]:
    which = str(reader.which())
    if which == "envelope":
        return which, bytes(reader.envelope)
    if which == "notice":
        notice = reader.notice
        return which, (bytes(notice.messageId), bytes(notice.twin), str(notice.code))
    if which == "dht":
        return which, bytes(reader.dht)
    raise DecodeError(f"bus frame {which!r} unknown to this version")


def _read_attach(reader: Any) -> tuple[bytes, bytes, bool]:
    if str(reader.which()) != "attach":
        raise DecodeError("expected an attach")
    attach = reader.attach
    return bytes(attach.twinKey), bytes(attach.signature), bool(attach.receive)


def _read_request(reader: Any) -> tuple[int, str, Any]:
    which = str(reader.which())
    request_id = int(reader.requestId)
    if which == "submit":
        s = reader.submit
        return request_id, which, (bytes(s.envelope), bool(s.reliable), bool(s.failFast),
                                   int(s.payloadSize))
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
