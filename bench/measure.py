"""What a figure is, how samples become one, and the bounds every loop runs under."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

# Units a figure may have. Times: lower is better; rates: higher is better; "x" is a
# ratio between two systems' figures, oriented so that higher is better.
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
Unit = Literal["s", "ms", "us", "msgs/s", "MB/s", "MiB", "x"]
LOWER_IS_BETTER = {"s", "ms", "us", "MiB"}


@dataclass(frozen=True)
class Stats:
    """Summary of a list of samples (already in the figure's unit)."""

    n: int
    median: float
    p10: float
    p90: float
    p99: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        ordered = sorted(samples)
        return cls(
            n=len(ordered),
            median=statistics.median(ordered),
            p10=percentile(ordered, 10),
            p90=percentile(ordered, 90),
            p99=percentile(ordered, 99),
            low=ordered[0],
            high=ordered[-1],
        )


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile of already sorted samples."""
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * pct / 100
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


@dataclass(frozen=True)
class Goal:
    """A target from an issue: `value` must be met by the figure's headline value."""

    value: float
    source: str = ""  # where the goal comes from, e.g. the issue

    def met(self, figure: Figure) -> bool:
        if figure.missing:
            return False
        if figure.unit in LOWER_IS_BETTER:
            return figure.value <= self.value
        return figure.value >= self.value


@dataclass
class Figure:
    """One measured figure: a headline value plus what it is and how far it spread."""

    key: str  # stable id, e.g. "handshake.tcp"
    group: str  # the group module's TITLE
    name: str  # what a reader sees in the table
    value: float
    unit: Unit
    spread: tuple[float, float] | None = None  # (low, high) in `unit`
    spread_kind: str = ""  # "p10-p90", "min-max of 5 runs", ...
    detail: str = ""  # n, p90/p99, byte rates: one short line
    goal: Goal | None = None
    floor_key: str | None = None  # the figure this one is a ratio of
    floor_value: float | None = None
    floor_name: str = ""
    notes: list[str] = field(default_factory=list)  # e.g. a run cut short by its bound
    short: str = ""  # how a figure that is a floor is named in other figures' ratios
    missing: str = ""  # set when the figure could not be measured: why (value is NaN)

    @property
    def ratio(self) -> float | None:
        if self.floor_value is None or self.floor_value == 0:
            return None
        return self.value / self.floor_value

    @property
    def verdict(self) -> str:
        if self.missing:
            return "not measured" if self.goal is not None else ""
        if self.goal is None:
            return ""
        if self.goal.met(self):
            return "pass"
        gap = self.value - self.goal.value
        pct = 100 * gap / self.goal.value
        return f"short by {fmt_value(abs(gap), self.unit)} ({pct:+.0f}%)"


def fmt_number(value: float) -> str:
    """Three significant digits, never an exponent."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def fmt_value(value: float, unit: str) -> str:
    if unit == "x":
        return f"{fmt_number(value)}x"
    if unit == "msgs/s":
        if value >= 1000:
            return f"{fmt_number(value / 1000)} k msgs/s"
        return f"{fmt_number(value)} msgs/s"
    shown = "µs" if unit == "us" else unit
    return f"{fmt_number(value)} {shown}"


def fmt_spread(figure: Figure) -> str:
    if figure.spread is None:
        return ""
    low, high = figure.spread
    unit = "µs" if figure.unit == "us" else figure.unit
    if figure.unit == "msgs/s":
        return f"{fmt_number(low / 1000)}-{fmt_number(high / 1000)} k ({figure.spread_kind})"
    return f"{fmt_number(low)}-{fmt_number(high)} {unit} ({figure.spread_kind})"


def fmt_shown(figure: Figure) -> str:
    """The headline value as shown in tables ("not measured" when it is missing)."""
    if figure.missing:
        return "not measured"
    return fmt_value(figure.value, figure.unit)


def fmt_ratio(figure: Figure) -> str:
    ratio = figure.ratio
    if ratio is None or figure.missing:
        return ""
    return f"{fmt_number(ratio)}x {figure.floor_name}"


class Bound:
    """A wall-clock allowance for one loop: check `expired` next to the loop's count."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.perf_counter() + seconds

    @property
    def expired(self) -> bool:
        return time.perf_counter() >= self.deadline

    @property
    def left(self) -> float:
        return max(0.0, self.deadline - time.perf_counter())


class Progress:
    """One line per figure on stderr: what is being measured, then its value."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._started = time.perf_counter()
        self._count = 0
        self._current: tuple[str, float] | None = None

    def start(self, what: str) -> None:
        self._count += 1
        self._current = (what, time.perf_counter())
        self._write(f"bench [{self._count:2d}] {what} …", end="")

    def done(self, figure: Figure | None = None, text: str = "") -> None:
        took = time.perf_counter() - self._current[1] if self._current else 0.0
        shown = text or (fmt_shown(figure) if figure else "done")
        self._write(f" {shown}  ({took:.1f} s)")
        self._current = None

    def note(self, text: str) -> None:
        self._write(f"bench      {text}")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def _write(self, text: str, end: str = "\n") -> None:
        print(text, end=end, file=self._stream, flush=True)


@dataclass
class Context:
    """Shared by every group in one run: the plan, the progress line, the figures."""

    quick: bool
    progress: Progress
    figures: list[Figure] = field(default_factory=list)

    def pick(self, full: int, quick: int) -> int:
        """A repetition count for this run."""
        return quick if self.quick else full

    def add(self, figure: Figure) -> Figure:
        floor = self.get(figure.floor_key) if figure.floor_key else None
        if floor is not None and figure.floor_value is None:
            figure.floor_value = floor.value
            figure.floor_name = figure.floor_name or floor.short or floor.name
        self.figures.append(figure)
        return figure

    def get(self, key: str) -> Figure | None:
        return next((f for f in self.figures if f.key == key), None)


def cpu_time_per_op(
    op: Callable[[], object], *, ops: int, batches: int, bound: Bound
) -> tuple[Stats, int]:
    """Time `op` in `batches` batches of `ops` calls; per-call microseconds per batch.

    Stops early when `bound` expires (after at least one batch). Returns the stats of
    the per-batch means and the number of batches run.
    """
    op()  # warm caches and lazy initialisation
    means: list[float] = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(ops):
            op()
        means.append((time.perf_counter() - started) / ops / TIME_UNITS["us"])
        if bound.expired:
            break
    return Stats.of(means), len(means)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far, from /proc/PID/stat
    (in 10 ms ticks; it includes threads that have ended, which the per-thread
    nanosecond counts do not)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
