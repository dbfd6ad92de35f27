"""The trio shell around one link core: read, feed, flush, sleep.

A `LinkSession` owns one carrier stream and one `proto.link.Link`. Three tasks share
the core (trio runs them on one thread, and every core call is synchronous):

- the reader feeds received bytes to the core;
- the writer drains the bounded send queue, batching every payload already waiting
  into one write (back-pressure: `send()` blocks while the queue is full);
- the timer sleeps until `core.get_timer()` and calls `handle_timer`.

Only this module writes to the stream, so a keepalive ack and a data batch never
interleave: either under `_send_lock` (`send_all`), or, while nobody holds it and
nothing waits to be written, synchronously without blocking (a plain socket takes
what fits in its kernel buffer; what does not fit waits in `_unsent` for the next
locked write). That direct path spares a packet the writer task's wake-up and the
trips through the run loop: most packets leave from the task that made them.
Events go to the owner through `LinkObserver`.

A read often brings several frames, and the owner answers or forwards each of them on
some link. While a read's events are handed out, direct writes wait in the cores
(`WriteBatch`) and each link touched is written once at the end: one system call (and
one wake-up of the peer) for the lot instead of one per packet.

A bug raising out of the owner's handler for one event (a packet, the link coming up
or going down) drops that event and is counted (`InternalErrors`); the link runs on.
One raising out of the link core itself leaves the core's state unknown: that link
closes (its dialer links again), the NIC runs on.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import time
from typing import Protocol

import structlog
import trio

from twinmesh.carriers.base import NowaitReader, nowait_reader, nowait_writer
from twinmesh.errors import LinkClosedError, LocalProtocolError
from twinmesh.identity.keys import PublicKey
from twinmesh.nic.internal_errors import LINK_CORE, LINK_EVENT, LINK_PACKET, InternalErrors
from twinmesh.proto.link import DataReceived, DownKind, Event, Link, LinkDown, LinkUp, State

_ids = itertools.count(1)

# Under glibc's threshold (128 KiB) for serving an allocation with its own mapping:
# a 256 KiB read buffer was mapped and unmapped on every read, faulting in each page
# it touched (5x the CPU of a 64 KiB read).
READ_SIZE = 127 * 1024
# Most bytes one write gathers from the queue before flushing.
WRITE_BATCH_BYTES = 256 * 1024
GOODBYE_TIMEOUT = 0.5
MAX_CONTROL_BACKLOG = 4096
# Frames the core may hold for a peer that does not read while we read it: the core
# answers some frames itself (keepalive acks), and the reader never waits to write.
# One read's worth of answers and forwards is a few thousand small frames at most.
MAX_CORE_BACKLOG = 65536


class WriteBatch:
    """Links whose direct writes wait for the end of the batch of events being handed
    out. A NIC shares one among all its links, so a packet forwarded from one link to
    another waits too. Changed only by `LinkSession`, synchronously (no checkpoint
    between opening and closing a batch)."""

    def __init__(self) -> None:
        self.depth = 0
        self.sessions: list[LinkSession] = []


class LinkObserver(Protocol):
    """What a session tells its owner. Called from the session's tasks; must not block."""

    def link_up(self, session: LinkSession) -> None: ...

    def link_data(self, session: LinkSession, data: bytes) -> None: ...

    def link_down(self, session: LinkSession, down: LinkDown) -> None: ...


class LinkSession:
    """One link: a core, a stream, and the tasks that drive them."""

    def __init__(
        self,
        core: Link,
        stream: trio.abc.Stream,
        observer: LinkObserver,
        *,
        direction: str,
        uri: str,
        carrier: str,
        send_queue: int = 256,
        internal_errors: InternalErrors | None = None,
        batch: WriteBatch | None = None,
    ) -> None:
        self.id = next(_ids)
        self.core = core
        self.direction = direction  # immutable after construction
        self.uri = uri
        self.carrier = carrier
        self.up_since: float | None = None  # unix time; only set by this session
        self.down: LinkDown | None = None
        self._stream = stream
        self._observer = observer
        self._send_lock = trio.Lock()
        self._queue_in, self._queue_out = trio.open_memory_channel[bytes](send_queue)
        self._timer_scope: trio.CancelScope | None = None
        self._finished = trio.Event()
        self._down_event = trio.Event()
        self._control_backlog: collections.deque[bytes] = collections.deque()
        self._write_nowait = nowait_writer(stream)
        # Bytes the core produced that the kernel did not take yet: they go before
        # anything else, and while there are some every write waits for the lock.
        self._unsent: bytes | bytearray = b""
        # Payloads put in the queue and not yet fed to the core. The queue's own count
        # misses one handed to a waiting writer, or taken by it before it yields: a
        # direct write then would overtake it.
        self._queued = 0
        self._batch = batch if batch is not None else WriteBatch()
        self._batched = False  # in `_batch.sessions`
        self.log = structlog.get_logger("twinmesh.link").bind(
            link=self.id, direction=direction, uri=uri
        )
        self.internal_errors = internal_errors or InternalErrors(self.log)

    # ---------------------------------------------------------------- owner API

    @property
    def peer(self) -> PublicKey | None:
        return self.core.peer

    @property
    def is_up(self) -> bool:
        return self.core.is_up and self.down is None

    async def send(self, payload: bytes) -> None:
        """Queue a payload, waiting while the send queue is full (back-pressure).

        Always a cancel point; a schedule point only when the queue is full. With
        nothing ahead of it the payload is written at once (see the module docstring).
        Otherwise a sender in a tight loop runs ahead by at most `send_queue` payloads
        before it yields, and the writer then drains them in one write: 2.3x the
        messages per second of yielding on every call (docs/BENCHMARKS.md).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_sendable(payload)
        if self._send_directly(payload):
            return
        try:
            self._enqueue(payload)
        except trio.WouldBlock:
            self._queued += 1  # before the wait: the writer may take it before we resume
            try:
                await self._queue_in.send(payload)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._queued -= 1
                raise LinkClosedError(f"link {self.id} is closed") from None
            except BaseException:
                self._queued -= 1
                raise
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosedError(f"link {self.id} is closed") from None

    def send_nowait(self, payload: bytes) -> None:
        """Queue a payload or raise trio.WouldBlock when the send queue is full."""
        self._check_sendable(payload)
        if self._send_directly(payload):
            return
        try:
            self._enqueue(payload)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosedError(f"link {self.id} is closed") from None

    def send_control(self, payload: bytes) -> None:
        """Queue a control payload (routing) that must not be dropped: it goes into the
        send queue, or when that is full into a bounded backlog sent right after it.
        A peer so slow that the backlog overflows is not really there: the link closes."""
        self._check_sendable(payload)
        if self._send_directly(payload):
            return
        if not self._control_backlog:
            try:
                self._enqueue(payload)
                return
            except trio.WouldBlock:
                pass
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise LinkClosedError(f"link {self.id} is closed") from None
        if len(self._control_backlog) >= MAX_CONTROL_BACKLOG:
            self.close("control backlog overflow: the peer does not read")
            return
        self._control_backlog.append(payload)

    def close(self, reason: str) -> None:
        """Say goodbye to the peer (best effort) and stop the session."""
        if self.down is not None:
            return
        # The core queues a Close frame; the run loop flushes it, then stops.
        self._dispatch(self.core.close(reason, trio.current_time()))

    async def wait_finished(self) -> None:
        await self._finished.wait()

    def has_room(self) -> bool:
        """Whether `send_nowait` would take a payload now (no trio.WouldBlock)."""
        stats = self._queue_in.statistics()
        return stats.current_buffer_used < stats.max_buffer_size

    def queue_statistics(self) -> trio.MemoryChannelStatistics:
        return self._queue_in.statistics()

    # --------------------------------------------------------------------- run

    async def run(self) -> None:
        """Drive the link until it goes down; then close the stream."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._timer)
                await self._flush()  # the initiator's hello
                await self._down_event.wait()
                # Give a goodbye frame (Close, Refuse) a moment to leave, then stop.
                nursery.cancel_scope.deadline = trio.current_time() + GOODBYE_TIMEOUT
                await self._flush()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._carrier_failed(exc)
        finally:
            with trio.CancelScope(shield=True):
                if self.down is None:
                    # Cancelled from outside (the NIC is stopping): say so to the peer.
                    self._dispatch(self.core.close("NIC shutting down", trio.current_time()))
                if self._unsent or self.core.has_data_to_send:  # a goodbye not yet sent
                    with trio.move_on_after(GOODBYE_TIMEOUT):
                        await self._flush()
                self._queue_in.close()
                await trio.aclose_forcefully(self._stream)
            self._finished.set()

    async def _reader(self) -> None:
        reader = nowait_reader(self._stream)
        if reader is not None:
            await self._read_socket(reader)
            return
        while self.down is None:
            try:
                data = await self._stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._carrier_failed(exc)
                return
            if not self._received(data):
                return

    async def _read_socket(self, reader: NowaitReader) -> None:
        # A read shorter than asked for emptied the kernel's buffer: wait before the
        # next one instead of reading nothing. After a full one, read again at once,
        # yielding first so a busy link does not starve the other tasks.
        drained = True
        while self.down is None:
            try:
                if drained:
                    await reader.wait_readable()
                else:
                    await trio.lowlevel.checkpoint()
                data = reader.read(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._carrier_failed(exc)
                return
            if data is None:
                drained = True
                continue
            drained = len(data) < READ_SIZE
            if not self._received(data):
                return

    def _received(self, data: bytes | bytearray) -> bool:
        """Feed what the carrier delivered to the core; False when the link ends."""
        if not data:
            self._carrier_failed(None)
            return False
        try:
            events = self.core.receive_data(bytes(data), trio.current_time())
        except Exception as exc:
            self._core_failed(exc)
            return False
        if len(events) > 1:
            self._dispatch_batched(events)
        else:
            self._dispatch(events)
        self._flush_nowait()
        return True

    def _dispatch_batched(self, events: list[Event]) -> None:
        batch = self._batch
        batch.depth += 1
        try:
            self._dispatch(events)
        finally:
            batch.depth -= 1
            if not batch.depth:
                sessions, batch.sessions = batch.sessions, []
                for session in sessions:
                    session._batched = False
                    session._write_or_wake()

    async def _writer(self) -> None:
        async for payload in self._queue_out:
            self._queued -= 1
            if self.down is not None:
                return
            now = trio.current_time()
            if payload:  # empty: only a wake-up to write what `_unsent` holds
                self.core.send_data(payload, now)
            size = len(payload)
            while size < WRITE_BATCH_BYTES:
                try:
                    more = self._queue_out.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                self._queued -= 1
                if more:
                    self.core.send_data(more, now)
                size += len(more)
            # Control that did not fit in the queue goes after what was already queued,
            # so control messages keep their order.
            while self._control_backlog:
                self.core.send_data(self._control_backlog.popleft(), now)
            await self._flush()

    async def _timer(self) -> None:
        while self.down is None:
            deadline = self.core.get_timer()
            if deadline is None:
                return
            with trio.CancelScope(deadline=deadline) as self._timer_scope:
                await trio.sleep_forever()
            self._timer_scope = None
            if self.down is None:
                try:
                    events = self.core.handle_timer(trio.current_time())
                except Exception as exc:
                    self._core_failed(exc)
                    return
                self._dispatch(events)
                await self._flush()

    async def _flush(self) -> None:
        # Nothing queued, or all of it written at once: no lock, whose acquire costs a
        # trip through the scheduler (the reader flushes after every read, mostly with
        # nothing to say). Every caller checkpoints elsewhere in its loop; whoever
        # queues bytes later flushes them.
        if not self._unsent and not self.core.has_data_to_send:
            return
        if self._write_directly():
            return
        async with self._send_lock:
            data = self._unsent + self.core.data_to_send()
            self._unsent = b""
            if data:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._carrier_failed(exc)

    def _flush_nowait(self) -> None:
        # The reader never waits for the peer to read: if both readers did, each waiting
        # for the other's, neither would read again. What the kernel does not take now
        # is left to the writer.
        if self._unsent or self.core.has_data_to_send:
            self._write_or_wake()
            if self.core.frames_to_send > MAX_CORE_BACKLOG:
                self.close("write backlog overflow: the peer sends but does not read")

    def _send_directly(self, payload: bytes) -> bool:
        """Encrypt and write `payload` now when nothing is ahead of it (queue, control
        backlog, a running write); True when it is taken care of. What the kernel does
        not take waits in `_unsent`, and the writer is woken to write it."""
        if (self._write_nowait is None or self._unsent or self._control_backlog
                or self._send_lock.locked() or self._queued):
            return False
        self.core.send_data(payload, trio.current_time())
        if self._batch.depth:
            if not self._batched:
                self._batched = True
                self._batch.sessions.append(self)
        else:
            self._write_or_wake()
        return True

    def _write_or_wake(self) -> None:
        if not self._write_directly():
            # Not all of it went (the kernel's buffer is full, a locked write runs, or
            # the stream has no direct path): the writer writes the rest. A full queue
            # means it is busy, and its next write takes the core's bytes along.
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                self._enqueue(b"")

    def _enqueue(self, payload: bytes) -> None:
        self._queue_in.send_nowait(payload)
        self._queued += 1

    def _write_directly(self) -> bool:
        """Write what the core has without blocking; True when all of it went (or the
        carrier broke, which ends the link). False: the rest is in `_unsent`, or a
        locked write is running, or the stream has no direct path."""
        if self._write_nowait is None or self._unsent or self._send_lock.locked():
            return False
        data = self.core.data_to_send()
        try:
            written = self._write_nowait(data) if data else 0
        except OSError as exc:
            self._carrier_failed(exc)
            return True
        if written < len(data):
            self._unsent = data[written:]
            return False
        return True

    # ------------------------------------------------------------------ events

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                try:
                    self._observer.link_data(self, event.data)
                except Exception as exc:  # a bug: drop this packet, keep the link
                    self.internal_errors.record(LINK_PACKET, exc)
            elif isinstance(event, LinkUp):
                self.up_since = time.time()
                self.log = self.log.bind(peer=event.peer.short)
                handshake_ms = round(event.handshake_time * 1e3, 3)
                self.log.info("link up", peer=event.peer.text, handshake_ms=handshake_ms)
                try:
                    self._observer.link_up(self)
                except Exception as exc:
                    self.internal_errors.record(LINK_EVENT, exc)
            elif isinstance(event, LinkDown):
                self._mark_down(event)
        self._rearm_timer()

    def _core_failed(self, exc: Exception) -> None:
        """The link core raised (a bug): its state is unknown, so this link ends."""
        self.internal_errors.record(LINK_CORE, exc)
        self._mark_down(LinkDown(DownKind.CLOSED_LOCALLY,
                                 f"internal error: {type(exc).__name__}: {exc}"))

    def _carrier_failed(self, exc: BaseException | None) -> None:
        if self.down is not None:
            return
        if exc is None:
            reason = "connection closed by peer"
        else:
            reason = f"connection broken: {_describe(exc)}"
        self._mark_down(LinkDown(DownKind.CLOSED_BY_PEER, reason))

    def _mark_down(self, down: LinkDown) -> None:
        if self.down is not None:
            return
        self.down = down
        if self.core.state is not State.CLOSED:
            try:
                self.core.close(down.reason, trio.current_time())
            except Exception as exc:  # a broken core: the link ends all the same
                self.internal_errors.record(LINK_CORE, exc)
        level = "warning" if down.kind is DownKind.PROTOCOL_ERROR else "info"
        getattr(self.log, level)("link down", kind=down.kind.value, reason=down.reason)
        self._queue_in.close()
        self._down_event.set()
        try:
            self._observer.link_down(self, down)
        except Exception as exc:
            self.internal_errors.record(LINK_EVENT, exc)

    def _rearm_timer(self) -> None:
        # Only ever earlier: on a busy link every frame pushes the keepalive out, and
        # moving the deadline costs trio a heap entry each time. A timer that fires
        # before anything is due costs one harmless `handle_timer` and is re-armed.
        scope = self._timer_scope
        if scope is not None:
            deadline = self.core.get_timer()
            if deadline is None:
                scope.cancel()
            elif deadline < scope.deadline:
                scope.deadline = deadline

    def _check_sendable(self, payload: bytes) -> None:
        if self.down is not None:
            raise LinkClosedError(f"link {self.id} is down: {self.down.reason}")
        if not self.core.is_up:
            raise LocalProtocolError(f"link {self.id} is not up yet")
        if len(payload) > self.core.max_payload:
            raise LocalProtocolError(
                f"payload of {len(payload)} bytes exceeds the link maximum of "
                f"{self.core.max_payload}"
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause):
        return str(cause)
    return str(exc) or type(exc).__name__
