"""`self`: the NIC's key (its address), listen URIs, uptime, version."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

NAME = "self"


def build(request: Any, arg: str | None) -> None:
    request.self = None


def handle(nic: Nic, request: Any, response: Any, health_url: str = "") -> None:
    info = nic.self_info()
    out = response.init("self")
    out.key = info.key
    out.keyHex = info.key_hex
    listen = out.init("listen", len(info.listen))
    for i, uri in enumerate(info.listen):
        listen[i] = uri
    out.uptime = info.uptime
    out.version = info.version
    out.pid = info.pid
    out.health = health_url


def read(response: Any) -> dict[str, Any]:
    info = response.self
    return {
        "key": str(info.key),
        "key_hex": str(info.keyHex),
        "listen": [str(u) for u in info.listen],
        "uptime": float(info.uptime),
        "version": str(info.version),
        "pid": int(info.pid),
        "health": str(info.health),
    }
