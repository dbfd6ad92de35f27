"""The lab supervisor with real processes: up from a TOML file, status, restart, down.

Each test starts the detached supervisor exactly as `twinctl lab up` does
(`client.spawn_supervisor`) and drives it from "another shell": `lab.json`, the
supervisor's control socket and the nodes' own sockets. Whatever happens, the
`finally` of `running_lab` stops the lab and kills anything the record still names.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio

from twinmesh.control.admin_client import admin_call
from twinmesh.control.twin_client import twin_call
from twinmesh.lab import client
from twinmesh.lab.state import LabError, pid_alive, read_state
from twinmesh.testing.processes import wait_until

pytestmark = pytest.mark.process

FAST = """\
[pnicd.link]
keepalive_interval = 0.2
dead_after = 1.0
"""

LINE = FAST + """\
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
delay_ms = 5
loss_pct = 1
"""

TWINS = FAST + """\
[[nic]]
name = "n1"
[[nic]]
name = "n2"

[[link]]
from = "n2"
to = "n1"

[[twin]]
name = "alice"
nic = "n1"
fallback = ["n2"]
web = true
[[twin]]
name = "bob"
nic = "n2"
[[twin]]
name = "crowd"
nic = "n1"
fallback = ["n2"]
hosted = 3
"""


@asynccontextmanager
async def running_lab(tmp_path: Path, text: str) -> AsyncIterator[tuple[Path, dict[str, Any]]]:
    path = tmp_path / "lab.toml"
    path.write_text(text)
    lab_dir = tmp_path / "lab"
    pid = client.spawn_supervisor(path, lab_dir, netns=False)
    try:
        record = await client.wait_up(lab_dir, pid, timeout=60)
        yield lab_dir, record
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            if pid_alive(pid):
                await client.stop_lab(lab_dir)
        kill_leftovers(lab_dir, pid)


def kill_leftovers(lab_dir: Path, supervisor: int) -> None:
    """Last resort after a failed test: SIGKILL whatever the record still names."""
    with suppress(LabError):
        for node in read_state(lab_dir)["nodes"]:
            if node["pid"] and pid_alive(node["pid"]):
                os.kill(node["pid"], signal.SIGKILL)
    kill_and_reap(supervisor)


def kill_and_reap(pid: int) -> None:
    """SIGKILL a child of this test and reap it (immediate: nothing can delay a SIGKILL)."""
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with suppress(ChildProcessError):
        os.waitpid(pid, 0)


async def rows_by_name(lab_dir: Path) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in await client.status_rows(read_state(lab_dir))}


async def reaches(lab_dir: Path, src: str, dst_key: str) -> bool:
    reply = await admin_call(lab_dir / src, "ping", dst_key, timeout=1.0)
    return reply["rtt"] is not None


def assert_nothing_left(lab_dir: Path, pids: list[int]) -> None:
    assert not [pid for pid in pids if pid_alive(pid)]
    assert not list(lab_dir.rglob("*.sock"))


async def test_a_line_comes_up_restarts_a_nic_and_goes_down_clean(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with running_lab(tmp_path, LINE) as (lab_dir, record):
            assert record["state"] == "up" and record["mode"] == "local"
            rows = await rows_by_name(lab_dir)
            assert {n: (r["state"], r["links"]) for n, r in rows.items()} == {
                "a": ("up", "1/1"), "b": ("up", "2/2"), "c": ("up", "1/1")}
            keys = {n: r["key"] for n, r in rows.items()}
            assert keys["a"] == (await admin_call(lab_dir / "a", "self"))["key"]
            # a reaches c across b, through the relayed (delayed, lossy) websocket link.
            await wait_until(lambda: reaches(lab_dir, "a", keys["c"]), 15, what="a -> c")

            old_pid = rows["b"]["pid"]
            reply = await client.request(lab_dir, {"restart": "b"})
            assert reply["restarted"] == ["b"]
            rows = await rows_by_name(lab_dir)
            assert rows["b"]["pid"] != old_pid and not pid_alive(old_pid)
            assert rows["b"]["links"] == "2/2" and rows["b"]["key"] == keys["b"]
            await wait_until(lambda: reaches(lab_dir, "a", keys["c"]), 15, what="a -> c again")

            # A NIC that dies is shown as such; restart brings it back.
            os.kill(rows["c"]["pid"], signal.SIGKILL)
            await wait_until(lambda: read_state(lab_dir)["nodes"][2]["state"] == "exited -9",
                             10, what="c marked exited")
            assert (await rows_by_name(lab_dir))["c"]["pid"] is None
            await client.request(lab_dir, {"restart": "c"})
            assert (await rows_by_name(lab_dir))["c"]["links"] == "1/1"

            with pytest.raises(LabError, match="no node 'zz'"):
                await client.request(lab_dir, {"restart": "zz"})

            pids = [r["pid"] for r in (await rows_by_name(lab_dir)).values()]
            final = await client.stop_lab(lab_dir)
            assert final["leftovers"] == [] and final["state"] == "down"
            assert_nothing_left(lab_dir, [*pids, record["supervisor"]])
            assert client.lab_state(read_state(lab_dir)) == "down"


async def test_twins_come_up_on_their_nics_and_restart_with_the_same_id(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with running_lab(tmp_path, TWINS) as (lab_dir, record):
            ids = client.twin_ids(record)
            assert sorted(ids) == ["alice", "bob", "crowd/twin-0000", "crowd/twin-0001",
                                   "crowd/twin-0002"]
            assert len(set(ids.values())) == 5 and all(len(i) == 52 for i in ids.values())
            rows = await rows_by_name(lab_dir)
            assert rows["alice"]["url"].startswith("http://127.0.0.1:")
            assert rows["bob"]["url"] == ""  # no page asked for
            assert rows["crowd"]["key"] == "3 twins"
            for name, twin_id in ids.items():
                answer = await twin_call(lab_dir / name, "identity")
                assert answer["twin"] == twin_id

            old_pid = rows["alice"]["pid"]
            await client.request(lab_dir, {"restart": "alice"})
            rows = await rows_by_name(lab_dir)
            assert rows["alice"]["pid"] != old_pid and rows["alice"]["state"] == "up"
            assert (await twin_call(lab_dir / "alice", "identity"))["twin"] == ids["alice"]

            pids = [r["pid"] for r in rows.values()]
            await client.stop_lab(lab_dir)
            assert_nothing_left(lab_dir, [*pids, record["supervisor"]])


async def test_a_nic_that_cannot_start_fails_the_lab_with_its_reason(tmp_path: Path) -> None:
    with trio.socket.socket() as busy:  # hold the port the file insists on
        await busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        text = LINE.replace('name = "b"', f'name = "b"\ntcp_port = {port}')
        with trio.fail_after(90), pytest.raises(LabError) as info:
            async with running_lab(tmp_path, text):
                pass
    message = str(info.value)
    assert re.match(r"b exited with code \d+ while starting: .*in use", message, re.I), message
    assert "\n" not in message
    record = read_state(tmp_path / "lab")
    assert record["state"] == "failed" and record["error"].startswith("b exited")
    assert_nothing_left(tmp_path / "lab", [n["pid"] for n in record["nodes"] if n["pid"]])


async def test_down_cleans_up_after_a_supervisor_that_died(tmp_path: Path) -> None:
    pair = FAST + '[[nic]]\nname = "x"\n[[nic]]\nname = "y"\n[[link]]\nfrom = "y"\nto = "x"\n'
    with trio.fail_after(90):
        async with running_lab(tmp_path, pair) as (lab_dir, record):
            kill_and_reap(record["supervisor"])
            assert client.lab_state(read_state(lab_dir)) == "supervisor gone"
            rows = await rows_by_name(lab_dir)
            pids = [rows["x"]["pid"], rows["y"]["pid"]]
            assert all(pid_alive(pid) for pid in pids)  # the NICs run on by themselves
            with pytest.raises(LabError, match="is not running"):
                await client.request(lab_dir, {"restart": "x"})
            final = await client.stop_lab(lab_dir)
            assert sorted(final["leftovers"]) == [f"x (pid {pids[0]})", f"y (pid {pids[1]})"]
            assert_nothing_left(lab_dir, pids)
            assert client.lab_state(read_state(lab_dir)) == "down"
