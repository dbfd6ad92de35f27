"""Unix-domain sockets for local control planes (admin API, twin <-> NIC).

The socket file is created with the requested mode (0600 by default) before anyone
can connect: it is bound under a restrictive umask, never chmod-ed afterwards.
A stale socket file (nobody listening) is replaced; a live one is an error, since
it means another daemon owns this state directory.
"""

from __future__ import annotations

import errno
import os
import socket as stdlib_socket
from pathlib import Path

import trio

from twinmesh.carriers.base import ConnectionHandler
from twinmesh.errors import ConfigError

MAX_CONNECTIONS = 64


async def serve_unix(
    path: Path,
    handler: ConnectionHandler,
    *,
    mode: int = 0o600,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `path` until cancelled; each connection runs `handler(stream, "unix")`."""
    await _remove_stale(path)
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(MAX_CONNECTIONS)
    listener = trio.SocketListener(sock)
    limit = trio.CapacityLimiter(MAX_CONNECTIONS)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                stream = await listener.accept()
                nursery.start_soon(_handle, stream, handler, limit)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        path.unlink(missing_ok=True)


async def _handle(
    stream: trio.SocketStream, handler: ConnectionHandler, limit: trio.CapacityLimiter
) -> None:
    # Enter the stream first: it must be closed even if we are cancelled right away.
    async with stream:
        try:
            limit.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            await handler(stream, "unix")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            limit.release()


async def connect_unix(path: Path) -> trio.SocketStream:
    """Connect to the socket at `path`; OSError when nobody listens there."""
    return await trio.open_unix_socket(str(path))


async def _remove_stale(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            path.unlink(missing_ok=True)
            return
        raise ConfigError(f"{path}: cannot use socket path: {exc.strerror}") from None
    await stream.aclose()
    raise ConfigError(f"{path}: another process is already listening on this socket")
