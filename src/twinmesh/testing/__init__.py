"""Test tools that ship with twinmesh, like `trio.testing` does for trio.

`MemoryNetwork` joins many nodes in one process over in-memory carriers with
latency, loss, partitions and resets, for tests and the simulator.
"""

from twinmesh.testing.memnet import (
    Conditions,
    MemoryCarrier,
    MemoryNetwork,
    MemoryNetworkStatistics,
    MemoryStream,
)

__all__ = [
    "Conditions",
    "MemoryCarrier",
    "MemoryNetwork",
    "MemoryNetworkStatistics",
    "MemoryStream",
]
