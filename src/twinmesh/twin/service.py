"""One twin: its identity, its store, its NIC session and the services it runs.

(Being built: the method signatures below are the contract `twin.api`, the control
socket, the web page and the lab use.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from twinmesh.errors import ApiError
from twinmesh.identity.keys import Identity

KEY_FILE = "twin.key"
STORE_FILE = "twin.sqlite3"
INBOX_FILE = "inbox.sqlite3"
CONTROL_SOCKET = "control.sock"
WEB_TOKEN_FILE = "web.token"
WEB_URL_FILE = "web.url"


class Twin:
    def __init__(self, identity: Identity, state_dir: Path, nics: list[Path]) -> None:
        self.identity = identity
        self.state_dir = state_dir
        self.nics = nics

    async def run(self, *, task_status: trio.TaskStatus[Twin] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store, keep a NIC session (reconnecting, moving along `nics`), run
        the services; `started` once the store is open (not waiting for a NIC)."""
        raise NotImplementedError

    # The API (dicts mirror schemas/api.capnp; failures raise ApiError(code, message))

    def identity_info(self) -> dict[str, Any]:
        raise NotImplementedError

    async def status(self) -> dict[str, Any]:
        raise NotImplementedError

    async def ping(self, twin: str, *, timeout: float = 5.0, sequence: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    async def find(self, twin: str) -> dict[str, Any]:
        raise NotImplementedError

    async def send_text(self, twin: str, text: str, *, ttl: float = 300.0,
                        wait: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    async def inbox(self, peer: str = "", *, limit: int = 50) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def message_status(self, message_id: str) -> dict[str, Any]:
        raise NotImplementedError

    async def contacts(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def add_contact(self, twin: str, name: str = "") -> dict[str, Any]:
        raise NotImplementedError

    async def accept_contact(self, twin: str, name: str = "") -> dict[str, Any]:
        raise NotImplementedError

    async def remove_contact(self, twin: str) -> None:
        raise NotImplementedError

    async def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    async def set_settings(self, *, contacts_only: bool | None = None,
                           name: str | None = None) -> dict[str, Any]:
        raise NotImplementedError

    async def move(self, nic: str) -> dict[str, Any]:
        raise NotImplementedError

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """Events (dicts mirroring `Event`) from now on, until the block exits. A
        subscriber that does not keep up loses events (bounded), never the twin."""
        raise ApiError("offline", "not built yet")
        yield  # pragma: no cover


def default_twin_dir() -> Path:
    """The user's default twin state directory under XDG_STATE_HOME."""
    import os

    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "twinmesh" / "twin"
