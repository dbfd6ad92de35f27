"""open_database: one owner per store file (exclusive locking) unless asked to share;
a second opener is told at once, naming the file; kill -9 of the owner frees it."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from twinmesh.errors import StorageError
from twinmesh.storage import open_database

KIND = "twinmesh-test"
SCHEMA = (
    "CREATE TABLE schema_version (kind TEXT NOT NULL, version INTEGER NOT NULL) STRICT",
    "CREATE TABLE t (x INTEGER NOT NULL) STRICT",
)

# Opens the store in another process, then reports what happened on stdout.
OPENER = """
import sys
from pathlib import Path
from twinmesh.errors import StorageError
from twinmesh.storage import open_database

try:
    conn = open_database(Path(sys.argv[1]), "twinmesh-test", 1, ())
except StorageError as exc:
    print(exc)
else:
    print("opened", conn.execute("SELECT count(*) FROM t").fetchone()[0])
"""

# Owns the store and keeps committing until killed; prints each committed value.
OWNER = """
import sys
from pathlib import Path
from twinmesh.storage import open_database

conn = open_database(Path(sys.argv[1]), "twinmesh-test", 1, (
    "CREATE TABLE schema_version (kind TEXT NOT NULL, version INTEGER NOT NULL) STRICT",
    "CREATE TABLE t (x INTEGER NOT NULL) STRICT",
))
n = 0
while True:
    conn.execute("INSERT INTO t VALUES (?)", (n,))
    print(n, flush=True)
    n += 1
"""


def _open(path: Path, *, exclusive: bool = True) -> sqlite3.Connection:
    return open_database(path, KIND, 1, SCHEMA, exclusive=exclusive)


def _in_another_process(script: str, path: Path) -> str:
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_a_second_open_is_refused_at_once_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    owner = _open(path)
    try:
        owner.execute("INSERT INTO t VALUES (1)")
        locked = rf"^{re.escape(str(path))}: cannot open the database: it is locked \("
        with pytest.raises(StorageError, match=locked) as info:
            _open(path)
        assert "\n" not in str(info.value)
        # The failed attempt left the owner's lock alone: another process is refused
        # too, and the owner goes on committing.
        assert re.match(locked, _in_another_process(OPENER, path))
        owner.execute("INSERT INTO t VALUES (2)")
        assert owner.execute("SELECT x FROM t").fetchall() == [(1,), (2,)]
    finally:
        owner.close()
    # Closed: the lock is gone.
    assert _in_another_process(OPENER, path) == "opened 2"


def test_the_log_index_stays_in_memory_no_shm_file(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    conn = _open(path)
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        assert Path(f"{path}-wal").exists()
        assert not Path(f"{path}-shm").exists()
        assert conn.execute("PRAGMA locking_mode").fetchone() == ("exclusive",)
    finally:
        conn.close()


def test_shared_stores_can_be_read_while_open(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    conn = _open(path, exclusive=False)
    try:
        conn.execute("INSERT INTO t VALUES (7)")
        assert _in_another_process(
            "import sqlite3, sys\n"
            "c = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True)\n"
            "print(c.execute('SELECT x FROM t').fetchall())", path) == "[(7,)]"
        # Another shared connection may open it too; an exclusive one may not.
        _open(path, exclusive=False).close()
        with pytest.raises(StorageError, match="it is locked"):
            _open(path)
    finally:
        conn.close()


def test_kill_9_of_the_owner_frees_the_store_and_keeps_its_commits(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        for _ in range(50):
            line = proc.stdout.readline()
            assert line, f"owner died: {proc.stderr.read().decode()}"
        with pytest.raises(StorageError, match="it is locked"):
            _open(path)
    finally:
        proc.kill()  # SIGKILL: no close, the log is left to replay
        rest = proc.stdout.read()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    printed = 50 + len(rest.split())
    conn = _open(path)
    try:
        (count,) = conn.execute("SELECT count(*) FROM t").fetchone()
        assert count in (printed, printed + 1)  # the one in flight may be there too
        assert conn.execute("SELECT x FROM t ORDER BY rowid LIMIT 3").fetchall() == [
            (0,), (1,), (2,)]
    finally:
        conn.close()
