"""sqlite3 stores: one way to open, check, and fail (the outbox, the inbox, ...).

Every store is one file created with mode 0600, in WAL mode, with a `schema_version`
table naming the kind of store and its version. Commits run with synchronous=NORMAL
(one that returned survives kill -9, no fsync: tens of microseconds, so the trio
shells call them inline); the commits that must also survive a power cut say so
(`synchronous_full`, or `twinmesh.group_sync` after the commit) and run their fsync
off the event loop unless fsyncs are quick (`twinmesh.commit_placement`). Every failure
becomes a one-line StorageError naming the file; a failed transaction is rolled back
so the store stays usable.

A store file belongs to one connection of one daemon (which holds its state dir's
lock), so by default it is opened in sqlite's exclusive locking mode: the lock is
taken once at open and held until close, and the log's index lives in the process's
memory (no -shm file). In the shared mode every transaction paid ~12 fcntl lock calls
and touched the mmap'ed -shm index: ~7 µs of CPU per commit and read (measured),
several of each per message.
A second open of the file fails at once ("locked"); a kill -9 releases the lock (the
kernel drops it with the process) and the next open replays the log. A store that
others must read while its owner runs says `exclusive=False`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from twinmesh.errors import StorageError

T = TypeVar("T")

SHARED_BUSY_TIMEOUT = 5.0  # s a shared-mode connection waits for another's transaction



class SqliteStore:
    """What every store shares: one connection, used only under one lock (calls come
    from the event loop and, for fsync'ed commits, from worker threads), closed once.
    Subclasses open it."""

    kind = "store"  # named in errors: "the outbox store is closed"

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path  # immutable after construction
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = conn  # None once closed

    def close(self) -> None:
        """Close the file (idempotent). Later calls raise StorageError."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        """The open connection; call with `_lock` held."""
        if self._conn is None:
            raise StorageError(f"{self.path}: the {self.kind} store is closed")
        return self._conn

    def _write(self, doing: str, run: Callable[[sqlite3.Connection], T], *,
               power_safe: bool = False) -> T:
        """`run` in one transaction; StorageError("cannot {doing}") on failure, rolled
        back. `power_safe=True` makes this one commit synchronous=FULL (an fsync)."""
        with self._lock:
            conn = self._connection()
            try:
                if power_safe:
                    with synchronous_full(conn):
                        result = _transaction(conn, run)
                else:  # the usual case: no context manager to enter
                    result = _transaction(conn, run)
            except sqlite3.Error as exc:
                rollback(conn)
                raise storage_error(self.path, f"cannot {doing}", exc) from None
            except BaseException:
                rollback(conn)
                raise
            return result

    def _execute(self, doing: str, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """One statement, its own transaction (sqlite's autocommit): what `_write`
        does for a one-statement `run`, without the BEGIN and COMMIT round trips.
        StorageError("cannot {doing}") on failure; nothing is left half done."""
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(sql, args)
            except sqlite3.Error as exc:
                rollback(conn)
                raise storage_error(self.path, f"cannot {doing}", exc) from None

    def _read(self, doing: str, run: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._connection()
            try:
                return run(conn)
            except sqlite3.Error as exc:
                raise storage_error(self.path, f"cannot {doing}", exc) from None


def _transaction(conn: sqlite3.Connection, run: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    result = run(conn)
    conn.execute("COMMIT")
    return result


def open_database(
    path: Path, kind: str, version: int, schema: tuple[str, ...], *,
    max_bytes: int | None = None, exclusive: bool = True, page_size: int | None = None,
) -> sqlite3.Connection:
    """Open (creating with mode 0600) a store file of `kind`, WAL, synchronous=NORMAL:
    a commit survives the process being killed (the log is in the kernel's cache), but
    the last ones may be lost if the machine loses power unless made power safe.

    `exclusive` (the default): this connection is the only one until it is closed (see
    the module docstring); False lets other connections, in this process or others,
    read and write the file meanwhile, at the cost of locking every transaction.
    `page_size` (a power of two, 512-65536) applies to a file this call creates; an
    existing file keeps the page size it was created with.

    Raises StorageError naming the file when it cannot be created or opened, is held
    by another connection, is not a database, is corrupt, or holds another kind of
    store or a newer schema.
    """
    _create_private(path)
    try:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False,
            # Exclusive: nobody else may hold the file, waiting only delays the error.
            timeout=0.0 if exclusive else SHARED_BUSY_TIMEOUT,
        )
    except sqlite3.Error as exc:
        raise storage_error(path, "cannot open the database", exc) from None
    try:
        if page_size is not None:
            # Only an empty file takes it, and only before it is put in WAL mode.
            conn.execute(f"PRAGMA page_size = {int(page_size)}")
        if exclusive:
            # Before the first read: sqlite keeps the log's index in heap memory only
            # if the connection is exclusive when it first opens the log.
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise StorageError(f"{path}: cannot use a write-ahead log (journal mode {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 16777216")  # shrink the log after bursts
        if max_bytes is not None:
            (page,) = conn.execute("PRAGMA page_size").fetchone()
            conn.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page)}")
        _check_schema(conn, path, kind, version, schema)
    except sqlite3.Error as exc:
        conn.close()
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_BUSY":
            raise StorageError(
                f"{path}: cannot open the database: it is locked (another process, or "
                "another connection of this one, holds this store)") from None
        raise storage_error(path, "cannot open the database", exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _create_private(path: Path) -> None:
    # sqlite3 would create the file 0644; create it ourselves, 0600, and make its
    # directory entry durable. sqlite gives the -wal (and, shared, -shm) files the
    # same mode.
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
            # row[1] < version: the store migrates it once open (see inbox_store._migrate).
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


@contextlib.contextmanager
def synchronous_full(conn: sqlite3.Connection, enabled: bool = True) -> Iterator[None]:
    """Commits inside are power safe (fsync); `enabled=False` changes nothing."""
    if not enabled:
        yield
        return
    conn.execute("PRAGMA synchronous = FULL")
    try:
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA synchronous = NORMAL")


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any (sqlite already did after some errors)."""
    if conn.in_transaction:
        # If even that fails the connection is unusable; the log still guarantees a
        # consistent file at the next open.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def storage_error(path: Path, doing: str, exc: sqlite3.Error) -> StorageError:
    """One line naming the file: what we were doing and what sqlite said."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return StorageError(f"{path}: corrupt database file ({exc})")
    return StorageError(f"{path}: {doing}: {exc}")
