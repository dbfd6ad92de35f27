"""Where each twin is: the newest signed location record per twin (sans-I/O).

The router floods location records with its routing messages (a stand-in for the DHT
lookup that comes with findDigitalTwinById): every NIC keeps the record with the
highest seqno for each twin, refuses records whose signature does not verify or that
have expired, and forgets them when they expire. Bounded by `max_records`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twinmesh.identity.keys import KEY_SIZE, SIGNATURE_SIZE, PublicKey
from twinmesh.proto.attach import Location


@dataclass
class Directory:
    max_records: int = 100_000
    records: dict[PublicKey, Location] = field(default_factory=dict)
    refused: int = 0

    def accept(self, location: Location, wall: float) -> bool:
        """Keep `location` if it is valid, unexpired and newer than what we hold.
        True when it changed our view (so it should be passed on)."""
        current = self.records.get(location.twin)
        if not location.newer_than(current) or location.expires <= wall:
            return False
        if current is None and len(self.records) >= self.max_records:
            self.purge(wall)
            if len(self.records) >= self.max_records:
                self.refused += 1
                return False
        if not location.verify():
            self.refused += 1
            return False
        self.records[location.twin] = location
        return True

    def locate(self, twin: PublicKey, wall: float) -> PublicKey | None:
        location = self.records.get(twin)
        if location is None or location.expires <= wall:
            return None
        return location.nic

    def live(self, wall: float) -> list[Location]:
        return [loc for loc in self.records.values() if loc.expires > wall]

    def purge(self, wall: float) -> None:
        for twin in [t for t, loc in self.records.items() if loc.expires <= wall]:
            del self.records[twin]


def location_from_wire(
    twin: bytes, nic: bytes, seqno: int, expires: float, signature: bytes
) -> Location | None:
    """A Location from decoded fields, or None when the sizes are wrong."""
    if len(twin) != KEY_SIZE or len(nic) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return None
    return Location(PublicKey(twin), PublicKey(nic), seqno, expires, signature)
