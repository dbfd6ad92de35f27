"""The lab supervisor: brings a topology up, keeps it running, restarts nodes, tears down.

    python -m twinmesh.lab.runner FILE --dir DIR [--netns]    # what `lab up` detaches
    await supervise(load_topology(path), lab_dir, on_ready=print_summary)  # --foreground

One supervisor per lab directory (it holds `lab.lock`). It:

1. chooses ports (local mode) or builds one network namespace per NIC with a link per
   topology link (`--netns`, root: testing/netns.open_lab), creates every NIC key (so
   links can be pinned before anyone starts) and writes `pnicd.toml`;
2. starts the impaired links' relays (local mode), then every pnicd, and waits until
   each answers on its admin socket, has its links up and a route to every NIC it
   can reach; then every twind, and waits until each twin answers on its control
   socket;
3. records everything in `lab.json` (lab/state.py), serves `lab.sock` for
   `restart` and watches its children, until SIGINT or SIGTERM;
4. stops twins, then NICs (SIGTERM, SIGKILL after STOP_TIMEOUT), the relays, the
   namespaces; `lab.json` ends as "down" (or "failed" with the one-line reason).

Children run in sessions of their own, so a Ctrl-C reaches only the supervisor,
which stops them in order. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

import structlog
import trio

from twinmesh.carriers.unix import serve_unix
from twinmesh.control.admin_client import admin_call
from twinmesh.control.framed import FramedStream
from twinmesh.errors import AdminError, ApiError, ConfigError, KeyFileError, TwinmeshError
from twinmesh.identity.keystore import load_identity, load_or_create_identity
from twinmesh.lab import plan as planning
from twinmesh.lab.plan import Endpoints, NodePlan
from twinmesh.lab.relay import serve_relay
from twinmesh.lab.state import (
    CONTROL_SOCKET,
    LOCK_FILE,
    LOGS_DIR,
    PNICD_CONFIG,
    LabError,
    write_state,
)
from twinmesh.lab.topology import Topology, load_topology
from twinmesh.nic.config import KEY_FILE as NIC_KEY_FILE

NIC_START_TIMEOUT = 30.0  # every NIC up, linked and routed
TWIN_START_TIMEOUT = 30.0  # plus TWIN_START_PER_TWIN per twin
TWIN_START_PER_TWIN = 0.1
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.1
WATCH_INTERVAL = 0.5
PROBE_TIMEOUT = 2.0
CONTROL_TIMEOUT = 120.0  # the longest a control request (a restart) may take

TWIN_KEY_FILE = "twin.key"  # twin/service.py KEY_FILE; read without importing the twin
WEB_URL_FILE = "web.url"

Summary = Callable[[dict[str, Any]], None]


class Node:
    """One process of the lab and what is known of it. Changed only by the LabRunner."""

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan
        self.process: trio.Process | None = None
        self.state = "stopped"
        self.key = ""  # a NIC's key; a single twin's id
        self.stopping = False
        self.ready_dirs: set[Path] = set()  # twins of this node seen answering

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class LabRunner:
    """Drives one lab; use through `supervise`."""

    def __init__(self, topology: Topology, lab_dir: Path, *, netns: bool = False) -> None:
        self.topology = topology
        self.lab_dir = lab_dir
        self.netns = netns
        self.state = "starting"
        self.error = ""
        self.started_at = time.time()
        self.nodes: dict[str, Node] = {}
        self.keys: dict[str, str] = {}  # NIC name -> key
        self.ports: dict[str, dict[str, int]] = {}
        self.relay_ports: dict[int, int] = {}
        self.namespaces: dict[str, str] = {}
        self.stack = AsyncExitStack()
        self.lock = trio.Lock()  # one start/stop/restart at a time
        self.log = structlog.get_logger("twinmesh.lab").bind(lab=topology.name)

    # ------------------------------------------------------------- record

    def record(self) -> dict[str, Any]:
        return {
            "name": self.topology.name,
            "file": str(self.topology.source),
            "dir": str(self.lab_dir),
            "mode": "netns" if self.netns else "local",
            "supervisor": os.getpid(),
            "state": self.state,
            "error": self.error,
            "started_at": self.started_at,
            "namespaces": sorted(self.namespaces.values()),
            "nodes": [self._node_record(n) for n in self.nodes.values()],
            "links": [
                {"from": link.dialer, "to": link.listener, "carrier": link.carrier,
                 "delay_ms": link.delay_ms, "loss_pct": link.loss_pct,
                 "relay_port": self.relay_ports.get(link.index)}
                for link in self.topology.links
            ],
        }

    def _node_record(self, node: Node) -> dict[str, Any]:
        plan = node.plan
        return {
            "name": plan.name, "kind": plan.kind, "pid": node.pid, "state": node.state,
            "state_dir": str(plan.state_dir), "log": str(plan.log), "command": plan.command,
            "namespace": plan.namespace, "key": node.key, "links": plan.links,
            "listen": plan.listen, "health": plan.health, "nic": plan.nic,
            "twins": plan.twins, "web": plan.web,
        }

    def save(self) -> None:
        write_state(self.lab_dir, self.record())

    def set_state(self, state: str, error: str = "") -> None:
        self.state, self.error = state, error
        self.save()

    # ------------------------------------------------------------ prepare

    async def prepare(self, nursery: trio.Nursery) -> None:
        """Keys, ports or namespaces, relays, config: everything before the first start."""
        (self.lab_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)
        for nic in self.topology.nics:
            identity = load_or_create_identity(self.lab_dir / nic.name, NIC_KEY_FILE)
            self.keys[nic.name] = identity.public.text
        (self.lab_dir / PNICD_CONFIG).write_text(planning.pnicd_config_text(self.topology))
        if self.netns:
            endpoints = await self._build_namespaces()
        else:
            endpoints = await self._local_endpoints(nursery)
        plans = planning.plan_nodes(self.topology, self.lab_dir, endpoints, self.keys,
                                    self.namespaces)
        self.nodes = {p.name: Node(p) for p in plans}
        for name, node in self.nodes.items():
            if node.plan.kind == "nic":
                node.key = self.keys[name]
        self.save()

    async def _local_endpoints(self, nursery: trio.Nursery) -> Endpoints:
        fixed = {p for n in self.topology.nics for p in (n.tcp_port, n.ws_port, n.health_port)}
        fixed |= {t.web_port for t in self.topology.twins}
        wanted = 0
        for nic in self.topology.nics:
            wanted += 1 + (not nic.ws_port) + (not nic.health_port)
        free = iter(free_ports(wanted, exclude=fixed))
        for nic in self.topology.nics:
            self.ports[nic.name] = {
                "tcp": nic.tcp_port or next(free),
                "ws": nic.ws_port or next(free),
                "health": nic.health_port or next(free),
            }
        for link in self.topology.links:
            if link.impaired:
                target = self.ports[link.listener][link.carrier]
                self.relay_ports[link.index] = await nursery.start(
                    serve_relay, 0, (planning.LOOPBACK, target),
                    link.delay_ms / 1000, link.loss_pct / 100,
                )
        return planning.local_endpoints(self.topology, self.ports, self.relay_ports)

    async def _build_namespaces(self) -> Endpoints:
        from twinmesh.testing import netns  # only a netns lab needs `ip`

        ok, why = netns.available()
        if not ok:
            raise LabError(f"--netns: {why}")
        names = [n.name for n in self.topology.nics]
        index = {name: i for i, name in enumerate(names)}
        edges = [(index[k.dialer], index[k.listener]) for k in self.topology.links]
        shaped = [edges[k.index] for k in self.topology.links if k.impaired]
        try:
            lab = await self.stack.enter_async_context(
                netns.open_lab(len(names), edges, shaped=shaped))
            for link in self.topology.links:
                if link.impaired:
                    await lab.netem(*edges[link.index], delay_ms=link.delay_ms,
                                    loss_pct=link.loss_pct)
        except (netns.LabError, ValueError) as exc:
            raise LabError(f"--netns: {exc}") from None
        self.namespaces = {name: lab.ns(i) for name, i in index.items()}
        addresses = {name: lab.addresses(i) for name, i in index.items()}
        far = {k.index: lab.address(index[k.listener], index[k.dialer])
               for k in self.topology.links}
        return planning.netns_endpoints(self.topology, addresses, far)

    # -------------------------------------------------------- processes

    async def start(self, node: Node) -> None:
        """Spawn the node's process (in a session of its own)."""
        node.plan.log.parent.mkdir(parents=True, exist_ok=True)
        node.ready_dirs.clear()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("FORCE_COLOR", None)
        with open(node.plan.log, "ab") as log:
            log.write(f"--- lab: starting {node.name} at {time.ctime()}\n".encode())
            log.flush()
            node.process = await trio.lowlevel.open_process(
                node.plan.command, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        node.stopping = False
        node.state = "starting"
        self.log.info("started", node=node.name, pid=node.pid)
        self.save()

    async def stop(self, nodes: list[Node]) -> None:
        """SIGTERM each, wait (bounded), SIGKILL what is left; always reaped."""
        running = [n for n in nodes if n.process is not None]
        for node in running:
            node.stopping = True
            node.state = "stopping"
            assert node.process is not None
            if node.process.returncode is None:
                with suppress(ProcessLookupError):
                    node.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            for node in running:
                assert node.process is not None
                await node.process.wait()
        for node in running:
            assert node.process is not None
            if node.process.returncode is None:
                self.log.warning("killing", node=node.name, pid=node.pid)
                with suppress(ProcessLookupError):
                    node.process.kill()
                await node.process.wait()
            node.process = None
            node.state = "stopped"
        if running:
            self.save()

    async def wait_ready(self, nodes: list[Node], timeout: float) -> None:
        """Until every node is ready; LabError naming what is still missing after `timeout`."""
        waiting = {n.name: "not checked yet" for n in nodes}
        with trio.move_on_after(timeout):
            while waiting:
                for name in list(waiting):
                    node = self.nodes[name]
                    assert node.process is not None
                    code = node.process.returncode
                    if code is not None:
                        raise LabError(f"{name} exited with code {code} while starting: "
                                       f"{last_line(node.plan.log)} (log: {node.plan.log})")
                    why = await self.not_ready(node)
                    if why is None:
                        node.state = "up"
                        self.log.info("ready", node=name)
                        del waiting[name]
                        self.save()
                    else:
                        waiting[name] = why
                if waiting:
                    await trio.sleep(POLL_INTERVAL)
            return
        missing = "; ".join(f"{name}: {why}" for name, why in waiting.items())
        raise LabError(f"not ready within {timeout:g} s: {missing}")

    async def not_ready(self, node: Node) -> str | None:
        """None when `node` is ready, else why not (one phrase)."""
        if node.plan.kind == "nic":
            return await self._nic_not_ready(node)
        for state_dir in node.plan.twin_dirs():
            if state_dir in node.ready_dirs:
                continue
            why = await twin_not_ready(state_dir)
            if why is not None:
                return why
            node.ready_dirs.add(state_dir)
        if node.plan.kind == "twin":
            node.key = twin_id(node.plan.state_dir)
        return None

    async def _nic_not_ready(self, node: Node) -> str | None:
        try:
            peers = await admin_call(node.plan.state_dir, "peers")
            up = {row["key"] for row in peers if row["state"] == "up"}
            missing = [n for n in node.plan.links if self.keys[n] not in up]
            if missing:
                return f"link to {', '.join(missing)} not up"
            routes = {row["destination"] for row in await admin_call(node.plan.state_dir,
                                                                       "routes")}
        except AdminError:
            return "admin socket not answering"
        group = next(g for g in self.topology.components() if node.name in g)
        unrouted = sorted(n for n in group if n != node.name and self.keys[n] not in routes)
        if unrouted:
            return f"no route to {', '.join(unrouted)}"
        return None

    def timeout_for(self, nodes: list[Node]) -> float:
        twins = sum(n.plan.twins for n in nodes)
        if not twins:
            return NIC_START_TIMEOUT
        return TWIN_START_TIMEOUT + TWIN_START_PER_TWIN * twins

    # ------------------------------------------------------- lifecycle

    @property
    def nics(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.plan.kind == "nic"]

    @property
    def twins(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.plan.kind != "nic"]

    async def start_all(self) -> None:
        for group in (self.nics, self.twins):
            for node in group:
                await self.start(node)
            if group:
                await self.wait_ready(group, self.timeout_for(group))

    async def restart(self, name: str | None) -> list[str]:
        """Restart one node (or, with None, every node) and wait until it is ready."""
        async with self.lock:
            if name is None:
                await self.stop(self.twins)
                await self.stop(self.nics)
                await self.start_all()
                return list(self.nodes)
            node = self.nodes.get(name)
            if node is None:
                raise LabError(f"no node {name!r} in lab {self.topology.name} "
                               f"(nodes: {', '.join(self.nodes)})")
            await self.stop([node])
            node.state = "restarting"
            await self.start(node)
            await self.wait_ready([node], self.timeout_for([node]))
            return [name]

    async def watch(self) -> None:
        """Mark nodes whose process ended on its own; nothing restarts them by itself."""
        while True:
            for node in self.nodes.values():
                process = node.process
                if process is None or node.stopping or node.state.startswith("exited"):
                    continue
                if process.returncode is not None:
                    node.state = f"exited {process.returncode}"
                    self.log.warning("node exited", node=node.name, code=process.returncode)
                    self.save()
            await trio.sleep(WATCH_INTERVAL)

    async def tear_down(self) -> None:
        """Stop everything, in order; shielded, bounded. Never raises for a stuck child."""
        with trio.CancelScope(shield=True):
            await self.stop(self.twins)
            await self.stop(self.nics)
            try:
                await self.stack.aclose()  # the namespaces (netns mode)
            except Exception as exc:
                self.log.error("teardown", error=str(exc))
                self.error = self.error or f"teardown: {exc}"

    # ----------------------------------------------------------- control

    async def serve_control(self, *, task_status: trio.TaskStatus[Path]) -> None:
        await serve_unix(self.lab_dir / CONTROL_SOCKET, self._control_connection,
                         task_status=task_status)

    async def _control_connection(self, stream: trio.abc.Stream, _peer: str) -> None:
        framed = FramedStream(stream)
        while (body := await framed.receive()) is not None:
            await framed.send(json.dumps(await self.control(body)).encode())

    async def control(self, body: bytes) -> dict[str, Any]:
        """Answer one control request: {"restart": NODE | null} or {"status": null}."""
        try:
            request = json.loads(body)
        except ValueError:
            return {"error": "malformed request: not JSON"}
        if not isinstance(request, dict) or len(request) != 1:
            return {"error": "malformed request: expected one of restart, status"}
        if "status" in request:
            return {"status": self.record()}
        if "restart" in request:
            target = request["restart"]
            if target is not None and not isinstance(target, str):
                return {"error": "restart takes a node name or null"}
            try:
                with trio.fail_after(CONTROL_TIMEOUT):
                    restarted = await self.restart(target)
            except LabError as exc:
                return {"error": str(exc)}
            except trio.TooSlowError:
                return {"error": f"restart took over {CONTROL_TIMEOUT:g} s"}
            return {"restarted": restarted, "status": self.record()}
        return {"error": f"unknown request {next(iter(request))!r}"}


# ------------------------------------------------------------------ supervise


async def supervise(
    topology: Topology,
    lab_dir: Path,
    *,
    netns: bool = False,
    on_ready: Summary | None = None,
) -> dict[str, Any]:
    """Run the lab until SIGINT/SIGTERM; return the final record.

    `on_ready(record)` is called once everything is up. LabError (one line) when the
    lab cannot come up; everything started is stopped first, and `lab.json` says
    "failed" with the reason.
    """
    lab_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_lab(lab_dir)
    runner = LabRunner(topology, lab_dir, netns=netns)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope,
                                       runner)
                    try:
                        runner.save()
                        async with runner.lock:
                            await runner.prepare(nursery)
                            await runner.start_all()
                        await nursery.start(runner.serve_control)
                        runner.set_state("up")
                        if on_ready is not None:
                            on_ready(runner.record())
                        nursery.start_soon(runner.watch)
                        await trio.sleep_forever()
                    finally:
                        if runner.state != "failed":
                            runner.state = "stopping"
                        await runner.tear_down()
            except BaseExceptionGroup as group:
                raise _one_line(group) from None
    except (LabError, ConfigError, KeyFileError, OSError) as exc:
        message = str(exc) if isinstance(exc, TwinmeshError) else f"{type(exc).__name__}: {exc}"
        runner.set_state("failed", message)
        raise LabError(message) from None
    else:
        runner.set_state("down", runner.error)
    finally:
        os.close(lock)
    return runner.record()


async def _cancel_on_signal(signals: Any, scope: trio.CancelScope, runner: LabRunner) -> None:
    async for signum in signals:
        runner.log.info("stopping", signal=signal.Signals(signum).name)
        scope.cancel()
        return


def _one_line(group: BaseExceptionGroup) -> BaseException:
    """The lab's own error out of a (nested) group; anything else stays a group."""
    matched, rest = group.split((LabError, ConfigError, KeyFileError, OSError))
    if matched is not None and rest is None:
        first: BaseException = matched
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        return first
    return group


def lock_lab(lab_dir: Path) -> int:
    """Hold `lab.lock`; LabError when another supervisor runs this lab."""
    fd = os.open(lab_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LabError(f"{lab_dir}: this lab is already running; stop it with "
                       f"'twinctl lab down --dir {lab_dir}'") from None
    return fd


# ------------------------------------------------------------------ helpers


def free_ports(count: int, exclude: Collection[int] = ()) -> list[int]:
    """`count` distinct loopback TCP ports that were free a moment ago.

    All are held open together while choosing, so none is handed out twice.
    """
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((planning.LOOPBACK, 0))
            port = sock.getsockname()[1]
            if port not in exclude:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


async def twin_not_ready(state_dir: Path) -> str | None:
    """None when the twin in `state_dir` answers `identity` on its control socket."""
    from twinmesh.control.twin_client import twin_call

    if not (state_dir / TWIN_KEY_FILE).exists():
        return f"{state_dir.name}: no key yet"
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            await twin_call(state_dir, "identity")
    except (ApiError, trio.TooSlowError) as exc:
        return f"{state_dir.name}: control socket not answering ({exc})"
    return None


def twin_id(state_dir: Path) -> str:
    """The twin's id (its public key text) from its key file; "" when not readable."""
    try:
        return load_identity(state_dir / TWIN_KEY_FILE).public.text
    except KeyFileError:
        return ""


def web_url(state_dir: Path) -> str:
    try:
        return (state_dir / WEB_URL_FILE).read_text("utf-8").strip()
    except OSError:
        return ""


def last_line(path: Path, limit: int = 300) -> str:
    """The last non-empty line of a log (its message, when it is a JSON log line)."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 8192))
            lines = [ln for ln in file.read().decode("utf-8", "replace").splitlines()
                     if ln.strip() and not ln.startswith("--- lab:")]
    except OSError:
        return "(no log)"
    # A traceback's last useful line may sit inside exception-group box drawing.
    lines = [ln.strip().lstrip("|").strip() for ln in lines]
    lines = [ln for ln in lines if ln.strip("+-^ ")]
    if not lines:
        return "(nothing logged)"
    line = lines[-1]
    try:
        entry = json.loads(line)
        if isinstance(entry, dict) and "event" in entry:
            extra = entry.get("error") or entry.get("exception") or ""
            line = f"{entry['event']} {extra}".strip()
    except ValueError:
        pass
    return line[:limit]


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """The detached supervisor `twinctl lab up` starts: runs until SIGTERM."""
    from twinmesh.log import configure_logging

    parser = argparse.ArgumentParser(prog="python -m twinmesh.lab.runner")
    parser.add_argument("file", type=Path)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--netns", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("json", "info")
    try:
        topology = load_topology(args.file.resolve())
        trio.run(lambda: supervise(topology, args.dir.resolve(), netns=args.netns))
    except TwinmeshError as exc:
        print(f"lab: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
