"""Which scheduling round of the trio loop is running now.

Trio runs the tasks that became runnable in batches, one batch per turn of its loop
(around one `epoll_wait`); a task woken during a batch runs in the next one. A writer
that sends the first write of a batch at once and lets the later ones of the same
batch pile up for one system call needs to tell batches apart. Waking a task of its
own at the end of each batch to say "the batch is over" costs a turn of the loop per
write; counting the turns costs a function call per turn, which is what this does: an
instrument with the one hook trio calls once per turn (`before_io_wait`), shared by
everything in one `trio.run`.
"""

from __future__ import annotations

import trio

_COUNTER: trio.lowlevel.RunVar[_RoundCounter] = trio.lowlevel.RunVar("twinmesh_loop_round")


class _RoundCounter(trio.abc.Instrument):
    __slots__ = ("round",)

    def __init__(self) -> None:
        self.round = 0

    def before_io_wait(self, timeout: float) -> None:
        self.round += 1


def loop_rounds() -> _RoundCounter:
    """The counter of this `trio.run`: its `round` changes between two batches of
    tasks and never within one. Call from inside trio."""
    try:
        return _COUNTER.get()
    except LookupError:
        counter = _RoundCounter()
        trio.lowlevel.add_instrument(counter)
        _COUNTER.set(counter)
        return counter
