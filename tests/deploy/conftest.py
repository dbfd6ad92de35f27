"""Checks shared by the deploy/ tests: every daemon command line in a deployment artefact
goes through the daemons' own argument parsers, so the files cannot drift from the code."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from twinmesh.errors import ConfigError
from twinmesh.nic import main as pnicd_main
from twinmesh.nic.config import NicConfig
from twinmesh.nic.health import check_loopback
from twinmesh.twin import main as twind_main

PnicdCheck = Callable[..., NicConfig]


@pytest.fixture
def pnicd_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> PnicdCheck:
    """`check(argv, config_text)`: the settings pnicd would run with, or the test fails.

    argv is what follows the program name. When it names `--config FILE`, config_text is
    what that file holds on the target (it is written to a temporary file in its place).
    """

    def check(argv: Sequence[str], config_text: str | None = None) -> NicConfig:
        args = list(argv)
        if "--config" in args:
            if config_text is None:
                pytest.fail(f"pnicd {shlex.join(args)}: the test needs the --config file's text")
            path = tmp_path / "pnicd.toml"
            path.write_text(config_text, "utf-8")
            args[args.index("--config") + 1] = str(path)
        try:
            parsed = pnicd_main.parse_args(args)
        except SystemExit:
            pytest.fail(f"pnicd rejects {shlex.join(args)}: {capsys.readouterr().err.strip()}")
        try:
            settings = pnicd_main.build_config(parsed)
            if settings.health is not None:
                check_loopback(settings.health[0])  # checked by pnicd only as it starts
        except ConfigError as exc:
            pytest.fail(f"pnicd {shlex.join(args)}: {exc}")
        return settings

    return check


@pytest.fixture
def twind_args(
    capsys: pytest.CaptureFixture[str],
) -> Callable[[Sequence[str]], argparse.Namespace]:
    """`check(argv)`: twind's parsed arguments, or the test fails."""

    def check(argv: Sequence[str]) -> argparse.Namespace:
        try:
            return twind_main.parse_args(list(argv))
        except SystemExit:
            pytest.fail(f"twind rejects {shlex.join(argv)}: {capsys.readouterr().err.strip()}")

    return check
