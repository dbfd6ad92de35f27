"""Five real pnicd processes in a ring of Linux network namespaces, over real veth links.

Each NIC lives in its own namespace and listens on its two link addresses; the first
node of each edge dials the second, pinned with `?key=`. Links are cut silently
(`ip link set down`: no RST, no FIN), impaired (100 ms delay, 20% loss each way) and
a NIC is killed with SIGKILL; the overlay must route around each. The NICs are
driven from the host through their admin sockets: `twinctl nic ping --json` for
the checks, in-process admin pings for polling.

Needs root and `ip netns`; skipped with the reason otherwise. Measured repair times
are printed (see them with `pytest -s` or `-rP`); the only timing assert is a
generous bound.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from twinmesh.testing import netns
from twinmesh.testing.netns import Lab, LabNics, open_lab, open_lab_nics, ring
from twinmesh.testing.processes import PnicdProcess, twinctl, wait_until, write_config

AVAILABLE, WHY = netns.available()
pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(not AVAILABLE, reason=f"network namespace lab unavailable: {WHY}"),
]

N = 5
TIMEOUT = 40  # per test; every wait inside is far shorter
REPAIR_BOUND = 15.0  # generous: issue 3 wants <= 2 s, the bench measures it
CONFIG = """\
[link]
keepalive_interval = 0.25
dead_after = 1.0

[reconnect]
initial = 0.2
max = 2.0
"""


def ring_hops(a: int, b: int) -> int:
    """Hops between `a` and `b` the short way round the intact ring."""
    d = abs(a - b) % N
    return min(d, N - d)


async def ping_json(nic: PnicdProcess, key: str, *options: str) -> dict[str, Any]:
    """`twinctl nic ping KEY OPTIONS --json`; exit 1 (nothing came back) is an answer too."""
    done = await twinctl("--nic", nic.state_dir, "nic", "ping", key, *options, "--json")
    assert done.returncode in (0, 1), done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "ring.toml", CONFIG)


@pytest.fixture
async def ring_lab(tmp_path: Path, config: Path) -> AsyncIterator[tuple[Lab, LabNics]]:
    # Link 2-3 is `shaped`: the impairment test puts delay and loss on it.
    with trio.fail_after(TIMEOUT) as setup:
        async with (
            open_lab(N, ring(N), shaped=[(2, 3)]) as lab,
            open_lab_nics(lab, tmp_path, config=config) as nics,
        ):
            await nics.wait_converged()
            setup.deadline = math.inf  # the test bounds itself; teardown is bounded inside
            yield lab, nics


async def test_every_nic_pings_every_other(ring_lab: tuple[Lab, LabNics]) -> None:
    _, nics = ring_lab
    results: dict[tuple[int, int], dict[str, Any]] = {}

    async def ping_all_from(src: int) -> None:
        for dst in range(N):
            if dst != src:
                results[src, dst] = await ping_json(nics[src], nics.keys[dst], "-c", "1")

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for src in range(N):
                nursery.start_soon(ping_all_from, src)
    assert len(results) == N * (N - 1)
    for (src, dst), result in results.items():
        assert result["received"] == 1, (src, dst, result)
        assert result["replies"][0]["hops"] == ring_hops(src, dst), (src, dst, result)


async def test_a_silently_cut_link_is_routed_around(ring_lab: tuple[Lab, LabNics]) -> None:
    lab, nics = ring_lab
    a, b = nics[0], nics[1]
    with trio.fail_after(TIMEOUT):
        assert (await ping_json(a, nics.keys[1], "-c", "1"))["replies"][0]["hops"] == 1

        cut = time.monotonic()
        await lab.set_link(0, 1, up=False)
        repaired = await netns.measure_until(lambda: nics.reaches(0, 1, 4), REPAIR_BOUND,
                                             since=cut)
        print(f"\nrepair after a silent cut of link 0-1: "
              f"{'not within the bound' if repaired is None else f'{repaired:.2f} s'}")
        assert repaired is not None, f"0 did not reach 1 the other way within {REPAIR_BOUND} s"
        await wait_until(lambda: nics.reaches(1, 0, 4), REPAIR_BOUND,
                         what="1 reaches 0 the other way round")
        there = await ping_json(a, nics.keys[1], "-c", "2", "-i", "0.05")
        back = await ping_json(b, nics.keys[0], "-c", "2", "-i", "0.05")
        print(f"both ways after {time.monotonic() - cut:.2f} s")

        # The cable goes back in: the dialer redials and the direct route returns.
        await lab.set_link(0, 1, up=True)
        await wait_until(lambda: nics.reaches(0, 1, 1), REPAIR_BOUND,
                         what="direct route 0-1 back after the link came up")
    assert there["received"] == 2 and {r["hops"] for r in there["replies"]} == {4}
    assert back["received"] == 2 and {r["hops"] for r in back["replies"]} == {4}


async def test_a_delayed_lossy_link_still_carries_pings(ring_lab: tuple[Lab, LabNics]) -> None:
    lab, nics = ring_lab
    count = 10
    with trio.fail_after(TIMEOUT):
        await lab.netem(2, 3, delay_ms=100, loss_pct=20)
        result = await ping_json(nics[2], nics.keys[3], "-c", str(count), "-i", "0.1",
                                 "-W", "2")
        print(f"\nping over link 2-3 with 100 ms delay and 20% loss each way "
              f"({lab.link(2, 3).kind}): {result['received']}/{count} replies, "
              f"hops {sorted({r['hops'] for r in result['replies'] if r['rtt']})}")
        await lab.netem(2, 3, delay_ms=0, loss_pct=0)
    assert result["sent"] == count
    assert result["received"] >= 1, result
    direct = [r["rtt"] for r in result["replies"] if r["rtt"] is not None and r["hops"] == 1]
    # Over the impaired link itself, a round trip crosses the 100 ms delay twice.
    assert all(rtt >= 0.19 for rtt in direct), direct


async def test_a_killed_nic_is_routed_around_and_rejoins(
    ring_lab: tuple[Lab, LabNics],
) -> None:
    _, nics = ring_lab
    left, middle, right = 1, 2, 3
    with trio.fail_after(TIMEOUT):
        killed = time.monotonic()
        await nics.kill(middle)  # SIGKILL: no goodbye
        await wait_until(lambda: nics.reaches(left, right, 3), REPAIR_BOUND,
                         interval=0.0, what="1 reaches 3 around the dead NIC")
        print(f"\n1 reaches 3 the other way {time.monotonic() - killed:.2f} s after kill -9 of 2")
        around = await ping_json(nics[right], nics.keys[left], "-c", "1")

        restarted = await nics.start(middle)  # same state dir, same ports
        await nics.wait_converged()
        # Routes to 2 may first come the long way round (2 dialled 3 at once; 1 redials
        # 2 after its backoff); wait for the direct links before asking twinctl.
        for side in (left, right):
            await wait_until(lambda side=side: nics.reaches(side, middle, 1),
                             REPAIR_BOUND, what=f"{side} reaches 2 directly again")
        back_left = await ping_json(nics[left], nics.keys[middle], "-c", "1")
        back_right = await ping_json(nics[right], nics.keys[middle], "-c", "1")
        await wait_until(lambda: nics.reaches(left, right, 2), REPAIR_BOUND,
                         what="1 reaches 3 through 2 again")
    assert around["received"] == 1 and around["replies"][0]["hops"] == 3
    assert restarted.key == nics.keys[middle]
    assert back_left["received"] == 1 and back_left["replies"][0]["hops"] == 1
    assert back_right["received"] == 1 and back_right["replies"][0]["hops"] == 1
