"""A loopback TCP relay that delays (and "loses", as TCP sees it) a lab link's traffic.

    port = await nursery.start(serve_relay, 0, ("127.0.0.1", 9651), 0.02, 0.01)

Listens on 127.0.0.1; every accepted connection is joined to `target` through two
`delay.DelayLine`s, one per direction. Transparent to the carriers (TCP, websocket).
When either side closes or breaks, whatever is still due is dropped and both sides
are closed: the NIC's dialer reconnects as it would after any broken link.
"""

from __future__ import annotations

import random

import structlog
import trio

from twinmesh.lab.delay import DelayLine

CONNECT_TIMEOUT = 5.0
RECEIVE_SIZE = 65536
MAX_CONNECTIONS = 64  # a lab link carries one NIC link; more is someone else's mistake


async def serve_relay(
    port: int,
    target: tuple[str, int],
    delay: float,
    loss: float,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Relay 127.0.0.1:`port` to `target` with `delay` s and `loss` (0..1) each way.

    Started with the port actually bound (useful with `port=0`).
    """
    log = structlog.get_logger("twinmesh.lab.relay").bind(target=f"{target[0]}:{target[1]}")
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    limit = trio.Semaphore(MAX_CONNECTIONS)

    async def handle(client: trio.SocketStream) -> None:
        if limit.value == 0:
            await client.aclose()
            return
        async with limit, client:
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    upstream = await trio.open_tcp_stream(*target)
            except (OSError, trio.TooSlowError) as exc:
                log.info("relay target unreachable", error=str(exc))
                return
            async with upstream:
                await _join(client, upstream, delay, loss)

    log.info("relay listening", port=bound, delay=delay, loss=loss)
    task_status.started(bound)
    await trio.serve_listeners(handle, listeners)


async def _join(a: trio.SocketStream, b: trio.SocketStream, delay: float, loss: float) -> None:
    rng = random.Random()
    async with trio.open_nursery() as nursery:
        for src, dst in ((a, b), (b, a)):
            line = DelayLine(delay, loss, rng=rng)
            nursery.start_soon(_pump, src, dst, line, nursery.cancel_scope)


class _Signal:
    """A wake-up for one waiting task; set() before wait() is not lost."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, deadline: float = float("inf")) -> None:
        with trio.move_on_at(deadline):
            await self._event.wait()
        self._event = trio.Event()


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, line: DelayLine,
                done: trio.CancelScope) -> None:
    """Read from `src` into `line`; write what falls due to `dst`. Ends the pair on close."""
    arrived, room = _Signal(), _Signal()

    async def read() -> None:
        while True:
            while line.full:
                await room.wait()
            data = await src.receive_some(RECEIVE_SIZE)
            if not data:
                return
            line.feed(data, trio.current_time())
            arrived.set()

    async def write() -> None:
        while True:
            timer = line.get_timer()
            await arrived.wait(timer if timer is not None else float("inf"))
            data = line.take_due(trio.current_time())
            if data:
                room.set()
                await dst.send_all(data)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await read()
            nursery.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # either side went away: the pair ends below
    done.cancel()
