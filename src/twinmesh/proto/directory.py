"""Where each twin is: the newest signed location record per twin (sans-I/O).

The router floods location records with its routing messages (a stand-in for the DHT
lookup that comes with findDigitalTwinById): every NIC keeps the record with the
highest seqno for each twin, refuses records whose signature does not verify or that
have expired, and forgets them when they expire. Bounded by `max_records`.

Expiry is swept often (the router's 2 s housekeeping), so it must not cost a pass over
every record: a heap of (expires, twin) finds the expired ones; entries of records
since replaced are skipped when they surface, and the heap is rebuilt when such stale
entries outnumber the records.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from twinmesh.identity.keys import KEY_SIZE, SIGNATURE_SIZE, PublicKey
from twinmesh.proto.attach import Location


@dataclass
class Directory:
    max_records: int = 100_000
    records: dict[PublicKey, Location] = field(default_factory=dict)
    refused: int = 0
    # (expires, tie-breaker, twin) for every record accepted; some are stale.
    _expiry: list[tuple[float, int, PublicKey]] = field(default_factory=list, repr=False)
    _ties: itertools.count[int] = field(default_factory=itertools.count, repr=False)

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
        heapq.heappush(self._expiry, (location.expires, next(self._ties), location.twin))
        if len(self._expiry) > 2 * len(self.records) + 64:
            self._expiry = [(loc.expires, next(self._ties), twin)
                            for twin, loc in self.records.items()]
            heapq.heapify(self._expiry)
        return True

    def locate(self, twin: PublicKey, wall: float) -> PublicKey | None:
        location = self.records.get(twin)
        if location is None or location.expires <= wall:
            return None
        return location.nic

    def live(self, wall: float) -> list[Location]:
        return [loc for loc in self.records.values() if loc.expires > wall]

    def purge(self, wall: float) -> None:
        """Forget every record expired at `wall`."""
        expiry = self._expiry
        while expiry and expiry[0][0] <= wall:
            _, _, twin = heapq.heappop(expiry)
            location = self.records.get(twin)
            if location is not None and location.expires <= wall:
                del self.records[twin]


def location_from_wire(
    twin: bytes, nic: bytes, seqno: int, expires: float, signature: bytes
) -> Location | None:
    """A Location from decoded fields, or None when the sizes are wrong."""
    if len(twin) != KEY_SIZE or len(nic) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return None
    return Location(PublicKey(twin), PublicKey(nic), seqno, expires, signature)
