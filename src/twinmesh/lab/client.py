"""What any shell does with a lab: start its supervisor, ask its status, restart, stop it.

    pid = spawn_supervisor(path, lab_dir, netns=False)
    record = await wait_up(lab_dir, pid, timeout=60)
    rows = await status_rows(read_state(lab_dir))
    await request(lab_dir, {"restart": "nic2"})
    await stop_lab(lab_dir)

Only `lab.json`, the supervisor's `lab.sock` and the nodes' own sockets are used, so
all of it works from another terminal than the one that ran `lab up`. `stop_lab`
also cleans up after a supervisor that died: it stops the recorded processes itself,
each only after checking the pid still runs in that node's state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from twinmesh.carriers.unix import connect_unix
from twinmesh.control.admin_client import admin_call
from twinmesh.control.framed import FramedStream
from twinmesh.errors import AdminError
from twinmesh.lab.runner import (
    CONTROL_TIMEOUT,
    STOP_TIMEOUT,
    lock_lab,
    twin_id,
    web_url,
)
from twinmesh.lab.state import (
    CONTROL_SOCKET,
    LOG_FILE,
    STATE_FILE,
    LabError,
    pid_alive,
    pid_runs_in,
    read_state,
    write_state,
)

SUPERVISOR_STOP_TIMEOUT = 60.0  # it stops every node itself (STOP_TIMEOUT per group)
POLL_INTERVAL = 0.1


def spawn_supervisor(path: Path, lab_dir: Path, *, netns: bool) -> int:
    """Start `python -m twinmesh.lab.runner` detached (own session, output to lab.log)."""
    lab_dir.mkdir(parents=True, exist_ok=True)
    os.close(lock_lab(lab_dir))  # refuse at once when a supervisor holds this lab
    (lab_dir / STATE_FILE).unlink(missing_ok=True)  # a finished run's record
    argv = [sys.executable, "-m", "twinmesh.lab.runner", str(path), "--dir", str(lab_dir)]
    if netns:
        argv.append("--netns")
    log = str(lab_dir / LOG_FILE)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ])


async def wait_up(lab_dir: Path, pid: int, timeout: float) -> dict[str, Any]:
    """Wait until supervisor `pid` (our child) reports the lab up; LabError if it fails.

    On timeout the supervisor is stopped (it stops what it started) before raising.
    """
    with trio.move_on_after(timeout):
        while True:
            record = _record_of(lab_dir, pid)
            if record is not None and record["state"] == "up":
                return record
            done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: no wait)
            if done:
                record = _record_of(lab_dir, pid) or {}
                raise LabError(record.get("error") or f"the lab supervisor exited "
                               f"({_exit_text(status)}; log: {lab_dir / LOG_FILE})")
            await trio.sleep(POLL_INTERVAL)
    os.kill(pid, signal.SIGTERM)
    # Another process's exit has no event to wait on: poll it (WNOHANG never blocks).
    with trio.move_on_after(SUPERVISOR_STOP_TIMEOUT):
        while not os.waitpid(pid, os.WNOHANG)[0]:  # noqa: ASYNC110, ASYNC222
            await trio.sleep(POLL_INTERVAL)
    raise LabError(f"lab not up within {timeout:g} s; stopped it (log: {lab_dir / LOG_FILE})")


def _record_of(lab_dir: Path, pid: int) -> dict[str, Any] | None:
    try:
        record = read_state(lab_dir)
    except LabError:
        return None
    return record if record.get("supervisor") == pid else None


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"code {os.waitstatus_to_exitcode(status)}"


def lab_state(record: dict[str, Any]) -> str:
    """The lab's state as it is now, not only as last recorded."""
    state = str(record["state"])
    if state in ("starting", "up", "stopping") and not pid_alive(record["supervisor"]):
        return "supervisor gone"
    return state


async def status_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per node: name, kind, pid, state, key (or twin id), links up, url."""
    rows = []
    keys = {n["name"]: n["key"] for n in record["nodes"] if n["kind"] == "nic"}
    for node in record["nodes"]:
        alive = pid_alive(node["pid"])
        state = node["state"] if alive or node["state"] != "up" else "dead"
        row: dict[str, Any] = {
            "name": node["name"], "kind": node["kind"], "pid": node["pid"] if alive else None,
            "state": state, "key": node["key"], "links": "", "url": "",
            "state_dir": node["state_dir"],
        }
        if node["kind"] == "nic":
            row["url"] = node["health"]
            row["links"] = await _links_up(node, keys) if alive else f"-/{len(node['links'])}"
        elif node["kind"] == "twin":
            row["key"] = row["key"] or twin_id(Path(node["state_dir"]))
            row["url"] = web_url(Path(node["state_dir"]))
            row["links"] = node["nic"]
        else:
            row["key"] = f"{node['twins']} twins"
            row["links"] = node["nic"]
        rows.append(row)
    return rows


async def _links_up(node: dict[str, Any], keys: dict[str, str]) -> str:
    try:
        peers = await admin_call(Path(node["state_dir"]), "peers")
    except AdminError:
        return f"?/{len(node['links'])}"
    up = {row["key"] for row in peers if row["state"] == "up"}
    return f"{sum(keys[n] in up for n in node['links'])}/{len(node['links'])}"


def twin_ids(record: dict[str, Any]) -> dict[str, str]:
    """Every twin's id by node name (hosted twins as NAME/twin-NNNN)."""
    ids: dict[str, str] = {}
    for node in record["nodes"]:
        if node["kind"] == "twin":
            ids[node["name"]] = node["key"] or twin_id(Path(node["state_dir"]))
        elif node["kind"] == "twins":
            root = Path(node["state_dir"])
            for twin_dir in sorted(root.glob("twin-*")):
                ids[f"{node['name']}/{twin_dir.name}"] = twin_id(twin_dir)
    return ids


async def request(lab_dir: Path, body: dict[str, Any]) -> dict[str, Any]:
    """One request to the supervisor's control socket; LabError when it is not there."""
    try:
        stream = await connect_unix(lab_dir / CONTROL_SOCKET)
    except OSError:
        raise LabError(f"lab in {lab_dir} is not running (nobody answers on "
                       f"{CONTROL_SOCKET}); start it with 'twinctl lab up FILE'") from None
    async with stream:
        framed = FramedStream(stream)
        try:
            with trio.fail_after(CONTROL_TIMEOUT + 10):
                await framed.send(json.dumps(body).encode())
                answer = await framed.receive()
        except trio.TooSlowError:
            raise LabError("the lab supervisor did not answer in time") from None
        except (trio.BrokenResourceError, OSError) as exc:
            raise LabError(f"lost the lab supervisor: {exc}") from None
    if answer is None:
        raise LabError("the lab supervisor closed the connection without answering")
    reply: dict[str, Any] = json.loads(answer)
    if "error" in reply:
        raise LabError(str(reply["error"]))
    return reply


async def stop_lab(lab_dir: Path) -> dict[str, Any]:
    """Stop the lab's supervisor (it stops everything) and whatever it left behind.

    Returns the final record with `leftovers`: processes or namespaces that had to be
    removed here because the supervisor was gone or stuck.
    """
    record = read_state(lab_dir)
    leftovers: list[str] = []
    supervisor = int(record["supervisor"])
    if pid_runs_in(supervisor, record["dir"]):
        os.kill(supervisor, signal.SIGTERM)
        if not await _wait_gone(supervisor, SUPERVISOR_STOP_TIMEOUT):
            os.kill(supervisor, signal.SIGKILL)
            leftovers.append(f"supervisor {supervisor} (killed)")
            await _wait_gone(supervisor, STOP_TIMEOUT)
    if not pid_alive(supervisor):  # a supervisor killed outright leaves its socket
        (lab_dir / CONTROL_SOCKET).unlink(missing_ok=True)
    record = read_state(lab_dir)
    for node in record["nodes"]:
        pid = node["pid"]
        if pid and pid_runs_in(pid, node["state_dir"]):
            os.kill(pid, signal.SIGTERM)
            if not await _wait_gone(pid, STOP_TIMEOUT):
                os.kill(pid, signal.SIGKILL)
                await _wait_gone(pid, STOP_TIMEOUT)
            leftovers.append(f"{node['name']} (pid {pid})")
    for namespace in record.get("namespaces", []):
        if Path("/run/netns", namespace).exists():
            await _delete_namespace(namespace)
            leftovers.append(f"namespace {namespace}")
    if leftovers or record["state"] not in ("down", "failed"):
        for node in record["nodes"]:
            node["pid"], node["state"] = None, "stopped"
        record["state"] = "down"
        write_state(lab_dir, record)
    record["leftovers"] = leftovers
    return record


async def _wait_gone(pid: int, timeout: float) -> bool:
    # Not our child (the supervisor started it): no event to wait on, so poll.
    with trio.move_on_after(timeout):
        while pid_alive(pid):  # noqa: ASYNC110
            await trio.sleep(POLL_INTERVAL)
        return True
    return False


async def _delete_namespace(namespace: str) -> None:
    with trio.move_on_after(STOP_TIMEOUT * 2):
        done = await trio.run_process(["ip", "netns", "pids", namespace], capture_stdout=True,
                                      check=False, stdin=subprocess.DEVNULL)
        for pid in done.stdout.decode().split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        await trio.run_process(["ip", "netns", "del", namespace], check=False,
                               stdin=subprocess.DEVNULL, capture_stderr=True)
