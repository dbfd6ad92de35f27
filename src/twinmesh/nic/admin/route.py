"""`route KEY`: the route this NIC would use to reach one destination."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twinmesh.errors import AdminError
from twinmesh.identity.keys import PublicKey
from twinmesh.nic.admin.routes import fill, to_dict

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

NAME = "route"


def build(request: Any, arg: str | None) -> None:
    request.route = arg or ""


def parse_key(text: str) -> PublicKey:
    try:
        return PublicKey.from_text(text)
    except ValueError as exc:
        raise AdminError(f"{text!r} is not a NIC key: {exc}") from None


def handle(nic: Nic, request: Any, response: Any, health_url: str = "") -> None:
    destination = parse_key(str(request.route))
    row = nic.overlay.lookup(destination)
    if row is None:
        raise AdminError(f"no route to {destination.text}")
    fill(response.init("route"), row)


def read(response: Any) -> dict[str, Any]:
    return to_dict(response.route)
