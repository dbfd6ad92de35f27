"""Group commit across sqlite stores: one fsync round for many files.

A twind hosting hundreds of twins keeps one inbox file per twin. Accepting a message
must be power safe before it is acked, and with `synchronous=FULL` every twin paid
its own fsync in its own worker-thread hop; at a few hundred messages a second the
hand-offs between the event loop and those threads (GIL and futex traffic) cost more
CPU than everything else twind did.

Instead a store commits without the fsync (`synchronous=NORMAL`, still kill -9 safe)
and the caller awaits `GroupSync.sync(path)` before acking. The first caller of a
round leads it: it takes every file that asked meanwhile and fdatasyncs their
write-ahead logs (in one worker thread, or inline: below), then the others of that
round return. While a round runs, the next one collects. A file's log (and, the first
time, its directory) on disk after `sync` returns is what FULL would have given at
commit.

The thread: `run()` is a task (start it in the daemon's nursery) that keeps one
worker thread for as long as it runs, taken with `trio.to_thread` and ended when the
task is cancelled (structured: no thread outlives its nursery). A round is handed to
it on a queue and it answers by writing a byte to a pipe the leader waits on in
trio: one wake-up of the event loop per round. Measured on the 2-core VM with rounds
of one file: ~90 µs of CPU per round on top of the fdatasync itself, against ~260 µs
for a `trio.to_thread.run_sync` per round (thread-cache hand-off, thread renaming,
the capacity limiter's checkpoint and the result's trip through trio's entry queue).
While no `run()` is running (a client used alone, tests) each round takes a thread
from trio's cache as before.

Inline while the disk is quick: a round of a few files on an SSD takes 0.1-0.5 ms of
fdatasync, mostly waiting, while the hand-off to the thread costs ~90 µs of CPU and two
wake-ups. So a round runs on the event loop itself while the recent inline rounds took
at most 2 ms (`twinmesh.commit_placement`); after a slower one the rounds go to
the thread again and one runs inline as a probe now and then, so a slow or stalling
disk blocks the loop once per probe at most. Measured in the scale bench (30 twins in
one twind, 60 msgs/s): twind's CPU per message 4-8 % lower than with every round in
the thread.

Descriptors kept open: a round used to open and close each log (one openat and one
close per message at low batching). While `run()` runs, the last `MAX_OPEN_LOGS` logs
synced stay open between rounds (least recently synced closed first). A log can be
replaced meanwhile: a store that closes deletes it (after checkpointing it into the
database, synced), and the store opened next creates a new file under that name. So
each round first stats the name, and syncs the kept descriptor only if the name still
names the file it holds (device and inode: an inode cannot be reused while our
descriptor keeps it alive); otherwise it opens the new log (and syncs its directory
entry again, as sqlite's FULL does for a new log). A commit that asked for a round
was written before the round's stat, so the file the stat finds holds it: a stale
descriptor never answers for a new log.

Sans-I/O is not possible here (this is the I/O); the logic is small on purpose.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from twinmesh.commit_placement import INLINE_COMMIT_BOUND, CommitPlacement, StallClock
from twinmesh.errors import StorageError

KEEP_ROUNDS = 64  # answers kept for callers of a round still waiting for the lock
# Logs kept open between rounds; a twind of 250 twins keeps all of theirs. Also at
# most a quarter of the process's descriptor limit (stores and sockets need the rest).
MAX_OPEN_LOGS = 1024


class GroupSync:
    """`inline_bound`: a round runs on the event loop while inline rounds take at most
    this long (`twinmesh.commit_placement.INLINE_COMMIT_BOUND`); None puts every
    round in a thread."""

    def __init__(self, *, inline_bound: float | None = INLINE_COMMIT_BOUND) -> None:
        self._lock = trio.Lock()  # FIFO: the callers of a round queue before the next
        self._pending: set[Path] = set()
        self._round = 0  # the round now collecting
        self._done = -1  # the last round that finished
        self._failed: dict[int, dict[Path, str]] = {}
        self._dirs_synced: set[Path] = set()  # touched only by the round under way
        # Logs open between rounds, least recently synced first: touched only by the
        # round under way, or on the loop while no round is (the lock is free).
        self._logs: dict[Path, _OpenLog] = {}
        self._keep_logs = False  # while `run` runs
        self._max_logs = _max_open_logs()
        self._worker: _Worker | None = None  # set while `run` runs
        self._placement = None if inline_bound is None else CommitPlacement(inline_bound)
        self._clock = StallClock()  # read on the event loop's thread only
        self.rounds = 0
        self.inline_rounds = 0
        self.files = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Keep a worker thread for the rounds until cancelled (start it in the
        daemon's nursery). At most one `run` at a time."""
        if self._worker is not None:
            raise RuntimeError("GroupSync.run is already running")
        worker = _Worker(self._sync_files)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.serve)
                self._worker = worker
                self._keep_logs = True
                task_status.started()
        finally:
            self._worker = None
            self._keep_logs = False
            if not self._lock.locked():  # else the lock's holder closes them
                self._close_logs()
            worker.close()

    async def sync(self, path: Path) -> None:
        """Return once `path`'s write-ahead log, as committed before this call, is on
        disk. Raises StorageError naming the file when the disk refuses."""
        ticket = self._round
        self._pending.add(path)
        async with self._lock:
            try:
                if self._done < ticket:
                    batch, self._pending = self._pending, set()
                    self._round += 1
                    failed = await self._run_round(batch)
                    self._failed[ticket] = failed
                    self._done = ticket
                    self._failed.pop(ticket - KEEP_ROUNDS, None)
                    self.rounds += 1
                    self.files += len(batch)
            finally:
                if self._logs and not self._keep_logs:  # `run` ended while we waited
                    self._close_logs()
            error = self._failed.get(ticket, {}).get(path)
        if error is not None:
            raise StorageError(error)

    async def _run_round(self, batch: set[Path]) -> dict[Path, str]:
        placement = self._placement
        if placement is not None and placement.inline(start := self._clock(), len(batch)):
            failed = self._sync_files(batch)
            end = self._clock()
            placement.inline_took(end - start, end)
            self.inline_rounds += 1
            return failed
        # Not abandoned on cancel: the round finishes for everyone in it.
        worker = self._worker
        if worker is not None:
            return await worker.run_round(batch)
        return await trio.to_thread.run_sync(self._sync_files, batch)

    def _sync_files(self, paths: set[Path]) -> dict[Path, str]:
        failed: dict[Path, str] = {}
        keep = self._keep_logs
        for path in paths:
            try:
                new_file = self._sync_log(path) if keep else _sync_once(Path(f"{path}-wal"))
                if new_file or path.parent not in self._dirs_synced:
                    # The log file's directory entry too (sqlite's FULL does): once per
                    # directory, and again for each log created since.
                    _fsync_directory(path.parent)
                    self._dirs_synced.add(path.parent)
            except OSError as exc:
                failed[path] = (f"{path}: cannot make the commit durable: "
                                f"{exc.strerror or exc}")
        return failed

    def _sync_log(self, path: Path) -> bool:
        """fdatasync the log `path`'s name names now, through the descriptor kept for
        it if it still holds that file; True when it is another file than the one
        held before (a log created since)."""
        wal = f"{path}-wal"
        held = self._logs.pop(path, None)
        try:
            st = os.stat(wal)
        except OSError:
            if held is not None:
                _close(held.fd)
            raise
        if held is not None and (held.dev, held.ino) == (st.st_dev, st.st_ino):
            log = held
        else:
            if held is not None:
                _close(held.fd)
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # The file opened, not the one stat saw: the name may have moved on.
                opened = os.fstat(fd)
            except OSError:
                _close(fd)
                raise
            log = _OpenLog(fd, opened.st_dev, opened.st_ino)
        try:
            os.fdatasync(log.fd)
        except OSError:
            _close(log.fd)
            raise
        self._logs[path] = log  # most recently synced last
        while len(self._logs) > self._max_logs:
            _close(self._logs.pop(next(iter(self._logs))).fd)
        return held is not None and log is not held

    def _close_logs(self) -> None:
        logs, self._logs = self._logs, {}
        for log in logs.values():
            _close(log.fd)

    @property
    def open_logs(self) -> int:
        """Logs kept open between rounds now."""
        return len(self._logs)


@dataclass(frozen=True)
class _OpenLog:
    fd: int
    dev: int  # of the file `fd` holds: the name may come to name another
    ino: int


def _max_open_logs() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_LOGS
    return max(1, min(MAX_OPEN_LOGS, soft // 4))


def _sync_once(wal: Path) -> bool:
    """fdatasync a log without keeping it open (False: not known to be new)."""
    fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return False


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class _Worker:
    """One thread that runs the rounds handed to it, one at a time (the caller holds
    the GroupSync lock), and says each is done through a pipe. Only the trio thread
    touches its fields, except `_answer` (written by the thread before the byte that
    says it is there)."""

    def __init__(self, sync_files: Callable[[set[Path]], dict[Path, str]]) -> None:
        self._sync_files = sync_files
        self._jobs: queue.SimpleQueue[set[Path] | None] = queue.SimpleQueue()
        self._done_read, self._done_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._answer: dict[Path, str] = {}
        self._stopped = False  # the thread takes no more rounds: they go to_thread
        self._in_round = False
        self._closed = False

    async def serve(self) -> None:
        """Run the thread until cancelled; it finishes the round it was given first."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_cancelled)
                # Its own limiter: this thread lives as long as the daemon and must
                # not hold a token of the default one, which other to_thread calls use.
                await trio.to_thread.run_sync(self._work, limiter=trio.CapacityLimiter(1))
        finally:
            self._stopped = True

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._stopped = True
            self._jobs.put(None)

    def _work(self) -> None:
        while (paths := self._jobs.get()) is not None:
            try:
                self._answer = self._sync_files(paths)
            except BaseException as exc:  # a bug: nobody of the round may think it synced
                self._answer = {path: f"{path}: cannot make the commit durable: {exc!r}"
                                for path in paths}
            os.write(self._done_write, b".")

    async def run_round(self, paths: set[Path]) -> dict[Path, str]:
        """The files of `paths` that could not be synced, with why. The round finishes
        even if the caller is cancelled meanwhile (the others of the round wait)."""
        if self._stopped:
            return await trio.to_thread.run_sync(self._sync_files, paths)
        self._in_round = True
        try:
            self._jobs.put(paths)
            with trio.CancelScope(shield=True):
                while True:
                    await trio.lowlevel.wait_readable(self._done_read)
                    with contextlib.suppress(BlockingIOError):
                        if os.read(self._done_read, 64):
                            break
        finally:
            self._in_round = False
            if self._closed:
                self._close_pipe()
        answer, self._answer = self._answer, {}
        return answer

    def close(self) -> None:
        """Once `serve` returned (the thread is gone); a round's leader that has not
        read its byte yet closes the pipe after it."""
        self._closed = True
        if not self._in_round:
            self._close_pipe()

    def _close_pipe(self) -> None:
        if self._done_read < 0:
            return
        trio.lowlevel.notify_closing(self._done_read)
        for fd in (self._done_read, self._done_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._done_read = self._done_write = -1


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
