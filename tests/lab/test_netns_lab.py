"""`lab up --netns`: one network namespace per NIC, links as real interfaces, then gone.

A line of three NICs, each in its own namespace; the second link is impaired (so it
is built as the user-space relay where the kernel has no netem). A twin on each end
runs on the host, attached through its NIC's Unix socket. Status shows the links up,
a restarted NIC rejoins, and `down` leaves no process and no namespace.

Needs root and `ip netns`; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import signal
from contextlib import suppress
from pathlib import Path

import pytest
import trio

from twinmesh.control.admin_client import admin_call
from twinmesh.control.twin_client import twin_call
from twinmesh.lab import client
from twinmesh.lab.state import pid_alive, read_state
from twinmesh.testing import netns
from twinmesh.testing.processes import wait_until

AVAILABLE, WHY = netns.available()
pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(not AVAILABLE, reason=f"network namespace lab unavailable: {WHY}"),
]

TOPOLOGY = """\
[pnicd.link]
keepalive_interval = 0.25
dead_after = 1.5

[[nic]]
name = "a"
[[nic]]
name = "b"
[[nic]]
name = "c"

[[link]]
from = "b"
to = "a"
[[link]]
from = "c"
to = "b"
carrier = "ws"
delay_ms = 10
loss_pct = 1

[[twin]]
name = "west"
nic = "a"
[[twin]]
name = "east"
nic = "c"
"""


def kill_and_reap(pid: int) -> None:
    """SIGKILL the supervisor this test started (if still there) and reap it."""
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with suppress(ChildProcessError):
        os.waitpid(pid, 0)


async def test_a_netns_lab_comes_up_restarts_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ns.toml"
    path.write_text(TOPOLOGY)
    lab_dir = tmp_path / "lab"
    pid = client.spawn_supervisor(path, lab_dir, netns=True)
    namespaces: list[str] = []
    try:
        with trio.fail_after(120):
            record = await client.wait_up(lab_dir, pid, timeout=90)
            namespaces = record["namespaces"]
            assert record["mode"] == "netns" and len(namespaces) == 3
            assert all(Path("/run/netns", ns).exists() for ns in namespaces)
            rows = {r["name"]: r for r in await client.status_rows(record)}
            assert [rows[n]["links"] for n in "abc"] == ["1/1", "2/2", "1/1"]
            # Each NIC listens only on its link addresses, inside its own namespace.
            info = await admin_call(lab_dir / "b", "self")
            assert all(uri.split("//")[1].startswith("10.231.") for uri in info["listen"])
            ids = client.twin_ids(record)
            assert (await twin_call(lab_dir / "east", "identity"))["twin"] == ids["east"]

            await client.request(lab_dir, {"restart": "b"})
            rows = {r["name"]: r for r in await client.status_rows(read_state(lab_dir))}
            assert rows["b"]["links"] == "2/2"

            async def a_reaches_c() -> bool:
                reply = await admin_call(lab_dir / "a", "ping", rows["c"]["key"], timeout=1.0)
                return reply["rtt"] is not None and reply["hops"] == 2

            await wait_until(a_reaches_c, 20, what="a -> c across the namespaces")
            pids = [r["pid"] for r in rows.values()]
            final = await client.stop_lab(lab_dir)
            assert final["leftovers"] == []
            assert not [p for p in [*pids, pid] if pid_alive(p)]
            assert not [ns for ns in namespaces if Path("/run/netns", ns).exists()]
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            if pid_alive(pid):
                await client.stop_lab(lab_dir)
        kill_and_reap(pid)
        for ns in namespaces:  # only this lab's, and only if still there
            if Path("/run/netns", ns).exists():
                await trio.run_process(["ip", "netns", "del", ns], check=False)
