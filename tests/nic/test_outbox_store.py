"""The NIC's durable outbox: round trips, atomic batches, kill -9, full disk, corruption."""

from __future__ import annotations

import os
import random
import re
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from twinmesh.errors import StorageError
from twinmesh.identity.keys import Identity
from twinmesh.nic.outbox_store import (
    _SCHEMA,
    PAGE_SIZE,
    SCHEMA_VERSION,
    STORE_KIND,
    OutboxStore,
)
from twinmesh.proto.outbox import Entry, Forget, Persist, Status, Transmit
from twinmesh.storage import open_database

ALICE = Identity.generate().public
BOB = Identity.generate().public


def entry(n: int, *, size: int = 64, **kwargs: object) -> Entry:
    fields: dict[str, object] = {
        "id": n.to_bytes(16, "big"),
        "source": ALICE,
        "destination": BOB,
        "deadline": 1_700_000_000.5 + n,
        "ack_hash": (n + 1).to_bytes(16, "big"),
        "envelope": bytes([n % 256]) * size,
    }
    fields.update(kwargs)
    return Entry(**fields)  # type: ignore[arg-type]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite"


# ------------------------------------------------------------------ round trips


def test_round_trip_keeps_every_field(path: Path) -> None:
    a = entry(1)
    b = entry(2, destination=ALICE, source=BOB, attempts=3, next_try=12.25,
              status=Status.SENT, code="offline")
    with OutboxStore(path) as store:
        assert store.load() == [] and store.count() == 0
        store.apply([Persist(a), Persist(b)])
        assert store.load() == [a, b]
        assert store.count() == 2


def test_a_finished_status_is_kept_without_its_envelope_until_pruned(path: Path) -> None:
    done, failed, live = entry(1), entry(2), entry(3)
    with OutboxStore(path, max_finished=10) as store:
        store.apply([Persist(done), Persist(failed), Persist(live)])
        store.apply([Forget(done.id, Status.DELIVERED, "", 500.0),
                     Forget(failed.id, Status.FAILED, "unknownTwin", 900.0)])
    with OutboxStore(path, max_finished=10) as store:  # as after a restart
        rows = {e.id: e for e in store.load()}
        assert rows[done.id].status is Status.DELIVERED and rows[done.id].envelope == b""
        assert rows[done.id].next_try == 500.0
        assert (rows[failed.id].status, rows[failed.id].code) == (Status.FAILED, "unknownTwin")
        assert rows[live.id] == live
        store.apply([Persist(entry(4))], now=600.0)  # prunes what is past its hold
        assert {e.id for e in store.load()} == {failed.id, live.id, entry(4).id}


def test_finished_statuses_on_disk_are_bounded_in_number(path: Path) -> None:
    with OutboxStore(path, max_finished=3) as store:
        for n in range(8):
            store.apply([Persist(entry(n))])
            store.apply([Forget(entry(n).id, Status.DELIVERED, "", 1e12)])
        store.apply([Persist(entry(99))], now=1.0)
        kept = [e.id for e in store.load()]
        assert kept == [entry(n).id for n in (5, 6, 7, 99)]  # the newest finished, the live


def test_persist_again_updates_in_place_and_keeps_submission_order(path: Path) -> None:
    with OutboxStore(path) as store:
        store.apply([Persist(entry(1)), Persist(entry(2)), Persist(entry(3))])
        changed = entry(1, attempts=4, status=Status.SENT, code="noRoute")
        store.apply([Persist(changed)])
        assert [e.id for e in store.load()] == [entry(n).id for n in (1, 2, 3)]
        assert store.load()[0] == changed


def test_forget_removes_and_unknown_ids_and_empty_batches_are_no_ops(path: Path) -> None:
    with OutboxStore(path) as store:
        store.apply([Persist(entry(1)), Persist(entry(2))])
        store.apply([Forget(entry(1).id), Forget(b"never stored")])
        store.apply([])
        assert store.load() == [entry(2)]
        # Persist then Forget in one batch: applied in order, nothing left.
        store.apply([Persist(entry(3)), Forget(entry(3).id)])
        assert store.count() == 1


def test_a_batch_with_a_bad_element_applies_nothing(path: Path) -> None:
    with OutboxStore(path) as store:
        store.apply([Persist(entry(1))])
        bad: list[object] = [Persist(entry(2)), Forget(entry(1).id), Transmit(b"x", BOB, b"y")]
        with pytest.raises(TypeError, match="Transmit"):
            store.apply(bad)  # type: ignore[arg-type]
        assert store.load() == [entry(1)]
        store.apply([Persist(entry(2))])  # and the store goes on
        assert store.count() == 2


def test_reopen_after_close_keeps_everything(path: Path) -> None:
    entries = [entry(n, attempts=n % 3, status=Status.SENT if n % 2 else Status.QUEUED)
               for n in range(50)]
    store = OutboxStore(path)
    store.apply(Persist(e) for e in entries)
    store.apply([Forget(entries[7].id)])
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        store.load()
    with OutboxStore(path) as again:
        assert again.load() == entries[:7] + entries[8:]


async def test_works_from_worker_threads(path: Path) -> None:
    # How the trio shell uses it: every call through trio.to_thread.run_sync.
    with trio.fail_after(10):
        store = await trio.to_thread.run_sync(OutboxStore, path)
        for n in range(5):
            await trio.to_thread.run_sync(store.apply, [Persist(entry(n))])
        assert len(await trio.to_thread.run_sync(store.load)) == 5
        await trio.to_thread.run_sync(store.close)


# ------------------------------------------------------------- file and settings


def test_file_is_private_wal_and_submissions_are_power_safe(path: Path) -> None:
    with OutboxStore(path) as store:
        conn = store._conn  # white box: the settings live on the store's connection
        assert conn is not None
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        store.apply([Persist(entry(1))])
        for suffix in ("", "-wal"):
            mode = stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
            assert mode == 0o600, (suffix, oct(mode))
        # The log's index is in this process's memory, not in a -shm file others map.
        assert not os.path.exists(f"{path}-shm")
        # By default a batch commits with synchronous=FULL (an fsync) ...
        assert statements.index("PRAGMA synchronous = FULL") < statements.index(
            "COMMIT") < statements.index("PRAGMA synchronous = NORMAL")
        # ... and power_safe=False (acks, retries) commits without it.
        statements.clear()
        store.apply([Forget(entry(1).id)], power_safe=False)
        assert "COMMIT" in statements
        assert "PRAGMA synchronous = FULL" not in statements
        conn.set_trace_callback(None)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert store.count() == 0


def test_an_existing_file_that_is_too_open_is_made_private(path: Path) -> None:
    OutboxStore(path).close()
    path.chmod(0o644)
    OutboxStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_missing_directory_is_a_storage_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "outbox.sqlite"
    with pytest.raises(StorageError, match=re.escape(str(missing))):
        OutboxStore(missing)


# ------------------------------------------------------------------- failures


def test_full_disk_raises_storage_error_and_leaves_the_store_usable(path: Path) -> None:
    store = OutboxStore(path, max_bytes=128 * 1024)
    stored: list[Entry] = []
    with pytest.raises(StorageError, match=r"outbox\.sqlite: cannot write the outbox: .*full"):
        for n in range(1000):
            store.apply([Persist(entry(n, size=3000))])
            stored.append(entry(n, size=3000))
    assert 10 < len(stored) < 100
    assert store.load() == stored  # readable, nothing half-written

    # A batch that runs out of space half-way leaves nothing applied, not even its Forget.
    # (Six: whole pages are freed whatever the page size; rows share pages.)
    store.apply([Forget(e.id) for e in stored[:6]])
    del stored[:6]
    batch = [Forget(stored[0].id)] + [Persist(entry(n, size=3000)) for n in range(1000, 1010)]
    with pytest.raises(StorageError, match="full"):
        store.apply(batch)
    assert store.load() == stored

    # Space freed by Forget is used again.
    more = [entry(n, size=3000) for n in range(2000, 2003)]
    store.apply(Persist(e) for e in more)
    assert store.load() == stored + more
    store.close()
    with OutboxStore(path) as again:
        assert again.load() == stored + more


def test_a_read_only_database_raises_storage_error_and_recovers(path: Path) -> None:
    with OutboxStore(path) as store:
        store.apply([Persist(entry(1))])
        conn = store._conn  # white box: make writes fail as on a read-only mount
        assert conn is not None
        conn.execute("PRAGMA query_only = ON")
        with pytest.raises(StorageError, match="readonly"):
            store.apply([Persist(entry(2)), Forget(entry(1).id)])
        conn.execute("PRAGMA query_only = OFF")
        assert store.load() == [entry(1)]
        store.apply([Persist(entry(2))])
        assert store.count() == 2


def test_a_file_that_is_not_a_database_is_refused_naming_it(path: Path) -> None:
    path.write_bytes(b"this is not sqlite at all, " * 200)
    with pytest.raises(StorageError, match=rf"{re.escape(str(path))}: corrupt database file"):
        OutboxStore(path)


def test_a_damaged_page_is_a_storage_error_naming_the_file(path: Path) -> None:
    with OutboxStore(path) as store:
        store.apply(Persist(entry(n, size=500)) for n in range(200))
    # Closing checkpointed the log into the file; now scribble over all but page 1.
    data = bytearray(path.read_bytes())
    data[4096:] = random.Random(1).randbytes(len(data) - 4096)
    path.write_bytes(bytes(data))
    with (
        pytest.raises(StorageError, match=rf"{re.escape(str(path))}: corrupt database file"),
        OutboxStore(path) as store,
    ):
        store.load()


def test_another_kind_of_database_is_refused(path: Path, tmp_path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="not a twinmesh-outbox database"):
        OutboxStore(path)

    newer = tmp_path / "newer.sqlite"
    OutboxStore(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="newer twinmesh"):
        OutboxStore(newer)


# ------------------------------------------------------------------ kill -9

# Applies batch after batch; prints the batch number once apply() has returned.
# Batch n persists ids(n) and forgets every other id of batch n - 3.
CHILD = """
import sys
from pathlib import Path
from twinmesh.identity.keys import PublicKey
from twinmesh.nic.outbox_store import (
    _SCHEMA,
    PAGE_SIZE,
    SCHEMA_VERSION,
    STORE_KIND,
    OutboxStore,
)
from twinmesh.proto.outbox import Entry, Forget, Persist

KEY = PublicKey(bytes(range(32)))

def ids(n):
    return [n.to_bytes(8, "big") + i.to_bytes(8, "big") for i in range(1 + n % 8)]

store = OutboxStore(Path(sys.argv[1]))
n = 0
while True:
    batch = [Persist(Entry(i, KEY, KEY, 1e12, i, i * 40, attempts=n)) for i in ids(n)]
    if n >= 3:
        batch += [Forget(i) for i in ids(n - 3)[::2]]
    store.apply(batch)
    print(n, flush=True)
    n += 1
"""


def _ids(n: int) -> list[bytes]:
    return [n.to_bytes(8, "big") + i.to_bytes(8, "big") for i in range(1 + n % 8)]


def _present_after(last: int) -> set[bytes]:
    """The ids stored once batches 0..last have committed."""
    present: set[bytes] = set()
    for n in range(last + 1):
        present.update(_ids(n))
        if n >= 3:
            present.difference_update(_ids(n - 3)[::2])
    return present


@pytest.mark.parametrize("round_", range(3))
def test_every_batch_reported_committed_survives_kill_9(tmp_path: Path, round_: int) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    path = tmp_path / "outbox.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        target = rng.randint(5, 60)
        deadline = time.monotonic() + 20
        seen = 0
        while seen < target:
            line = proc.stdout.readline()
            assert line, f"child died: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "child too slow"
            seen += 1
        time.sleep(rng.uniform(0, 0.02))  # lands inside apply() most of the time
    finally:
        proc.kill()  # SIGKILL
        rest = proc.stdout.read()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    printed = seen + len(rest.split())
    last = printed - 1  # batch numbers are 0, 1, 2, ... in order

    with OutboxStore(path) as store:
        loaded = {e.id: e for e in store.load()}
        # Every reported batch is there, and the one in flight is all there or absent.
        assert set(loaded) in (_present_after(last), _present_after(last + 1)), seed
        for e in loaded.values():
            assert e.envelope == e.id * 40 and e.source == e.destination
            assert e.attempts == int.from_bytes(e.id[:8], "big")
        store.apply([Persist(entry(1))])  # and it is writable



def test_a_new_file_gets_the_outbox_page_size_and_an_old_one_keeps_its_own(
    path: Path, tmp_path: Path
) -> None:
    entries = [entry(1, size=70_000), entry(2)]
    with OutboxStore(path) as store:
        store.apply([Persist(e) for e in entries])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (PAGE_SIZE,)
    # A file written by an earlier version (sqlite's default 4 KiB pages) works as it is.
    old = tmp_path / "old.sqlite"
    open_database(old, STORE_KIND, SCHEMA_VERSION, _SCHEMA, page_size=4096).close()
    with OutboxStore(old) as store:
        store.apply([Persist(e) for e in entries])
    with OutboxStore(old) as store:
        assert store.load() == entries
    with sqlite3.connect(old) as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (4096,)
