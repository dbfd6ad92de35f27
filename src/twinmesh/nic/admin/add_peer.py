"""`add-peer URI`: start keeping a link to a peer (optionally pinned with ?key=)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twinmesh.carriers.uri import PeerUri

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

NAME = "addPeer"


def build(request: Any, arg: str | None) -> None:
    request.addPeer = arg or ""


def handle(nic: Nic, request: Any, response: Any, health_url: str = "") -> None:
    uri = PeerUri.parse(str(request.addPeer))  # ConfigError -> error response
    created = nic.add_peer(uri)
    out = response.init("addPeer")
    out.uri = str(uri)
    out.created = created


def read(response: Any) -> dict[str, Any]:
    result = response.addPeer
    return {"uri": str(result.uri), "created": bool(result.created)}
