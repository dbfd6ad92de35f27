"""`make run`: a small local mesh of real pnicd processes in a line.

    python -m twinmesh.nic.localmesh --dir .run --nics 3

NIC 1 listens on TCP; each next NIC listens on TCP and websocket and dials the one
before it, alternating carriers (nic2 -tcp-> nic1, nic3 -ws-> nic2, ...), pinned to
the key it read from that NIC's admin socket. Every port is chosen by the kernel
(port 0) and read back through `self`. Ctrl-C stops them all.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from twinmesh.cli import render
from twinmesh.cli.nic import PEER_COLUMNS
from twinmesh.control.admin_client import admin_call
from twinmesh.errors import AdminError

START_TIMEOUT = 15.0


async def wait_admin(state_dir: Path, process: trio.Process, timeout: float = START_TIMEOUT) -> Any:
    """Poll the admin socket until `self` answers; fail if the process exits."""
    with trio.fail_after(timeout):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"pnicd in {state_dir} exited with {process.returncode}; "
                                   f"see {state_dir / 'pnicd.log'}")
            try:
                return await admin_call(state_dir, "self")
            except AdminError:
                await trio.sleep(0.05)


async def wait_links(state_dirs: list[Path], timeout: float = START_TIMEOUT) -> None:
    """Wait until every line link is up (n-1 links seen from both ends) and every NIC
    has a route to every other."""
    with trio.fail_after(timeout):
        while True:
            up = 0
            for state_dir in state_dirs:
                rows = await admin_call(state_dir, "peers")
                up += sum(1 for r in rows if r["state"] == "up")
            routes = [len(await admin_call(d, "routes")) for d in state_dirs]
            if up >= 2 * (len(state_dirs) - 1) and min(routes) == len(state_dirs):
                return
            await trio.sleep(0.1)


async def start_line(root: Path, count: int, nursery: trio.Nursery,
                     processes: list[trio.Process]) -> list[Path]:
    state_dirs: list[Path] = []
    previous: dict[str, Any] | None = None
    for index in range(1, count + 1):
        state_dir = root / f"nic{index}"
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cmd = [sys.executable, "-m", "twinmesh.nic.main", "--state-dir", str(state_dir),
               "--listen", "tcp://127.0.0.1:0", "--health", "127.0.0.1:0",
               "--log-format", "json"]
        if index > 1:
            cmd += ["--listen", "ws://127.0.0.1:0/pnic"]
        if previous is not None:
            scheme = "ws" if index % 2 == 1 and index > 2 else "tcp"
            target = next((u for u in previous["listen"] if u.startswith(scheme)),
                          previous["listen"][0])
            cmd += ["--peer", f"{target}?key={previous['key']}"]
        log = open(state_dir / "pnicd.log", "ab")  # noqa: SIM115 (owned by the process)
        process = await trio.lowlevel.open_process(cmd, stdout=log, stderr=log)
        processes.append(process)
        previous = await wait_admin(state_dir, process)
        state_dirs.append(state_dir)
        print(f"nic{index}: {previous['key']}  {' '.join(previous['listen'])}")
    return state_dirs


async def amain(root: Path, count: int) -> None:
    processes: list[trio.Process] = []
    try:
        async with trio.open_nursery() as nursery:
            state_dirs = await start_line(root, count, nursery, processes)
            await wait_links(state_dirs)
            middle = state_dirs[len(state_dirs) // 2]
            print(f"\n{count} NICs linked in a line. Peers of {middle.name}:\n")
            print(render.table(await admin_call(middle, "peers"), PEER_COLUMNS))
            twinctl = Path(sys.executable).with_name("twinctl")
            last = await admin_call(state_dirs[-1], "self")
            reply = await admin_call(state_dirs[0], "ping", last["key"], timeout=2.0)
            if reply["rtt"] is not None:
                print(f"\nnic1 -> nic{count} across the overlay: {reply['hops']} hops, "
                      f"{reply['rtt'] * 1e3:.2f} ms")
            print(f"\nInspect them:\n  {twinctl} --nic {middle} nic peers\n"
                  f"  {twinctl} --nic {state_dirs[0]} nic routes\n"
                  f"  {twinctl} --nic {state_dirs[0]} nic ping {last['key']} -c 3\n"
                  f"  {twinctl} --nic {state_dirs[0]} nic self --json\n"
                  f"Logs: {root}/nicN/pnicd.log.  Ctrl-C stops the mesh.")
            await trio.sleep_forever()
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for process in processes:
                await process.wait()
        for process in processes:
            if process.returncode is None:
                process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a local line of pnicd processes")
    parser.add_argument("--dir", type=Path, default=Path(".run"))
    parser.add_argument("--nics", type=int, default=3)
    args = parser.parse_args(argv)
    if not 2 <= args.nics <= 20:
        parser.error("--nics must be between 2 and 20")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # The status lines must show up at once when stdout is a pipe (`make run | tee`).
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    try:
        trio.run(amain, args.dir.resolve(), args.nics)
    except* KeyboardInterrupt:  # Ctrl-C arrives inside amain's nursery, so in a group
        print("\nmesh stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
