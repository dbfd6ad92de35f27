"""`twinctl`: the one CLI for twinmesh users.

Your twin (`--twin PATH`: its state dir or control socket; default $TWINMESH_TWIN, else
the XDG state dir, ~/.local/state/twinmesh/twin):

    twinctl id                                   this twin's id (alone on one line)
    twinctl status                               identity, NIC, uptime, queued, unread
    twinctl ping TWIN_ID [-c N] [-i S] [-W S]    round trips like ping(8); Ctrl-C ends
    twinctl find TWIN_ID                         identity, NIC, hops, rounds, lookup time
    twinctl send TWIN_ID TEXT [--ttl S] [--wait] send a chat message
    twinctl inbox [--with TWIN_ID] [-n N] [--since TIME] [--follow]
                                                 history, then live messages
    twinctl contacts list|add TWIN_ID [--name N]|accept TWIN_ID [--name N]|remove TWIN_ID
    twinctl settings [--contacts-only on|off] [--name N]
    twinctl web                                  the browser page's URL with its token
    twinctl move NIC_PATH                        attach the twin to another NIC

Your NIC (`--nic PATH`: its state dir or admin socket; default: the XDG state dir):

    twinctl nic self|peers|add-peer URI|remove-peer KEY|URI
    twinctl nic routes|route KEY|ping KEY [-c N] [-i S] [-W S]

A whole deployment from a topology file (see twinmesh.cli.lab):

    twinctl lab up FILE [--netns] [--dir D] [--foreground] [--timeout S]
    twinctl lab status|restart [NODE]|down [--dir D]

Readable tables by default, `--json` everywhere (before or after the command), exit 1
with a one-line error when a command fails (twin or NIC not running, unknown twin,
expired...), 2 for usage errors (including a malformed twin id).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import trio

from twinmesh.cli import lab, nic, twin
from twinmesh.control.twin_client import sole_exception
from twinmesh.errors import ApiError, TwinmeshError
from twinmesh.nic.config import default_state_dir
from twinmesh.twin.service import default_twin_dir

TWIN_ENV = "TWINMESH_TWIN"


def build_parser() -> argparse.ArgumentParser:
    # Options accepted before and after the subcommand: `twinctl --json nic peers`
    # and `twinctl nic peers --json` both work.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of a table")
    common.add_argument("--nic", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                        help="NIC state dir or admin socket (default: XDG state dir)")
    common.add_argument("--twin", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                        help=f"twin state dir or control socket (default: ${TWIN_ENV}, "
                             "else the XDG state dir)")
    parser = argparse.ArgumentParser(prog="twinctl", parents=[common],
                                     description="twinmesh command-line control")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    twin.add_parser(subparsers, common)
    nic.add_parser(subparsers, common)
    lab.add_parser(subparsers, common)
    return parser


def default_twin() -> Path:
    return Path(os.environ.get(TWIN_ENV) or default_twin_dir())


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run one command; the exit code. `stdout`/`stderr` default to sys's (tests pass
    their own to run twinctl in-process)."""
    args = build_parser().parse_args(argv)
    args.out = stdout or sys.stdout
    args.err = stderr or sys.stderr
    args.json = getattr(args, "json", False)
    args.nic = getattr(args, "nic", None) or default_state_dir()
    args.twin = (getattr(args, "twin", None) or default_twin()).expanduser()
    try:
        data, human, *code = run(args)
    except TwinmeshError as exc:
        report_error(args, exc)
        return 1
    except KeyboardInterrupt:
        return 130
    if data is None and human is None:
        return code[0] if code else 0  # the command printed as it went
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else human, file=args.out)
    return code[0] if code else 0


def run(args: argparse.Namespace) -> Any:
    """Run the command's coroutine; an error inside task groups comes out on its own."""
    try:
        return trio.run(args.run, args)
    except BaseExceptionGroup as group:
        errors, _ = group.split(TwinmeshError)
        first = sole_exception(group) or (_first_leaf(errors) if errors else None)
        if first is None:
            raise
        raise first from None


def report_error(args: argparse.Namespace, exc: TwinmeshError) -> None:
    if isinstance(exc, ApiError):
        message = (exc.message or exc.code).replace("\n", " ")
        if args.json:
            print(json.dumps({"error": message, "code": exc.code}), file=args.out)
    else:
        message = str(exc)
        if args.json:
            print(json.dumps({"error": message}), file=args.out)
    print(f"twinctl: {message}", file=args.err)


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup):
        inner = inner.exceptions[0]
    return inner


if __name__ == "__main__":
    sys.exit(main())
