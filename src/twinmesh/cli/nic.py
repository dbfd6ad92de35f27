"""`twinctl nic ...`: inspect and steer a NIC through its admin socket."""

from __future__ import annotations

import argparse
from typing import Any

from twinmesh.cli import render
from twinmesh.control.admin_client import admin_call

PEER_COLUMNS: list[render.Column] = [
    ("KEY", "key", render.short_key),
    ("URI", "uri", render.uri),
    ("DIR", "direction", render.text),
    ("STATE", "state", render.text),
    ("UP", "up_since", render.since),
    ("RTT", "rtt", render.rtt),
    ("IN", "bytes_in", render.size),
    ("OUT", "bytes_out", render.size),
    ("LAST ERROR", "last_error", render.text),
]


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    nic = subparsers.add_parser("nic", help="inspect and steer the NIC", parents=[common])
    commands = nic.add_subparsers(dest="nic_command", required=True, metavar="COMMAND")
    commands.add_parser("self", help="key, listen URIs, uptime", parents=[common])
    commands.add_parser("peers", help="links and configured peers", parents=[common])
    add = commands.add_parser("add-peer", help="keep a link to URI", parents=[common])
    add.add_argument("uri", metavar="URI")
    remove = commands.add_parser("remove-peer", help="forget a peer by KEY or URI",
                                 parents=[common])
    remove.add_argument("target", metavar="KEY|URI")
    nic.set_defaults(run=run)


async def run(args: argparse.Namespace) -> tuple[Any, str]:
    """Returns (data for --json, text for humans)."""
    command = args.nic_command
    if command == "self":
        info = await admin_call(args.nic, "self")
        return info, render.key_values([
            ("key", info["key"]),
            ("listen", ", ".join(info["listen"]) or "-"),
            ("uptime", render.duration(info["uptime"])),
            ("health", info["health"] or "-"),
            ("version", info["version"]),
            ("pid", str(info["pid"])),
        ])
    if command == "peers":
        rows = await admin_call(args.nic, "peers")
        return rows, render.table(rows, PEER_COLUMNS) if rows else "no peers"
    if command == "add-peer":
        result = await admin_call(args.nic, "addPeer", args.uri)
        verb = "added" if result["created"] else "already configured"
        return result, f"{verb}: {result['uri']}"
    result = await admin_call(args.nic, "removePeer", args.target)
    return result, f"removed {result['removed']} peer(s)/link(s) matching {args.target}"
