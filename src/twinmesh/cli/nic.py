"""`twinctl nic ...`: inspect and steer a NIC through its admin socket."""

from __future__ import annotations

import argparse
import math
from typing import Any

import trio

from twinmesh.cli import render
from twinmesh.control.admin_client import AdminClient, admin_call
from twinmesh.errors import AdminError

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
    commands.add_parser("routes", help="the routing table", parents=[common])
    route = commands.add_parser("route", help="the route to one NIC", parents=[common])
    route.add_argument("key", metavar="KEY")
    ping = commands.add_parser("ping", help="ping a NIC across the overlay", parents=[common])
    ping.add_argument("key", metavar="KEY")
    ping.add_argument("-c", "--count", type=int, default=4, help="pings to send (default 4)")
    ping.add_argument("-i", "--interval", type=float, default=1.0,
                      help="seconds between pings (default 1)")
    ping.add_argument("-W", "--timeout", type=float, default=2.0,
                      help="seconds to wait for each reply (default 2)")
    nic.set_defaults(run=run)


ROUTE_COLUMNS: list[render.Column] = [
    ("DESTINATION", "destination", render.short_key),
    ("NEXT HOP", "next_hop", render.short_key),
    ("METRIC", "metric", render.text),
    ("SEQNO", "seqno", render.text),
    ("AGE", "age", render.duration),
    ("ALT", "alternatives", render.text),
]


async def run(args: argparse.Namespace) -> tuple[Any, str] | tuple[Any, str, int]:
    """Returns (data for --json, text for humans[, exit code])."""
    command = args.nic_command
    if command == "routes":
        rows = await admin_call(args.nic, "routes")
        return rows, render.table(rows, ROUTE_COLUMNS)
    if command == "route":
        row = await admin_call(args.nic, "route", args.key)
        return row, render.key_values([
            ("destination", row["destination"]),
            ("next hop", row["next_hop"] or "(this NIC)"),
            ("metric", f"{row['metric']} hop(s)"),
            ("seqno", str(row["seqno"])),
            ("age", render.duration(row["age"])),
            ("alternatives", str(row["alternatives"])),
        ])
    if command == "ping":
        return await ping(args)
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


async def ping(args: argparse.Namespace) -> tuple[Any, str, int]:
    """Like ping(8): a line per reply (unless --json), then loss and RTT statistics."""
    if not 1 <= args.count <= 10_000:
        raise AdminError("-c must be between 1 and 10000")
    if not 0 <= args.interval <= 60 or not 0 < args.timeout <= 30:
        raise AdminError("-i must be in [0, 60] and -W in (0, 30] seconds")
    replies: list[dict[str, Any]] = []
    short = args.key[:16]
    if not args.json:
        print(f"PING {args.key} across the overlay", flush=True)
    async with AdminClient(args.nic) as client:
        for seq in range(1, args.count + 1):
            reply = await client.call("ping", args.key, timeout=args.timeout)
            reply["seq"] = seq
            replies.append(reply)
            if not args.json:
                if reply["rtt"] is not None:
                    line = (f"reply from {short}…: seq={seq} hops={reply['hops']} "
                            f"time={reply['rtt'] * 1e3:.3f} ms")
                elif reply["error"] == "timeout":
                    line = f"no reply: seq={seq} (timeout after {args.timeout:g} s)"
                else:
                    by = reply["reported_by"][:16]
                    line = f"unreachable: seq={seq} {reply['error']} (reported by {by}…)"
                print(line, flush=True)
            if seq < args.count:
                await trio.sleep(args.interval)
    summary = ping_summary(replies)
    human = (f"--- {short}… overlay ping statistics ---\n"
             f"{summary['sent']} sent, {summary['received']} received, "
             f"{summary['loss'] * 100:.0f}% loss")
    if summary["received"]:
        human += ("\nrtt min/avg/max/p99 = " + "/".join(
            f"{summary[k] * 1e3:.3f}" for k in ("min", "avg", "max", "p99")) + " ms")
    return {"replies": replies, **summary}, human, 0 if summary["received"] else 1


def ping_summary(replies: list[dict[str, Any]]) -> dict[str, Any]:
    rtts = sorted(r["rtt"] for r in replies if r["rtt"] is not None)
    summary: dict[str, Any] = {
        "sent": len(replies),
        "received": len(rtts),
        "loss": 1 - len(rtts) / len(replies) if replies else 0.0,
    }
    if rtts:
        summary.update(
            min=rtts[0],
            avg=sum(rtts) / len(rtts),
            max=rtts[-1],
            p99=rtts[min(len(rtts) - 1, math.ceil(0.99 * len(rtts)) - 1)],
        )
    return summary
