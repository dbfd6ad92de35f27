"""What a twin keeps about its user: conversations, contacts, settings, and the
messages it sealed while no NIC would take them.

One sqlite3 file in the twin's state dir (`twinmesh.storage`: mode 0600, WAL, one
transaction per call, StorageError naming the file on any failure). Every commit
survives a kill -9 of twind; only a commit that records a waiting envelope (the one
copy of an accepted message) is also made power safe (synchronous=FULL): history,
statuses and contacts skip that fsync, which is most of the cost of a chat message.
Without the fsync a call takes tens of microseconds, so the twin calls them directly
on its event loop; only `add_chat` with a waiting envelope goes to a worker thread.
(Measured at scale: with a thread hop per call, GIL hand-offs between the loop and
the workers were most of twind's CPU.)

A chat message the user sends while no NIC takes it is written here, with its sealed
envelope, before twind answers: if the NIC is down the envelope waits in `waiting`
and is handed over when a NIC is back, so nothing the user sent is lost to a NIC
restart or a twind crash. Bounded: `max_waiting` envelopes (then `overloaded`) and
the newest `max_history` chat entries.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinmesh.errors import StorageError
from twinmesh.storage import SqliteStore, open_database

STORE_KIND = "twinmesh-twin"
SCHEMA_VERSION = 1
DEFAULT_MAX_WAITING = 10_000
DEFAULT_MAX_HISTORY = 100_000

# Version 1; a later version adds a migration in storage._check_schema. Never edit these.
_SCHEMA = (
    "CREATE TABLE schema_version (kind TEXT NOT NULL, version INTEGER NOT NULL) STRICT",
    """CREATE TABLE chat (
        seq      INTEGER PRIMARY KEY,
        id       BLOB NOT NULL UNIQUE,
        peer     BLOB NOT NULL,
        outgoing INTEGER NOT NULL,
        text     TEXT NOT NULL,
        at       REAL NOT NULL,
        status   TEXT NOT NULL,
        code     TEXT NOT NULL
    ) STRICT""",
    "CREATE INDEX chat_by_peer ON chat (peer, seq)",
    # Sealed envelopes no NIC has accepted yet, oldest first.
    """CREATE TABLE waiting (
        seq          INTEGER PRIMARY KEY,
        id           BLOB NOT NULL UNIQUE,
        envelope     BLOB NOT NULL,
        payload_size INTEGER NOT NULL,
        deadline     REAL NOT NULL
    ) STRICT""",
    """CREATE TABLE contacts (
        twin  BLOB PRIMARY KEY,
        name  TEXT NOT NULL,
        state TEXT NOT NULL,   -- accepted, requested (we asked), pending (they asked)
        since REAL NOT NULL
    ) STRICT, WITHOUT ROWID""",
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT, WITHOUT ROWID",
)

_CHAT = "id, peer, outgoing, text, at, status, code"
_INSERT_CHAT = f"INSERT OR IGNORE INTO chat ({_CHAT}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_FINAL = frozenset(("delivered", "expired", "failed"))
_STOPS_WAITING = frozenset(("expired", "failed"))
_UPDATE_STATUS = (
    "UPDATE chat SET status = ?, code = ? WHERE id = ? AND outgoing = 1 "
    "AND status NOT IN ('delivered', 'expired', 'failed') AND NOT (status = ? AND code = ?)"
)
TRIMS_PER_HISTORY = 64  # the history is trimmed every max_history / 64 entries


@dataclass(frozen=True)
class ChatRow:
    id: bytes
    peer: bytes
    outgoing: bool
    text: str
    at: float
    status: str
    code: str


@dataclass(frozen=True)
class WaitingRow:
    id: bytes
    envelope: bytes
    payload_size: int
    deadline: float


@dataclass(frozen=True)
class ContactRow:
    twin: bytes
    name: str
    state: str
    since: float


class TwinStore(SqliteStore):
    kind = "twin"

    def __init__(self, path: Path, *, max_waiting: int = DEFAULT_MAX_WAITING,
                 max_history: int = DEFAULT_MAX_HISTORY) -> None:
        # Exclusive (twinmesh.storage): only twind reads it while it runs; others ask
        # twind (the `inbox` request). Shared, every message paid ~18 fcntl calls.
        super().__init__(path, open_database(path, STORE_KIND, SCHEMA_VERSION, _SCHEMA))
        self.max_waiting = max_waiting
        self.max_history = max_history
        self._trim_every = max(1, max_history // TRIMS_PER_HISTORY)
        self._untrimmed = self._trim_every - 1  # the first entry trims (max_history may be new)

    # ------------------------------------------------------------------ chat

    def add_chat(self, row: ChatRow, waiting: WaitingRow | None = None) -> bool:
        """Record a chat entry (and the envelope that carries it, until a NIC takes it).
        False when that id is already recorded (a message delivered twice). Raises
        StorageError("... full") when `max_waiting` envelopes already wait."""
        values = (row.id, row.peer, int(row.outgoing), row.text, row.at, row.status, row.code)
        if waiting is None:
            # The usual case: one statement, its own transaction.
            if not self._execute("record a chat message", _INSERT_CHAT, values).rowcount:
                return False
            self._trim_history()
            return True

        def run(conn: sqlite3.Connection) -> bool:
            (count,) = conn.execute("SELECT count(*) FROM waiting").fetchone()
            if count >= self.max_waiting:
                raise StorageError(f"{self.path}: {count} messages already wait for a "
                                   f"NIC (limit {self.max_waiting}): full")
            if conn.execute(_INSERT_CHAT, values).rowcount == 0:
                return False
            conn.execute(
                "INSERT INTO waiting (id, envelope, payload_size, deadline) "
                "VALUES (?, ?, ?, ?)",
                (waiting.id, waiting.envelope, waiting.payload_size, waiting.deadline))
            return True

        if not self._write("record a chat message", run, power_safe=True):
            return False
        self._trim_history()
        return True

    def _trim_history(self) -> None:
        # Every `_trim_every` entries rather than with each (a statement per message
        # saved); between trims the history holds up to that many more. Best effort:
        # a trim that fails is tried again with the next entry.
        self._untrimmed += 1
        if self._untrimmed < self._trim_every:
            return
        with contextlib.suppress(StorageError):
            self._execute("trim the chat history",
                          "DELETE FROM chat WHERE seq <= (SELECT max(seq) FROM chat) - ?",
                          (self.max_history,))
            self._untrimmed = 0

    def set_status(self, changes: Iterable[tuple[bytes, str, str]]) -> list[bytes]:
        """Apply (id, status, code) changes to outgoing entries; a final status
        (delivered, expired, failed) is never overwritten by an earlier one. Returns
        the ids that changed. Several changes of one message (`sent`, then
        `delivered`) are written once, as `collapse_statuses` folds them."""
        changes = list(changes)
        folded = collapse_statuses(changes)
        stops = {message_id for message_id, status, _ in changes if status in _STOPS_WAITING}
        if len(folded) == 1 and not stops:  # one statement, its own transaction
            ((message_id, (status, code)),) = folded.items()
            cursor = self._execute("update message statuses", _UPDATE_STATUS,
                                   (status, code, message_id, status, code))
            return [message_id] if cursor.rowcount else []

        def run(conn: sqlite3.Connection) -> list[bytes]:
            changed = []
            for message_id, (status, code) in folded.items():
                cursor = conn.execute(_UPDATE_STATUS, (status, code, message_id, status, code))
                if cursor.rowcount:
                    changed.append(message_id)
                if message_id in stops:
                    conn.execute("DELETE FROM waiting WHERE id = ?", (message_id,))
            return changed

        return self._write("update message statuses", run)

    def handed_over(self, message_id: bytes) -> None:
        """A NIC stored the envelope durably: it no longer waits here."""
        self._write("forget a handed-over envelope", lambda conn: conn.execute(
            "DELETE FROM waiting WHERE id = ?", (message_id,)))

    def waiting(self, limit: int = 1000) -> list[WaitingRow]:
        rows = self._read("read waiting envelopes", lambda conn: conn.execute(
            "SELECT id, envelope, payload_size, deadline FROM waiting ORDER BY seq LIMIT ?",
            (limit,)).fetchall())
        return [WaitingRow(*row) for row in rows]

    def waiting_count(self) -> int:
        (count,) = self._read("count waiting envelopes", lambda conn: conn.execute(
            "SELECT count(*) FROM waiting").fetchone())
        return int(count)

    def chat(self, peer: bytes | None = None, limit: int = 50) -> list[ChatRow]:
        """The newest `limit` entries (of one conversation), oldest first."""
        def run(conn: sqlite3.Connection) -> list[Any]:
            if peer is None:
                return conn.execute(f"SELECT {_CHAT} FROM chat ORDER BY seq DESC LIMIT ?",
                                    (limit,)).fetchall()
            return conn.execute(
                f"SELECT {_CHAT} FROM chat WHERE peer = ? ORDER BY seq DESC LIMIT ?",
                (peer, limit)).fetchall()

        rows = self._read("read the chat history", run)
        return [_chat_row(row) for row in reversed(rows)]

    def chat_since(self, since: float, peer: bytes | None = None, limit: int = 50
                   ) -> list[ChatRow]:
        """The first `limit` entries (of one conversation) recorded at or after `since`
        (unix seconds), in the order of their times: to read on, ask again from the
        last one's time (the entries of that very time come again)."""
        def run(conn: sqlite3.Connection) -> list[Any]:
            if peer is None:
                return conn.execute(
                    f"SELECT {_CHAT} FROM chat WHERE at >= ? ORDER BY at, seq LIMIT ?",
                    (since, limit)).fetchall()
            return conn.execute(
                f"SELECT {_CHAT} FROM chat WHERE peer = ? AND at >= ? ORDER BY at, seq "
                "LIMIT ?", (peer, since, limit)).fetchall()

        return [_chat_row(row) for row in self._read("read the chat history", run)]

    def chat_entry(self, message_id: bytes) -> ChatRow | None:
        row = self._read("read a chat message", lambda conn: conn.execute(
            f"SELECT {_CHAT} FROM chat WHERE id = ?", (message_id,)).fetchone())
        return None if row is None else _chat_row(row)

    def unread(self) -> int:
        """Incoming entries after the last `mark_read`."""
        last = int(self.setting("read_seq", "0"))
        (count,) = self._read("count unread messages", lambda conn: conn.execute(
            "SELECT count(*) FROM chat WHERE outgoing = 0 AND seq > ?", (last,)).fetchone())
        return int(count)

    def mark_read(self) -> None:
        def run(conn: sqlite3.Connection) -> None:
            (seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM chat").fetchone()
            conn.execute("INSERT OR REPLACE INTO settings VALUES ('read_seq', ?)", (str(seq),))

        self._write("mark messages read", run)

    # -------------------------------------------------------------- contacts

    def contact(self, twin: bytes) -> ContactRow | None:
        row = self._read("read a contact", lambda conn: conn.execute(
            "SELECT twin, name, state, since FROM contacts WHERE twin = ?",
            (twin,)).fetchone())
        return None if row is None else ContactRow(*row)

    def contacts(self) -> list[ContactRow]:
        rows = self._read("read contacts", lambda conn: conn.execute(
            "SELECT twin, name, state, since FROM contacts ORDER BY name, twin").fetchall())
        return [ContactRow(*row) for row in rows]

    def put_contact(self, row: ContactRow) -> None:
        self._write("save a contact", lambda conn: conn.execute(
            "INSERT OR REPLACE INTO contacts VALUES (?, ?, ?, ?)",
            (row.twin, row.name, row.state, row.since)))

    def remove_contact(self, twin: bytes) -> bool:
        cursor = self._write("remove a contact", lambda conn: conn.execute(
            "DELETE FROM contacts WHERE twin = ?", (twin,)))
        return bool(cursor.rowcount)

    # -------------------------------------------------------------- settings

    def setting(self, key: str, default: str = "") -> str:
        row = self._read("read a setting", lambda conn: conn.execute(
            "SELECT value FROM settings WHERE key = ?", (key,)).fetchone())
        return default if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        self._write("save a setting", lambda conn: conn.execute(
            "INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value)))


def collapse_statuses(changes: Iterable[tuple[bytes, str, str]]
                      ) -> dict[bytes, tuple[str, str]]:
    """Each message's status after `changes` in order, as `set_status` applies them:
    the first final status stays; before one, the latest wins."""
    folded: dict[bytes, tuple[str, str]] = {}
    for message_id, status, code in changes:
        current = folded.get(message_id)
        if current is None or current[0] not in _FINAL:
            folded[message_id] = (status, code)
    return folded


def _chat_row(row: Any) -> ChatRow:
    id_, peer, outgoing, text, at, status, code = row
    return ChatRow(bytes(id_), bytes(peer), bool(outgoing), str(text), float(at), str(status),
                   str(code))
