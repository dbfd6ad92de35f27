"""A real `pnicd` process: startup time and the memory it holds while idle with one link."""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench.measure import Context, Figure, Stats
from twinmesh.control.admin_client import admin_call
from twinmesh.errors import AdminError

TITLE = "pnicd process"
START_TIMEOUT = 20.0
LINK_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
IDLE_SECONDS = 2.0
POLL = 0.005  # admin socket polling while waiting for startup


def plan(ctx: Context) -> dict[str, int]:
    return {"runs": ctx.pick(3, 1)}


def method(ctx: Context) -> str:
    p = plan(ctx)
    return f"""\
Real processes started with the `pnicd` entry point of this venv, each with a fresh
state directory in a temporary directory (a new key is generated on first start), JSON
logs to a file, no health endpoint.

- A peer `pnicd` (P) is started first with `--listen tcp://127.0.0.1:0`. Then the
  measured `pnicd` (M) is started with `--listen tcp://127.0.0.1:0 --peer <P's
  URI>?key=<P's key>`.
- **startup time**: from just before M's process is spawned until its admin socket
  answers `self` (polled every {POLL * 1e3:g} ms); this includes the interpreter start,
  imports and schema loading, key generation, and binding the listener.
- **idle RSS**: once M's `peers` shows the link up, wait {IDLE_SECONDS:g} s (keepalives
  run), then read `VmRSS` from `/proc/<pid>/status` of M. The detail gives the peak
  (`VmHWM`) and P's RSS (P holds the inbound end of the link).
- {p["runs"]} run(s), each with new processes; median and min-max. Both processes get
  SIGTERM afterwards.
"""


async def run(ctx: Context) -> None:
    p = plan(ctx)
    startup: list[float] = []
    rss: list[float] = []
    peak: list[float] = []
    peer_rss: list[float] = []
    ctx.progress.start(f"pnicd: startup and idle RSS, {p['runs']} run(s)")
    for _ in range(p["runs"]):
        with tempfile.TemporaryDirectory(prefix="twinmesh-bench-pnicd-") as tmp:
            result = await _one_run(Path(tmp))
        startup.append(result["startup"])
        rss.append(result["rss"])
        peak.append(result["hwm"])
        peer_rss.append(result["peer_rss"])
    ctx.progress.done(text=f"startup {Stats.of(startup).median:.0f} ms, "
                           f"RSS {Stats.of(rss).median:.1f} MiB")
    start = Stats.of(startup)
    ctx.add(
        Figure(key="pnicd.startup", group=TITLE,
               name="pnicd startup (spawn → admin `self` answers)", value=start.median,
               unit="ms", spread=(start.low, start.high), spread_kind=f"min-max of {start.n}",
               detail=f"n={start.n}")
    )
    mem = Stats.of(rss)
    ctx.add(
        Figure(key="pnicd.rss", group=TITLE, name="pnicd idle RSS, one link up",
               value=mem.median, unit="MiB", spread=(mem.low, mem.high),
               spread_kind=f"min-max of {mem.n}",
               detail=f"peak {Stats.of(peak).median:.1f} MiB; the peer: "
               f"{Stats.of(peer_rss).median:.1f} MiB")
    )


def pnicd_command() -> list[str]:
    script = Path(sys.executable).with_name("pnicd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "twinmesh.nic.main"]


async def _one_run(root: Path) -> dict[str, float]:
    processes: list[trio.Process] = []
    try:
        peer_dir = root / "peer"
        peer, _ = await _start(peer_dir, [], processes)
        peer_info = await _wait_self(peer_dir, peer, START_TIMEOUT)
        target = f"{peer_info['listen'][0]}?key={peer_info['key']}"
        measured_dir = root / "measured"
        measured, spawned = await _start(measured_dir, ["--peer", target], processes)
        await _wait_self(measured_dir, measured, START_TIMEOUT)
        startup = (time.perf_counter() - spawned) * 1e3
        with trio.fail_after(LINK_TIMEOUT):
            for _ in range(int(LINK_TIMEOUT / 0.02)):
                rows = await admin_call(measured_dir, "peers")
                if any(row["state"] == "up" for row in rows):
                    break
                await trio.sleep(0.02)
            else:
                raise RuntimeError(f"pnicd did not link to its peer within {LINK_TIMEOUT:g} s")
        await trio.sleep(IDLE_SECONDS)
        status = read_status(measured.pid)
        peer_status = read_status(peer.pid)
        return {
            "startup": startup,
            "rss": status["VmRSS"],
            "hwm": status["VmHWM"],
            "peer_rss": peer_status["VmRSS"],
        }
    finally:
        await _stop(processes)


async def _start(
    state_dir: Path, extra: list[str], processes: list[trio.Process]
) -> tuple[trio.Process, float]:
    state_dir.mkdir(mode=0o700)
    cmd = [*pnicd_command(), "--state-dir", str(state_dir), "--listen", "tcp://127.0.0.1:0",
           "--log-format", "json", *extra]
    log = open(state_dir / "pnicd.log", "ab")  # noqa: SIM115 (the child owns it)
    try:
        spawned = time.perf_counter()
        process = await trio.lowlevel.open_process(cmd, stdout=log, stderr=log)
    finally:
        log.close()  # the child holds its own copy of the descriptor
    processes.append(process)
    return process, spawned


async def _wait_self(state_dir: Path, process: trio.Process, timeout: float) -> Any:
    with trio.fail_after(timeout):
        for _ in range(int(timeout / POLL)):
            if process.poll() is not None:
                log = (state_dir / "pnicd.log").read_text("utf-8", "replace")[-2000:]
                raise RuntimeError(f"pnicd in {state_dir} exited with {process.returncode}:\n"
                                   f"{log}")
            if (state_dir / "admin.sock").exists():
                try:
                    return await admin_call(state_dir, "self")
                except AdminError:
                    pass
            await trio.sleep(POLL)
    raise RuntimeError(f"pnicd in {state_dir} did not answer `self` within {timeout:g} s")


async def _stop(processes: list[trio.Process]) -> None:
    with trio.CancelScope(shield=True):
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            for process in processes:
                await process.wait()
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()


def read_status(pid: int) -> dict[str, float]:
    """`Vm*` lines of /proc/PID/status, in MiB."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name.startswith("Vm") and rest.strip().endswith("kB"):
                values[name] = int(rest.split()[0]) / 1024
    return values

