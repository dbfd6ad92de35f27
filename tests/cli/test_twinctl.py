"""The real `twinctl` console script against real (or missing) pnicd processes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from twinmesh.identity.keys import Identity
from twinmesh.nic.config import ADMIN_SOCKET
from twinmesh.testing.processes import (
    PnicdProcess,
    free_port,
    run_pnicd,
    twinctl,
    twinctl_json,
)

pytestmark = pytest.mark.process

TIMEOUT = 30


@pytest.fixture
async def nic(tmp_path: Path) -> AsyncIterator[PnicdProcess]:
    with trio.fail_after(TIMEOUT):
        async with run_pnicd(tmp_path / "nic", health=False) as running:
            yield running


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
async def test_a_nic_that_is_not_running_is_one_line_and_exit_1(
    tmp_path: Path, json_flag: list[str]
) -> None:
    state_dir = tmp_path / "nobody-home"
    state_dir.mkdir()
    with trio.fail_after(TIMEOUT):
        done = await twinctl("--nic", state_dir, "nic", "peers", *json_flag)
    assert done.returncode == 1
    assert len(done.stderr_lines) == 1, done.stderr
    assert done.stderr_lines[0].startswith("twinctl: ")
    assert "admin socket" in done.stderr
    assert str(state_dir / ADMIN_SOCKET) in done.stderr
    if json_flag:
        assert "admin socket" in json.loads(done.stdout)["error"]
    else:
        assert done.stdout == ""


async def test_json_is_accepted_before_and_after_the_subcommand(nic: PnicdProcess) -> None:
    with trio.fail_after(TIMEOUT):
        before = await twinctl("--json", "--nic", nic.state_dir, "nic", "self")
        after = await twinctl("nic", "self", "--nic", nic.state_dir, "--json")
    for done in (before, after):
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        assert info["key"] == nic.key
        assert info["listen"] == nic.listen
        assert info["pid"] == nic.pid


async def test_self_without_json_is_readable_key_values(nic: PnicdProcess) -> None:
    with trio.fail_after(TIMEOUT):
        done = await twinctl("--nic", nic.state_dir, "nic", "self")
    assert done.returncode == 0, done.stderr
    fields = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert fields["key"] == nic.key
    assert fields["listen"] == ", ".join(nic.listen)
    assert fields["pid"] == str(nic.pid)


async def test_peers_table_has_a_header_with_key_and_state(nic: PnicdProcess) -> None:
    unreachable = f"tcp://127.0.0.1:{free_port()}"  # nobody listens: stays connecting/backoff
    with trio.fail_after(TIMEOUT):
        empty = await twinctl("--nic", nic.state_dir, "nic", "peers")
        assert (empty.returncode, empty.stdout.strip()) == (0, "no peers")
        await twinctl_json("--nic", nic.state_dir, "nic", "add-peer", unreachable)
        done = await twinctl("--nic", nic.state_dir, "nic", "peers")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    columns = header.split()
    assert columns[0] == "KEY"
    assert "STATE" in columns
    assert "URI" in columns
    assert len(rows) == 1
    assert unreachable in rows[0]


async def test_remove_peer_of_an_unknown_key_is_exit_1(nic: PnicdProcess) -> None:
    stranger = Identity.generate().public.text
    with trio.fail_after(TIMEOUT):
        done = await twinctl("--nic", nic.state_dir, "nic", "remove-peer", stranger)
    assert done.returncode == 1
    assert len(done.stderr_lines) == 1, done.stderr
    assert stranger in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    "uri", ["http://127.0.0.1:9651", "tcp://127.0.0.1", "tcp://127.0.0.1:9651?key=nope"]
)
async def test_add_peer_with_a_bad_uri_is_exit_1(nic: PnicdProcess, uri: str) -> None:
    with trio.fail_after(TIMEOUT):
        done = await twinctl("--nic", nic.state_dir, "nic", "add-peer", uri)
        peers = await twinctl_json("--nic", nic.state_dir, "nic", "peers")
    assert done.returncode == 1
    assert len(done.stderr_lines) == 1, done.stderr
    assert uri in done.stderr
    assert peers == []
