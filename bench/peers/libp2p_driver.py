"""py-libp2p side of the benchmarks: run with the benchmark venv's python.

    python bench/peers/libp2p_driver.py run [--quick]

prints one JSON object on stdout (figures, or {"error": ...}). `run` starts a listening
host as its own process (`role server`, on /ip4/127.0.0.1/tcp/0) and a dialing host
as another (`role client`): each host on its own trio loop, like twinmesh's NICs and
Reticulum's nodes. Both hosts pin security to Noise (the default list also offers
plaintext, TLS and secio), use yamux, have mDNS, UPnP and QUIC off, and use a
`ConnectionConfig(max_connections_per_peer=1)` (without it `connect()` waits ~250 ms).

The client measures, each bounded in count and time:

- connect: `host.connect(peer_info)` (TCP + multistream + Noise XX + yamux);
- stream echo RTT: 100 B written, the server's handler reads exactly 100 B and writes
  them back, the client reads 100 B;
- stream msgs/s, 100 B: N separate `stream.write()`s of 100 B on one stream, no
  per-message ack (libp2p has none); the server reads until it has N x 100 B and
  then writes one byte; timed from the first write to that byte;
- stream MB/s, 64 KiB: the same with N writes of 64 KiB.

Not part of twinmesh: a driver for comparison only, installed nowhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

# websockets >= 14 deprecates APIs libp2p imports: not our concern in a driver.
warnings.simplefilter("ignore", DeprecationWarning)

import trio  # noqa: E402

PROTOCOL_ECHO = "/twinmesh-bench/echo/1.0.0"
PROTOCOL_SINK = "/twinmesh-bench/sink/1.0.0"
SMALL = 100
LARGE = 64 * 1024
START_TIMEOUT = 30.0
RUN_TIMEOUT = 30.0
CLIENT_TIMEOUT = 240.0
HEADER = 12  # sink stream header: message count (8 B) + size (4 B)


def plan(quick: bool) -> dict[str, int]:
    return {
        "pings": 100 if quick else 500,
        "small": 3000 if quick else 10000,
        "large": 300 if quick else 1000,
        "runs": 2 if quick else 5,
        "connects": 3 if quick else 10,
    }


def make_host():  # type: ignore[no-untyped-def]
    from libp2p import create_new_x25519_key_pair, generate_new_ed25519_identity, new_host
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport

    key_pair = generate_new_ed25519_identity()
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_preference="YAMUX",
        enable_mDNS=False,
        enable_upnp=False,
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


async def read_exactly(stream, n: int) -> bytes:  # type: ignore[no-untyped-def]
    chunks: list[bytes] = []
    have = 0
    while have < n:
        data = await stream.read(n - have)
        if not data:
            raise EOFError(f"stream ended after {have}/{n} bytes")
        chunks.append(data)
        have += len(data)
    return b"".join(chunks)


# ---------------------------------------------------------------------- server


async def serve() -> None:
    import multiaddr

    host = make_host()

    async def echo(stream) -> None:  # type: ignore[no-untyped-def]
        try:
            while True:
                data = await read_exactly(stream, SMALL)
                await stream.write(data)
        except Exception:  # the client closed or reset it
            pass

    async def sink(stream) -> None:  # type: ignore[no-untyped-def]
        try:
            while True:
                header = await read_exactly(stream, HEADER)
                count = int.from_bytes(header[:8], "big")
                size = int.from_bytes(header[8:], "big")
                left = count * size
                while left:
                    data = await stream.read(min(left, 1 << 20))
                    if not data:
                        return
                    left -= len(data)
                await stream.write(b"\x01")
        except Exception:
            pass

    host.set_stream_handler(PROTOCOL_ECHO, echo)
    host.set_stream_handler(PROTOCOL_SINK, sink)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        addrs = [str(a) for a in host.get_addrs() if "/ip4/127.0.0.1/" in str(a)]
        peer = host.get_id().to_string()
        addr = next((a for a in addrs if "/p2p/" in a), f"{addrs[0]}/p2p/{peer}")
        print(json.dumps({"ready": True, "addr": addr}), flush=True)
        # Until the coordinator closes our stdin.
        with trio.move_on_after(CLIENT_TIMEOUT + 60):
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            while await stdin.receive_some(4096):
                pass


# ---------------------------------------------------------------------- client


async def client(addr: str, p: dict[str, int]) -> dict[str, object]:
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    result: dict[str, object] = {}
    notes: list[str] = []
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    connects: list[float] = []
    for index in range(p["connects"]):
        host = make_host()
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            started = time.perf_counter()
            with trio.fail_after(10):
                await host.connect(info)
            connects.append((time.perf_counter() - started) * 1e3)
            if index + 1 < p["connects"]:
                continue
            # The last host stays for the stream figures.
            result["connect_ms"] = connects
            await _streams(host, info, p, result, notes)
    result["notes"] = notes
    return result


async def bounded_client(addr: str, p: dict[str, int]) -> dict[str, object]:
    with trio.fail_after(CLIENT_TIMEOUT):
        return await client(addr, p)


async def _streams(host, info, p: dict[str, int], result: dict[str, object],  # type: ignore[no-untyped-def]
                   notes: list[str]) -> None:
    # Echo RTT.
    stream = await host.new_stream(info.peer_id, [PROTOCOL_ECHO])
    payload = os.urandom(SMALL)
    rtts: list[float] = []
    with trio.move_on_after(RUN_TIMEOUT):
        for index in range(20 + p["pings"]):
            started = time.perf_counter()
            await stream.write(payload)
            back = await read_exactly(stream, SMALL)
            took = time.perf_counter() - started
            if back != payload:
                notes.append("echo came back changed")
                break
            if index >= 20:
                rtts.append(took * 1e3)
    await stream.close()
    result["rtt_ms"] = rtts

    # Throughput: one stream, header then N writes, one byte back when all arrived.
    stream = await host.new_stream(info.peer_id, [PROTOCOL_SINK])
    for size, count, key in ((SMALL, p["small"], "small"), (LARGE, p["large"], "large")):
        data = os.urandom(size)
        rates: list[float] = []
        for run in range(p["runs"] + 1):  # run 0 warms up
            n = max(10, count // 5) if run == 0 else count
            started = time.perf_counter()
            with trio.move_on_after(RUN_TIMEOUT) as scope:
                await stream.write(n.to_bytes(8, "big") + size.to_bytes(4, "big"))
                for _ in range(n):
                    await stream.write(data)
                await read_exactly(stream, 1)
            if scope.cancelled_caught:
                notes.append(f"a {size} B run was cut at {RUN_TIMEOUT:g} s")
                result[key] = rates
                return
            if run:
                rates.append(n / (time.perf_counter() - started))
        result[key] = rates
    await stream.close()


# ------------------------------------------------------------------ coordinator


def run(quick: bool) -> dict[str, object]:
    from importlib.metadata import version

    p = plan(quick)
    out: dict[str, object] = {"version": version("libp2p"), "plan": p}
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning")
    server = subprocess.Popen([sys.executable, __file__, "role", "server"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=env)
    try:
        assert server.stdout is not None
        ready = _read_line(server, START_TIMEOUT)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "role", "client", str(ready["addr"]), json.dumps(p)],
            capture_output=True, timeout=CLIENT_TIMEOUT, env=env, check=False)
        lines = [line for line in done.stdout.decode().splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"the client printed nothing (exit {done.returncode}): "
                               f"{done.stderr.decode('utf-8', 'replace')[-600:]}")
        out["direct"] = json.loads(lines[-1])
        out["direct"]["wall_s"] = time.perf_counter() - started  # type: ignore[index]
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return out


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> dict[str, object]:
    import selectors

    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=max(0.0, deadline - time.monotonic())):
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"the server exited ({process.wait()})")
            if line.startswith(b"{"):
                return dict(json.loads(line))
    raise RuntimeError(f"the server did not start within {timeout:g} s")


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--quick", action="store_true")
    role = sub.add_parser("role")
    role.add_argument("role", choices=("server", "client"))
    role.add_argument("args", nargs="*")
    args = parser.parse_args()
    if args.command == "run":
        try:
            print(json.dumps(run(args.quick)), flush=True)
        except Exception as exc:  # reported as "not measured: ..."
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 0
    if args.role == "server":
        trio.run(serve)
        return 0
    addr, plan_json = args.args
    try:
        result = trio.run(bounded_client, addr, json.loads(plan_json))
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    # libp2p leaves background tasks and threads behind; leave without waiting on them.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
