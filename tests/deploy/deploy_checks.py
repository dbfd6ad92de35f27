"""Helpers for the deploy/ tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent

# The probe commands fetch the health endpoint as `http://HOST:PORT/PATH` inside a string.
_URL = re.compile(r"http://([0-9.]+|\[[0-9a-f:]+\]):(\d+)(/[^'\"\s]*)")


def split_command(command: Sequence[str]) -> tuple[str, list[str]]:
    """('pnicd', [flags...]) from ['/opt/twinmesh/bin/pnicd', flags...]."""
    return Path(command[0]).name, list(command[1:])


def probe_urls(command: Sequence[str] | str) -> list[tuple[str, int, str]]:
    """Every (host, port, path) an HTTP probe command fetches."""
    text = command if isinstance(command, str) else " ".join(command)
    return [(host.strip("[]"), int(port), path) for host, port, path in _URL.findall(text)]
