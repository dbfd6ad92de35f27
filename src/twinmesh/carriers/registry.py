"""The carriers a daemon can use, by URI scheme."""

from __future__ import annotations

from twinmesh.carriers.base import Carrier
from twinmesh.carriers.tcp import TcpCarrier
from twinmesh.carriers.ws import WebSocketCarrier


def default_carriers() -> dict[str, Carrier]:
    """A fresh `{scheme: carrier}` map with every network carrier (tcp, ws).

    The in-memory carrier is not here: it belongs to a `twinmesh.testing.MemoryNetwork`.
    """
    carriers: list[Carrier] = [TcpCarrier(), WebSocketCarrier()]
    return {carrier.scheme: carrier for carrier in carriers}
