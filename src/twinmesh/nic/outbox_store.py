"""The NIC's durable outbox: where accepted envelopes live until acked or expired.

The outbox core (`twinmesh.proto.outbox`) never touches the disk. It emits `Persist`
and `Forget` outputs; the NIC shell hands every such output produced while the
previous commit ran to `OutboxStore.apply` as one batch (group commit), and only once
`apply` has returned does it tell the submitting twins "accepted". After a restart the
shell reads the entries back with `load()` and feeds each to `Outbox.restore()`.

Finished messages: a `Forget` that carries a final status (delivered, expired,
failed) keeps the row with that status and code, its envelope dropped and `next_try`
holding the time until which the status is kept, so "what became of id X?" is still
answered after a restart. `apply(..., now=...)` prunes the rows past that time, and
the oldest beyond `max_finished`, at most once every PRUNE_INTERVAL seconds (no new
column or index: the schema stays version 1).

Durability: one sqlite3 file, write-ahead log. When `apply` returns, the batch is in
the log and (unless `power_safe=False`: batches without new submissions, kill -9
safe only) the log has been fsync'ed, so it survives `kill -9` and power loss. A
batch is all-or-nothing: a crash, a full disk or a bad element in the middle leaves
none of it applied.

Errors: anything the disk or the file does wrong (full, I/O error, read-only,
corrupt) raises `StorageError` with one line naming the file, after rolling the
transaction back, so the shell can answer `overloaded` and keep running.

Threads: the trio shell calls `apply` from one task. Batches that are not power safe
run on the event loop; power-safe ones (the fsync) too while they are quick, and in a
worker thread after a slow one (`twinmesh.commit_placement`). The connection may be used
from any thread; a lock serialises the calls.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twinmesh.errors import StorageError
from twinmesh.identity.keys import PublicKey
from twinmesh.proto.outbox import FINAL, Entry, Forget, Persist, Status
from twinmesh.storage import (
    SqliteStore,
    open_database,
    rollback,
    storage_error,
    synchronous_full,
)

STORE_KIND = "twinmesh-outbox"
SCHEMA_VERSION = 1

# Version 1. A later version adds a migration step in storage._check_schema; never
# edit these.
# STRICT tables (sqlite >= 3.37) refuse a value of the wrong type at insert.
_SCHEMA = (
    "CREATE TABLE schema_version (kind TEXT NOT NULL, version INTEGER NOT NULL) STRICT",
    """CREATE TABLE entries (
        seq         INTEGER PRIMARY KEY,  -- submission order, kept when updated
        id          BLOB NOT NULL UNIQUE,
        source      BLOB NOT NULL,
        destination BLOB NOT NULL,
        deadline    REAL NOT NULL,
        ack_hash    BLOB NOT NULL,
        envelope    BLOB NOT NULL,
        attempts    INTEGER NOT NULL,
        next_try    REAL NOT NULL,
        status      TEXT NOT NULL,
        code        TEXT NOT NULL
    ) STRICT""",
)

_UPSERT = """
INSERT INTO entries (id, source, destination, deadline, ack_hash, envelope,
                     attempts, next_try, status, code)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    source = excluded.source, destination = excluded.destination,
    deadline = excluded.deadline, ack_hash = excluded.ack_hash,
    envelope = excluded.envelope, attempts = excluded.attempts,
    next_try = excluded.next_try, status = excluded.status, code = excluded.code
"""

_FINISH = """
UPDATE entries SET envelope = x'', status = ?, code = ?, next_try = ? WHERE id = ?
"""

_FINAL_STATUSES = tuple(sorted(status.value for status in FINAL))
_FINAL_IN = "status IN (" + ", ".join("?" * len(_FINAL_STATUSES)) + ")"
_PRUNE_OLD = f"DELETE FROM entries WHERE {_FINAL_IN} AND next_try <= ?"
_PRUNE_MANY = f"""
DELETE FROM entries WHERE seq IN (
    SELECT seq FROM entries WHERE {_FINAL_IN} ORDER BY seq DESC LIMIT -1 OFFSET ?)
"""
PRUNE_INTERVAL = 60.0
# Pages of a new outbox file. An envelope of 64 KiB spans a chain of overflow pages,
# each a system call and a log frame (written, then read and written again by the
# checkpoint, then read to be freed): 8 KiB pages halve those and cost 12-15 % less CPU
# per message than sqlite's 4 KiB, for 64 KiB envelopes and 300-byte ones alike
# (measured; 16 KiB was no better for 64 KiB and worse for small envelopes).
PAGE_SIZE = 8192
DEFAULT_MAX_FINISHED = 100_000

_SELECT = """
SELECT id, source, destination, deadline, ack_hash, envelope, attempts, next_try,
       status, code
FROM entries ORDER BY seq
"""


class OutboxStore(SqliteStore):
    """The outbox entries of one NIC, in one sqlite3 file (created with mode 0600).

    `max_bytes` caps the database file (sqlite `max_page_count`): beyond it a write
    fails as on a full disk. None: only the disk bounds it.
    """

    kind = "outbox"

    def __init__(
        self, path: Path, *, max_bytes: int | None = None,
        max_finished: int = DEFAULT_MAX_FINISHED,
    ) -> None:
        super().__init__(
            path, open_database(path, STORE_KIND, SCHEMA_VERSION, _SCHEMA, max_bytes=max_bytes,
                                page_size=PAGE_SIZE)
        )
        # This sqlite zeroes every freed page by default (secure_delete): each acked
        # 64 KiB envelope was written twice more. FAST still clears what is freed
        # inside a page; the envelopes are sealed end to end anyway.
        assert self._conn is not None
        self._conn.execute("PRAGMA secure_delete = FAST")
        self.max_finished = max_finished  # immutable after construction
        self._next_prune = 0.0  # unix time; only touched with _lock held

    # ------------------------------------------------------------------ write

    def apply(self, outputs: Iterable[Persist | Forget], now: float | None = None, *,
              power_safe: bool = True) -> None:
        """Apply a batch of `Persist`/`Forget` outputs in one durable transaction.

        `Persist` stores the entry as it is *now* (a second `Persist` of the same id
        updates it in place); `Forget` of an id not stored is a no-op; a `Forget` with
        a status keeps that status until its `until`. With `now` (unix seconds) the
        same transaction prunes finished statuses now and then. On return the
        whole batch is durable; on any exception none of it was applied (`StorageError`
        for the disk or the file, `TypeError` for an output that is neither).

        `power_safe=False` skips the fsync (the commit still survives kill -9): for
        batches that hold no new submission, as losing them to a power cut only
        means a retry or an attempt count that the receiver's dedup absorbs.
        """
        with self._lock:
            conn = self._connection()
            began = False
            try:
                with synchronous_full(conn, power_safe):
                    for output in outputs:
                        if not began:
                            conn.execute("BEGIN IMMEDIATE")
                            began = True
                        if isinstance(output, Persist):
                            conn.execute(_UPSERT, _row(output.entry))
                        elif isinstance(output, Forget):
                            if output.status is None:
                                conn.execute("DELETE FROM entries WHERE id = ?", (output.id,))
                            else:
                                conn.execute(_FINISH, (output.status.value, output.code,
                                                       output.until, output.id))
                        else:
                            raise TypeError(
                                f"OutboxStore.apply takes Persist and Forget outputs, "
                                f"not {type(output).__name__}"
                            )
                    if began and now is not None and now >= self._next_prune:
                        conn.execute(_PRUNE_OLD, (*_FINAL_STATUSES, now))
                        conn.execute(_PRUNE_MANY, (*_FINAL_STATUSES, self.max_finished))
                    if began:
                        conn.execute("COMMIT")
                        if now is not None and now >= self._next_prune:
                            self._next_prune = now + PRUNE_INTERVAL
            except sqlite3.Error as exc:
                rollback(conn)
                raise storage_error(self.path, "cannot write the outbox", exc) from None
            except BaseException:
                rollback(conn)
                raise

    # ------------------------------------------------------------------- read

    def load(self) -> list[Entry]:
        """Every stored entry, in submission order, as it was last persisted; finished
        ones have a final status, no envelope, and `next_try` = kept until."""
        with self._lock:
            conn = self._connection()
            try:
                rows = conn.execute(_SELECT).fetchall()
            except sqlite3.Error as exc:
                raise storage_error(self.path, "cannot read the outbox", exc) from None
        try:
            return [_entry(row) for row in rows]
        except (ValueError, TypeError) as exc:
            raise StorageError(f"{self.path}: corrupt outbox entry ({exc})") from None

    def count(self) -> int:
        """How many entries are stored."""
        with self._lock:
            conn = self._connection()
            try:
                (n,) = conn.execute("SELECT count(*) FROM entries").fetchone()
            except sqlite3.Error as exc:
                raise storage_error(self.path, "cannot read the outbox", exc) from None
        return int(n)

    # --------------------------------------------------------------- lifecycle



def _row(entry: Entry) -> tuple[object, ...]:
    return (
        entry.id, entry.source.raw, entry.destination.raw, entry.deadline, entry.ack_hash,
        entry.envelope, entry.attempts, entry.next_try, entry.status.value, entry.code,
    )


def _entry(row: tuple[Any, ...]) -> Entry:
    # The STRICT table guarantees the column types; the values may still be nonsense.
    (id_, source, destination, deadline, ack_hash, envelope, attempts, next_try, status,
     code) = row
    return Entry(
        id=id_, source=PublicKey(source), destination=PublicKey(destination),
        deadline=deadline, ack_hash=ack_hash, envelope=envelope, attempts=attempts,
        next_try=next_try, status=Status(status), code=code,
    )
