"""Group commit across sqlite stores: one fsync round for many files.

A twind hosting hundreds of twins keeps one inbox file per twin. Accepting a message
must be power safe before it is acked, and with `synchronous=FULL` every twin paid
its own fsync in its own worker-thread hop; at a few hundred messages a second the
hand-offs between the event loop and those threads (GIL and futex traffic) cost more
CPU than everything else twind did.

Instead a store commits without the fsync (`synchronous=NORMAL`, still kill -9 safe)
and the caller awaits `GroupSync.sync(path)` before acking. The first caller of a
round leads it: it takes every file that asked meanwhile and fdatasyncs their
write-ahead logs in one worker thread, then the others of that round return. While a
round runs, the next one collects. A file's log (and, the first time, its directory)
on disk after `sync` returns is what FULL would have given at commit.

Sans-I/O is not possible here (this is the I/O); the logic is small on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from twinmesh.errors import StorageError

KEEP_ROUNDS = 64  # answers kept for callers of a round still waiting for the lock


class GroupSync:
    def __init__(self) -> None:
        self._lock = trio.Lock()  # FIFO: the callers of a round queue before the next
        self._pending: set[Path] = set()
        self._round = 0  # the round now collecting
        self._done = -1  # the last round that finished
        self._failed: dict[int, dict[Path, str]] = {}
        self._dirs_synced: set[Path] = set()  # touched only by the round's thread
        self.rounds = 0
        self.files = 0

    async def sync(self, path: Path) -> None:
        """Return once `path`'s write-ahead log, as committed before this call, is on
        disk. Raises StorageError naming the file when the disk refuses."""
        ticket = self._round
        self._pending.add(path)
        async with self._lock:
            if self._done < ticket:
                batch, self._pending = self._pending, set()
                self._round += 1
                # Not abandoned on cancel: the round finishes for everyone in it.
                failed = await trio.to_thread.run_sync(self._sync_files, batch)
                self._failed[ticket] = failed
                self._done = ticket
                self._failed.pop(ticket - KEEP_ROUNDS, None)
                self.rounds += 1
                self.files += len(batch)
            error = self._failed.get(ticket, {}).get(path)
        if error is not None:
            raise StorageError(error)

    def _sync_files(self, paths: set[Path]) -> dict[Path, str]:
        failed: dict[Path, str] = {}
        for path in paths:
            try:
                _fdatasync(Path(f"{path}-wal"))
                if path.parent not in self._dirs_synced:
                    # The log file's directory entry too, once (sqlite's FULL does).
                    _fdatasync(path.parent, directory=True)
                    self._dirs_synced.add(path.parent)
            except OSError as exc:
                failed[path] = (f"{path}: cannot make the commit durable: "
                                f"{exc.strerror or exc}")
        return failed


def _fdatasync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        if directory:
            os.fsync(fd)
        else:
            os.fdatasync(fd)
    finally:
        os.close(fd)
