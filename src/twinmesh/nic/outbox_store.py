"""The NIC's durable outbox: where accepted envelopes live until acked or expired.

The outbox core (`twinmesh.proto.outbox`) never touches the disk. It emits `Persist`
and `Forget` outputs; the NIC shell hands every such output produced while the
previous commit ran to `OutboxStore.apply` as one batch (group commit), and only once
`apply` has returned does it tell the submitting twins "accepted". After a restart the
shell reads the entries back with `load()` and feeds each to `Outbox.restore()`.

Durability: one sqlite3 file, write-ahead log, `synchronous=FULL`. When `apply`
returns, the batch is in the log and the log has been fsync'ed, so it survives
`kill -9` and power loss. A batch is all-or-nothing: a crash, a full disk or a bad
element in the middle leaves none of it applied.

Errors: anything the disk or the file does wrong (full, I/O error, read-only,
corrupt) raises `StorageError` with one line naming the file, after rolling the
transaction back, so the shell can answer `overloaded` and keep running.

Threads: the trio shell calls every method through `trio.to_thread.run_sync`, from
one task. The connection may be used from any thread; a lock serialises the calls.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from twinmesh.errors import StorageError
from twinmesh.identity.keys import PublicKey
from twinmesh.proto.outbox import Entry, Forget, Persist, Status

STORE_KIND = "twinmesh-outbox"
SCHEMA_VERSION = 1

# Version 1. A later version adds a migration step in _check_schema; never edit these.
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

_SELECT = """
SELECT id, source, destination, deadline, ack_hash, envelope, attempts, next_try,
       status, code
FROM entries ORDER BY seq
"""


class OutboxStore:
    """The outbox entries of one NIC, in one sqlite3 file (created with mode 0600).

    `max_bytes` caps the database file (sqlite `max_page_count`): beyond it a write
    fails as on a full disk. None: only the disk bounds it.
    """

    def __init__(self, path: Path, *, max_bytes: int | None = None) -> None:
        self.path = path  # immutable after construction
        self._lock = threading.Lock()
        # Only used with _lock held; None once closed.
        self._conn: sqlite3.Connection | None = _open_database(
            path, STORE_KIND, SCHEMA_VERSION, _SCHEMA, max_bytes=max_bytes
        )

    # ------------------------------------------------------------------ write

    def apply(self, outputs: Iterable[Persist | Forget]) -> None:
        """Apply a batch of `Persist`/`Forget` outputs in one durable transaction.

        `Persist` stores the entry as it is *now* (a second `Persist` of the same id
        updates it in place); `Forget` of an id not stored is a no-op. On return the
        whole batch is durable; on any exception none of it was applied (`StorageError`
        for the disk or the file, `TypeError` for an output that is neither).
        """
        with self._lock:
            conn = self._connection()
            began = False
            try:
                for output in outputs:
                    if not began:
                        conn.execute("BEGIN IMMEDIATE")
                        began = True
                    if isinstance(output, Persist):
                        conn.execute(_UPSERT, _row(output.entry))
                    elif isinstance(output, Forget):
                        conn.execute("DELETE FROM entries WHERE id = ?", (output.id,))
                    else:
                        raise TypeError(
                            f"OutboxStore.apply takes Persist and Forget outputs, "
                            f"not {type(output).__name__}"
                        )
                if began:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise _storage_error(self.path, "cannot write the outbox", exc) from None
            except BaseException:
                _rollback(conn)
                raise

    # ------------------------------------------------------------------- read

    def load(self) -> list[Entry]:
        """Every stored entry, in submission order, as it was last persisted."""
        with self._lock:
            conn = self._connection()
            try:
                rows = conn.execute(_SELECT).fetchall()
            except sqlite3.Error as exc:
                raise _storage_error(self.path, "cannot read the outbox", exc) from None
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
                raise _storage_error(self.path, "cannot read the outbox", exc) from None
        return int(n)

    # --------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the file (idempotent). Later calls raise StorageError."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.close()

    def __enter__(self) -> OutboxStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"{self.path}: the outbox store is closed")
        return self._conn


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


# ---------------------------------------------------------------------------------
# The sqlite3 plumbing. Kept identical to twinmesh.bus.inbox_store's copy; the two
# belong in one shared module once a third store appears.


def _open_database(
    path: Path, kind: str, version: int, schema: tuple[str, ...], *, max_bytes: int | None = None
) -> sqlite3.Connection:
    """Open (creating with mode 0600) a store file of `kind`, WAL, synchronous=FULL.

    Raises StorageError naming the file when it cannot be created or opened, is not a
    database, is corrupt, or holds another kind of store or a newer schema.
    """
    _create_private(path)
    try:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=5.0
        )
    except sqlite3.Error as exc:
        raise _storage_error(path, "cannot open the database", exc) from None
    try:
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise StorageError(f"{path}: cannot use a write-ahead log (journal mode {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA journal_size_limit = 16777216")  # shrink the log after bursts
        if max_bytes is not None:
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            conn.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page_size)}")
        _check_schema(conn, path, kind, version, schema)
    except sqlite3.Error as exc:
        conn.close()
        raise _storage_error(path, "cannot open the database", exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _create_private(path: Path) -> None:
    # sqlite3 would create the file 0644; create it ourselves, 0600, and make its
    # directory entry durable. sqlite gives the -wal and -shm files the same mode.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"{path}: not a regular file")
            if st.st_mode & 0o077:
                os.chmod(path, 0o600)
        except OSError as exc:
            raise StorageError(f"{path}: cannot open the database: {exc.strerror}") from None
        return
    except OSError as exc:
        raise StorageError(f"{path}: cannot create the database: {exc.strerror}") from None
    os.close(fd)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StorageError(f"{path}: cannot sync its directory: {exc.strerror}") from None


def _check_schema(
    conn: sqlite3.Connection, path: Path, kind: str, version: int, schema: tuple[str, ...]
) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table'"
        )}
        if not tables:
            for statement in schema:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, ?)", (kind, version))
        elif "schema_version" not in tables:
            raise StorageError(f"{path}: not a {kind} database (no schema_version table)")
        else:
            row = conn.execute("SELECT kind, version FROM schema_version").fetchone()
            if row is None or row[0] != kind:
                found = "nothing" if row is None else row[0]
                raise StorageError(f"{path}: not a {kind} database (holds {found})")
            if row[1] > version:
                raise StorageError(
                    f"{path}: written by a newer twinmesh (schema {row[1]}, "
                    f"this one reads up to {version})"
                )
            # row[1] < version: run the migrations here when version 2 exists.
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any (sqlite already did after some errors)."""
    if conn.in_transaction:
        # If even that fails the connection is unusable; the log still guarantees a
        # consistent file at the next open.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _storage_error(path: Path, doing: str, exc: sqlite3.Error) -> StorageError:
    """One line naming the file: what we were doing and what sqlite said."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return StorageError(f"{path}: corrupt database file ({exc})")
    return StorageError(f"{path}: {doing}: {exc}")
