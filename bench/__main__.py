"""`python -m bench [--quick] [--out docs/BENCHMARKS.md] [--only GROUP,...]`.

Runs every figure group in order (floors first: the others are ratios of them), prints
a progress line per figure to stderr and the summary table to stdout, and with `--out`
writes the markdown report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import trio

from bench import bus, daemon, floor, handshake, link, lookup, peers, repair, report, scale
from bench.measure import Context, Progress
from twinmesh.log import configure_logging

# In this order: later groups take their ratios from figures of earlier ones.
GROUPS: dict[str, ModuleType] = {
    "floor": floor,
    "handshake": handshake,
    "link": link,
    "pnicd": daemon,
    "repair": repair,
    "peers": peers,  # Reticulum and py-libp2p, from the benchmark venv
    "bus": bus,  # after the peers: its ratios divide by their figures
    "lookup": lookup,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[2])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions (about a minute in all)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="write the markdown report here (e.g. docs/BENCHMARKS.md)")
    parser.add_argument("--only", metavar="GROUP,...",
                        help=f"run only these groups ({', '.join(GROUPS)})")
    args = parser.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(GROUPS)
        if unknown:
            parser.error(f"unknown group(s): {', '.join(sorted(unknown))}")
    return args


async def run_groups(ctx: Context, names: list[str]) -> None:
    for name in names:
        await GROUPS[name].run(ctx)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only.split(",") if args.only else list(GROUPS)
    names = [n for n in GROUPS if n in names]  # keep the dependency order
    # As in pnicd: structlog, JSON, info level; the lines go nowhere.
    devnull = open(os.devnull, "w")  # noqa: SIM115 (open for the whole run)
    configure_logging("json", "info", file=devnull)
    ctx = Context(quick=args.quick, progress=Progress())
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        ctx.progress.note(f"load average is {load_before:.2f}: other work on this machine "
                          "will show in the figures")
    started = time.perf_counter()
    try:
        trio.run(run_groups, ctx, names)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    load = f"{load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end (1-minute average)"
    print(f"\nbench: {len(ctx.figures)} figures in {elapsed:.0f} s\n", file=sys.stderr)
    print(report.terminal_table(ctx.figures))
    if args.out is not None:
        sections = [
            report.Section(
                GROUPS[name].TITLE,
                GROUPS[name].method(ctx),
                [f for f in ctx.figures if f.group == GROUPS[name].TITLE],
            )
            for name in names
        ]
        command = "python -m bench" + (" --quick" if args.quick else "") + f" --out {args.out}"
        machine = [*report.machine(), *peers.machine_rows(), ("load", load)]
        text = report.markdown(sections, machine, command=command, quick=args.quick,
                               elapsed=elapsed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # `make scale` writes its own section into the same file: carry it over, with
        # the notes written by hand below it (how to read those figures).
        old = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if scale.BEGIN in old and scale.END in old:
            kept = old[old.index(scale.BEGIN):].rstrip("\n")
            text = text.rstrip("\n") + "\n\n" + kept + "\n"
        args.out.write_text(text, encoding="utf-8")
        print(f"\nbench: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
