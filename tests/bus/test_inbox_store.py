"""The twin's durable inbox: dedup, pending order, history, bounds, kill -9, failures."""

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

from twinmesh.bus.inbox_store import InboxMessage, InboxStore, IncomingMessage
from twinmesh.errors import StorageError
from twinmesh.nic.outbox_store import OutboxStore

ALICE = bytes(range(32))
BOB = bytes(range(1, 33))
SCHEMA = 0xD6F2C9A8B1E3F405  # Cap'n Proto ids have the top bit set: beyond sqlite's i64
NOW = 1_700_000_000.0
TTL = 300.0


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def accept(store: InboxStore, n: int, *, source: bytes = ALICE, now: float = NOW,
           deadline: float = NOW + TTL, size: int = 10, reply_to: bytes = b"") -> bool:
    return store.accept(mid(n), source, deadline, SCHEMA, bytes([n % 256]) * size, now,
                        reply_to=reply_to)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "inbox.sqlite"


# ------------------------------------------------------------ accept and dedup


def test_accept_many_records_a_burst_in_one_go_with_the_same_answers(path: Path) -> None:
    def incoming(n: int, deadline: float = NOW + TTL) -> IncomingMessage:
        return IncomingMessage(mid(n), ALICE, deadline, SCHEMA, bytes([n]) * 5)

    with InboxStore(path, max_pending=4) as store:
        assert accept(store, 1)
        burst = [incoming(1), incoming(2), incoming(2), incoming(3, NOW - 1), incoming(4),
                 incoming(5), incoming(6)]
        # duplicate, new, duplicate within the burst, expired, new, new, inbox full
        assert store.accept_many(burst, NOW) == [False, True, False, False, True, True, None]
        assert [m.id for m in store.pending()] == [mid(n) for n in (1, 2, 4, 5)]
        assert store.pending_count() == 4
        assert not store.remembers(mid(6))  # refused, so it may come again
        # Still full: a duplicate is still answered as one (acked), a new one is not.
        assert store.accept_many([incoming(2), incoming(7)], NOW) == [False, None]


def test_accept_records_every_field(path: Path) -> None:
    with InboxStore(path) as store:
        assert store.accept(mid(1), ALICE, NOW + 5, SCHEMA, b"hi", NOW, reply_to=mid(9))
        assert store.pending() == [InboxMessage(
            id=mid(1), source=ALICE, reply_to=mid(9), schema_id=SCHEMA, payload=b"hi",
            deadline=NOW + 5, received_at=NOW, consumed_at=None,
        )]
        assert store.pending_count() == 1


def test_a_duplicate_returns_false_and_is_not_pending_twice(path: Path) -> None:
    with InboxStore(path) as store:
        assert accept(store, 1)
        assert not accept(store, 1)
        assert not accept(store, 1, now=NOW + 10)
        assert [m.id for m in store.pending()] == [mid(1)]
        assert store.consume(mid(1), NOW + 11)
        assert not accept(store, 1, now=NOW + 12)  # consumed: still a duplicate
        assert store.pending() == []


def test_a_message_past_its_deadline_is_refused_and_not_stored(path: Path) -> None:
    with InboxStore(path) as store:
        assert not accept(store, 1, deadline=NOW - 0.001)
        assert store.pending() == [] and not store.remembers(mid(1))
        assert accept(store, 2, deadline=NOW)  # on the deadline itself: still in time


def test_pending_is_in_arrival_order_and_limited(path: Path) -> None:
    with InboxStore(path) as store:
        order = [5, 1, 9, 3, 7]
        for i, n in enumerate(order):
            accept(store, n, source=ALICE if i % 2 else BOB, now=NOW + i)
        assert [m.id for m in store.pending()] == [mid(n) for n in order]
        assert [m.id for m in store.pending(2)] == [mid(5), mid(1)]
        store.consume(mid(1), NOW + 10)
        assert [m.id for m in store.pending()] == [mid(n) for n in (5, 9, 3, 7)]


def test_consume_keeps_history_with_the_time(path: Path) -> None:
    with InboxStore(path) as store:
        accept(store, 1)
        assert store.consume(mid(1), NOW + 3)
        assert not store.consume(mid(1), NOW + 4)  # already consumed
        assert not store.consume(mid(2), NOW + 4)  # never seen
        (message,) = store.history(ALICE)
        assert message.consumed_at == NOW + 3 and store.pending_count() == 0


def test_history_is_per_peer_oldest_first_and_the_last_n(path: Path) -> None:
    with InboxStore(path) as store:
        for n in range(10):
            accept(store, n, source=ALICE if n % 2 else BOB, now=NOW + n)
            if n < 6:
                store.consume(mid(n), NOW + n)
        assert [m.id for m in store.history(ALICE)] == [mid(n) for n in (1, 3, 5, 7, 9)]
        assert [m.id for m in store.history(BOB, 2)] == [mid(6), mid(8)]
        assert store.history(b"nobody") == []


# ------------------------------------------------------------------- pruning


def test_prune_forgets_ids_after_deadline_plus_grace(path: Path) -> None:
    with InboxStore(path, grace=60.0, max_history=0) as store:
        accept(store, 1, deadline=NOW + 10)
        store.consume(mid(1), NOW + 1)
        assert store.prune(NOW + 10 + 59) == 0
        assert store.remembers(mid(1)) and not accept(store, 1, now=NOW + 5)
        assert store.prune(NOW + 10 + 60) == 1
        assert not store.remembers(mid(1))
        # A replay now is past its deadline: refused, never pending again.
        assert not accept(store, 1, deadline=NOW + 10, now=NOW + 71)
        assert store.pending() == []


def test_prune_never_drops_a_pending_message(path: Path) -> None:
    with InboxStore(path, max_history=0) as store:
        accept(store, 1, deadline=NOW + 10)
        assert store.prune(NOW + 10_000) == 0  # nothing forgotten: the message is kept
        assert [m.id for m in store.pending()] == [mid(1)]
        assert store.remembers(mid(1))  # still a duplicate while it is kept


def test_a_kept_message_stays_a_duplicate_past_its_deadline_plus_grace(path: Path) -> None:
    with InboxStore(path, max_history=0) as store:
        accept(store, 1, deadline=NOW + 10)
        assert store.prune(NOW + 10_000) == 0
        # A clock stepped far back: the copy is within its deadline again.
        again = IncomingMessage(mid(1), ALICE, NOW + 10, SCHEMA, b"x")
        assert store.accept_many([again], NOW) == [False]
        assert [m.id for m in store.pending()] == [mid(1)]


def test_an_id_trimmed_from_the_history_stays_a_duplicate_across_a_restart(
        path: Path) -> None:
    with InboxStore(path, grace=60.0, max_history=0) as store:
        accept(store, 1, deadline=NOW + 10)
        accept(store, 2, deadline=NOW + 10)
        store.consume(mid(1), NOW + 1)
        store.consume(mid(2), NOW + 1)
        assert store.prune(NOW + 5) == 0
        assert store.history(ALICE) == []  # trimmed, but its id is still remembered
    with InboxStore(path, grace=60.0, max_history=0) as again:
        assert not accept(again, 1, now=NOW + 6, deadline=NOW + 10)
        assert again.accept_many([IncomingMessage(mid(2), ALICE, NOW + 10, SCHEMA, b"x")],
                                 NOW + 6) == [False]
        assert again.pending() == []
        assert again.prune(NOW + 70) == 2
        assert not again.remembers(mid(1)) and not again.remembers(mid(2))


def test_trimming_a_message_past_its_deadline_plus_grace_forgets_its_id(path: Path) -> None:
    with InboxStore(path, grace=60.0, max_history=1) as store:
        for n in range(3):
            accept(store, n, deadline=NOW + 10)
            store.consume(mid(n), NOW + 1)
        assert store.prune(NOW + 70) == 2  # the two oldest: trimmed and forgotten
        assert [store.remembers(mid(n)) for n in range(3)] == [False, False, True]


def test_prune_keeps_the_newest_history_only(path: Path) -> None:
    with InboxStore(path, max_history=2) as store:
        for n in range(6):
            accept(store, n)
        for n in range(4):
            store.consume(mid(n), NOW + 1)
        store.prune(NOW + 1)
        assert [m.id for m in store.history(ALICE)] == [mid(n) for n in (2, 3, 4, 5)]
        assert store.pending_count() == 2


def test_consume_soon_rides_with_the_next_accept_in_one_transaction(path: Path) -> None:
    with InboxStore(path) as store:
        accept(store, 1)
        statements: list[str] = []
        assert store._conn is not None
        store._conn.set_trace_callback(statements.append)
        store.consume_soon(mid(1), NOW + 1)
        assert statements == []  # nothing written yet
        assert accept(store, 2)
        store._conn.set_trace_callback(None)
        assert [sql.split()[0] for sql in statements if not sql.startswith("PRAGMA")] == [
            "BEGIN", "UPDATE", "INSERT", "COMMIT"]
    with InboxStore(path) as again:
        assert [m.consumed_at for m in again.history(ALICE)] == [NOW + 1, None]


def test_a_waiting_consume_soon_mark_is_never_seen_pending(path: Path) -> None:
    with InboxStore(path, max_pending=2) as store:
        accept(store, 1)
        accept(store, 2)
        store.consume_soon(mid(1), NOW + 1)
        # Reads write the waiting marks first.
        assert store.pending_count() == 1
        store.consume_soon(mid(2), NOW + 2)
        assert store.pending() == []
        assert [m.consumed_at for m in store.history(ALICE)] == [NOW + 1, NOW + 2]
        # The mark freed room: the inbox takes two more.
        store.consume_soon(mid(3), NOW + 3)  # unknown: changes nothing
        assert accept(store, 4) and accept(store, 5)
        with pytest.raises(StorageError, match="inbox full"):
            accept(store, 6)
        store.consume_soon(mid(4), NOW + 4)
        assert accept(store, 6)  # the mark is written before the new message counts
        assert store.consume(mid(5), NOW + 5)  # written together with any waiting mark
        assert [m.id for m in store.pending()] == [mid(6)]


def test_consume_soon_marks_are_written_at_close_and_by_prune(path: Path) -> None:
    with InboxStore(path) as store:
        for n in range(3):
            accept(store, n)
        store.consume_soon(mid(0), NOW + 1)
        store.prune(NOW + 1)
        store.consume_soon(mid(1), NOW + 2)
    with InboxStore(path) as again:
        assert [m.id for m in again.pending()] == [mid(2)]


def test_a_consume_soon_mark_survives_a_failed_transaction(path: Path) -> None:
    store = InboxStore(path, max_bytes=128 * 1024, max_history=0)
    accepted = 0
    with pytest.raises(StorageError, match="full"):
        for n in range(1000):
            accept(store, n, size=3000)
            accepted += 1
    store.consume_soon(mid(0), NOW + 1)
    with pytest.raises(StorageError, match="full"):
        accept(store, 1000, size=3000)  # rolled back, the mark with it
    store.prune(NOW + 1)  # writes the mark, then trims the consumed message
    assert [m.id for m in store.pending(1000)] == [mid(n) for n in range(1, accepted)]
    store.close()


# -------------------------------------------------------------------- bounds


def test_max_pending_raises_inbox_full_until_the_application_consumes(path: Path) -> None:
    with InboxStore(path, max_pending=3) as store:
        for n in range(3):
            accept(store, n)
        with pytest.raises(StorageError, match=rf"{re.escape(str(path))}: inbox full"):
            accept(store, 3)
        assert not store.remembers(mid(3))
        assert not accept(store, 1)  # a duplicate is still answered (re-ack it)
        store.consume(mid(0), NOW + 1)
        assert accept(store, 3)
        assert store.pending_count() == 3


def test_reopen_keeps_pending_history_and_dedup(path: Path) -> None:
    with InboxStore(path) as store:
        for n in range(5):
            accept(store, n)
        store.consume(mid(2), NOW + 1)
    store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        store.pending()
    with InboxStore(path) as again:
        assert again.pending_count() == 4
        assert [m.id for m in again.pending()] == [mid(n) for n in (0, 1, 3, 4)]
        assert not accept(again, 2) and not accept(again, 4)
        assert [m.consumed_at for m in again.history(ALICE)][2] == NOW + 1


async def test_works_from_worker_threads(path: Path) -> None:
    with trio.fail_after(10):
        store = await trio.to_thread.run_sync(InboxStore, path)
        for n in range(5):
            assert await trio.to_thread.run_sync(accept, store, n)
        assert len(await trio.to_thread.run_sync(store.pending)) == 5
        await trio.to_thread.run_sync(store.close)


def test_schema_ids_must_be_unsigned_64_bit(path: Path) -> None:
    with InboxStore(path) as store:
        for bad in (-1, 1 << 64):
            with pytest.raises(ValueError, match="64-bit"):
                store.accept(mid(1), ALICE, NOW + 1, bad, b"", NOW)
        assert store.accept(mid(1), ALICE, NOW + 1, (1 << 64) - 1, b"", NOW)
        assert store.pending()[0].schema_id == (1 << 64) - 1


# ----------------------------------------------------------- file and failures


def test_file_is_private_wal_and_accepting_is_power_safe(path: Path) -> None:
    with InboxStore(path) as store:
        conn = store._conn  # white box: the settings live on the store's connection
        assert conn is not None
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        accept(store, 1)
        for suffix in ("", "-wal"):
            mode = stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
            assert mode == 0o600, (suffix, oct(mode))
        # The log's index is in this process's memory, not in a -shm file others map.
        assert not os.path.exists(f"{path}-shm")
        # The accepting commit (one statement, its own transaction) runs with
        # synchronous=FULL (an fsync) ...
        (insert,) = [i for i, sql in enumerate(statements) if sql.startswith("INSERT")]
        assert statements.index("PRAGMA synchronous = FULL") < insert < statements.index(
            "PRAGMA synchronous = NORMAL")
        assert "BEGIN" not in "".join(statements)
        # ... consuming does not (kill -9 safe without it; see the module docstring).
        statements.clear()
        assert store.consume(mid(1), NOW)
        assert "PRAGMA synchronous = FULL" not in statements
        conn.set_trace_callback(None)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL between


def test_full_disk_raises_storage_error_and_leaves_the_store_usable(path: Path) -> None:
    store = InboxStore(path, max_bytes=128 * 1024, max_history=0)
    accepted: list[bytes] = []
    with pytest.raises(StorageError, match=r"inbox\.sqlite: cannot write the inbox: .*full"):
        for n in range(1000):
            accept(store, n, size=3000)
            accepted.append(mid(n))
    failed = mid(len(accepted))
    assert 10 < len(accepted) < 100
    assert not store.remembers(failed)  # not marked seen without being stored
    assert [m.id for m in store.pending(1000)] == accepted
    assert store.pending_count() == len(accepted)
    # The application catches up; pruning its history frees the space.
    for message_id in accepted[:5]:
        store.consume(message_id, NOW + 1)
    store.prune(NOW + 1)
    assert store.accept(failed, ALICE, NOW + TTL, SCHEMA, b"x" * 3000, NOW)
    store.close()
    with InboxStore(path) as again:
        assert [m.id for m in again.pending(1000)] == [*accepted[5:], failed]


def test_a_file_that_is_not_a_database_is_refused_naming_it(path: Path) -> None:
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StorageError, match=rf"{re.escape(str(path))}: corrupt database file"):
        InboxStore(path)


def test_an_outbox_file_is_not_an_inbox(path: Path) -> None:
    OutboxStore(path).close()
    with pytest.raises(StorageError, match="not a twinmesh-inbox database"):
        InboxStore(path)


# ---------------------------------------------------------------- migration

# The layout twinmesh wrote as inbox schema version 1, as it shipped.
V1_LAYOUT = (
    "CREATE TABLE schema_version (kind TEXT NOT NULL, version INTEGER NOT NULL) STRICT",
    """CREATE TABLE seen (
        id           BLOB PRIMARY KEY,
        forget_after REAL NOT NULL
    ) STRICT, WITHOUT ROWID""",
    "CREATE INDEX seen_forget ON seen (forget_after)",
    """CREATE TABLE messages (
        seq         INTEGER PRIMARY KEY,
        id          BLOB NOT NULL UNIQUE,
        source      BLOB NOT NULL,
        reply_to    BLOB NOT NULL,
        schema_id   INTEGER NOT NULL,
        payload     BLOB NOT NULL,
        deadline    REAL NOT NULL,
        received_at REAL NOT NULL,
        consumed_at REAL
    ) STRICT""",
    "CREATE INDEX messages_pending ON messages (seq) WHERE consumed_at IS NULL",
    "CREATE INDEX messages_history ON messages (seq) WHERE consumed_at IS NOT NULL",
    "CREATE INDEX messages_by_source ON messages (source, seq)",
    "INSERT INTO schema_version VALUES ('twinmesh-inbox', 1)",
)


def write_version_1_inbox(path: Path) -> None:
    """What version 1 left after accepting 1 and 2, consuming 2, and trimming 3 (whose
    id it still remembered): every accepted id in `seen` as well."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in V1_LAYOUT:
        conn.execute(statement)
    signed_schema = SCHEMA - (1 << 64)
    conn.executemany("INSERT INTO messages (id, source, reply_to, schema_id, payload, "
                     "deadline, received_at, consumed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                         (mid(1), ALICE, mid(9), signed_schema, b"one", NOW + TTL, NOW, None),
                         (mid(2), BOB, b"", signed_schema, b"two", NOW + TTL, NOW, NOW + 1)])
    conn.executemany("INSERT INTO seen VALUES (?, ?)", [
        (mid(1), NOW + TTL + 60), (mid(2), NOW + TTL + 60), (mid(3), NOW + 70)])
    conn.close()
    path.chmod(0o600)


def test_a_version_1_file_is_upgraded_keeping_messages_and_dedup(path: Path) -> None:
    write_version_1_inbox(path)
    with InboxStore(path, grace=60.0) as store:
        assert store.pending() == [InboxMessage(
            id=mid(1), source=ALICE, reply_to=mid(9), schema_id=SCHEMA, payload=b"one",
            deadline=NOW + TTL, received_at=NOW, consumed_at=None)]
        assert [(m.payload, m.consumed_at) for m in store.history(BOB)] == [(b"two", NOW + 1)]
        assert [store.remembers(mid(n)) for n in (1, 2, 3)] == [True, True, True]
        assert not accept(store, 1) and not accept(store, 2)
        assert not accept(store, 3, deadline=NOW + 10)  # trimmed, still remembered
        assert accept(store, 4)
        assert store.consume(mid(1), NOW + 2)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        indexes = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL")}
        assert indexes == {"seen_forget", "messages_pending"}
    finally:
        conn.close()
    # Opened again (no second upgrade): the dedup memory still ends as it did.
    with InboxStore(path, grace=60.0, max_history=0) as again:
        assert again.pending_count() == 1
        assert again.prune(NOW + 70) == 1  # 3's window closed; 1 and 2 trimmed, remembered
        assert [again.remembers(mid(n)) for n in (1, 2, 3, 4)] == [True, True, False, True]
        assert again.prune(NOW + TTL + 60) == 2
        assert [m.id for m in again.pending()] == [mid(4)]


# ------------------------------------------------------------------ kill -9

# Accepts message after message; prints each id once accept() has returned True.
CHILD = """
import sys
from pathlib import Path
from twinmesh.bus.inbox_store import InboxStore

store = InboxStore(Path(sys.argv[1]))
n = 0
while True:
    message_id = n.to_bytes(16, "big")
    assert store.accept(message_id, b"s" * 32, 2e9, 1, message_id * 8, 1.7e9)
    print(n, flush=True)
    n += 1
"""


def test_every_message_reported_accepted_survives_kill_9(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    path = tmp_path / "inbox.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        target = rng.randint(5, 100)
        deadline = time.monotonic() + 20
        seen = 0
        while seen < target:
            line = proc.stdout.readline()
            assert line, f"child died: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "child too slow"
            seen += 1
        time.sleep(rng.uniform(0, 0.02))
    finally:
        proc.kill()  # SIGKILL
        rest = proc.stdout.read()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    printed = seen + len(rest.split())

    with InboxStore(path) as store:
        pending = store.pending(10_000)
        # Every reported message is pending; the one in flight may be too.
        assert [m.id for m in pending[:printed]] == [mid(n) for n in range(printed)], seed
        assert len(pending) in (printed, printed + 1), seed
        assert all(m.payload == m.id * 8 for m in pending)
        assert not store.accept(mid(0), b"s" * 32, 2e9, 1, b"", 1.7e9)  # still a duplicate
