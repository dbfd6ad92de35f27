"""The admin API end to end in one process: AdminClient -> Unix socket -> AdminServer -> Nic."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from twinmesh.carriers.unix import connect_unix
from twinmesh.carriers.uri import PeerUri
from twinmesh.control.admin_client import AdminClient, admin_call
from twinmesh.control.framed import FramedStream
from twinmesh.errors import AdminError, ConfigError
from twinmesh.identity.keys import Identity
from twinmesh.nic.admin.server import AdminServer
from twinmesh.nic.config import NicConfig
from twinmesh.nic.node import Nic
from twinmesh.testing.memnet import MemoryNetwork
from twinmesh.wire import schemas


async def start(nursery: trio.Nursery, net: MemoryNetwork, name: str, state: Path) -> Nic:
    state.mkdir(mode=0o700)
    config = NicConfig(state_dir=state, listen=(PeerUri("memory", name, 0),))
    nic = Nic(Identity.generate(), config, {"memory": net.carrier(name)})
    await nursery.start(nic.run)
    await nursery.start(AdminServer(nic, config.admin_socket, "http://127.0.0.1:1/").serve)
    return nic


async def test_commands_answer_with_the_nic_state(tmp_path: Path) -> None:
    net = MemoryNetwork()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            a = await start(nursery, net, "a", tmp_path / "a")
            b = await start(nursery, net, "b", tmp_path / "b")
            socket = tmp_path / "b" / "admin.sock"
            assert stat.S_IMODE(os.stat(socket).st_mode) == 0o600

            info = await admin_call(tmp_path / "b", "self")  # a state dir works as PATH
            assert info["key"] == b.key.text and info["listen"] == ["memory://b"]
            assert info["health"] == "http://127.0.0.1:1/" and info["pid"] == os.getpid()

            async with AdminClient(socket) as client:  # ...and so does the socket itself
                added = await client.call("addPeer", f"memory://a?key={a.key.text}")
                assert added == {"uri": f"memory://a?key={a.key.text}", "created": True}
                again = await client.call("addPeer", "memory://a")
                assert again["created"] is False
                while True:
                    rows = await client.call("peers")
                    if rows and rows[0]["state"] == "up":
                        break
                    await trio.sleep(0.01)
                [row] = rows
                assert row["key"] == a.key.text and row["direction"] == "outbound"
                assert row["frames_out"] >= 2 and row["carrier"] == "memory"
                removed = await client.call("removePeer", a.key.text)
                assert removed["removed"] >= 1
                with pytest.raises(AdminError, match="no peer or link matches"):
                    await client.call("removePeer", "memory://nobody")
                with pytest.raises(AdminError, match="unknown scheme"):
                    await client.call("addPeer", "udp://127.0.0.1:1")
            nursery.cancel_scope.cancel()


async def test_garbage_gets_an_error_answer_and_the_server_keeps_serving(tmp_path: Path) -> None:
    net = MemoryNetwork()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await start(nursery, net, "a", tmp_path / "a")
            socket = tmp_path / "a" / "admin.sock"
            framed = FramedStream(await connect_unix(socket))
            await framed.send(b"\x00" * 3 + b"not capnp at all")
            body = await framed.receive()
            assert body is not None
            error = schemas.decode(schemas.admin.AdminResponse, body, lambda r: str(r.error))
            assert "undecodable" in error
            # An oversized frame closes that connection only.
            await framed.stream.send_all((1 << 30).to_bytes(4, "big"))
            assert await framed.stream.receive_some(100) == b""
            await framed.stream.aclose()
            assert (await admin_call(socket, "self"))["listen"] == ["memory://a"]
            nursery.cancel_scope.cancel()


async def test_a_second_server_on_a_live_socket_is_refused(tmp_path: Path) -> None:
    net = MemoryNetwork()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nic = await start(nursery, net, "a", tmp_path / "a")
            with pytest.raises(ConfigError, match="already listening"):
                await AdminServer(nic, tmp_path / "a" / "admin.sock").serve()
            nursery.cancel_scope.cancel()


async def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    net = MemoryNetwork()
    state = tmp_path / "a"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await start(nursery, net, "a", state)
            nursery.cancel_scope.cancel()
        # Simulate a kill -9: a socket file with nobody behind it.
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(str(state / "admin.sock"))
        sock.close()
        os.rename(state, tmp_path / "old")
        async with trio.open_nursery() as nursery:
            (tmp_path / "old").rename(state)
            nic = Nic(Identity.generate(), NicConfig(state_dir=state), {})
            await nursery.start(nic.run)
            await nursery.start(AdminServer(nic, state / "admin.sock").serve)
            assert (await admin_call(state, "self"))["key"] == nic.key.text
            nursery.cancel_scope.cancel()


async def test_no_nic_running_is_a_one_line_admin_error(tmp_path: Path) -> None:
    with trio.fail_after(5), pytest.raises(AdminError) as info:
        await admin_call(tmp_path, "self")
    assert "is pnicd running?" in str(info.value) and "\n" not in str(info.value)


async def test_routes_route_and_ping_through_the_admin_socket(tmp_path: Path) -> None:
    net = MemoryNetwork()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a = await start(nursery, net, "a", tmp_path / "a")
            b = await start(nursery, net, "b", tmp_path / "b")
            c = await start(nursery, net, "c", tmp_path / "c")
            b.add_peer(PeerUri("memory", "a", 0, key=a.key))
            c.add_peer(PeerUri("memory", "b", 0, key=b.key))
            async with AdminClient(tmp_path / "a") as client:
                while len(await client.call("routes")) < 3:
                    await trio.sleep(0.01)
                rows = {r["destination"]: r for r in await client.call("routes")}
                assert rows[a.key.text]["metric"] == 0 and rows[a.key.text]["next_hop"] == ""
                assert rows[c.key.text]["metric"] == 2
                assert rows[c.key.text]["next_hop"] == b.key.text
                route = await client.call("route", c.key.text)
                assert route["next_hop"] == b.key.text and route["metric"] == 2
                reply = await client.call("ping", c.key.text, timeout=2.0)
                assert reply["error"] == "" and reply["hops"] == 2 and reply["rtt"] > 0
                stranger = Identity.generate().public.text
                with pytest.raises(AdminError, match="no route"):
                    await client.call("route", stranger)
                lost = await client.call("ping", stranger, timeout=1.0)
                assert lost["error"] == "noRoute" and lost["rtt"] is None
                with pytest.raises(AdminError, match="not a NIC key"):
                    await client.call("ping", "nonsense", timeout=1.0)
            nursery.cancel_scope.cancel()
