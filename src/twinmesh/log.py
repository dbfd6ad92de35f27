"""Logging for the daemons: structlog, one call to set it up, one helper to get a logger.

Call `configure_logging()` once at startup (calling it again simply replaces the
configuration). Modules take their logger with `get_logger(component=...)` at import time:
the logger is a lazy proxy, so it follows whatever configuration is current when it logs.

Two output formats, both to stderr unless told otherwise:

* ``console`` -- aligned, human-readable lines; colours only when the file is a terminal.
* ``json``    -- one JSON object per line: ``timestamp`` (ISO 8601, UTC), ``level``,
  ``event`` and every bound key; exceptions as a single ``exception`` string.

``auto`` (the default) means ``console``; services under a supervisor pass ``json``.

Only structlog loggers are configured; the standard library's ``logging`` is left alone.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger, Processor

from twinmesh.errors import ConfigError

FORMATS = ("auto", "console", "json")
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure_logging(
    fmt: str = "auto", level: str = "info", *, file: TextIO | None = None
) -> None:
    """Configure structlog to write events at `level` or above to `file` in format `fmt`.

    `fmt` is one of "auto", "console", "json"; `level` one of "debug", "info", "warning",
    "error", "critical" (any case). `file` defaults to the current ``sys.stderr``.
    Raises ConfigError (a one-line message) for an unknown format or level. Idempotent:
    a second call replaces the first configuration, it never adds a second output.
    """
    fmt_key = fmt.strip().lower()
    if fmt_key not in FORMATS:
        raise ConfigError(f"unknown log format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    level_key = level.strip().lower()
    if level_key not in LEVELS:
        raise ConfigError(f"unknown log level {level!r}; expected one of: {', '.join(LEVELS)}")
    out = sys.stderr if file is None else file

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt_key == "json":
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    else:
        # ConsoleRenderer formats exc_info itself (and warns if format_exc_info ran first).
        processors.append(structlog.dev.ConsoleRenderer(colors=_isatty(out)))

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level_key]),
        context_class=dict,
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Not cached: loggers taken at import time must follow a later configure_logging().
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """Return a logger with `bound` key/value pairs attached to every event it logs."""
    logger: FilteringBoundLogger = structlog.get_logger(**bound)
    return logger


def _isatty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or already closed
        return False
