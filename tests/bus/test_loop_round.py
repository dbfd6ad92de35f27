"""The loop-round counter changes between batches of tasks, never within one."""

from __future__ import annotations

import trio
import trio.testing

from twinmesh.bus.loop_round import loop_rounds


async def test_tasks_woken_together_see_one_round_and_a_checkpoint_starts_another() -> None:
    counter = loop_rounds()
    assert loop_rounds() is counter  # one per run
    go = trio.Event()
    seen: list[int] = []

    async def woken() -> None:
        await go.wait()
        seen.append(counter.round)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(woken)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    assert len(seen) == 5 and len(set(seen)) == 1
    before = counter.round
    await trio.lowlevel.checkpoint()
    assert counter.round > before


def test_each_run_has_its_own_counter() -> None:
    async def first_round() -> int:
        await trio.lowlevel.checkpoint()
        return loop_rounds().round

    assert trio.run(first_round) == trio.run(first_round)
