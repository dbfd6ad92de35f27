"""`make run`: the local mesh script starts a line of real pnicd processes, links them,
and leaves nothing behind on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from twinmesh.testing.processes import twinctl_json, wait_until

pytestmark = pytest.mark.process

LINKED = b"NICs linked in a line"


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_localmesh_links_three_nics_and_stops_them_all_on_sigint(tmp_path: Path) -> None:
    root = tmp_path / "mesh"
    # Like `make run | tee`: stdout is a pipe and nothing asks Python to be unbuffered.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    cmd = [sys.executable, "-m", "twinmesh.nic.localmesh", "--dir", str(root), "--nics", "3"]
    process = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert process.stdout is not None and process.stderr is not None
    out = bytearray()
    err = bytearray()
    pids: list[int] = []

    async def drain(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
        while chunk := await stream.receive_some(65536):
            into += chunk

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, process.stderr, err)
            with trio.fail_after(30):
                while LINKED not in out:
                    chunk = await process.stdout.receive_some(65536)
                    assert chunk, f"localmesh exited early: {out.decode()}{err.decode()}"
                    out += chunk
                state_dirs = [root / f"nic{i}" for i in (1, 2, 3)]
                infos = [await twinctl_json("--nic", d, "nic", "self") for d in state_dirs]
                pids = [info["pid"] for info in infos]
                assert all(alive(pid) for pid in pids)

                rows = await twinctl_json("--nic", state_dirs[1], "nic", "peers")
                up = {r["key"] for r in rows if r["state"] == "up"}
                assert up == {infos[0]["key"], infos[2]["key"]}

                process.send_signal(signal.SIGINT)
                nursery.start_soon(drain, process.stdout, out)
                assert await process.wait() == 0, err.decode()
                await wait_until(
                    lambda: not any(alive(pid) for pid in pids), 10, what="every pnicd gone"
                )
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            for pid in pids:  # only the pnicd children this test saw; normally all gone
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    assert "mesh stopped" in out.decode()
    assert "Traceback" not in err.decode(), err.decode()
    for state_dir in state_dirs:
        assert not (state_dir / "admin.sock").exists()  # every NIC stopped cleanly
