"""`remove-peer KEY|URI`: stop dialling a peer and close its links."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twinmesh.errors import AdminError

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

NAME = "removePeer"


def build(request: Any, arg: str | None) -> None:
    request.removePeer = arg or ""


def handle(nic: Nic, request: Any, response: Any, health_url: str = "") -> None:
    target = str(request.removePeer)
    removed = nic.remove_peer(target)
    if removed == 0:
        raise AdminError(f"no peer or link matches {target!r}")
    response.init("removePeer").removed = removed


def read(response: Any) -> dict[str, Any]:
    return {"removed": int(response.removePeer.removed)}
