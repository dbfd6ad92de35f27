"""`twinctl lab ...`: a whole deployment from one topology file (src/twinmesh/lab/).

    twinctl lab up FILE [--netns] [--dir D] [--foreground] [--timeout S]
    twinctl lab status [--dir D]
    twinctl lab restart [NODE] [--dir D]
    twinctl lab down [--dir D]

`up` returns once everything is up, leaving a supervisor running in the background;
with `--foreground` it stays until Ctrl-C and stops everything on the way out (what
`make run` does). Without `--dir` a lab lives in `.run/lab/<name>/`, and the other
commands find it there when it is the only one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from twinmesh.cli import render
from twinmesh.lab import client
from twinmesh.lab.runner import (
    NIC_START_TIMEOUT,
    TWIN_START_PER_TWIN,
    TWIN_START_TIMEOUT,
    web_url,
)
from twinmesh.lab.state import default_dir, find_lab_dir, read_state
from twinmesh.lab.topology import Topology, load_topology
from twinmesh.log import configure_logging

STATUS_COLUMNS: list[render.Column] = [
    ("NODE", "name", render.text),
    ("KIND", "kind", render.text),
    ("PID", "pid", render.text),
    ("STATE", "state", render.text),
    ("KEY/ID", "key", render.text),
    ("LINKS", "links", render.text),
    ("URL", "url", render.text),
]


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    lab = subparsers.add_parser("lab", help="run a whole mesh from a topology file",
                                parents=[common])
    commands = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", type=Path, metavar="DIR",
                       help="the lab's directory (default: .run/lab/NAME)")
    up = commands.add_parser("up", help="start every NIC and twin of FILE",
                             parents=[common, where])
    up.add_argument("file", type=Path, metavar="FILE", help="topology (TOML), e.g. labs/line3.toml")
    up.add_argument("--netns", action="store_true",
                    help="one network namespace per NIC (root)")
    up.add_argument("--foreground", action="store_true",
                    help="stay until Ctrl-C, then stop everything")
    up.add_argument("--timeout", type=float, metavar="S",
                    help="give up when not up within S seconds (default: by size)")
    commands.add_parser("status", help="every node: state, key, links, URL",
                        parents=[common, where])
    restart = commands.add_parser("restart", help="restart NODE (default: every node)",
                                  parents=[common, where])
    restart.add_argument("node", nargs="?", metavar="NODE")
    commands.add_parser("down", help="stop the lab", parents=[common, where])
    lab.set_defaults(run=run)


async def run(args: argparse.Namespace) -> tuple[Any, str] | tuple[Any, str, int]:
    command = args.lab_command
    if command == "up":
        return await up(args)
    lab_dir = find_lab_dir(args.dir).resolve()
    if command == "status":
        record = read_state(lab_dir)
        return await status(record)
    if command == "restart":
        reply = await client.request(lab_dir, {"restart": args.node})
        data, table = await status(reply["status"])
        return ({"restarted": reply["restarted"], **data},
                f"restarted {', '.join(reply['restarted'])}\n\n{table}")
    record = await client.stop_lab(lab_dir)
    extra = f" (cleaned up: {', '.join(record['leftovers'])})" if record["leftovers"] else ""
    return record, f"lab {record['name']} down{extra}"


async def up(args: argparse.Namespace) -> tuple[Any, str] | tuple[Any, str, int]:
    topology = load_topology(args.file.resolve())
    lab_dir = (args.dir or default_dir(topology.name)).resolve()
    if args.foreground:
        return await up_foreground(args, topology, lab_dir)
    pid = client.spawn_supervisor(topology.source, lab_dir, netns=args.netns)
    record = await client.wait_up(lab_dir, pid, args.timeout or default_timeout(topology))
    data, table = await status(record)
    return data, f"{summary(record)}\n\n{table}"


async def up_foreground(args: argparse.Namespace, topology: Topology,
                        lab_dir: Path) -> tuple[Any, str]:
    """Run the supervisor in this process until Ctrl-C; its log goes to lab.log."""
    from twinmesh.lab.runner import supervise
    from twinmesh.lab.state import LOG_FILE

    def ready(record: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps({"up": record, "twins": client.twin_ids(record)}), flush=True)
        else:
            print(f"{summary(record)}\nCtrl-C stops the lab.", flush=True)

    if not args.json:
        print(f"starting lab {topology.name}: {len(topology.nics)} NIC(s), "
              f"{topology.twin_count} twin(s) (log: {lab_dir / LOG_FILE})", flush=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    with open(lab_dir / LOG_FILE, "a", encoding="utf-8") as log:
        configure_logging("json", "info", file=log)
        try:
            record = await supervise(topology, lab_dir, netns=args.netns, on_ready=ready)
        finally:
            configure_logging("auto", "warning")
    return record, f"lab {topology.name} stopped"


def default_timeout(topology: Topology) -> float:
    return NIC_START_TIMEOUT + TWIN_START_TIMEOUT + TWIN_START_PER_TWIN * topology.twin_count


async def status(record: dict[str, Any]) -> tuple[dict[str, Any], str]:
    rows = await client.status_rows(record)
    state = client.lab_state(record)
    data = {"name": record["name"], "dir": record["dir"], "mode": record["mode"],
            "state": state, "error": record["error"], "supervisor": record["supervisor"],
            "nodes": rows}
    head = f"lab {record['name']}: {state} ({record['mode']}, {record['dir']})"
    if record["error"]:
        head += f"\nerror: {record['error']}"
    return data, f"{head}\n{render.table(rows, STATUS_COLUMNS)}"


def summary(record: dict[str, Any]) -> str:
    """What a newcomer needs: the twins' ids, the page to open, how to go on."""
    nics = [n for n in record["nodes"] if n["kind"] == "nic"]
    ids = client.twin_ids(record)
    lines = [f"lab {record['name']} up: {len(nics)} NIC(s), {len(ids)} twin(s) "
             f"in {record['dir']}"]
    for nic in nics:
        lines.append(f"  nic   {nic['name']:<8} {nic['key']}  {' '.join(nic['listen'])}")
    shown = list(ids.items())
    for name, twin in shown[:20]:
        lines.append(f"  twin  {name:<8} {twin}")
    if len(shown) > 20:
        lines.append(f"  ... and {len(shown) - 20} more twins")
    urls = [web_url(Path(n["state_dir"])) for n in record["nodes"] if n.get("web")]
    urls = [u for u in urls if u]
    if urls:
        lines.append(f"\nOpen {urls[0]} in your browser.")
    single = [n for n in record["nodes"] if n["kind"] == "twin"]
    if len(single) >= 2:
        first, last = single[0], single[-1]
        lines.append(f"Try:  twinctl --twin {first['state_dir']} ping {ids[last['name']]}")
    lines.append(f"Status: twinctl lab status --dir {record['dir']}")
    return "\n".join(lines)
