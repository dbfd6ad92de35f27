"""Client for a twin's control socket (used by twinctl, tests and benchmarks).

    async with connect_twin(state_dir) as twin:        # or the control.sock path
        status = await twin.call("status")
        reply = await twin.call("ping", {"twin": other, "timeout": 2.0})
        await twin.subscribe()
        async for event in twin.events():               # {"message": {...}}, ...
            ...

`call` returns the value of the answer's one union member (a dict, a list, or None for
`done`) and raises ApiError(code, message) when the twin refuses. Several calls may be
in flight at once from different tasks: a reader task matches answers to callers by id.
Errors of the connection itself are ApiErrors too, with codes of their own:
`notRunning` (nobody serves the socket), `disconnected`, `timeout`, `malformed`.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from twinmesh.carriers.unix import connect_unix
from twinmesh.control.framed import CONTROL_MAX_FRAME, FramedStream
from twinmesh.errors import ApiError, FrameTooLarge
from twinmesh.twin.service import CONTROL_SOCKET
from twinmesh.wire.framing import encode_frame

CALL_TIMEOUT = 10.0  # on top of any wait the request itself asks for
EVENT_QUEUE = 1024  # events not yet taken by events(); beyond this they are dropped


def control_socket_path(path: Path) -> Path:
    """Accept a twin's state directory or its control socket. A path that does not
    exist names a state dir unless it ends in `.sock` (so the error names the socket)."""
    if path.is_dir() or (not path.exists() and path.suffix != ".sock"):
        return path / CONTROL_SOCKET
    return path


def call_timeout(which: str, value: Any) -> float:
    """How long to wait for the answer to one request: the request's own wait (a
    ping's timeout, a waited-for send's ttl) plus CALL_TIMEOUT."""
    extra = 0.0
    if isinstance(value, dict):
        if which == "ping":
            extra = float(value.get("timeout", 5.0))
        elif which == "send" and value.get("wait"):
            extra = float(value.get("ttl", 300.0))
    return CALL_TIMEOUT + extra if math.isfinite(extra) and extra >= 0 else CALL_TIMEOUT


class TwinClient:
    """A connection to one twin; get one from `connect_twin`."""

    def __init__(self, path: Path, stream: trio.abc.Stream) -> None:
        self.path = path
        self._stream = stream
        self._framed = FramedStream(stream, max_frame=CONTROL_MAX_FRAME)
        self._ids = itertools.count(1)
        self._send_lock = trio.Lock()
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events_send, self._events_receive = trio.open_memory_channel[dict[str, Any]](
            EVENT_QUEUE
        )
        self._closed: ApiError | None = None
        self._subscribed = False
        self.events_dropped = 0

    async def call(self, which: str, value: Any = None, *,
                   timeout: float | None = None) -> Any:
        """Send request `which` (a `Request` union member) with `value`; return the
        answer's value. ApiError on refusal, timeout or a lost connection."""
        if self._closed is not None:
            raise self._closed
        request_id = next(self._ids)
        body = json.dumps({"id": request_id, which: value}).encode()
        answer_send, answer_receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = answer_send
        limit = call_timeout(which, value) if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                await self._send(body)
                response = await answer_receive.receive()
        except trio.TooSlowError:
            raise ApiError("timeout", f"the twin did not answer {which} within {limit:g} s"
                           ) from None
        except trio.EndOfChannel:
            assert self._closed is not None
            raise self._closed from None
        finally:
            self._waiting.pop(request_id, None)
        error = response.get("error")
        if error is not None:
            raise ApiError(str(error.get("code", "failed")), str(error.get("message", "")))
        members = [key for key in response if key != "id"]
        if len(members) != 1:
            raise ApiError("malformed", f"the twin answered {which} with {sorted(members)}")
        return response[members[0]]

    async def subscribe(self) -> None:
        """Ask for events; from the answer on, `events()` yields them."""
        await self.call("subscribe")
        self._subscribed = True

    def events(self) -> Events:
        """Events (`Event` dicts: {"message": ...}, {"messageStatus": ...}, ...) in the
        order the twin sent them, for `async for`; it raises ApiError(disconnected) when
        the connection is lost. Call `subscribe()` first."""
        if not self._subscribed:
            raise ApiError("malformed", "events() needs subscribe() first")
        return Events(self)

    async def next_event(self) -> dict[str, Any]:
        """The next event; ApiError(disconnected) once the connection is lost."""
        try:
            return await self._events_receive.receive()
        except trio.EndOfChannel:
            assert self._closed is not None
            raise self._closed from None

    async def _send(self, body: bytes) -> None:
        frame = encode_frame(body, CONTROL_MAX_FRAME)
        async with self._send_lock:
            try:
                await self._stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                lost = ApiError("disconnected", f"lost the twin at {self.path}: {exc}")
                self._close(lost)
                raise lost from None

    async def read_all(self) -> None:
        """Route answers to callers and events to `events()`, until the twin closes."""
        try:
            while True:
                body = await self._framed.receive()
                if body is None:
                    self._close(ApiError("disconnected",
                                         f"the twin at {self.path} closed the connection"))
                    return
                self._dispatch(body)
        except (FrameTooLarge, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._close(ApiError("disconnected", f"lost the twin at {self.path}: {exc}"))

    def _dispatch(self, body: bytes) -> None:
        try:
            message = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return  # not ours to answer; the caller's timeout reports it
        if not isinstance(message, dict):
            return
        if "event" in message:
            try:
                self._events_send.send_nowait(message["event"])
            except trio.WouldBlock:
                self.events_dropped += 1
            return
        waiter = self._waiting.get(message.get("id", -1))
        if waiter is not None:
            waiter.send_nowait(message)
        elif "error" in message:
            # An answer to no request: the twin is closing this connection and says why.
            error = message["error"]
            self._close(ApiError(str(error.get("code", "failed")),
                                 str(error.get("message", ""))))

    def _close(self, reason: ApiError) -> None:
        if self._closed is not None:
            return
        self._closed = reason
        self._events_send.close()
        for waiter in self._waiting.values():
            waiter.close()


class Events:
    """`async for event in client.events()` (a plain iterator: nothing to close)."""

    def __init__(self, client: TwinClient) -> None:
        self._client = client

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._client.next_event()


@asynccontextmanager
async def connect_twin(path: Path) -> AsyncIterator[TwinClient]:
    """Connect to the twin whose state directory or control socket is `path`.

    ApiError(notRunning, "twin not running at PATH (is twind running?)") when nobody
    serves the socket."""
    socket_path = control_socket_path(path)
    try:
        stream = await connect_unix(socket_path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
            raise ApiError("notRunning",
                           f"twin not running at {socket_path} (is twind running?)") from None
        raise ApiError("notRunning", f"cannot reach the twin at {socket_path}: "
                                     f"{exc.strerror or exc}") from None
    try:
        async with stream, trio.open_nursery() as nursery:
            client = TwinClient(socket_path, stream)
            nursery.start_soon(client.read_all)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Callers catch ApiError, not a group of one: hand them what the block raised.
        sole = sole_exception(group)
        if sole is None:
            raise
        raise sole from None


def sole_exception(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception inside (nested) groups of one, else None."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup):
        if len(inner.exceptions) != 1:
            return None
        inner = inner.exceptions[0]
    return inner


async def twin_call(path: Path, which: str, value: Any = None, **options: Any) -> Any:
    """One request on a fresh connection."""
    async with connect_twin(path) as client:
        return await client.call(which, value, **options)
