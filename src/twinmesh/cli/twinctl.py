"""`twinctl`: the one CLI for twinmesh users.

    twinctl [--nic PATH] [--json] nic self|peers|add-peer URI|remove-peer KEY|URI
    twinctl [--nic PATH] [--json] nic routes|route KEY|ping KEY [-c N] [-i S] [-W S]

Readable tables by default, `--json` everywhere, exit 1 with a one-line error when
a command fails (NIC not running, unknown peer...), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from twinmesh.cli import nic
from twinmesh.errors import TwinmeshError
from twinmesh.nic.config import default_state_dir


def build_parser() -> argparse.ArgumentParser:
    # Options accepted before and after the subcommand: `twinctl --json nic peers`
    # and `twinctl nic peers --json` both work.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of a table")
    common.add_argument("--nic", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                        help="NIC state dir or admin socket (default: XDG state dir)")
    parser = argparse.ArgumentParser(prog="twinctl", parents=[common],
                                     description="twinmesh command-line control")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nic.add_parser(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    args.nic = getattr(args, "nic", None) or default_state_dir()
    try:
        data, human, *code = trio.run(args.run, args)
    except TwinmeshError as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        print(f"twinctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else human)
    return code[0] if code else 0


if __name__ == "__main__":
    sys.exit(main())
