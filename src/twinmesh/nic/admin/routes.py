"""`routes`: the routing table: destination, next hop, metric, seqno, age."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twinmesh.proto.router import RouteRow

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

NAME = "routes"


def build(request: Any, arg: str | None) -> None:
    request.routes = None


def handle(nic: Nic, request: Any, response: Any, health_url: str = "") -> None:
    rows = nic.overlay.routes()
    out = response.init("routes", len(rows))
    for item, row in zip(out, rows, strict=True):
        fill(item, row)


def read(response: Any) -> list[dict[str, Any]]:
    return [to_dict(item) for item in response.routes]


def fill(item: Any, row: RouteRow) -> None:
    item.destination = row.destination.text
    item.nextHop = row.next_hop.text if row.next_hop is not None else ""
    item.metric = row.metric
    item.seqno = row.seqno
    item.age = row.age
    item.alternatives = row.feasible_alternatives


def to_dict(item: Any) -> dict[str, Any]:
    return {
        "destination": str(item.destination),
        "next_hop": str(item.nextHop),
        "metric": int(item.metric),
        "seqno": int(item.seqno),
        "age": float(item.age),
        "alternatives": int(item.alternatives),
    }
