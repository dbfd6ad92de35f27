"""Client for the NIC admin API (used by twinctl, tests and benchmarks)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import trio

from twinmesh.carriers.unix import connect_unix
from twinmesh.control.framed import FramedStream
from twinmesh.errors import AdminError
from twinmesh.nic.admin import COMMANDS
from twinmesh.nic.config import ADMIN_SOCKET
from twinmesh.wire import schemas

CALL_TIMEOUT = 10.0


def admin_socket_path(path: Path) -> Path:
    """Accept a NIC state directory or the socket itself."""
    return path / ADMIN_SOCKET if path.is_dir() else path


class AdminClient:
    """One connection to a NIC's admin socket; use as an async context manager."""

    def __init__(self, path: Path) -> None:
        self.path = admin_socket_path(path)
        self._framed: FramedStream | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> AdminClient:
        try:
            stream = await connect_unix(self.path)
        except OSError as exc:
            raise AdminError(
                f"cannot reach the NIC admin socket {self.path}: {exc.strerror or exc} "
                "(is pnicd running?)"
            ) from None
        self._framed = FramedStream(stream)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._framed is not None:
            await self._framed.stream.aclose()

    async def call(self, command: str, arg: str | None = None, **options: Any) -> Any:
        """Run one command (a key of COMMANDS: `self`, `peers`, `addPeer`, `removePeer`,
        `routes`, `route`, `ping`); AdminError on failure. `options` go to the command's
        request builder (e.g. `timeout=` for ping)."""
        module = COMMANDS[command]
        assert self._framed is not None, "use AdminClient as an async context manager"
        request = schemas.admin.AdminRequest.new_message()
        request.id = request_id = next(self._ids)
        module.build(request, arg, **options)
        try:
            with trio.fail_after(CALL_TIMEOUT + float(options.get("timeout", 0))):
                await self._framed.send(request.to_bytes())
                body = await self._framed.receive()
        except trio.TooSlowError:
            raise AdminError(f"NIC did not answer {command} within {CALL_TIMEOUT:g} s") from None
        except (trio.BrokenResourceError, OSError) as exc:
            raise AdminError(f"admin connection broken: {exc}") from None
        if body is None:
            raise AdminError("NIC closed the admin connection without answering")

        def extract(response: Any) -> Any:
            if int(response.id) != request_id and str(response.which()) != "error":
                raise AdminError(f"answer to request {response.id}, expected {request_id}")
            if str(response.which()) == "error":
                raise AdminError(str(response.error))
            return module.read(response)

        return schemas.decode(schemas.admin.AdminResponse, body, extract)


async def admin_call(path: Path, command: str, arg: str | None = None, **options: Any) -> Any:
    async with AdminClient(path) as client:
        return await client.call(command, arg, **options)
