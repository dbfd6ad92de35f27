"""The carrier interface every transport implements."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from twinmesh.carriers.uri import PeerUri

# Called once per accepted connection with the stream and a printable remote address.
# The connection lives as long as the handler runs; the carrier closes it afterwards.
ConnectionHandler = Callable[[trio.abc.Stream, str], Awaitable[None]]


class Carrier(Protocol):
    scheme: str

    async def dial(self, uri: PeerUri) -> trio.abc.Stream:
        """Connect to `uri`. Raises OSError (or a subclass) when the peer is unreachable."""
        ...

    async def serve(
        self,
        uri: PeerUri,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[PeerUri] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `uri` until cancelled; `task_status.started()` gets the bound URI
        (with the real port when `uri` asked for port 0)."""
        ...
