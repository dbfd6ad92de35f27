"""The twin's control socket: `twinctl` (and tests) drive a twin over a Unix socket.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON. Each request
is one `Request` object (schemas/api.capnp) answered by `twin.api.handle` with one
`Response` carrying the same id. Requests on one connection run concurrently (up to
MAX_IN_FLIGHT; then the reader stops reading until one is answered), so a ping that
waits five seconds does not hold up the `status` sent after it: answers come back in
the order they finish, matched by id. After `{"subscribe": null}` the connection also
carries `{"event": {...}}` objects from `twin.subscribe()` until it closes.

Answers and events go out in order. What the socket takes at once is sent by the task
that made it; when the socket is full, the rest queues (bounded) for one writer task,
which waits for the client to read. A client that stops reading for WRITE_TIMEOUT (up
to WRITE_TIMEOUT_SLACK more) is dropped; a subscriber that falls behind loses events
inside `twin.subscribe()` (bounded there), never stalls the twin.

A busy twin answers a request every few milliseconds on each of its connections, so
the per-request path avoids what costs a timer or a task switch: no hand-over to the
writer while the socket keeps up, the idle and stall deadlines are cancel scopes that
last for many frames (moved rarely, and checked when they fire), and a free slot is
taken without a checkpoint. A chat `send` (most of what a busy twin is asked) gets no
task at all: it is sealed and handed to the NIC by the reader, and answered from the
bus client's reader when the NIC's result arrives (`api.answer_soon`); the slot it
holds until then keeps the bound, and the connection ends only once every slot is
back, so each such request is answered exactly once.

A frame that is not a valid request gets a `malformed` error answer and the connection
goes on. Only a frame the stream cannot carry (over MAX_REQUEST_FRAME, or cut off by
the end of the stream) closes it, after a last error answer saying why, and one log line.
"""

from __future__ import annotations

import itertools
import json
import math
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from twinmesh.carriers.unix import serve_unix
from twinmesh.control.framed import CONTROL_MAX_FRAME, FramedStream
from twinmesh.errors import ApiError, FrameTooLarge, LocalProtocolError
from twinmesh.twin import api
from twinmesh.wire.framing import encode_frame

if TYPE_CHECKING:
    from twinmesh.twin.service import Twin

log = structlog.get_logger("twinmesh.twin.control")

MAX_REQUEST_FRAME = 1 << 20  # over this the stream is dropped; api.MAX_REQUEST is answered
MAX_RESPONSE_FRAME = CONTROL_MAX_FRAME
MAX_IN_FLIGHT = 16  # concurrent requests per connection
OUTGOING_QUEUE = 64  # answers and events waiting for the writer
WRITE_TIMEOUT = 30.0  # a client that reads nothing for this long is dropped
IDLE_TIMEOUT = 600.0  # an unsubscribed connection that sends nothing is closed
# The writer's stall deadline moves forward only when less than WRITE_TIMEOUT is left,
# to WRITE_TIMEOUT + this: a stuck write is given up after 30 to 40 s.
WRITE_TIMEOUT_SLACK = WRITE_TIMEOUT / 3
WRITE_BATCH = 64  # frames sent in one write when they pile up
LAST_WORDS_TIMEOUT = 1.0  # time given to the final error answer before closing

_connection_ids = itertools.count(1)


async def serve_control(
    twin: Twin, path: Path, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve `twin` on the Unix socket `path` (mode 0600) until cancelled.

    A stale socket file is replaced; ConfigError if another process (another twind on
    the same state directory) already serves `path`. `started` with `path` once
    connections are accepted.
    """
    await serve_unix(path, partial(_serve_connection, twin), task_status=task_status)


async def _serve_connection(twin: Twin, stream: trio.abc.Stream, remote: str) -> None:
    await ControlConnection(twin, stream).run()


class ControlConnection:
    """One client connection. Only `run` (and the tasks it starts) touches its state."""

    def __init__(self, twin: Twin, stream: trio.abc.Stream) -> None:
        self.twin = twin
        self.stream = stream
        self.framed = FramedStream(stream, max_frame=MAX_REQUEST_FRAME)
        self.log = log.bind(connection=next(_connection_ids))
        self._outgoing_send, self._outgoing_receive = trio.open_memory_channel[bytes](
            OUTGOING_QUEUE
        )
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._subscribed = False
        self._subscribing = trio.Lock()
        self._connection_scope = trio.CancelScope()
        self._events_scope = trio.CancelScope()
        self._last_frame = 0.0  # when the last frame arrived (trio time)
        self._writing = False  # the writer task is sending
        self._backlog = 0  # frames handed to the writer task and not yet sent
        self._connection: trio.Nursery | None = None  # `run`'s, for callbacks' tasks

    async def run(self) -> None:
        self._last_frame = trio.current_time()
        try:
            with self._connection_scope:
                async with trio.open_nursery() as connection:
                    self._connection = connection
                    connection.start_soon(self._write_all)
                    async with trio.open_nursery() as requests:
                        await self._read_all(requests, connection)
                    # Answers to requests already read are still sent (those answered
                    # by callbacks too: every slot back means every request answered);
                    # then the writer ends.
                    for _ in range(MAX_IN_FLIGHT):
                        await self._slots.acquire()
                    self._events_scope.cancel()
                    await self._outgoing_send.aclose()
        finally:
            self._connection = None  # a callback answering later has nobody to tell

    async def _read_all(self, requests: trio.Nursery, connection: trio.Nursery) -> None:
        waiting: bytes | None = None  # a frame read while every slot was taken
        while True:
            if waiting is not None:
                await self._slots.acquire()
                self._last_frame = trio.current_time()  # waiting for a slot is not idling
                self._start(waiting, requests, connection)
            try:
                waiting = await self._read_frames(requests, connection)
            except trio.TooSlowError:
                self.log.info("control connection closed", reason="idle")
                return
            except (FrameTooLarge, trio.BrokenResourceError) as exc:
                reason = str(exc) or type(exc).__name__
                self.log.info("control connection closed", reason=reason)
                await self._last_words(reason)
                return
            if waiting is None:
                return

    async def _read_frames(self, requests: trio.Nursery, connection: trio.Nursery
                           ) -> bytes | None:
        """Read frames and start answering them while a slot is free. Returns a frame
        that waits for a slot, or None at the end of the stream; TooSlowError once an
        unsubscribed connection sent nothing for IDLE_TIMEOUT.

        The idle deadline is one cancel scope for all the frames until it fires (a
        receive cancelled there loses nothing), then is set anew from the last frame."""
        while True:
            deadline = math.inf if self._subscribed else self._last_frame + IDLE_TIMEOUT
            with trio.CancelScope(deadline=deadline):
                while True:
                    body = await self.framed.receive()
                    if body is None:
                        return None
                    self._last_frame = trio.current_time()
                    try:
                        self._slots.acquire_nowait()
                    except trio.WouldBlock:
                        return body
                    self._start(body, requests, connection)
            if not self._subscribed and (
                    trio.current_time() >= self._last_frame + IDLE_TIMEOUT):
                raise trio.TooSlowError

    def _start(self, body: bytes, requests: trio.Nursery, connection: trio.Nursery) -> None:
        """Answer a request that holds a slot: through a callback when the twin can
        (a chat `send`: no task, no wait for the NIC's result), else in a task."""
        try:
            request: tuple[int, str, Any] | None = api.parse_request(body)
        except ApiError:
            request = None  # `_answer` says what is wrong
        if request is not None:
            try:
                if api.answer_soon(self.twin, *request, done=self._answered,
                                   spawn=connection.start_soon):
                    return
            except Exception as exc:  # a bug in the twin must not take the socket down
                self.log.exception("control request failed")
                self._answered(api.error_response(request[0], "internal", repr(exc)))
                return
        requests.start_soon(self._answer, body, request, connection)

    def _answered(self, response: dict[str, Any]) -> None:
        """A callback's answer: sent (or queued) at once; its slot is free again."""
        try:
            self._queue_now(response)
        finally:
            self._slots.release()

    async def _answer(self, body: bytes, request: tuple[int, str, Any] | None,
                      connection: trio.Nursery) -> None:
        try:
            try:
                response = await (api.handle(self.twin, body) if request is None
                                  else api.answer(self.twin, *request))
            except Exception as exc:  # a bug in the twin must not take the socket down
                self.log.exception("control request failed")
                response = api.error_response(api._guess_id(body), "internal", repr(exc))
            if "done" in response and _is_subscribe(body):
                response = await self._subscribe(response, connection)
            await self._queue(response)
        finally:
            self._slots.release()

    async def _subscribe(self, response: dict[str, Any], connection: trio.Nursery
                         ) -> dict[str, Any]:
        # Subscribed before `done` goes out: every event after `done` reaches the client.
        async with self._subscribing:
            if self._subscribed:
                return response
            try:
                await connection.start(self._forward_events)
            except ApiError as exc:
                return api.error_response(response["id"], exc.code, exc.message)
            self._subscribed = True
        return response

    async def _forward_events(self, *, task_status: trio.TaskStatus[None]) -> None:
        with self._events_scope:
            async with self.twin.subscribe() as events:
                task_status.started()
                async for event in events:
                    await self._queue({"event": event})
        if self._events_scope.cancel_called:
            return
        self.log.info("control connection closed", reason="the twin ended the subscription")
        self._connection_scope.cancel()

    def _send_inline(self, frame: bytes) -> bytes | None:
        """Send what the socket takes at once when nothing waits ahead; the rest, for
        the writer (None: all sent, or nobody to send it to)."""
        if self._backlog:
            return frame
        try:
            sent = self.framed.send_now(frame)
        except trio.BrokenResourceError:
            self._gone("the client went away")
            return None
        except trio.ClosedResourceError:
            return None  # the connection is over: nobody to answer
        if sent == len(frame):
            return None
        return frame[sent:]  # the socket is full: the writer sends the rest first

    async def _queue(self, message: dict[str, Any]) -> None:
        frame = self._encode(message)
        if frame is None:
            return
        frame = self._send_inline(frame)
        if frame is None:
            return
        self._backlog += 1
        # Closed: the connection is closing and nobody is left to read it.
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            try:
                self._outgoing_send.send_nowait(frame)
            except trio.WouldBlock:  # the writer is behind: wait for room
                await self._outgoing_send.send(frame)

    def _queue_now(self, message: dict[str, Any]) -> None:
        """`_queue` for a caller that cannot wait (a callback, after `run` perhaps)."""
        connection = self._connection
        frame = self._encode(message)
        if frame is None or connection is None:
            return
        frame = self._send_inline(frame)
        if frame is None:
            return
        self._backlog += 1
        try:
            self._outgoing_send.send_nowait(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # closing: nobody is left to read it
        except trio.WouldBlock:
            # The writer is behind: a task waits for room (answers hold slots, so at
            # most MAX_IN_FLIGHT of them).
            connection.start_soon(self._queue_later, frame)

    async def _queue_later(self, frame: bytes) -> None:
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self._outgoing_send.send(frame)

    def _encode(self, message: dict[str, Any]) -> bytes | None:
        """The frame for an answer or event. An answer that cannot be sent becomes an
        error answer; such an event is dropped (logged): no request waits for it."""
        try:
            body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
            return encode_frame(body, MAX_RESPONSE_FRAME)
        except (TypeError, ValueError) as exc:  # the twin returned something not JSON
            reason = f"answer not encodable as JSON: {exc}"
            code = "internal"
        except LocalProtocolError as exc:
            reason = f"answer too large to send ({exc}); ask for less (e.g. a lower limit)"
            code = "tooLarge"
        self.log.warning("control answer not sent", reason=reason,
                         kind="event" if "event" in message else "answer")
        if "event" in message:
            return None
        body = json.dumps(api.error_response(message.get("id", 0), code, reason)).encode()
        return encode_frame(body, MAX_RESPONSE_FRAME)

    async def _write_all(self) -> None:
        async with self._outgoing_receive:
            while True:
                with trio.CancelScope() as stall:
                    reason = await self._write_frames(stall)
                if not stall.cancelled_caught:
                    break
                if self._writing:
                    reason = "the client stopped reading"
                    break
                # The deadline passed between writes: nothing was late.
            if reason is not None:
                self._gone(reason)

    def _gone(self, reason: str) -> None:
        if not self._connection_scope.cancel_called:
            self.log.info("control connection closed", reason=reason)
            self._connection_scope.cancel()

    async def _write_frames(self, stall: trio.CancelScope) -> str | None:
        """Send queued frames (those that piled up in one write) until the queue is
        closed (None) or the client is gone (why). `stall`'s deadline covers each
        write with at least WRITE_TIMEOUT; if it fires, `_writing` says whether a
        write was under way."""
        while True:
            try:
                frames = [await self._outgoing_receive.receive()]
            except trio.EndOfChannel:
                return None
            while len(frames) < WRITE_BATCH:
                try:
                    frames.append(self._outgoing_receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            now = trio.current_time()
            if not now + WRITE_TIMEOUT <= stall.deadline < math.inf:
                stall.deadline = now + WRITE_TIMEOUT + WRITE_TIMEOUT_SLACK
            self._writing = True
            try:
                await self.stream.send_all(frames[0] if len(frames) == 1 else b"".join(frames))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return "the client went away"
            self._writing = False
            self._backlog -= len(frames)

    async def _last_words(self, reason: str) -> None:
        with trio.move_on_after(LAST_WORDS_TIMEOUT):
            await self._queue(api.error_response(0, "malformed", f"closing: {reason}"))


def _is_subscribe(body: bytes) -> bool:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "subscribe" in obj

