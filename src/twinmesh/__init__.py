"""twinmesh: sovereign digital twins on an encrypted peer-to-peer overlay."""

__version__ = "0.1.0"
