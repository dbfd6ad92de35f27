"""LAN discovery for real: pnicd processes with `--mdns` on one bridged segment.

Three namespaces share a bridge (in a namespace of its own); each pnicd listens on
its LAN address only and has no `--peer`. The two with the same group password find
each other and link; the third, with another password, hears them (and says so in
its log) but links to neither, and they do not link to it. Multicast never leaves
the lab's namespaces.

Needs root and `ip netns`; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from twinmesh.testing import netns
from twinmesh.testing.netns import open_lab, open_lab_nics
from twinmesh.testing.processes import PnicdProcess, twinctl, wait_until, write_config

AVAILABLE, WHY = netns.available()
pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(not AVAILABLE, reason=f"network namespace lab unavailable: {WHY}"),
]

TIMEOUT = 40
PASSWORDS = {0: "blue-team-password", 1: "blue-team-password", 2: "red-team-password"}
CONFIG = """\
mdns = true

[link]
keepalive_interval = 0.25
dead_after = 1.0

[reconnect]
initial = 0.2
max = 2.0
"""


async def up_keys(nic: PnicdProcess) -> set[str]:
    return {row["key"] for row in await nic.peers() if row["state"] == "up"}


async def test_nics_on_a_lan_find_each_other_within_their_group(tmp_path: Path) -> None:
    config = write_config(tmp_path / "mdns.toml", CONFIG)  # mdns = true from the file
    with trio.fail_after(TIMEOUT):
        async with (
            open_lab(3, lan=True) as lab,
            open_lab_nics(
                lab, tmp_path, config=config, peers=False,
                extra_args=lambda node: ["--mdns-password", PASSWORDS[node]],
            ) as nics,
        ):
            a, b, outsider = nics[0], nics[1], nics[2]
            await wait_until(lambda: _has(a, nics.keys[1]), 20, interval=0.1,
                             what="0 linked to 1 through discovery")
            await wait_until(lambda: _has(b, nics.keys[0]), 20, interval=0.1,
                             what="1 linked to 0 through discovery")
            # The outsider heard both (its log says why it did not link), and they heard it.
            await wait_until(lambda: outsider.stderr_text().count("does not match") >= 2, 20,
                             what="the outsider refused both announcements")
            for nic in (a, b):
                await wait_until(lambda nic=nic: "does not match" in nic.stderr_text(), 20,
                                 what="the group refused the outsider's announcement")
            peers_a = json.loads((await twinctl("--nic", a.state_dir, "nic", "peers",
                                                "--json")).stdout)
            ping = await twinctl("--nic", a.state_dir, "nic", "ping", nics.keys[1], "-c", "1",
                                 "--json")
            outsider_rows = await outsider.peers()
            group_rows = await a.peers() + await b.peers()
            stopped = await a.stop(timeout=8)  # unregisters (goodbye) and closes zeroconf
    assert nics.keys[1] in {row["key"] for row in peers_a if row["state"] == "up"}
    assert json.loads(ping.stdout)["received"] == 1
    assert outsider_rows == []
    assert nics.keys[2] not in {row["key"] for row in group_rows}
    assert stopped == 0
    assert all("mdns announcing" in nic.stderr_text() for nic in (a, b, outsider))
    # Whoever heard the other first dialled it; the other may find the link already up.
    assert any("linking to discovered NIC" in nic.stderr_text() for nic in (a, b))
    assert "linking to discovered NIC" not in outsider.stderr_text()


async def _has(nic: PnicdProcess, key: str) -> bool:
    return key in await up_keys(nic)
