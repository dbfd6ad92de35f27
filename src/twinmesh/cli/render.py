"""Readable tables and durations for twinctl output."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

Column = tuple[str, str, Callable[[Any], str]]


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Left-aligned columns separated by two spaces, with a header line."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        cells.append([fmt(row.get(key)) for _, key, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in cells]
    return "\n".join(lines)


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def text(value: Any) -> str:
    return "-" if value in (None, "") else str(value)


def uri(value: Any) -> str:
    # The key column already shows a pinned key; keep the table narrow.
    return text(str(value or "").split("?", 1)[0])


def short_key(value: Any) -> str:
    return "-" if not value else f"{value[:16]}…"


def duration(seconds: Any) -> str:
    if seconds is None or seconds < 0:
        return "-"
    seconds = float(seconds)
    if seconds < 1:
        return f"{seconds * 1e3:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def since(unix_time: Any) -> str:
    if not unix_time:
        return "-"
    return duration(time.time() - float(unix_time))


def rtt(seconds: Any) -> str:
    if seconds is None or seconds < 0:
        return "-"
    return f"{float(seconds) * 1e3:.2f}ms"


def size(count: Any) -> str:
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"
