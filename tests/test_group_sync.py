"""GroupSync: many stores' fsyncs in few rounds; a failing file is named, the others
in its round still return; rounds run on the loop while the disk is quick."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import trio

from twinmesh import group_sync
from twinmesh.commit_placement import INLINE_MAX_ITEMS
from twinmesh.errors import StorageError
from twinmesh.group_sync import GroupSync

# Every round inline (no disk is that slow), or every round in a thread.
PLACEMENTS = pytest.mark.parametrize("inline_bound", [float("inf"), None],
                                     ids=["inline", "thread"])


def _wal_database(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE t (x INTEGER)")
    return conn


@PLACEMENTS
async def test_concurrent_callers_share_rounds(tmp_path: Path, inline_bound: float | None
                                               ) -> None:
    # As many as a round may hold and still run on the loop.
    paths = [tmp_path / f"store-{i}.sqlite3" for i in range(INLINE_MAX_ITEMS)]
    conns = [_wal_database(p) for p in paths]
    try:
        for conn in conns:
            conn.execute("INSERT INTO t VALUES (1)")
        group = GroupSync(inline_bound=inline_bound)
        returned: list[Path] = []

        async def one(path: Path) -> None:
            await group.sync(path)
            returned.append(path)

        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(one, path)
        assert sorted(returned) == sorted(paths)
        # Callers that ask while a round is being set up or runs share one: at most
        # 2 rounds (the first may run alone).
        assert group.files == len(paths)
        assert group.rounds <= 2
        assert group.inline_rounds == (group.rounds if inline_bound else 0)
    finally:
        for conn in conns:
            conn.close()


@PLACEMENTS
async def test_a_file_that_cannot_be_synced_is_named_and_the_others_return(
        tmp_path: Path, inline_bound: float | None) -> None:
    good = tmp_path / "good.sqlite3"
    conn = _wal_database(good)
    missing = tmp_path / "gone" / "inbox.sqlite3"  # no log file: open fails
    group = GroupSync(inline_bound=inline_bound)
    outcomes: dict[str, str] = {}

    async def one(name: str, path: Path) -> None:
        try:
            await group.sync(path)
            outcomes[name] = "ok"
        except StorageError as exc:
            outcomes[name] = str(exc)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "first", good)
            nursery.start_soon(one, "good", good)
            nursery.start_soon(one, "missing", missing)
    finally:
        conn.close()
    assert outcomes["first"] == outcomes["good"] == "ok"
    assert outcomes["missing"].startswith(f"{missing}: cannot make the commit durable:")
    assert "\n" not in outcomes["missing"]


@PLACEMENTS
async def test_later_callers_are_not_answered_by_an_earlier_round(
        tmp_path: Path, inline_bound: float | None) -> None:
    path = tmp_path / "store.sqlite3"
    conn = _wal_database(path)
    group = GroupSync(inline_bound=inline_bound)
    try:
        await group.sync(path)
        (path.parent / "store.sqlite3-wal").rename(tmp_path / "moved")
        # A new round runs for the new call (and sees the log is gone).
        with pytest.raises(StorageError, match="cannot make the commit durable"):
            await group.sync(path)
        assert group.rounds == 2
    finally:
        conn.close()


async def test_rounds_go_to_the_worker_thread_while_it_runs(tmp_path: Path) -> None:
    paths = [tmp_path / f"store-{i}.sqlite3" for i in range(20)]
    conns = [_wal_database(p) for p in paths]
    missing = tmp_path / "gone" / "inbox.sqlite3"
    group = GroupSync(inline_bound=None)  # every round in a thread
    returned: list[Path] = []
    refused: list[str] = []

    async def one(path: Path) -> None:
        try:
            await group.sync(path)
            returned.append(path)
        except StorageError as exc:
            refused.append(str(exc))

    try:
        async with trio.open_nursery() as daemon:
            await daemon.start(group.run)
            with pytest.raises(RuntimeError, match="already running"):
                await group.run()
            for conn in conns:
                conn.execute("INSERT INTO t VALUES (1)")
            async with trio.open_nursery() as nursery:
                for path in [*paths, missing]:
                    nursery.start_soon(one, path)
            # One after another, too: each round is answered, none mixed up.
            for path in paths[:3]:
                await one(path)
            daemon.cancel_scope.cancel()
        # The worker is gone: rounds take a thread of their own again.
        await one(paths[0])
    finally:
        for conn in conns:
            conn.close()
    assert sorted(returned) == sorted([*paths, *paths[:3], paths[0]])
    assert len(refused) == 1 and refused[0].startswith(f"{missing}: cannot make the commit")
    assert group.files == 25
    assert group.rounds <= 2 + 4
    assert group.inline_rounds == 0


async def test_a_round_under_way_when_the_daemon_stops_still_finishes(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    conn = _wal_database(path)
    group = GroupSync(inline_bound=None)
    done: list[str] = []

    async def caller() -> None:
        await group.sync(path)  # the round is not abandoned by the cancel
        done.append("synced")

    try:
        async with trio.open_nursery() as daemon:
            await daemon.start(group.run)
            conn.execute("INSERT INTO t VALUES (1)")
            daemon.start_soon(caller)
            worker = group._worker  # white box: cancel while the thread has the round
            assert worker is not None
            while not worker._in_round:
                await trio.lowlevel.checkpoint()
            daemon.cancel_scope.cancel()
    finally:
        conn.close()
    assert done == ["synced"]
    assert group.rounds == 1


async def test_rounds_run_inline_while_the_worker_runs_if_the_disk_is_quick(
        tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    conn = _wal_database(path)
    group = GroupSync(inline_bound=float("inf"))
    try:
        async with trio.open_nursery() as daemon:
            await daemon.start(group.run)
            for n in range(3):
                conn.execute("INSERT INTO t VALUES (?)", (n,))
                await group.sync(path)
            daemon.cancel_scope.cancel()
    finally:
        conn.close()
    assert group.rounds == group.inline_rounds == 3



def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@PLACEMENTS
async def test_logs_stay_open_between_rounds_while_it_runs_and_close_after(
        tmp_path: Path, inline_bound: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "store.sqlite3"
    conn = _wal_database(path)
    group = GroupSync(inline_bound=inline_bound)
    opened: list[str] = []
    real_open = os.open

    def recording_open(file: str, *args: int) -> int:
        opened.append(str(file))
        return real_open(file, *args)

    monkeypatch.setattr(os, "open", recording_open)
    try:
        async with trio.open_nursery() as daemon:
            await daemon.start(group.run)
            conn.execute("INSERT INTO t VALUES (0)")
            await group.sync(path)
            fds, opens = _open_fds(), len(opened)
            for n in range(1, 6):
                conn.execute("INSERT INTO t VALUES (?)", (n,))
                await group.sync(path)
                assert _open_fds() == fds  # nothing left open per round
            assert len(opened) == opens  # nor opened: the log's descriptor was kept
            assert group.open_logs == 1
            daemon.cancel_scope.cancel()
        assert group.open_logs == 0  # `run` ended: nothing held
        await group.sync(path)  # alone, a round opens and closes the log again
        assert group.open_logs == 0
    finally:
        conn.close()
    assert group.rounds == 7


async def test_the_logs_kept_open_are_bounded(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_sync, "MAX_OPEN_LOGS", 2)
    paths = [tmp_path / f"store-{i}.sqlite3" for i in range(5)]
    conns = [_wal_database(p) for p in paths]
    group = GroupSync(inline_bound=float("inf"))
    try:
        async with trio.open_nursery() as daemon:
            await daemon.start(group.run)
            for conn, path in zip(conns, paths, strict=True):
                conn.execute("INSERT INTO t VALUES (1)")
                await group.sync(path)
                assert group.open_logs <= 2
            # The least recently synced went first; syncing it again still works.
            await group.sync(paths[0])
            assert group.open_logs == 2
            daemon.cancel_scope.cancel()
    finally:
        for conn in conns:
            conn.close()


@PLACEMENTS
async def test_a_store_reopened_between_rounds_gets_its_new_log_synced(
        tmp_path: Path, inline_bound: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store closing deletes its log; the next one creates another file under the
    same name. The descriptor kept for the old file must not answer for the new."""
    path = tmp_path / "store.sqlite3"
    wal = tmp_path / "store.sqlite3-wal"
    synced: list[int] = []  # inode of each file fdatasynced
    real_fdatasync = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    group = GroupSync(inline_bound=inline_bound)
    async with trio.open_nursery() as daemon:
        await daemon.start(group.run)
        conn = _wal_database(path)
        conn.execute("INSERT INTO t VALUES (1)")
        await group.sync(path)
        old_log = wal.stat().st_ino
        assert synced[-1] == old_log
        conn.close()  # checkpointed into the database, log deleted
        assert not wal.exists()
        with pytest.raises(StorageError, match="cannot make the commit durable"):
            await group.sync(path)  # no log to sync is said, not papered over
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("INSERT INTO t VALUES (2)")
            await group.sync(path)
            assert synced[-1] == wal.stat().st_ino  # the new log, not the old file
            # A log replaced while its descriptor is held (no failed round between).
            await group.sync(path)
            held = synced[-1]
            conn.close()
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("INSERT INTO t VALUES (3)")
            assert wal.stat().st_ino != held
            await group.sync(path)
            assert synced[-1] == wal.stat().st_ino
        finally:
            conn.close()
        daemon.cancel_scope.cancel()
