from twinmesh.identity.keys import Identity
from twinmesh.proto.attach import Location
from twinmesh.proto.directory import Directory, location_from_wire

TWIN = Identity.generate()
NIC_A = Identity.generate().public
NIC_B = Identity.generate().public


def test_newest_valid_record_wins() -> None:
    directory = Directory()
    first = Location.sign(TWIN, NIC_A, 1, expires=100.0)
    moved = Location.sign(TWIN, NIC_B, 2, expires=100.0)
    assert directory.accept(first, wall=0.0)
    assert directory.locate(TWIN.public, 0.0) == NIC_A
    assert directory.accept(moved, wall=1.0)
    assert directory.locate(TWIN.public, 1.0) == NIC_B
    assert not directory.accept(first, wall=2.0)  # a replayed older record changes nothing
    assert directory.locate(TWIN.public, 2.0) == NIC_B


def test_forged_and_expired_records_are_refused() -> None:
    directory = Directory()
    good = Location.sign(TWIN, NIC_A, 5, expires=100.0)
    forged = Location(TWIN.public, NIC_B, 6, 100.0, good.signature)
    assert not directory.accept(forged, wall=0.0) and directory.refused == 1
    assert not directory.accept(Location.sign(TWIN, NIC_A, 7, expires=10.0), wall=10.0)
    assert directory.accept(good, wall=0.0)
    assert directory.locate(TWIN.public, 99.0) == NIC_A
    assert directory.locate(TWIN.public, 100.0) is None  # expired: unknown again
    directory.purge(100.0)
    assert not directory.records


def test_the_directory_is_bounded() -> None:
    directory = Directory(max_records=2)
    twins = [Identity.generate() for _ in range(3)]
    assert all(directory.accept(Location.sign(t, NIC_A, 1, 100.0), 0.0) for t in twins[:2])
    assert not directory.accept(Location.sign(twins[2], NIC_A, 1, 100.0), 0.0)
    assert len(directory.records) == 2
    # Once records expire, room is made again.
    assert directory.accept(Location.sign(twins[2], NIC_A, 1, 300.0), 200.0)


def test_wire_sizes_are_checked() -> None:
    assert location_from_wire(b"x", NIC_A.raw, 1, 1.0, b"s" * 64) is None
    assert location_from_wire(TWIN.public.raw, NIC_A.raw, 1, 1.0, b"s" * 64) is not None


def test_purge_forgets_only_what_has_expired_by_then() -> None:
    directory = Directory()
    others = [Identity.generate() for _ in range(3)]
    for n, twin in enumerate(others):
        assert directory.accept(Location.sign(twin, NIC_A, 1, expires=10.0 * (n + 1)), 0.0)
    assert directory.accept(Location.sign(TWIN, NIC_A, 1, expires=5.0), 0.0)
    # Renewed before it expired: the old expiry no longer counts.
    assert directory.accept(Location.sign(TWIN, NIC_B, 2, expires=50.0), 1.0)
    directory.purge(20.0)
    assert set(directory.records) == {others[2].public, TWIN.public}
    assert directory.locate(TWIN.public, 20.0) == NIC_B
    directory.purge(50.0)
    assert not directory.records


def test_many_renewals_keep_the_expiry_index_small() -> None:
    directory = Directory()
    for seqno in range(1, 400):
        assert directory.accept(Location.sign(TWIN, NIC_A, seqno, expires=1000.0 + seqno), 0.0)
    assert len(directory._expiry) <= 2 * len(directory.records) + 64
    directory.purge(2000.0)
    assert not directory.records
