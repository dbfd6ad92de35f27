"""Serves the admin commands on the NIC's Unix socket (mode 0600)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from twinmesh.carriers.unix import serve_unix
from twinmesh.control.framed import FramedStream
from twinmesh.errors import (
    AdminError,
    ConfigError,
    DecodeError,
    NoRouteError,
    RemoteProtocolError,
)
from twinmesh.nic.admin import COMMANDS
from twinmesh.wire import schemas

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

log = structlog.get_logger("twinmesh.admin")
IDLE_TIMEOUT = 300.0


class AdminServer:
    def __init__(self, nic: Nic, path: Path, health_url: str = "") -> None:
        self.nic = nic
        self.path = path
        self.health_url = health_url

    async def serve(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_unix(self.path, self._connection, task_status=task_status)

    async def _connection(self, stream: trio.abc.Stream, remote: str) -> None:
        framed = FramedStream(stream)
        while True:
            try:
                with trio.fail_after(IDLE_TIMEOUT):
                    body = await framed.receive()
            except (trio.TooSlowError, RemoteProtocolError, trio.BrokenResourceError) as exc:
                log.info("admin connection dropped", reason=str(exc) or type(exc).__name__)
                return
            if body is None:
                return
            await framed.send(await self.answer(body))

    async def answer(self, body: bytes) -> bytes:
        """One request in, one response out; errors become an `error` response."""
        response = schemas.admin.AdminResponse.new_message()
        try:
            request_id, which = schemas.decode(
                schemas.admin.AdminRequest, body, lambda r: (int(r.id), str(r.which()))
            )
        except DecodeError as exc:
            response.error = str(exc)
            return bytes(response.to_bytes())
        response.id = request_id
        command = COMMANDS.get(which)
        if command is None:
            response.error = f"unknown admin command {which!r}"
            return bytes(response.to_bytes())
        try:
            if hasattr(command, "handle_async"):
                # The request reader is only valid inside decode: copy the arguments out.
                args = schemas.decode(schemas.admin.AdminRequest, body, command.parse)
                await command.handle_async(self.nic, *args, response)
            else:
                schemas.decode(
                    schemas.admin.AdminRequest, body, lambda r: self._run(command, r, response)
                )
        except (AdminError, ConfigError, DecodeError, NoRouteError) as exc:
            response = schemas.admin.AdminResponse.new_message()
            response.id = request_id
            response.error = str(exc)
        return bytes(response.to_bytes())

    def _run(self, command: Any, request: Any, response: Any) -> None:
        command.handle(self.nic, request, response, self.health_url)
        log.debug("admin command", command=command.NAME)
