"""From a topology to command lines: where each NIC listens, whom it dials, each twin's NIC.

Pure: ports, keys and addresses come in as arguments (the runner chooses them), so
the same topology gives the same commands every time, and `restart NODE` runs a node
exactly as it first ran.

Local mode: every NIC on 127.0.0.1 with its own ports; an impaired link's dialer
dials the link's relay (lab/relay.py), which forwards to the listener. Netns mode:
a NIC listens on its addresses inside its own namespace (one per link,
testing/netns.py) on the same ports everywhere, and dials the listener's address on
their shared link; the namespace's links carry the impairment.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from twinmesh.lab.state import LOGS_DIR, PNICD_CONFIG
from twinmesh.lab.topology import Topology, TwinSpec

LOOPBACK = "127.0.0.1"
WS_PATH = "/pnic"
NETNS_TCP_PORT = 9651
NETNS_WS_PORT = 9652
PNICD = [sys.executable, "-m", "twinmesh.nic.main"]
TWIND = [sys.executable, "-m", "twinmesh.twin.main"]

# Faster than a deployment's defaults, so a restarted NIC is linked again in seconds.
LAB_PNICD_DEFAULTS = {"reconnect": {"initial": 0.2, "max": 2.0}}


@dataclass(frozen=True)
class Endpoints:
    """Where each NIC listens and what each link's dialer dials."""

    listen: dict[str, list[str]]  # NIC -> listen URIs
    dial: dict[int, str]  # link index -> URI (without ?key=)
    health: dict[str, str]  # NIC -> HOST:PORT ("" for none)


@dataclass(frozen=True)
class NodePlan:
    """One process of the lab: what runs, where, and what "ready" means for it."""

    name: str
    kind: str  # "nic", "twin" (one twin) or "twins" (a hosting process)
    state_dir: Path
    argv: list[str]
    log: Path
    namespace: str = ""  # netns mode: the NIC's namespace
    links: list[str] = field(default_factory=list)  # NICs this NIC links to
    listen: list[str] = field(default_factory=list)
    health: str = ""
    nic: str = ""  # twins: the NIC they attach to
    twins: int = 0  # twins: how many
    web: bool = False

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    @property
    def command(self) -> list[str]:
        return [*self.prefix, *self.argv]

    def twin_dirs(self) -> list[Path]:
        """The state directory of each twin this process runs."""
        if self.kind == "twin":
            return [self.state_dir]
        return [self.state_dir / hosted_dir_name(i) for i in range(self.twins)]


def hosted_dir_name(index: int) -> str:
    """The state directory of hosted twin `index` inside `--state-root` (twin/main.py)."""
    return f"twin-{index:04d}"


def pnicd_config_text(topology: Topology) -> str:
    """The lab's pnicd TOML: lab defaults, overridden by the topology's [pnicd] table."""
    merged: dict[str, object] = {k: dict(v) for k, v in LAB_PNICD_DEFAULTS.items()}
    for key, value in topology.pnicd.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}  # type: ignore[dict-item]
        else:
            merged[key] = value
    scalars = [f"{k} = {_toml(v)}" for k, v in merged.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "".join(f"{ik} = {_toml(iv)}\n" for ik, iv in v.items())
              for k, v in merged.items() if isinstance(v, dict)]
    return "\n".join(scalars) + ("\n" if scalars else "") + "".join(tables)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def local_endpoints(
    topology: Topology,
    ports: dict[str, dict[str, int]],
    relay_ports: dict[int, int],
) -> Endpoints:
    """Loopback addressing. `ports[nic]` has "tcp", and "ws"/"health" where used;
    `relay_ports[link index]` is the relay port of each impaired link."""
    listen: dict[str, list[str]] = {}
    health: dict[str, str] = {}
    for nic in topology.nics:
        uris = [f"tcp://{LOOPBACK}:{ports[nic.name]['tcp']}"]
        if topology.listens_ws(nic.name):
            uris.append(f"ws://{LOOPBACK}:{ports[nic.name]['ws']}{WS_PATH}")
        listen[nic.name] = uris
        health[nic.name] = f"{LOOPBACK}:{ports[nic.name]['health']}" if nic.health else ""
    dial: dict[int, str] = {}
    for link in topology.links:
        port = relay_ports.get(link.index) or ports[link.listener][link.carrier]
        path = WS_PATH if link.carrier == "ws" else ""
        dial[link.index] = f"{link.carrier}://{LOOPBACK}:{port}{path}"
    return Endpoints(listen, dial, health)


def netns_endpoints(
    topology: Topology,
    addresses: dict[str, list[str]],
    far_address: dict[int, str],
) -> Endpoints:
    """Namespace addressing. `addresses[nic]`: the NIC's addresses (one per link);
    `far_address[link index]`: the listener's address on that link."""
    listen: dict[str, list[str]] = {}
    for nic in topology.nics:
        uris = [f"tcp://{a}:{NETNS_TCP_PORT}" for a in addresses[nic.name]]
        if topology.listens_ws(nic.name):
            uris += [f"ws://{a}:{NETNS_WS_PORT}{WS_PATH}" for a in addresses[nic.name]]
        # A NIC without links still needs somewhere to listen (its own loopback).
        listen[nic.name] = uris or [f"tcp://{LOOPBACK}:{NETNS_TCP_PORT}"]
    dial = {}
    for link in topology.links:
        port = NETNS_WS_PORT if link.carrier == "ws" else NETNS_TCP_PORT
        path = WS_PATH if link.carrier == "ws" else ""
        dial[link.index] = f"{link.carrier}://{far_address[link.index]}:{port}{path}"
    # Health binds loopback inside the namespace, out of the host's reach: left out.
    return Endpoints(listen, dial, {nic.name: "" for nic in topology.nics})


def plan_nodes(
    topology: Topology,
    lab_dir: Path,
    endpoints: Endpoints,
    keys: dict[str, str],
    namespaces: dict[str, str] | None = None,
) -> list[NodePlan]:
    """Every process of the lab, NICs first (twins need them), in file order."""
    namespaces = namespaces or {}
    config = lab_dir / PNICD_CONFIG
    plans = []
    for nic in topology.nics:
        state_dir = lab_dir / nic.name
        argv = [*PNICD, "--state-dir", str(state_dir), "--config", str(config),
                "--log-format", "json"]
        for uri in endpoints.listen[nic.name]:
            argv += ["--listen", uri]
        for link in topology.links:
            if link.dialer == nic.name:
                argv += ["--peer", f"{endpoints.dial[link.index]}?key={keys[link.listener]}"]
        health = endpoints.health[nic.name]
        if health:
            argv += ["--health", health]
        plans.append(NodePlan(
            name=nic.name, kind="nic", state_dir=state_dir, argv=argv,
            log=lab_dir / LOGS_DIR / f"{nic.name}.log", namespace=namespaces.get(nic.name, ""),
            links=topology.neighbours(nic.name), listen=endpoints.listen[nic.name],
            health=f"http://{health}/" if health else "",
        ))
    plans += [twin_plan(twin, lab_dir) for twin in topology.twins]
    return plans


def twin_plan(twin: TwinSpec, lab_dir: Path) -> NodePlan:
    state_dir = lab_dir / twin.name
    nics = [str(lab_dir / name) for name in (twin.nic, *twin.fallback)]
    if twin.hosted:
        argv = [*TWIND, "--host", str(twin.hosted), "--state-root", str(state_dir)]
    else:
        argv = [*TWIND, "--state-dir", str(state_dir), "--name", twin.name]
    for nic in nics:
        argv += ["--nic", nic]
    if twin.web:
        argv += ["--http", f"{LOOPBACK}:{twin.web_port}"]
    argv += ["--log-format", "json"]
    return NodePlan(
        name=twin.name, kind="twins" if twin.hosted else "twin", state_dir=state_dir,
        argv=argv, log=lab_dir / LOGS_DIR / f"{twin.name}.log", nic=twin.nic,
        twins=twin.count, web=twin.web,
    )
