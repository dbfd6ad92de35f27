"""Real pnicd processes on 127.0.0.1: links, reconnects, refusals, admin, health, logs.

Every port is chosen by the kernel and read back through `twinctl nic self --json`,
except where a NIC must come back on the same port after a restart. Nothing sleeps
for a fixed time: conditions are polled with generous timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from twinmesh.identity.keys import Identity
from twinmesh.identity.keystore import load_or_create_identity
from twinmesh.nic.config import ADMIN_SOCKET, KEY_FILE
from twinmesh.testing.processes import (
    PnicdProcess,
    free_port,
    http_get,
    parse_metrics,
    run_pnicd,
    run_pnicd_to_exit,
    twinctl,
    twinctl_json,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.process

TIMEOUT = 30  # per test; every wait inside is far shorter


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "fast.toml")


def other_key() -> str:
    """A valid key that belongs to none of the NICs under test."""
    return Identity.generate().public.text


async def peers_json(nic: PnicdProcess) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = await twinctl_json("--nic", nic.state_dir, "nic", "peers")
    return rows


def row_for(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    matches = [r for r in rows if r["key"] == key]
    assert len(matches) == 1, rows
    return matches[0]


async def outbound_row(nic: PnicdProcess, uri_prefix: str) -> dict[str, Any] | None:
    """The dialer row of `nic` whose URI starts with `uri_prefix`."""
    rows = [r for r in await nic.peers() if r["uri"].startswith(uri_prefix)]
    return rows[0] if rows else None


async def metrics(nic: PnicdProcess) -> dict[str, float]:
    status, body = await http_get(nic.health_url + "metrics")
    assert status == 200
    return parse_metrics(body)


# --- links ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["tcp", "ws"])
async def test_two_nics_link_and_report_each_other(
    tmp_path: Path, config: Path, scheme: str
) -> None:
    with trio.fail_after(TIMEOUT):
        listen = ["tcp://127.0.0.1:0", "ws://127.0.0.1:0/pnic"]
        async with (
            run_pnicd(tmp_path / "a", config=config, listen=listen) as a,
            run_pnicd(tmp_path / "b", "--peer", a.uri(scheme), config=config) as b,
        ):
            await a.wait_peer_up(b.key)
            await b.wait_peer_up(a.key)

            # Keepalives every 0.2 s: wait until both ends measured an RTT.
            async def measured() -> bool:
                rows = [await a.peer(b.key), await b.peer(a.key)]
                return all(r is not None and r["rtt"] > 0 for r in rows)

            await wait_until(measured, what="RTT measured on both ends")

            seen_by_a = row_for(await peers_json(a), b.key)
            seen_by_b = row_for(await peers_json(b), a.key)
    for row, direction in ((seen_by_a, "inbound"), (seen_by_b, "outbound")):
        assert row["state"] == "up"
        assert row["direction"] == direction
        assert row["carrier"] == scheme
        assert 0 < row["rtt"] < 5
        assert row["up_since"] > 0
        assert row["bytes_in"] > 0 and row["bytes_out"] > 0
        assert row["frames_in"] > 0 and row["frames_out"] > 0
    assert seen_by_b["uri"] == a.uri(scheme)


async def test_three_nics_in_a_line_over_mixed_carriers(tmp_path: Path, config: Path) -> None:
    with trio.fail_after(TIMEOUT):
        both = ["tcp://127.0.0.1:0", "ws://127.0.0.1:0/pnic"]
        async with (
            run_pnicd(tmp_path / "a", config=config) as a,
            run_pnicd(tmp_path / "b", "--peer", a.uri("tcp"), config=config, listen=both) as b,
            run_pnicd(tmp_path / "c", "--peer", b.uri("ws"), config=config) as c,
        ):
            await b.wait_peer_up(a.key)
            await b.wait_peer_up(c.key)
            await a.wait_peer_up(b.key)
            await c.wait_peer_up(b.key)
            middle = await peers_json(b)
            ends = await peers_json(a), await peers_json(c)
    up = {r["key"]: r for r in middle if r["state"] == "up"}
    assert set(up) == {a.key, c.key}
    assert (up[a.key]["carrier"], up[a.key]["direction"]) == ("tcp", "outbound")
    assert (up[c.key]["carrier"], up[c.key]["direction"]) == ("ws", "inbound")
    for rows, key in zip(ends, (a.key, c.key), strict=True):
        assert [r["key"] for r in rows if r["state"] == "up"] == [b.key]
        assert all(r["key"] != key for r in rows)


async def test_twinctl_routes_and_pings_across_two_hops(tmp_path: Path, config: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_pnicd(tmp_path / "a", config=config) as a,
            run_pnicd(tmp_path / "b", "--peer", a.uri("tcp"), config=config) as b,
            run_pnicd(tmp_path / "c", "--peer", b.uri("tcp"), config=config) as c,
        ):
            async def routed() -> list[dict[str, object]] | None:
                rows = await twinctl_json("--nic", a.state_dir, "nic", "routes")
                return rows if len(rows) == 3 else None

            rows = {r["destination"]: r for r in await wait_until(routed, TIMEOUT / 2)}
            route = await twinctl_json("--nic", a.state_dir, "nic", "route", c.key)
            ping = await twinctl_json("--nic", a.state_dir, "nic", "ping", c.key,
                                      "-c", "3", "-i", "0.05")
            table = await twinctl("--nic", a.state_dir, "nic", "ping", c.key, "-c", "2",
                                  "-i", "0.05")
            stranger = Identity.generate().public.text
            unknown = await twinctl("--nic", a.state_dir, "nic", "ping", stranger, "-c", "1")
    assert rows[c.key]["next_hop"] == b.key and rows[c.key]["metric"] == 2
    assert rows[a.key]["metric"] == 0
    assert route["next_hop"] == b.key
    assert ping["sent"] == 3 and ping["received"] == 3 and ping["loss"] == 0
    assert all(r["hops"] == 2 and r["rtt"] > 0 for r in ping["replies"])
    assert ping["min"] <= ping["avg"] <= ping["max"]
    assert table.returncode == 0
    assert table.stdout.count("reply from") == 2 and "rtt min/avg/max/p99" in table.stdout
    # A key nobody announces gets an answer, not silence; no reply means exit 1, as ping(8).
    assert unknown.returncode == 1 and "unreachable: seq=1 noRoute" in unknown.stdout


async def test_killed_nic_is_seen_down_then_redialled_after_restart(
    tmp_path: Path, config: Path
) -> None:
    port = free_port()  # the restarted NIC must come back on the same address
    listen = [f"tcp://127.0.0.1:{port}"]
    with trio.fail_after(TIMEOUT):
        async with (
            run_pnicd(tmp_path / "a", config=config, listen=listen) as a,
            run_pnicd(tmp_path / "b", "--peer", a.uri(), config=config) as b,
        ):
            await b.wait_peer_up(a.key)
            a.process.kill()  # SIGKILL: no goodbye
            await a.process.wait()

            async def down() -> dict[str, Any] | None:
                row = await b.peer(a.key)
                if row is None or row["state"] == "up" or not row["last_error"]:
                    return None
                return row

            await wait_until(down, 5, what="link seen down after kill -9")
            row = row_for(await peers_json(b), a.key)
            assert row["state"] in ("backoff", "connecting", "handshaking"), row
            assert row["last_error"], row

            async with run_pnicd(tmp_path / "a", config=config, listen=listen) as again:
                assert again.key == a.key  # same state dir, same identity
                assert again.listen == a.listen
                await b.wait_peer_up(a.key)
                await again.wait_peer_up(b.key)
                row = row_for(await peers_json(b), a.key)
    assert row["state"] == "up"
    assert row["uri"] == a.uri()


async def test_a_peer_with_another_key_than_pinned_is_refused(
    tmp_path: Path, config: Path
) -> None:
    pinned = other_key()
    with trio.fail_after(TIMEOUT):
        async with run_pnicd(tmp_path / "a", config=config) as a:
            uri = f"{a.uri(pinned=False)}?key={pinned}"
            async with run_pnicd(tmp_path / "b", "--peer", uri, config=config) as b:

                async def refused() -> dict[str, Any] | None:
                    row = await outbound_row(b, a.uri(pinned=False))
                    return row if row is not None and pinned in row["last_error"] else None

                await wait_until(refused, what="pinned-key refusal reported")
                rows = await peers_json(b)
                b_metrics, a_metrics = await metrics(b), await metrics(a)
    [row] = rows
    assert "pinned" in row["last_error"]
    assert a.key in row["last_error"]  # the key it found instead
    assert row["state"] != "up"
    # It never came up, on either side.
    assert b_metrics["twinmesh_links_established_total"] == 0
    assert a_metrics["twinmesh_links_established_total"] == 0
    assert b_metrics['twinmesh_handshake_failures_total{reason="refused"}'] >= 1


async def test_an_allow_list_without_the_dialer_refuses_it(tmp_path: Path, config: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_pnicd(tmp_path / "a", "--allow", other_key(), config=config) as a,
            run_pnicd(tmp_path / "b", "--peer", a.uri(), config=config) as b,
        ):

            # Found by URI: while b redials, its row shows no key until a answers.
            async def refused() -> dict[str, Any] | None:
                row = await outbound_row(b, a.uri(pinned=False))
                return row if row is not None and row["last_error"] else None

            await wait_until(refused, what="allow-list refusal reported")
            [row] = await peers_json(b)
            a_metrics = await metrics(a)
            a_peers = await peers_json(a)
    assert row["state"] != "up"
    assert "refused by peer" in row["last_error"]
    assert "allow" in row["last_error"]
    # b keeps redialling, so a may show an inbound link mid-handshake, but never up.
    assert all(r["state"] == "handshaking" and r["key"] == "" for r in a_peers), a_peers
    assert a_metrics["twinmesh_links_up"] == 0
    assert a_metrics["twinmesh_links_established_total"] == 0
    assert a_metrics['twinmesh_handshake_failures_total{reason="refused"}'] >= 1


# --- admin through twinctl -------------------------------------------------------------


async def test_add_peer_and_remove_peer_through_twinctl(tmp_path: Path, config: Path) -> None:
    with trio.fail_after(TIMEOUT):
        listen = ["tcp://127.0.0.1:0", "ws://127.0.0.1:0/pnic"]
        async with (
            run_pnicd(tmp_path / "a", config=config, listen=listen) as a,
            run_pnicd(tmp_path / "b", config=config) as b,
        ):
            assert await peers_json(b) == []

            added = await twinctl_json("--nic", b.state_dir, "nic", "add-peer", a.uri())
            assert added == {"uri": a.uri(), "created": True}
            again = await twinctl_json("--nic", b.state_dir, "nic", "add-peer", a.uri())
            assert again["created"] is False
            await b.wait_peer_up(a.key)
            await a.wait_peer_up(b.key)
            assert [r["key"] for r in await peers_json(b)] == [a.key]

            removed = await twinctl_json("--nic", b.state_dir, "nic", "remove-peer", a.key)
            assert removed["removed"] >= 1
            await wait_until(lambda: _no_rows(b), what="b forgets a")
            await wait_until(lambda: _no_rows(a), what="a sees b go")

            # Unpinned, over websocket, removed by the URI it was added with.
            ws = a.uri("ws", pinned=False)
            await twinctl_json("--nic", b.state_dir, "nic", "add-peer", ws)
            await b.wait_peer_up(a.key)
            removed = await twinctl_json("--nic", b.state_dir, "nic", "remove-peer", ws)
            assert removed == {"removed": 1}
            await wait_until(lambda: _no_rows(b), what="b forgets a again")
            await wait_until(lambda: _no_rows(a), what="a sees b go again")

            # Unpinned, removed by the key it turned out to have.
            await twinctl_json("--nic", b.state_dir, "nic", "add-peer", ws)
            await b.wait_peer_up(a.key)
            removed = await twinctl_json("--nic", b.state_dir, "nic", "remove-peer", a.key)
            assert removed["removed"] >= 1
            await wait_until(lambda: _no_rows(b), what="b forgets a by key")
            await wait_until(lambda: _no_rows(a), what="a sees b go for good")
            assert await peers_json(b) == []


async def _no_rows(nic: PnicdProcess) -> bool:
    return await nic.peers() == []


# --- stopping ---------------------------------------------------------------------------


async def test_sigterm_exits_0_and_the_peer_is_told(tmp_path: Path) -> None:
    # A slow first retry, so the goodbye stays b's last error long enough to read it.
    config = write_config(tmp_path / "slow-retry.toml", "[reconnect]\ninitial = 3.0\n")
    with trio.fail_after(TIMEOUT):
        async with (
            run_pnicd(tmp_path / "a", config=config) as a,
            run_pnicd(tmp_path / "b", "--peer", a.uri(), config=config) as b,
        ):
            await b.wait_peer_up(a.key)
            # A NIC that ignored SIGTERM for 3 s would be killed: exit code -9, not 0.
            assert await a.stop(signal.SIGTERM, timeout=3) == 0

            async def told() -> dict[str, Any] | None:
                row = await b.peer(a.key)
                return row if row is not None and row["last_error"] else None

            await wait_until(told, what="b sees a gone")
            row = row_for(await peers_json(b), a.key)
    assert row["state"] != "up"
    assert "closed by peer" in row["last_error"]
    assert "NIC shutting down" in row["last_error"]
    assert not (tmp_path / "a" / ADMIN_SOCKET).exists()  # removed on a clean stop


# --- files and start-up errors ----------------------------------------------------------


async def test_state_files_are_private(tmp_path: Path) -> None:
    state_dir = tmp_path / "fresh" / "nic"
    with trio.fail_after(TIMEOUT):
        async with run_pnicd(state_dir, health=False):
            modes = {
                name: stat.S_IMODE(os.lstat(path).st_mode)
                for name, path in (
                    ("state dir", state_dir),
                    ("key", state_dir / KEY_FILE),
                    ("admin socket", state_dir / ADMIN_SOCKET),
                )
            }
            assert stat.S_ISSOCK(os.lstat(state_dir / ADMIN_SOCKET).st_mode)
    assert modes == {"state dir": 0o700, "key": 0o600, "admin socket": 0o600}


@pytest.mark.parametrize("damage", ["readable", "corrupt"])
async def test_a_bad_key_file_is_refused_with_one_line(tmp_path: Path, damage: str) -> None:
    state_dir = tmp_path / "nic"
    load_or_create_identity(state_dir, KEY_FILE)
    key_file = state_dir / KEY_FILE
    if damage == "readable":
        key_file.chmod(0o644)
    else:
        key_file.write_text("not a key\n", "ascii")
    with trio.fail_after(TIMEOUT):
        done = await run_pnicd_to_exit(state_dir, "--listen", "tcp://127.0.0.1:0")
    assert done.returncode == 2
    assert len(done.stderr_lines) == 1, done.stderr
    assert str(key_file) in done.stderr_lines[0]
    assert ("0644" if damage == "readable" else "corrupt") in done.stderr_lines[0]
    assert not (state_dir / ADMIN_SOCKET).exists()


async def test_a_second_pnicd_on_the_same_state_dir_exits_2(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with run_pnicd(tmp_path / "a", health=False) as a:
            done = await run_pnicd_to_exit(a.state_dir, "--listen", "tcp://127.0.0.1:0")
            assert (await a.self_info())["pid"] == a.pid  # the first one is unharmed
    assert done.returncode == 2
    assert len(done.stderr_lines) == 1, done.stderr
    assert "another pnicd is already running" in done.stderr
    assert str(a.state_dir) in done.stderr


# --- health, logs, config -----------------------------------------------------------------


async def test_health_endpoint_reports_the_link(tmp_path: Path, config: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with run_pnicd(tmp_path / "a", config=config) as a:
            status, body = await http_get(a.health_url + "healthz")
            assert (status, body) == (200, "ok\n")
            assert (await metrics(a))["twinmesh_links_up"] == 0
            async with run_pnicd(tmp_path / "b", "--peer", a.uri(), config=config) as b:
                await a.wait_peer_up(b.key)

                async def linked() -> dict[str, float] | None:
                    samples = await metrics(a)
                    return samples if samples["twinmesh_links_up"] == 1 else None

                samples = await wait_until(linked, what="twinmesh_links_up 1")
                status, _ = await http_get(b.health_url + "healthz")
                assert status == 200
    assert samples["twinmesh_links_established_total"] >= 1
    assert samples['twinmesh_link_frames_total{direction="in"}'] > 0
    assert samples['twinmesh_link_bytes_total{direction="out"}'] > 0
    assert samples["twinmesh_uptime_seconds"] > 0


async def test_json_logs_are_json_lines_with_a_link_up_event(
    tmp_path: Path, config: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with run_pnicd(tmp_path / "a", "--log-format", "json", config=config) as a:
            peer = a.uri("tcp")
            async with run_pnicd(tmp_path / "b", "--peer", peer, config=config) as b:
                await a.wait_peer_up(b.key)

                def logged_link_up() -> bool:
                    return '"link up"' in a.stderr_text()

                await wait_until(logged_link_up, what="'link up' in a's log")
        text = a.stderr_text()
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(isinstance(e, dict) and "event" in e and "level" in e for e in events)
    link_ups = [e for e in events if e["event"] == "link up"]
    assert link_ups and all(e["peer"] == b.key for e in link_ups)
    assert any(e["event"] == "pnicd ready" and e["key"] == a.key for e in events)


async def test_a_toml_config_file_is_read_and_flags_override_it(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "pnicd.toml",
        'listen = ["ws://127.0.0.1:0/pnic", "tcp://127.0.0.1:0"]\n'
        'health = "127.0.0.1:0"\n'
        'log_format = "json"\n',
    )
    with trio.fail_after(TIMEOUT):
        # No flags: everything comes from the file.
        async with run_pnicd(tmp_path / "a", config=config, listen=None, health=False) as a:
            assert [u.split(":")[0] for u in a.listen] == ["ws", "tcp"]
            assert a.health_url.startswith("http://127.0.0.1:")
            status, _ = await http_get(a.health_url + "healthz")
            assert status == 200
        assert all(json.loads(line) for line in a.stderr_text().splitlines())
        # A flag replaces the file's value; the rest of the file still applies.
        async with run_pnicd(
            tmp_path / "b", "--log-format", "console", config=config, health=False
        ) as b:
            info = await twinctl_json("--nic", b.state_dir, "nic", "self")
            assert info["health"].startswith("http://127.0.0.1:")
        assert [u.split(":")[0] for u in info["listen"]] == ["tcp"]
        assert "pnicd ready" in b.stderr_text()
        assert not b.stderr_text().lstrip().startswith("{")


async def test_a_busy_listen_address_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await run_pnicd_to_exit(tmp_path / "n", "--listen", f"tcp://127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stderr_lines == [
        f"pnicd: cannot listen on tcp://127.0.0.1:{port}: Address already in use"]
