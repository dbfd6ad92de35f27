"""`ping KEY`: one overlay ping to another NIC: RTT and hop count, or why it failed.

The only admin command that waits on the network: its handler is async."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twinmesh.errors import AdminError
from twinmesh.nic.admin.route import parse_key

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

NAME = "ping"
MAX_TIMEOUT = 30.0


def build(request: Any, arg: str | None, timeout: float = 2.0) -> None:
    ping = request.init("ping")
    ping.key = arg or ""
    ping.timeout = timeout


def parse(request: Any) -> tuple[str, float]:
    return str(request.ping.key), float(request.ping.timeout)


async def handle_async(nic: Nic, key_text: str, timeout: float, response: Any) -> None:
    destination = parse_key(key_text)
    if not 0 < timeout <= MAX_TIMEOUT:
        raise AdminError(f"ping timeout must be in (0, {MAX_TIMEOUT:g}] s")
    reply = await nic.ping(destination, timeout)
    out = response.init("ping")
    out.rtt = reply.rtt if reply.rtt is not None else -1.0
    out.hops = min(reply.hops, 255)
    out.error = reply.error
    out.reportedBy = reply.reported_by.text if reply.reported_by is not None else ""


def read(response: Any) -> dict[str, Any]:
    result = response.ping
    rtt = float(result.rtt)
    return {
        "rtt": rtt if rtt >= 0 else None,
        "hops": int(result.hops),
        "error": str(result.error),
        "reported_by": str(result.reportedBy),
    }
