"""`python -m bench.echo_server`: a trio TCP echo server on 127.0.0.1 in a process of its
own, the far end of the two-process echo floor in bench/floor.py.

Prints its kernel-chosen port on one line, echoes one connection, and exits when that
client hangs up or after `LIFETIME` seconds, whichever comes first. Imports only trio,
so that the floor's child starts fast and holds nothing else.
"""

from __future__ import annotations

import contextlib
import sys

import trio

LIFETIME = 60.0  # seconds: a forgotten child ends on its own
READ_SIZE = 256 * 1024


async def echo(stream: trio.abc.Stream) -> None:
    """Send back whatever arrives until the peer closes its side."""
    while data := await stream.receive_some(READ_SIZE):
        await stream.send_all(data)


async def serve_one(lifetime: float) -> None:
    with trio.move_on_after(lifetime):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listeners[0] as listener:
            print(listener.socket.getsockname()[1], flush=True)
            stream = await listener.accept()
        # A reset from the client means the same as a close: it is done with us.
        with contextlib.suppress(trio.BrokenResourceError):
            async with stream:
                await echo(stream)


def main() -> int:
    trio.run(serve_one, LIFETIME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
