"""The loopback relay carries a stream intact (lossy or not) and ends with it.

How late bytes arrive is the delay line's business (test_delay.py, on a clock of its own).
"""

from __future__ import annotations

import trio

from twinmesh.lab.relay import serve_relay


async def echo_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, "stream ended early"
        data += chunk
    return bytes(data)


async def test_a_lossy_relayed_stream_arrives_whole_and_in_order() -> None:
    payload = bytes(range(256)) * 2000  # 512 KB, many chunks, some "lost"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            target = await nursery.start(echo_server)
            port = await nursery.start(serve_relay, 0, ("127.0.0.1", target), 0.001, 0.05)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream, trio.open_nursery() as inner:
                inner.start_soon(stream.send_all, payload)
                echoed = await receive_exactly(stream, len(payload))
            assert echoed == payload
            nursery.cancel_scope.cancel()


async def test_an_unreachable_target_closes_the_client() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            dead = listeners[0].socket.getsockname()[1]
            await listeners[0].aclose()  # nobody listens there any more
            port = await nursery.start(serve_relay, 0, ("127.0.0.1", dead), 0.0, 0.0)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                assert await stream.receive_some(10) == b""
            nursery.cancel_scope.cancel()
