"""twind as a real process with real pnicd processes: chat survives a dead NIC."""

from __future__ import annotations

import signal

import pytest
import trio

from twinmesh.errors import ApiError
from twinmesh.testing.processes import (
    console_script,
    free_port,
    http_get,
    run_command,
    run_pnicd,
    run_twind,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.process
TIMEOUT = 40


async def test_a_message_sent_while_the_nic_is_dead_is_delivered_after_it_returns(tmp_path):
    config = write_config(tmp_path / "fast.toml")
    a_listen = [f"tcp://127.0.0.1:{free_port()}"]
    with trio.fail_after(TIMEOUT):
        async with run_pnicd(tmp_path / "b", config=config) as b:
            a_dir = tmp_path / "a"
            a_args = ("--peer", b.uri("tcp"))
            async with run_pnicd(a_dir, *a_args, config=config, listen=a_listen) as a:
                await a.wait_peer_up(b.key)
                async with (run_twind(tmp_path / "x", a_dir) as x,
                            run_twind(tmp_path / "y", tmp_path / "b") as y):
                    async def located() -> bool:
                        try:
                            await x.call("ping", {"twin": y.key, "timeout": 1.0})
                        except ApiError:  # not routable yet
                            return False
                        return True

                    await wait_until(located, 20, interval=0.1, what="y reachable from x")
                    first = await x.call("send", {"twin": y.key, "text": "before",
                                                  "wait": True})
                    assert first["status"] == "delivered"

                    a.process.kill()  # kill -9 of the twin's own NIC
                    await a.process.wait()

                    async def detached() -> bool:
                        return not (await x.call("status"))["connected"]

                    await wait_until(detached, 10, what="x notices its NIC died")
                    second = await x.call("send", {"twin": y.key, "text": "while down"})
                    assert second["status"] == "waiting"
                    assert (await x.call("status"))["waiting"] == 1

                    async with run_pnicd(a_dir, *a_args, config=config, listen=a_listen):
                        async def arrived() -> bool:
                            texts = [m["text"] for m in await y.call("inbox", {})]
                            return texts == ["before", "while down"]

                        await wait_until(arrived, 20, interval=0.1, what="y has both messages")

                        async def delivered() -> bool:
                            status = await x.call("messageStatus", second["id"])
                            return status["status"] == "delivered"

                        await wait_until(delivered, 10, interval=0.1, what="x hears delivered")
                        assert (await x.call("status"))["waiting"] == 0


async def test_a_second_twind_on_the_same_state_dir_is_refused(tmp_path):
    with trio.fail_after(TIMEOUT):
        async with (run_pnicd(tmp_path / "n") as nic,
                    run_twind(tmp_path / "t", nic.state_dir)):
            result = await run_command([*console_script("twind"), "--state-dir",
                                        tmp_path / "t", "--nic", nic.state_dir], timeout=20)
            assert result.returncode == 2
            assert result.stderr_lines[-1] == (
                f"twind: {tmp_path / 't'}: another twind is already running here")


async def test_twind_stops_cleanly_on_sigterm_and_keeps_its_identity(tmp_path):
    with trio.fail_after(TIMEOUT):
        async with run_pnicd(tmp_path / "n") as nic:
            async with run_twind(tmp_path / "t", nic.state_dir) as twin:
                key = twin.key
                assert await twin.stop(signal.SIGTERM) == 0
            async with run_twind(tmp_path / "t", nic.state_dir) as again:
                assert again.key == key
            assert ((tmp_path / "t" / "twin.key").stat().st_mode & 0o777) == 0o600
            assert ((tmp_path / "t").stat().st_mode & 0o777) == 0o700


async def test_twind_serves_its_page_on_loopback_behind_a_token(tmp_path):
    with trio.fail_after(TIMEOUT):
        async with (run_pnicd(tmp_path / "n") as nic,
                    run_twind(tmp_path / "t", nic.state_dir,
                              args=["--http", "127.0.0.1:0"]) as twin):
            url_file = tmp_path / "t" / "web.url"
            url = await wait_until(lambda: url_file.exists() and url_file.read_text().strip(),
                                   10, what="web.url written")
            assert (url_file.stat().st_mode & 0o777) == 0o600
            assert url.startswith("http://127.0.0.1:") and "?token=" in url
            status, body = await http_get(url)
            assert status == 200 and "app.js" in body
            status, _ = await http_get(url.split("?")[0])  # no token
            assert status == 403
            assert twin.key in twin.stderr_text()  # "open URL" line names the twin
