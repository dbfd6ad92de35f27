"""`python -m twinmesh.sim [--quick] [--only SIZE,...] [--out docs/SCALING.md]`.

Runs the scaling scenarios (100, 1 000 and 10 000 NICs) on the discrete-event
simulator, prints a progress line per phase to stderr and the summary tables to stdout.
With `--out`, rewrites the generated part of that file: everything between the
`<!-- BEGIN make sim -->` and `<!-- END make sim -->` lines, the rest is left as written.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from twinmesh.sim import scenarios
from twinmesh.sim.network import SimulationLimit
from twinmesh.sim.scenarios import Result, Scenario, fmt_bytes, fmt_seconds, fmt_traffic

BEGIN = "<!-- BEGIN make sim -->"
END = "<!-- END make sim -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m twinmesh.sim",
                                     description=__doc__.split("\n")[2])
    parser.add_argument("--quick", action="store_true",
                        help="fewer announcing destinations (about two minutes in all)")
    parser.add_argument("--only", metavar="SIZE,...",
                        help="run only the scenarios of these sizes (100, 1000, 10000)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help=f"rewrite the part of FILE between {BEGIN} and {END}")
    return parser.parse_args(argv)


def progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen: tuple[Scenario, ...] = scenarios.QUICK if args.quick else scenarios.SCENARIOS
    if args.only:
        sizes = {int(s) for s in args.only.split(",")}
        chosen = tuple(s for s in chosen if s.size in sizes)
    started = time.perf_counter()
    results: list[Result] = []
    try:
        for scenario in chosen:
            results.append(scenarios.run(scenario, progress))
    except KeyboardInterrupt:
        print("sim: interrupted", file=sys.stderr)
        return 130
    except SimulationLimit as exc:
        print(f"sim: a scenario went past its bounds: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    progress(f"{len(results)} scenarios in {elapsed:.0f} s")
    print(terminal(results))
    if args.out is not None:
        command = "python -m twinmesh.sim" + (" --quick" if args.quick else "") + \
            (f" --only {args.only}" if args.only else "") + f" --out {args.out}"
        write_section(args.out, markdown(results, command, elapsed))
        progress(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------- tables


def rows(results: list[Result]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    head = ["NICs", "graph", "destinations", "links (degree mean / max)", "diameter",
            "convergence (virtual)", "routes per NIC (mean / max)",
            "control per NIC per minute (mean / median / max)",
            "per destination per neighbour per minute", "wall"]
    body = []
    for r in results:
        s = r.scenario
        destinations = "all" if s.origins is None else f"{r.destinations} of {s.size}"
        converged = f"{r.converged * 1000:.0f} ms"
        if r.missing_routes:
            converged += f" ({r.missing_routes} routes missing)"
        body.append([
            f"{s.size:,}".replace(",", " "), s.topology, destinations,
            f"{r.links} ({r.mean_degree:.1f} / {r.max_degree})", f"~{r.diameter}", converged,
            f"{r.routes_mean:.1f} / {r.routes_max}",
            f"{fmt_bytes(r.bytes_per_min_mean)} / {fmt_bytes(r.bytes_per_min_median)} / "
            f"{fmt_bytes(r.bytes_per_min_max)}",
            fmt_bytes(r.bytes_per_destination_per_link),
            f"{r.wall:.0f} s",
        ])
    repair_head = ["NICs", "link cut (end degrees)", "paths crossing it", "detection",
                   "every path reaches again", "pings answered again", "origins re-signed"]
    repair_body = []
    for r in results:
        for p in r.repairs:
            repair_body.append([
                f"{r.scenario.size:,}".replace(",", " "),
                f"{p.link[0]}-{p.link[1]} ({p.link_degrees[0]}/{p.link_degrees[1]})",
                str(p.affected_pairs),
                "at once (socket closed)" if p.detection == 0 else
                f"{p.detection:g} s (keepalive dead_after)",
                fmt_seconds(p.repaired), fmt_traffic(p), str(p.resigned),
            ])
    return head, body, repair_head, repair_body


def terminal(results: list[Result]) -> str:
    head, body, repair_head, repair_body = rows(results)
    return _align(head, body) + "\n\n" + _align(repair_head, repair_body)


def _align(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def markdown(results: list[Result], command: str, elapsed: float) -> str:
    head, body, repair_head, repair_body = rows(results)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    details = []
    for r in results:
        details.append(
            f"- {r.scenario.label}: {r.converge_events} events to converge "
            f"({r.converge_wall:.0f} s wall), {r.events} in all; steady state over "
            f"{r.scenario.steady:.0f} s ({r.steady_wall:.0f} s wall), "
            f"{r.messages_per_min_mean:.0f} routing messages per NIC per minute; "
            f"keys {r.keygen_seconds:.2f} s; violations {r.violations}, relay announcements "
            f"refused {r.relay_refusals}, messages lost on cut links {r.lost}; "
            f"peak RSS {r.rss_mib:.0f} MiB.")
    return "\n".join([
        f"Written by `{command}` on {when}; the whole run took {elapsed:.0f} s. "
        "Regenerate with `make sim`; edits by hand between the markers are overwritten.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine()) + ".",
        "",
        _md(head, body),
        "",
        _md(repair_head, repair_body),
        "",
        *details,
    ])


def write_section(path: Path, section: str, *, begin: str = BEGIN, end: str = END) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else f"{begin}\n{end}\n"
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    before, _, rest = text.partition(begin)
    _, _, after = rest.partition(end)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{before}{begin}\n{section}\n{end}{after}", encoding="utf-8")


def machine() -> list[tuple[str, str]]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next((line.partition(":")[2].strip() for line in cpuinfo
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    here = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                  capture_output=True, text=True, timeout=5,
                                  check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = "unknown"
    return [
        ("CPU", cpu),
        ("cores", f"{os.cpu_count()} (one used)"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("git", revision),
    ]


if __name__ == "__main__":
    sys.exit(main())
