"""`peers`: every link and configured peer: state, RTT, traffic, last error."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

NAME = "peers"

# PeerRow field -> PeerInfo schema field
_FIELDS = {
    "key": "key", "uri": "uri", "direction": "direction", "state": "state",
    "up_since": "upSince", "rtt": "rtt", "bytes_in": "bytesIn", "bytes_out": "bytesOut",
    "frames_in": "framesIn", "frames_out": "framesOut", "last_error": "lastError",
    "retry_in": "retryIn", "carrier": "carrier",
}


def build(request: Any, arg: str | None) -> None:
    request.peers = None


def handle(nic: Nic, request: Any, response: Any, health_url: str = "") -> None:
    rows = nic.peer_rows()
    out = response.init("peers", len(rows))
    for item, row in zip(out, rows, strict=True):
        for name, value in dataclasses.asdict(row).items():
            setattr(item, _FIELDS[name], value)


def read(response: Any) -> list[dict[str, Any]]:
    rows = []
    for item in response.peers:
        row = {}
        for name, field in _FIELDS.items():
            value = getattr(item, field)
            row[name] = value if isinstance(value, int | float) else str(value)
        rows.append(row)
    return rows
