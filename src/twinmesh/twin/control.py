"""The twin's control socket: `twinctl` (and tests) drive a twin over a Unix socket.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON. Each request
is one `Request` object (schemas/api.capnp) answered by `twin.api.handle` with one
`Response` carrying the same id. Requests on one connection run concurrently (up to
MAX_IN_FLIGHT; then the reader stops reading until one is answered), so a ping that
waits five seconds does not hold up the `status` sent after it: answers come back in
the order they finish, matched by id. After `{"subscribe": null}` the connection also
carries `{"event": {...}}` objects from `twin.subscribe()` until it closes.

One writer task owns the sending half: answers and events queue for it (bounded). A
client that stops reading for WRITE_TIMEOUT is dropped; a subscriber that falls behind
loses events inside `twin.subscribe()` (bounded there), never stalls the twin.

A frame that is not a valid request gets a `malformed` error answer and the connection
goes on. Only a frame the stream cannot carry (over MAX_REQUEST_FRAME, or cut off by
the end of the stream) closes it, after a last error answer saying why, and one log line.
"""

from __future__ import annotations

import itertools
import json
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

    async def run(self) -> None:
        with self._connection_scope:
            async with trio.open_nursery() as connection:
                connection.start_soon(self._write_all)
                async with trio.open_nursery() as requests:
                    await self._read_all(requests, connection)
                # Answers to requests already read are still sent; then the writer ends.
                self._events_scope.cancel()
                await self._outgoing_send.aclose()

    async def _read_all(self, requests: trio.Nursery, connection: trio.Nursery) -> None:
        while True:
            try:
                body = await self._receive()
            except trio.TooSlowError:
                self.log.info("control connection closed", reason="idle")
                return
            except (FrameTooLarge, trio.BrokenResourceError) as exc:
                reason = str(exc) or type(exc).__name__
                self.log.info("control connection closed", reason=reason)
                await self._last_words(reason)
                return
            if body is None:
                return
            await self._slots.acquire()
            requests.start_soon(self._answer, body, connection)

    async def _receive(self) -> bytes | None:
        if self._subscribed:
            return await self.framed.receive()
        with trio.fail_after(IDLE_TIMEOUT):
            return await self.framed.receive()

    async def _answer(self, body: bytes, connection: trio.Nursery) -> None:
        try:
            try:
                response = await api.handle(self.twin, body)
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

    async def _queue(self, message: dict[str, Any]) -> None:
        frame = self._encode(message)
        if frame is None:
            return
        # Closed: the connection is closing and nobody is left to read it.
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
            async for frame in self._outgoing_receive:
                try:
                    with trio.fail_after(WRITE_TIMEOUT):
                        await self.stream.send_all(frame)
                except (trio.TooSlowError, trio.BrokenResourceError,
                        trio.ClosedResourceError) as exc:
                    reason = ("the client stopped reading" if isinstance(exc, trio.TooSlowError)
                              else "the client went away")
                    self.log.info("control connection closed", reason=reason)
                    self._connection_scope.cancel()
                    return

    async def _last_words(self, reason: str) -> None:
        with trio.move_on_after(LAST_WORDS_TIMEOUT):
            await self._queue(api.error_response(0, "malformed", f"closing: {reason}"))


def _is_subscribe(body: bytes) -> bool:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "subscribe" in obj

