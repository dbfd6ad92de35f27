"""Reticulum (`rns`) side of the benchmarks: run with the benchmark venv's python.

    python bench/peers/reticulum_driver.py run [--quick]

prints one JSON object on stdout (figures, or {"error": ...}). `run` is the
coordinator: it never starts Reticulum itself (one instance per process), but writes
a config file per node and starts each node as its own process of this script
(`role server|transport|client`), on 127.0.0.1 only:

- direct: server (TCPServerInterface) ← client (TCPClientInterface);
- 2 hops: server → transport node (TCPServerInterface, enable_transport) ← client.

Every config has `share_instance = No`, no AutoInterface, interface discovery and
probes off, so nothing leaves loopback and no shared instance or RPC port is opened.
The server announces an IN destination; the client requests a path to it, opens a
`Link`, and measures, each bounded in count and time:

- Link setup (RNS.Link() → established callback);
- delivery-proof RTT: a 100 B packet on the link, timed until its proof arrives
  (the server's destination proves every packet);
- `Channel` msgs/s: 100 B messages of a registered type, sent whenever
  `is_ready_to_send()` (the channel's own window), timed until the last one is
  acknowledged (the channel's transmit ring is empty);
- `Resource` MB/s (direct only): 64 KiB resources one after another, each timed
  from creation to its concluded callback (complete).

Not part of twinmesh: a driver for comparison only, installed nowhere.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

APP = "twinmeshbench"
ASPECT = "peer"
MSG_SIZE = 100
RESOURCE_SIZE = 64 * 1024
START_TIMEOUT = 20.0  # a node printing "ready"
PATH_TIMEOUT = 10.0  # the client finding a path to the server
LINK_TIMEOUT = 10.0
RUN_TIMEOUT = 30.0  # one throughput run
CLIENT_TIMEOUT = 240.0  # the whole client role
SEND_POLL = 0.0002  # sleep while the channel window is full
PROOF_TIMEOUT = 2.0  # one delivery proof


def plan(quick: bool) -> dict[str, int]:
    return {
        "pings": 50 if quick else 300,
        "msgs": 1000 if quick else 3000,
        "runs": 2 if quick else 5,
        "resources": 10 if quick else 40,
        "resource_runs": 2 if quick else 5,
    }


# --------------------------------------------------------------------- configs


def config_text(*, transport: bool, interface: str) -> str:
    return f"""\
[reticulum]
  enable_transport = {"Yes" if transport else "No"}
  share_instance = No
  discover_interfaces = No
  respond_to_probes = No
  enable_remote_management = No
  panic_on_interface_error = Yes

[logging]
  loglevel = 1

[interfaces]
{interface}"""


def tcp_server(port: int) -> str:
    return f"""\
  [[bench tcp server]]
    type = TCPServerInterface
    enabled = Yes
    ingress_control = No
    listen_ip = 127.0.0.1
    listen_port = {port}
"""


def tcp_client(port: int) -> str:
    return f"""\
  [[bench tcp client]]
    type = TCPClientInterface
    enabled = Yes
    ingress_control = No
    target_host = 127.0.0.1
    target_port = {port}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------- node roles


def start_reticulum(config_dir: str):  # type: ignore[no-untyped-def]
    import RNS  # only in the node processes

    level = int(os.environ.get("RNS_BENCH_LOGLEVEL", RNS.LOG_ERROR))
    return RNS, RNS.Reticulum(config_dir, loglevel=level,
                              logdest=lambda line: print(line, file=sys.stderr, flush=True))


def emit(obj: object) -> None:
    print(json.dumps(obj), flush=True)


def wait_stdin_closed(limit: float) -> None:
    """Until the coordinator closes our stdin (or `limit` seconds)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sys.stdin], [], [], 0.5)
        if ready and not sys.stdin.buffer.read1(4096):
            return


def role_transport(config_dir: str) -> None:
    start_reticulum(config_dir)
    emit({"ready": True})
    wait_stdin_closed(CLIENT_TIMEOUT + 60)
    os._exit(0)


def role_server(config_dir: str) -> None:
    RNS, _ = start_reticulum(config_dir)
    from RNS.Channel import MessageBase

    class BenchMessage(MessageBase):
        MSGTYPE = 0x0101

        def __init__(self, data: bytes = b"") -> None:
            self.data = data

        def pack(self) -> bytes:
            return self.data

        def unpack(self, raw: bytes) -> None:
            self.data = raw

    received = {"channel": 0, "resources": 0}

    def on_message(message: object) -> bool:
        received["channel"] += 1
        return True

    def on_resource(resource: object) -> None:
        received["resources"] += 1

    def on_link(link: object) -> None:
        link.set_resource_strategy(RNS.Link.ACCEPT_ALL)  # type: ignore[attr-defined]
        link.set_resource_concluded_callback(on_resource)  # type: ignore[attr-defined]
        channel = link.get_channel()  # type: ignore[attr-defined]
        channel.register_message_type(BenchMessage)
        channel.add_message_handler(on_message)

    identity = RNS.Identity()
    destination = RNS.Destination(identity, RNS.Destination.IN, RNS.Destination.SINGLE, APP,
                                  ASPECT)
    destination.set_proof_strategy(RNS.Destination.PROVE_ALL)
    destination.set_link_established_callback(on_link)
    # One announce, before the client starts: the transport node (or this node) then
    # answers the client's path requests. Announcing again while a client is starting
    # can leave that client deaf: an announce reaching its TCP interface before its
    # Transport has started ends the interface's reader (seen here about 1 run in 10).
    destination.announce()
    emit({"ready": True, "destination": destination.hash.hex()})
    wait_stdin_closed(CLIENT_TIMEOUT + 60)
    emit({"received": received})
    os._exit(0)


def role_client(config_dir: str, destination_hex: str, plan_json: str, hops: str) -> None:
    RNS, _ = start_reticulum(config_dir)
    from RNS.Channel import MessageBase

    class BenchMessage(MessageBase):
        MSGTYPE = 0x0101

        def __init__(self, data: bytes = b"") -> None:
            self.data = data

        def pack(self) -> bytes:
            return self.data

        def unpack(self, raw: bytes) -> None:
            self.data = raw

    p = json.loads(plan_json)
    result: dict[str, object] = {"hops": hops}
    started_all = time.monotonic()
    dest_hash = bytes.fromhex(destination_hex)

    # Path (lookup by destination hash), bounded.
    started = time.perf_counter()
    RNS.Transport.request_path(dest_hash)
    last_request = time.monotonic()
    while not RNS.Transport.has_path(dest_hash):
        if time.perf_counter() - started > PATH_TIMEOUT:
            emit({"error": f"no path to the server within {PATH_TIMEOUT:g} s"})
            os._exit(1)
        if time.monotonic() - last_request > 1.0:
            RNS.Transport.request_path(dest_hash)
            last_request = time.monotonic()
        time.sleep(0.005)
    result["path_s"] = time.perf_counter() - started
    result["path_hops"] = RNS.Transport.hops_to(dest_hash)

    server_identity = RNS.Identity.recall(dest_hash)
    destination = RNS.Destination(server_identity, RNS.Destination.OUT,
                                  RNS.Destination.SINGLE, APP, ASPECT)

    def open_link():  # type: ignore[no-untyped-def]
        established = threading.Event()
        link = RNS.Link(destination, established_callback=lambda _link: established.set())
        if not established.wait(LINK_TIMEOUT):
            emit({"error": f"no link within {LINK_TIMEOUT:g} s"})
            os._exit(1)
        return link

    started = time.perf_counter()
    link = open_link()
    result["link_setup_ms"] = (time.perf_counter() - started) * 1e3
    time.sleep(0.2)  # let the link's RTT and MTU settle

    # Delivery-proof RTT.
    payload = os.urandom(MSG_SIZE)
    rtts: list[float] = []
    lost = 0
    for index in range(10 + p["pings"]):
        proved = threading.Event()
        data = os.urandom(MSG_SIZE)
        sent_at = time.perf_counter()
        receipt = RNS.Packet(link, data).send()
        if receipt is None or receipt is False:
            result["rtt_notes"] = [f"packet {index} could not be sent ({receipt!r})"]
            break
        receipt.set_delivery_callback(lambda _r, ev=proved: ev.set())
        if receipt.status == RNS.PacketReceipt.DELIVERED:
            proved.set()
        if not proved.wait(PROOF_TIMEOUT):
            lost += 1
            if lost >= 5:
                break
            continue
        took = time.perf_counter() - sent_at
        if index >= 10:
            rtts.append(took * 1e3)
        if time.monotonic() - started_all > CLIENT_TIMEOUT / 4:
            break
    result["rtt_ms"] = rtts
    if lost and "rtt_notes" not in result:
        # A link packet's receipt times out after max(6 x link RTT, 5 ms); a proof that
        # comes later is dropped, and so is that sample.
        result["rtt_notes"] = [f"{lost} packet receipt(s) timed out before their proof "
                               "(Reticulum: max(6 x link RTT, 5 ms)); not counted"]

    # Channel msgs/s. A run during which the Channel gave up on a packet (it then tears
    # the link down) does not count; the next run gets a new link.
    notes: list[str] = []
    timeouts = [0]
    teardowns = 0
    sent_total = 0
    rates: list[float] = []
    poll = float(p.get("send_poll", SEND_POLL))
    channel = None
    window_max = 0
    for run in range(p["runs"] + 1):  # run 0 warms up (and lets the window grow)
        if link.status != RNS.Link.ACTIVE:
            link = open_link()
            channel = None
        if channel is None:
            channel = link.get_channel()
            channel.register_message_type(BenchMessage)
            # Count the Channel's packet timeouts (each one is a retransmission).
            original = channel._packet_timeout

            def counting(packet, original=original):  # type: ignore[no-untyped-def]
                timeouts[0] += 1
                return original(packet)

            channel._packet_timeout = counting
        n = p["msgs"] // 3 if run == 0 else p["msgs"]
        started = time.perf_counter()
        deadline = started + RUN_TIMEOUT
        sent = 0
        while sent < n and time.perf_counter() < deadline and link.status == RNS.Link.ACTIVE:
            if channel.is_ready_to_send():
                try:
                    channel.send(BenchMessage(payload))
                    sent += 1
                    continue
                except Exception:  # window closed between check and send
                    pass
            time.sleep(poll)
        while (channel._tx_ring and time.perf_counter() < deadline
               and link.status == RNS.Link.ACTIVE):
            time.sleep(poll)
        elapsed = time.perf_counter() - started
        sent_total += sent
        window_max = max(window_max, channel.window_max)
        if link.status != RNS.Link.ACTIVE:
            teardowns += 1
            continue
        if sent < n or channel._tx_ring:
            notes.append(f"a Channel run was cut at {RUN_TIMEOUT:g} s with {sent}/{n} sent")
            break
        if run:
            rates.append(n / elapsed)
    if teardowns:
        notes.append(f"{teardowns} Channel run(s) ended early: the Channel reached its retry "
                     "limit and tore the link down (not counted; a new link for the next)")
    result["channel_msgs_per_s"] = rates
    result["channel_sent"] = sent_total
    result["channel_teardowns"] = teardowns
    result["channel_timeouts"] = timeouts[0]
    result["channel_window_max"] = window_max

    # Resource 64 KiB (direct only); again a new link after a teardown.
    if hops == "direct":
        data = os.urandom(RESOURCE_SIZE)
        resource_rates: list[float] = []
        per_resource: list[float] = []
        failed = 0
        for run in range(p["resource_runs"] + 1):
            if link.status != RNS.Link.ACTIVE:
                link = open_link()
            n = max(2, p["resources"] // 4) if run == 0 else p["resources"]
            started = time.perf_counter()
            complete = 0
            for _ in range(n):
                done = threading.Event()
                one = time.perf_counter()
                resource = RNS.Resource(data, link, callback=lambda _r, ev=done: ev.set(),
                                        auto_compress=False)
                if not done.wait(RUN_TIMEOUT) or resource.status != RNS.Resource.COMPLETE:
                    break
                complete += 1
                if run:
                    per_resource.append((time.perf_counter() - one) * 1e3)
            if complete < n:
                failed += 1
                link.teardown()
                continue
            if run:
                resource_rates.append(n * RESOURCE_SIZE / (time.perf_counter() - started) / 1e6)
        if failed:
            notes.append(f"{failed} Resource run(s) had a Resource that did not complete "
                         "(not counted; a new link for the next)")
        result["resource_mb_per_s"] = resource_rates
        result["resource_ms"] = per_resource
    result["notes"] = notes
    link.teardown()
    time.sleep(0.1)
    emit(result)
    os._exit(0)


# ------------------------------------------------------------------ coordinator


class Node:
    """A node process of this script; its stdout lines are JSON objects."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.stderr = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, __file__, "role", *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr)
        self.lines: queue.Queue[dict[str, object] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                self.lines.put(json.loads(raw))
            except ValueError:
                continue
        self.lines.put(None)

    def next(self, timeout: float) -> dict[str, object]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no answer within {timeout:g} s") from None
        if line is None:
            raise RuntimeError(f"{self.name} exited ({self.process.wait()}): "
                               f"{self._log_tail()}")
        return line

    def _log_tail(self) -> str:
        self.stderr.flush()
        try:
            return Path(self.stderr.name).read_text("utf-8", "replace")[-600:]
        except OSError:
            return ""

    def stop(self) -> dict[str, object] | None:
        """Close stdin (the node's signal to stop), take its last line, reap it."""
        last = None
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            while True:
                line = self.lines.get(timeout=5.0)
                if line is None:
                    break
                last = line
        except (queue.Empty, OSError):
            pass
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()
        return last


def scenario(root: Path, hops: str, p: dict[str, int]) -> dict[str, object]:
    nodes: list[Node] = []
    try:
        if hops == "direct":
            port = free_port()
            server_cfg = config_text(transport=False, interface=tcp_server(port))
            client_cfg = config_text(transport=False, interface=tcp_client(port))
        else:
            port = free_port()
            transport_dir = root / "transport"
            transport_dir.mkdir()
            (transport_dir / "config").write_text(
                config_text(transport=True, interface=tcp_server(port)), "utf-8")
            nodes.append(Node("transport", ["transport", str(transport_dir)],
                              root / "transport.log"))
            nodes[-1].next(START_TIMEOUT)
            server_cfg = config_text(transport=False, interface=tcp_client(port))
            client_cfg = server_cfg
        server_dir, client_dir = root / "server", root / "client"
        for directory, text in ((server_dir, server_cfg), (client_dir, client_cfg)):
            directory.mkdir()
            (directory / "config").write_text(text, "utf-8")  # before the node starts
        server = Node("server", ["server", str(server_dir)], root / "server.log")
        nodes.append(server)
        ready = server.next(START_TIMEOUT)
        client = Node("client", ["client", str(client_dir), str(ready["destination"]),
                                 json.dumps(p), hops], root / "client.log")
        nodes.append(client)
        result = client.next(CLIENT_TIMEOUT)
        client.stop()
        nodes.remove(client)
        last = server.stop()
        nodes.remove(server)
        if last is not None and "received" in last:
            result["server_received"] = last["received"]
        return result
    finally:
        for node in nodes:
            node.stop()


def run(quick: bool) -> dict[str, object]:
    from importlib.metadata import version

    p = plan(quick)
    out: dict[str, object] = {"version": version("rns"), "plan": p}
    with tempfile.TemporaryDirectory(prefix="twinmesh-bench-rns-") as tmp:
        for hops in ("direct", "2hop"):
            started = time.perf_counter()
            result: dict[str, object] = {}
            for attempt in range(2):  # one retry with new nodes if no path was found
                root = Path(tmp) / f"{hops}-{attempt}"
                root.mkdir()
                try:
                    result = scenario(root, hops, p)
                except RuntimeError as exc:
                    result = {"error": str(exc)}
                if "no path" not in str(result.get("error", "")):
                    break
            if attempt:
                notes = list(result.get("notes", []))  # type: ignore[call-overload]
                notes.append("the first attempt found no path; the figures are from a "
                             "second set of nodes")
                result["notes"] = notes
            result["wall_s"] = time.perf_counter() - started
            out[hops] = result
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--quick", action="store_true")
    role = sub.add_parser("role")
    role.add_argument("role", choices=("server", "transport", "client"))
    role.add_argument("args", nargs="*")
    args = parser.parse_args()
    if args.command == "run":
        try:
            emit(run(args.quick))
        except Exception as exc:  # reported as "not measured: ..."
            emit({"error": f"{type(exc).__name__}: {exc}"})
        return 0
    if args.role == "server":
        role_server(*args.args)
    elif args.role == "transport":
        role_transport(*args.args)
    else:
        role_client(*args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
