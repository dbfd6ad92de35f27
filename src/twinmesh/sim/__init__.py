"""A discrete-event simulator driving the sans-I/O routing cores on a virtual clock.

`topologies` makes seeded graphs; `network.Network` runs one `Router` per node over
links with latency, cuts and detection delays; `python -m twinmesh.sim` (`make sim`)
runs the scaling scenarios of docs/SCALING.md.
"""

from twinmesh.sim.network import Network, SimulationLimit, Walk

__all__ = ["Network", "SimulationLimit", "Walk"]
