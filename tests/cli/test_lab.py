"""`twinctl lab ...` as a user runs it, including `make run` (labs/line3.toml, foreground).

`make run` runs exactly `twinctl lab up labs/line3.toml --foreground --dir ...`; the
first test runs that command the way a terminal would (stdout a pipe, Ctrl-C as
SIGINT) and checks what the newcomer is promised: each twin's id, the first twin's
browser URL (the page answers), everything linked, and nothing left after Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from twinmesh.control.twin_client import twin_call
from twinmesh.identity.keystore import load_identity
from twinmesh.lab.state import pid_alive, read_state
from twinmesh.testing.processes import (
    console_script,
    http_get,
    twinctl,
    twinctl_json,
)

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
READY = b"Ctrl-C stops the lab."


def kill_recorded(lab_dir: Path) -> None:
    """After a failed test: SIGKILL whatever the lab record still names."""
    try:
        record = read_state(lab_dir)
    except Exception:
        return
    for pid in [record["supervisor"], *(n["pid"] for n in record["nodes"])]:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_make_run_prints_twin_ids_and_a_working_url_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    lab_dir = tmp_path / "line3"
    # Like `make run | tee`: stdout is a pipe and nothing asks Python to be unbuffered.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    cmd = [*console_script("twinctl"), "lab", "up", str(REPO / "labs" / "line3.toml"),
           "--foreground", "--dir", str(lab_dir)]
    process = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, cwd=tmp_path,
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = bytearray(), bytearray()

    async def drain(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
        while chunk := await stream.receive_some(65536):
            into += chunk

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, process.stderr, err)
            with trio.fail_after(90):
                while READY not in out:
                    chunk = await process.stdout.receive_some(65536)
                    assert chunk, f"lab exited early: {out.decode()}{err.decode()}"
                    out += chunk
                text = out.decode()
                printed = dict(re.findall(r"^\s+twin\s+(\w+)\s+([a-z2-7]{52})$", text, re.M))
                assert sorted(printed) == ["alice", "bob", "carol"]
                for name, twin_id in printed.items():
                    key = load_identity(lab_dir / name / "twin.key")
                    assert key.public.text == twin_id
                    assert (await twin_call(lab_dir / name, "identity"))["twin"] == twin_id
                url = re.search(r"Open (http://127\.0\.0\.1:\d+/\S*) in your browser", text)
                assert url is not None, text
                assert url.group(1) == (lab_dir / "alice" / "web.url").read_text().strip()
                status, page = await http_get(url.group(1))
                assert status == 200 and "<html" in page.lower()

                lab = await twinctl_json("lab", "status", "--dir", lab_dir)
                nodes = {n["name"]: n for n in lab["nodes"]}
                assert lab["state"] == "up"
                assert [nodes[n]["links"] for n in ("nic1", "nic2", "nic3")] == [
                    "1/1", "2/2", "1/1"]
                pids = [n["pid"] for n in nodes.values()]
                assert all(pid_alive(pid) for pid in pids)

                process.send_signal(signal.SIGINT)
                nursery.start_soon(drain, process.stdout, out)
                assert await process.wait() == 0, err.decode()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            kill_recorded(lab_dir)
    assert "lab line3 stopped" in out.decode()
    assert "Traceback" not in err.decode(), err.decode()
    assert not [pid for pid in pids if pid_alive(pid)]
    assert not list(lab_dir.rglob("*.sock"))
    assert read_state(lab_dir)["state"] == "down"


async def test_a_background_lab_is_managed_from_other_commands(tmp_path: Path) -> None:
    lab_file = tmp_path / "pair.toml"
    lab_file.write_text('[[nic]]\nname = "x"\n[[nic]]\nname = "y"\n'
                        '[[link]]\nfrom = "y"\nto = "x"\ncarrier = "ws"\n')
    lab_dir = tmp_path / "pair"
    try:
        with trio.fail_after(90):
            up = await twinctl_json("lab", "up", lab_file, "--dir", lab_dir)
            assert up["state"] == "up" and [n["links"] for n in up["nodes"]] == ["1/1", "1/1"]

            again = await twinctl("lab", "up", lab_file, "--dir", lab_dir)
            assert again.returncode == 1
            assert again.stderr_lines == [
                f"twinctl: {lab_dir}: this lab is already running; stop it with "
                f"'twinctl lab down --dir {lab_dir}'"]

            restarted = await twinctl("lab", "restart", "y", "--dir", lab_dir)
            assert restarted.returncode == 0, restarted.stderr
            assert restarted.stdout.startswith("restarted y")
            status = await twinctl("lab", "status", "--dir", lab_dir)
            assert re.search(r"^y\s+nic\s+\d+\s+up\s+[a-z2-7]{52}\s+1/1", status.stdout, re.M)

            down = await twinctl("lab", "down", "--dir", lab_dir)
            assert down.returncode == 0 and down.stdout.strip() == "lab pair down"
            after = json.loads((await twinctl("lab", "status", "--dir", lab_dir,
                                              "--json")).stdout)
            assert after["state"] == "down" and all(n["pid"] is None for n in after["nodes"])
            gone = await twinctl("lab", "restart", "--dir", lab_dir)
            assert gone.returncode == 1 and "is not running" in gone.stderr
    finally:
        kill_recorded(lab_dir)


async def test_mistakes_get_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[nic]]\nname = "a"\n\n[[link]]\nfrom = "a"\nto = "b"\n')
    done = await twinctl("lab", "up", bad, "--dir", tmp_path / "never")
    assert done.returncode == 1
    assert done.stderr_lines == [f"twinctl: {bad}:6: link #1: 'to' names unknown NIC 'b'"]
    assert not (tmp_path / "never").exists()  # nothing started, nothing written

    nowhere = await twinctl("lab", "status", "--dir", tmp_path / "nothing")
    assert nowhere.returncode == 1 and "no lab here" in nowhere.stderr
