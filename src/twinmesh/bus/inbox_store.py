"""The twin's durable inbox: exactly-once delivery to the application.

The bus delivers at least once on the wire: a lost ack makes the source NIC send the
same envelope again. The destination twin opens each copy (`twinmesh.bus.crypto`),
then calls `InboxStore.accept`; only when it returns True is the message new, and the
twin hands it to the application. Either way the twin acks the copy, so the sender
stops retrying. The application takes messages with `pending()` and says it is done
with `consume()`; a message accepted but not consumed survives a restart and is
offered again, so nothing acked is ever lost.

Ids are remembered while their message is kept, and after that until `deadline +
grace` (`prune` forgets them): within its deadline a replay is a duplicate; after it,
`accept` refuses it as expired, so the store never needs to remember an id forever.
`grace` covers a clock that steps back a little after a prune. A kept message is its
own dedup memory (its id is unique), so accepting one writes one row; only when
`prune` trims it from the history does its id move to the `seen` table, if its
`deadline + grace` is still ahead.

Consumed messages stay as history (`history(peer)`, for chat views), the newest
`max_history` of them; `prune` trims the rest. At most `max_pending` messages wait
for the application: beyond that `accept` raises StorageError("inbox full") and the
twin answers `overloaded`, so the sender retries later instead of filling the disk.

Durability and errors: one sqlite3 file (mode 0600), write-ahead log, one transaction
per call. Accepting is power safe: `synchronous=FULL`, or without it and then
`twinmesh.group_sync` fsyncs the log (with other twins' logs) before the twin acks;
every other commit survives a kill -9 but skips the fsync (`synchronous=NORMAL`) and
takes microseconds, so the shell calls it directly: a thread hop costs more. A
consumed mark lost to a power cut only offers the message to the application again,
which dedups by id. An application that dedups anyway may say `consume_soon`: the
mark waits in memory and goes into the next accept (or prune) transaction, so a
message it handles costs one transaction here, not two. A full disk, an I/O error,
a read-only or corrupt file raise `StorageError` naming the file, with the
transaction rolled back. Every method may be called from
any thread; a lock serialises them.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinmesh.errors import StorageError
from twinmesh.storage import (
    SqliteStore,
    open_database,
    rollback,
    storage_error,
    synchronous_full,
)

STORE_KIND = "twinmesh-inbox"
SCHEMA_VERSION = 2
DEFAULT_GRACE = 60.0
DEFAULT_MAX_PENDING = 10_000
DEFAULT_MAX_HISTORY = 10_000
# Consumed marks `consume_soon` holds before it writes them in a transaction of their
# own (otherwise they ride with the next accept or prune).
CONSUME_SOON_LIMIT = 256

_U64 = 1 << 64
_I64 = 1 << 63

# The layout a new file gets (version 2). An older file is brought to it by
# `_MIGRATIONS`; never edit a step that has shipped.
# STRICT tables (sqlite >= 3.37) refuse a value of the wrong type at insert.
_SCHEMA = (
    "CREATE TABLE schema_version (kind TEXT NOT NULL, version INTEGER NOT NULL) STRICT",
    # The dedup memory of messages no longer kept: their ids until deadline + grace.
    """CREATE TABLE seen (
        id           BLOB PRIMARY KEY,
        forget_after REAL NOT NULL
    ) STRICT, WITHOUT ROWID""",
    "CREATE INDEX seen_forget ON seen (forget_after)",
    # Accepted messages: pending while consumed_at is NULL, then history.
    """CREATE TABLE messages (
        seq         INTEGER PRIMARY KEY,  -- arrival order
        id          BLOB NOT NULL UNIQUE,
        source      BLOB NOT NULL,
        reply_to    BLOB NOT NULL,
        schema_id   INTEGER NOT NULL,     -- the u64 Cap'n Proto id, stored as i64
        payload     BLOB NOT NULL,
        deadline    REAL NOT NULL,
        received_at REAL NOT NULL,
        consumed_at REAL
    ) STRICT""",
    # Few rows (the pending ones): cheap to keep, and `pending()` needs no scan. The
    # history and per-peer reads walk the table newest first instead: an index for
    # each cost every message an insert into it (and every consume a move), for reads
    # nothing on the message path makes.
    "CREATE INDEX messages_pending ON messages (seq) WHERE consumed_at IS NULL",
)

# Steps from version N to N + 1, run once at open in one transaction.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # Version 1 kept every accepted id in `seen` too, and indexed the history.
    1: (
        "DROP INDEX IF EXISTS messages_history",
        "DROP INDEX IF EXISTS messages_by_source",
        "DELETE FROM seen WHERE id IN (SELECT id FROM messages)",
    ),
}

_CONSUME = "UPDATE messages SET consumed_at = ? WHERE id = ? AND consumed_at IS NULL"
_COLUMNS = "id, source, reply_to, schema_id, payload, deadline, received_at, consumed_at"
# A message row unless its id is known (see `_known`): one statement, whose row count
# says whether it was new.
_INSERT_IF_NEW = (
    f"INSERT INTO messages ({_COLUMNS}) SELECT ?, ?, ?, ?, ?, ?, ?, NULL "
    "WHERE NOT EXISTS (SELECT 1 FROM seen WHERE id = ?) ON CONFLICT (id) DO NOTHING"
)


@dataclass(frozen=True)
class InboxMessage:
    id: bytes
    source: bytes  # the sending twin's raw ed25519 key
    reply_to: bytes  # the id this message answers, or b""
    schema_id: int  # Cap'n Proto type id of the payload (unsigned 64 bits)
    payload: bytes  # the opened payload
    deadline: float
    received_at: float
    consumed_at: float | None  # None while pending


@dataclass(frozen=True)
class IncomingMessage:
    """An opened message to record (`accept_many`)."""

    id: bytes
    source: bytes
    deadline: float
    schema_id: int
    payload: bytes
    reply_to: bytes = b""


class InboxStore(SqliteStore):
    """The inbox of one twin, in one sqlite3 file (created with mode 0600).

    `max_bytes` caps the database file (sqlite `max_page_count`): beyond it a write
    fails as on a full disk. None: only the disk bounds it.
    """

    kind = "inbox"

    def __init__(
        self,
        path: Path,
        *,
        grace: float = DEFAULT_GRACE,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_history: int = DEFAULT_MAX_HISTORY,
        max_bytes: int | None = None,
    ) -> None:
        if grace < 0 or max_pending < 1 or max_history < 0:
            raise ValueError("grace and max_history must be >= 0 and max_pending >= 1")
        super().__init__(
            path, open_database(path, STORE_KIND, SCHEMA_VERSION, _SCHEMA, max_bytes=max_bytes)
        )
        # Immutable after construction.
        self.grace = grace
        self.max_pending = max_pending
        self.max_history = max_history
        # _pending mirrors the number of unconsumed rows (this object is the only
        # writer of the file); like the connection, used only with _lock held.
        assert self._conn is not None
        doing = "cannot upgrade the inbox"
        try:
            _migrate(self._conn)
            doing = "cannot read the inbox"
            (pending,) = self._conn.execute(
                "SELECT count(*) FROM messages WHERE consumed_at IS NULL"
            ).fetchone()
        except sqlite3.Error as exc:
            rollback(self._conn)
            self._conn.close()
            raise storage_error(path, doing, exc) from None
        except BaseException:
            rollback(self._conn)
            self._conn.close()
            raise
        self._pending = int(pending)
        # (consumed at, id) of `consume_soon` marks not written yet; with _lock held.
        self._consume_soon: list[tuple[float, bytes]] = []

    # ------------------------------------------------------------------ write

    def accept(
        self,
        message_id: bytes,
        source: bytes,
        deadline: float,
        schema_id: int,
        payload: bytes,
        now: float,
        reply_to: bytes = b"",
    ) -> bool:
        """Record an opened message durably; True when it is new.

        True: deliver it to the application (it is also in `pending()`), then ack.
        False: do not deliver. Either a duplicate (ack it again) or already past its
        deadline (`now > deadline`: answer `expired`); neither is stored.
        Raises StorageError when `max_pending` messages already wait ("inbox full")
        or the disk or file fails: answer `overloaded`, the sender retries later.
        """
        (answer,) = self.accept_many(
            [IncomingMessage(message_id, source, deadline, schema_id, payload, reply_to)], now)
        if answer is None:
            raise StorageError(
                f"{self.path}: inbox full ({self._pending} messages not yet "
                "consumed by the application)"
            )
        return answer

    def accept_many(self, messages: list[IncomingMessage], now: float, *,
                    power_safe: bool = True) -> list[bool | None]:
        """`accept` for several opened messages in one durable transaction (one fsync
        for a burst instead of one per message), in order: True new, False duplicate
        or expired (as for `accept`), None not stored because `max_pending` messages
        already wait (answer `overloaded`: the sender retries later). Raises
        StorageError when the disk or file fails; then none of them was stored.
        `power_safe=False` skips the fsync: the caller makes the log durable itself
        (`twinmesh.group_sync`) before it acks."""
        answers: list[bool | None] = []
        with self._lock:
            conn = self._connection()
            marks, self._consume_soon = self._consume_soon, []
            try:
                if power_safe:
                    with synchronous_full(conn):
                        pending = self._insert_new(conn, messages, now, answers, marks)
                else:
                    pending = self._insert_new(conn, messages, now, answers, marks)
            except sqlite3.Error as exc:
                rollback(conn)
                self._consume_soon[:0] = marks  # written with the next transaction
                raise storage_error(self.path, "cannot write the inbox", exc) from None
            except BaseException:
                rollback(conn)
                self._consume_soon[:0] = marks
                raise
            self._pending = pending
        return answers

    def _insert_new(self, conn: sqlite3.Connection, messages: list[IncomingMessage],
                    now: float, answers: list[bool | None],
                    marks: list[tuple[float, bytes]]) -> int:
        """`accept_many`'s transaction, which also writes the consumed `marks` first
        (so they free room for these messages); returns the new pending count. A
        single message with no marks (the usual burst at a steady rate) is one
        statement, its own transaction: no BEGIN and COMMIT to run."""
        grouped = len(messages) + len(marks) > 1
        if grouped:
            conn.execute("BEGIN IMMEDIATE")
        pending = self._pending - self._write_marks(conn, marks)
        seen_now: set[bytes] = set()
        for message in messages:
            if not 0 <= message.schema_id < _U64:
                raise ValueError(f"schema id {message.schema_id} is not an "
                                 "unsigned 64-bit integer")
            if now > message.deadline or message.id in seen_now:
                answers.append(False)
                continue
            if pending >= self.max_pending:
                answers.append(False if self._known(conn, message.id) else None)
                continue
            inserted = conn.execute(_INSERT_IF_NEW, (
                message.id, message.source, message.reply_to, _to_i64(message.schema_id),
                message.payload, message.deadline, now, message.id)).rowcount
            if not inserted:
                answers.append(False)
                continue
            seen_now.add(message.id)
            pending += 1
            answers.append(True)
        if grouped:
            conn.execute("COMMIT")
        return pending

    def consume(self, message_id: bytes, now: float) -> bool:
        """The application is done with this message: keep it as history only.

        True when it was pending; False when unknown or already consumed.
        """
        with self._lock:
            conn = self._connection()
            try:
                if self._consume_soon:
                    return self._flush_marks(conn, [(now, message_id)]) > 0
                cursor = conn.execute(_CONSUME, (now, message_id))
            except sqlite3.Error as exc:
                rollback(conn)
                raise storage_error(self.path, "cannot write the inbox", exc) from None
            if cursor.rowcount:
                self._pending -= 1
            return cursor.rowcount > 0

    def consume_soon(self, message_id: bytes, now: float) -> None:
        """`consume`, written with the next `accept_many` or `prune` (or once
        CONSUME_SOON_LIMIT marks wait, or at `flush`/`close`) instead of in a
        transaction of its own. For an application that dedups by id: a mark not
        yet written when the process dies leaves the message pending, so it is
        offered again after the restart. Reads (`pending`, `history`,
        `pending_count`) write the waiting marks first: they never see them pending."""
        with self._lock:
            self._connection()
            self._consume_soon.append((now, message_id))
            if len(self._consume_soon) >= CONSUME_SOON_LIMIT:
                self._flush_locked()

    def flush(self) -> None:
        """Write the `consume_soon` marks that wait (one transaction)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._consume_soon:
            return
        conn = self._connection()
        try:
            self._flush_marks(conn, [])
        except sqlite3.Error as exc:
            rollback(conn)
            raise storage_error(self.path, "cannot write the inbox", exc) from None

    def _flush_marks(self, conn: sqlite3.Connection, more: list[tuple[float, bytes]]) -> int:
        """Write the waiting marks and `more` in one transaction; how many of `more`
        were pending. On failure the waiting marks keep waiting (rolled back)."""
        marks, self._consume_soon = self._consume_soon, []
        try:
            conn.execute("BEGIN IMMEDIATE")
            done = self._write_marks(conn, marks)
            extra = self._write_marks(conn, more)
            conn.execute("COMMIT")
        except BaseException:
            self._consume_soon[:0] = marks
            raise
        self._pending -= done + extra
        return extra

    @staticmethod
    def _write_marks(conn: sqlite3.Connection, marks: list[tuple[float, bytes]]) -> int:
        """Mark these consumed; how many were pending."""
        done = 0
        for mark in marks:
            done += conn.execute(_CONSUME, mark).rowcount
        return done

    def prune(self, now: float) -> int:
        """Forget the ids whose deadline + grace has passed, and the history beyond
        `max_history`. Returns how many ids are no longer remembered (a message still
        kept is remembered, whatever its deadline). Call it now and then."""
        with self._lock:
            conn = self._connection()
            marks, self._consume_soon = self._consume_soon, []
            try:
                conn.execute("BEGIN IMMEDIATE")
                consumed = self._write_marks(conn, marks)
                forgotten = conn.execute(
                    "DELETE FROM seen WHERE forget_after <= ?", (now,)
                ).rowcount
                oldest_kept = conn.execute(
                    "SELECT seq FROM messages WHERE consumed_at IS NOT NULL "
                    "ORDER BY seq DESC LIMIT 1 OFFSET ?", (self.max_history,),
                ).fetchone()
                if oldest_kept is not None:
                    # The trimmed messages' ids stay remembered until deadline + grace.
                    moved = conn.execute(
                        "INSERT OR IGNORE INTO seen (id, forget_after) "
                        "SELECT id, deadline + ? FROM messages WHERE consumed_at IS NOT NULL "
                        "AND seq <= ? AND deadline + ? > ?",
                        (self.grace, oldest_kept[0], self.grace, now),
                    ).rowcount
                    trimmed = conn.execute(
                        "DELETE FROM messages WHERE consumed_at IS NOT NULL AND seq <= ?",
                        (oldest_kept[0],),
                    ).rowcount
                    forgotten += trimmed - moved
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                rollback(conn)
                self._consume_soon[:0] = marks
                raise storage_error(self.path, "cannot write the inbox", exc) from None
            except BaseException:
                rollback(conn)
                self._consume_soon[:0] = marks
                raise
            self._pending -= consumed
            return int(forgotten)

    # ------------------------------------------------------------------- read

    def pending(self, limit: int = 100) -> list[InboxMessage]:
        """Up to `limit` messages accepted but not yet consumed, oldest first."""
        return self._select(
            "WHERE consumed_at IS NULL ORDER BY seq LIMIT ?", (limit,), reverse=False
        )

    def pending_count(self) -> int:
        """How many messages wait for the application."""
        with self._lock:
            self._flush_locked()
            return self._pending

    def history(self, peer: bytes, limit: int = 100) -> list[InboxMessage]:
        """The last `limit` messages from `peer` (pending or consumed), oldest first."""
        return self._select(
            "WHERE source = ? ORDER BY seq DESC LIMIT ?", (peer, limit), reverse=True
        )

    def remembers(self, message_id: bytes) -> bool:
        """True while `message_id` would be refused as a duplicate."""
        with self._lock:
            conn = self._connection()
            try:
                return self._known(conn, message_id)
            except sqlite3.Error as exc:
                raise storage_error(self.path, "cannot read the inbox", exc) from None

    # --------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Write the waiting `consume_soon` marks (if the file lets us), then close."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(StorageError):
                    self._flush_locked()
        super().close()

    @staticmethod
    def _known(conn: sqlite3.Connection, message_id: bytes) -> bool:
        # `messages` for a message kept (pending or history); `seen` for one trimmed
        # from the history within its deadline + grace.
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM seen WHERE id = ?) "
            "OR EXISTS (SELECT 1 FROM messages WHERE id = ?)",
            (message_id, message_id),
        ).fetchone()
        return bool(row[0])

    def _select(self, where: str, args: tuple[Any, ...], *, reverse: bool) -> list[InboxMessage]:
        if args[-1] < 0:
            raise ValueError("limit must be >= 0")
        with self._lock:
            self._flush_locked()
            conn = self._connection()
            try:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM messages {where}", args).fetchall()
            except sqlite3.Error as exc:
                raise storage_error(self.path, "cannot read the inbox", exc) from None
        if reverse:
            rows.reverse()
        return [_message(row) for row in rows]


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file of an older version to SCHEMA_VERSION (`open_database` checked it
    is not newer), keeping every message and every remembered id."""
    (version,) = conn.execute("SELECT version FROM schema_version").fetchone()
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    for step in range(version, SCHEMA_VERSION):
        for statement in _MIGRATIONS[step]:
            conn.execute(statement)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
    conn.execute("COMMIT")


def _to_i64(value: int) -> int:
    return value - _U64 if value >= _I64 else value


def _message(row: tuple[Any, ...]) -> InboxMessage:
    # The STRICT table guarantees the column types.
    id_, source, reply_to, schema_id, payload, deadline, received_at, consumed_at = row
    return InboxMessage(
        id=id_, source=source, reply_to=reply_to, schema_id=schema_id % _U64,
        payload=payload, deadline=deadline, received_at=received_at,
        consumed_at=consumed_at,
    )
