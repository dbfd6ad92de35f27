"""The summary table on the terminal and docs/BENCHMARKS.md."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.measure import Figure, fmt_ratio, fmt_shown, fmt_spread, fmt_value

PACKAGES = ("twinmesh", "trio", "pynacl", "pycapnp", "websockets", "structlog")
COLUMNS = ("figure", "value", "spread", "goal", "vs floor", "verdict")


@dataclass(frozen=True)
class Section:
    """One group's part of the report: its heading, method text and figures."""

    title: str
    method: str
    figures: list[Figure]


def machine() -> list[tuple[str, str]]:
    """What the figures were measured on, as (label, value) rows."""
    rows = [
        ("CPU", _cpu_model()),
        ("cores", f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable"),
        ("memory", _memory()),
        ("kernel", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
    ]
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    rows.append(("packages", ", ".join(versions)))
    rows.append(("source", _git_revision()))
    return rows


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _git_revision() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"git {commit}" + (" with uncommitted changes" if dirty else "")


def _goal(figure: Figure) -> str:
    if figure.goal is None:
        return ""
    sign = "≤" if figure.unit in ("s", "ms", "us", "MiB") else "≥"
    return f"{sign} {fmt_value(figure.goal.value, figure.unit)}"


def row(figure: Figure) -> tuple[str, ...]:
    return (
        figure.name,
        fmt_shown(figure),
        fmt_spread(figure) if not figure.missing else figure.missing,
        _goal(figure),
        fmt_ratio(figure),
        figure.verdict,
    )


# --------------------------------------------------------------------- terminal


def terminal_table(figures: Sequence[Figure]) -> str:
    """An aligned plain-text table of every figure, grouped by section."""
    rows = [row(f) for f in figures]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    group = None
    for figure, cells in zip(figures, rows, strict=True):
        if figure.group != group:
            group = figure.group
            lines.append(f"[{group}]")
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        for note in figure.notes:
            lines.append(f"    note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------- markdown

def markdown(
    sections: Sequence[Section],
    machine_rows: Sequence[tuple[str, str]],
    *,
    command: str,
    quick: bool,
    elapsed: float,
    when: datetime.datetime | None = None,
) -> str:
    when = when or datetime.datetime.now(datetime.UTC)
    figures = [f for s in sections for f in s.figures]
    out: list[str] = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {when:%Y-%m-%d %H:%M} UTC"
        f"{' (--quick: fewer repetitions)' if quick else ''}; the whole run took "
        f"{elapsed:.0f} s. Regenerate with `make bench`; edits by hand are overwritten.",
        "",
        "Figures are recorded here, not asserted by tests. Everything runs on loopback "
        "(127.0.0.1) on the machine below, in one run, next to floors re-measured in the "
        "same run; compare ratios across machines, not absolute values.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in machine_rows),
        "",
        "## Summary",
        "",
        "*value* is the median. *spread* says which range it shows. *vs floor* is our "
        "value ÷ the floor's value from this run (times: lower is better, so 3x means "
        "three times slower than the floor; rates: higher is better, so 0.3x means 30% of "
        "the floor). *verdict* compares the median with the goal set by an issue.",
        "",
        _md_table(figures),
        "",
    ]
    missed = [f for f in figures if f.goal is not None and not f.goal.met(f)]
    out += ["### Goals", ""]
    if not any(f.goal for f in figures):
        out += ["No figure in this run has a goal.", ""]
    for figure in figures:
        if figure.goal is None:
            continue
        if figure.missing:
            out.append(f"- {figure.name}: not measured ({figure.missing}); goal "
                       f"{_goal(figure)} ({figure.goal.source}).")
            continue
        state = "met" if figure not in missed else f"**missed**, {figure.verdict}"
        out.append(
            f"- {figure.name}: {fmt_value(figure.value, figure.unit)} against "
            f"{_goal(figure)} ({figure.goal.source}): {state}."
        )
    out.append("")
    notes = [(f, n) for f in figures for n in f.notes]
    if notes:
        out += ["### Notes", ""]
        out += [f"- {f.name}: {n}" for f, n in notes]
        out.append("")
    for section in sections:
        out += [f"## {section.title}", "", section.method.rstrip(), ""]
        if section.figures:
            out += [_md_detail_table(section.figures), ""]
    return "\n".join(out)


def _md_table(figures: Sequence[Figure]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for figure in figures:
        lines.append("| " + " | ".join(_md(c) for c in row(figure)) + " |")
    return "\n".join(lines)


def _md_detail_table(figures: Sequence[Figure]) -> str:
    lines = ["| figure | value | detail |", "|---|---|---|"]
    for figure in figures:
        detail = "; ".join([figure.detail, *figure.notes]) if figure.notes else figure.detail
        if figure.missing:
            detail = figure.missing
        lines.append(
            f"| {_md(figure.name)} | {_md(fmt_shown(figure))} "
            f"| {_md(detail)} |"
        )
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|")
