"""Linux network namespaces as a lab: real links between real processes on one host.

    ok, why = available()                              # root, and `ip netns` works?
    async with open_lab(5, ring(5)) as lab:            # 5 namespaces, one link per edge
        lab.exec_args(0)         # ["ip", "netns", "exec", "tm1a2b3c-0"]: a command prefix
        lab.address(0, 1)        # node 0's address on its link to node 1
        await lab.set_link(0, 1, up=False)             # a silent cut: no RST, no FIN
        await lab.netem(2, 3, delay_ms=100, loss_pct=20)
        async with open_lab_nics(lab, tmp_path, config=toml) as nics:
            await nics.wait_converged()                # a pnicd per node, peers pinned
            reply = await nics[0].ping(nics.keys[2])

Names. Every namespace is `tm<6 hex>-<node>`, the hex random per lab, so labs of
concurrent runs never meet. Inside a namespace the link to edge k is `l<k>`; the LAN
interface is `lan0`.

Addresses (private, and only ever inside the lab's namespaces). Edge k gets
10.231.k.0/24: .1 on its first node, .2 on its second. The optional LAN segment is
10.231.250.0/24, node N at .N+1, joined by a bridge that lives in a namespace of its
own (`tm<hex>-br`); it is the only place multicast (mDNS) is ever sent.

The host is never touched. Each veth pair is created inside a lab namespace with
its peer end placed straight into the other one (`ip -n A link add ... peer ...
netns B`); deleting a namespace deletes its ends. Teardown runs in `finally`, also
when the body failed or was cancelled: kill -9 whatever still runs in the namespaces
(`ip netns pids`), stop the lab's relays, delete the namespaces.

Impairment. `netem` puts `tc qdisc ... netem delay D loss L` on both ends of a link,
so each direction gets the delay and the loss. Kernels built without sch_netem exist
(`Lab.netem_reason` says why it is missing); for them, edges listed in `shaped=` are
built as two tap devices joined by a relay process (`python -m twinmesh.testing.netns
relay`, below) that applies the same per-direction delay and loss in user space.
Ask for `shaped=` on every edge a test means to impair; the lab then uses the
kernel's netem where it exists and the relay where it does not.

Processes. `open_lab_nics` runs one real `pnicd` per node through
`processes.run_pnicd(prefix=lab.exec_args(node))`: `ip netns exec` execs pnicd in
place, so the child *is* pnicd (kill -9 hits the daemon). Its admin socket is a Unix
socket in the state directory on the shared filesystem, so `twinctl --nic DIR`, and
every helper in `processes`, reach it from the host without entering the namespace.

Every command runs under a timeout and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import heapq
import ipaddress
import os
import random
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from twinmesh.identity.keystore import load_or_create_identity
from twinmesh.nic.config import KEY_FILE
from twinmesh.testing.processes import PnicdProcess, run_pnicd, wait_until

COMMAND_TIMEOUT = 10.0  # any single `ip`/`tc` command
TEARDOWN_TIMEOUT = 15.0  # the whole teardown
RELAY_READY_TIMEOUT = 10.0
LAN_SUBNET = ipaddress.ip_network("10.231.250.0/24")
MAX_EDGES = 200  # edge k uses 10.231.k.0/24; 250 is the LAN
NETNS_DIR = Path("/run/netns")


_Done = subprocess.CompletedProcess[bytes]


class LabError(Exception):
    """A lab command failed; the message names the command and what it printed."""


# ------------------------------------------------------------------- topologies


def ring(n: int) -> list[tuple[int, int]]:
    """Edges of a ring of `n` nodes: 0-1, 1-2, ..., (n-1)-0."""
    if n < 3:
        raise ValueError("a ring needs at least 3 nodes")
    return [(i, (i + 1) % n) for i in range(n)]


def line(n: int) -> list[tuple[int, int]]:
    """Edges of a line of `n` nodes: 0-1, 1-2, ..., (n-2)-(n-1)."""
    return [(i, i + 1) for i in range(n - 1)]


# ------------------------------------------------------------------ availability


def available() -> tuple[bool, str]:
    """(True, "") when this process can build labs; else (False, why not).

    Needs root, `ip` from iproute2, and a working `ip netns`: a throwaway namespace
    is created and deleted to prove it.
    """
    if os.geteuid() != 0:
        return False, "network namespaces need root (run the lab tests as root)"
    if shutil.which("ip") is None:
        return False, "`ip` (iproute2) is not installed"
    name = f"tm{secrets.token_hex(3)}-probe"
    try:
        added = _run_sync(["ip", "netns", "add", name])
        if added.returncode != 0:
            return False, f"`ip netns add` failed: {_output(added)}"
        up = _run_sync(["ip", "-n", name, "link", "set", "lo", "up"])
        if up.returncode != 0:
            return False, f"cannot configure a namespace: {_output(up)}"
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"`ip netns` does not work here: {exc}"
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run_sync(["ip", "netns", "del", name])
    return True, ""


def _run_sync(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
        stdin=subprocess.DEVNULL,
    )


def _output(done: subprocess.CompletedProcess[Any]) -> str:
    out = done.stderr or done.stdout or ""
    if isinstance(out, bytes):
        out = out.decode("utf-8", "replace")
    return out.strip() or f"exit code {done.returncode}"


# --------------------------------------------------------------------------- lab


@dataclass(frozen=True)
class LabLink:
    """One edge: `a` and `b` are nodes; the interface is `ifname` at both ends."""

    index: int
    a: int
    b: int
    kind: str  # "veth", or "relay" (tap devices joined by a relay process)

    @property
    def ifname(self) -> str:
        return f"l{self.index}"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.231.{self.index}.0/24")

    def address(self, node: int) -> str:
        """The address of `node`'s end of this link."""
        if node == self.a:
            return f"10.231.{self.index}.1"
        if node == self.b:
            return f"10.231.{self.index}.2"
        raise ValueError(f"node {node} is not on link {self.a}-{self.b}")


class Lab:
    """Namespaces, links and addresses built by `open_lab`; use it only inside that block.

    Node numbers are 0..nodes-1. Links are fixed after `open_lab` built them; only their
    state changes (`set_link`, `netem`).
    """

    def __init__(
        self,
        prefix: str,
        nodes: int,
        edges: Sequence[tuple[int, int]],
        *,
        lan: Sequence[int],
        shaped: Iterable[tuple[int, int]],
    ) -> None:
        if nodes < 1:
            raise ValueError("a lab needs at least one node")
        if len(edges) > MAX_EDGES:
            raise ValueError(f"at most {MAX_EDGES} edges")
        wanted = {frozenset(e) for e in shaped}
        self.prefix = prefix
        self.nodes = nodes
        self.lan = list(lan)
        self.netem_native = False
        self.netem_reason = "not probed (no shaped edges)"
        self._wanted_shaped = wanted
        self.links: list[LabLink] = []
        seen: set[frozenset[int]] = set()
        for index, (a, b) in enumerate(edges):
            if not (0 <= a < nodes and 0 <= b < nodes) or a == b:
                raise ValueError(f"bad edge {a}-{b} for {nodes} nodes")
            if frozenset((a, b)) in seen:
                raise ValueError(f"edge {a}-{b} given twice")
            seen.add(frozenset((a, b)))
            self.links.append(LabLink(index, a, b, "veth"))
        for node in self.lan:
            if not 0 <= node < nodes:
                raise ValueError(f"bad LAN node {node}")
        self._relays: dict[int, trio.Process] = {}
        self._created: list[str] = []

    # -------------------------------------------------------------- naming

    def ns(self, node: int) -> str:
        """The namespace of `node`."""
        if not 0 <= node < self.nodes:
            raise ValueError(f"no node {node} in this lab")
        return f"{self.prefix}-{node}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this lab (nodes, then the bridge's when there is a LAN)."""
        names = [self.ns(i) for i in range(self.nodes)]
        return [*names, self.bridge_ns] if self.lan else names

    def exec_args(self, node: int) -> list[str]:
        """The prefix that runs a command inside `node`'s namespace."""
        return ["ip", "netns", "exec", self.ns(node)]

    def link(self, a: int, b: int) -> LabLink:
        """The link between `a` and `b`, in either order."""
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        raise ValueError(f"no link between {a} and {b}")

    def neighbors(self, node: int) -> list[int]:
        return [link.b if link.a == node else link.a
                for link in self.links if node in (link.a, link.b)]

    def address(self, node: int, peer: int) -> str:
        """`node`'s address on its link to `peer`."""
        return self.link(node, peer).address(node)

    def lan_address(self, node: int) -> str:
        if node not in self.lan:
            raise ValueError(f"node {node} is not on the LAN")
        return str(LAN_SUBNET.network_address + node + 1)

    def addresses(self, node: int) -> list[str]:
        """Every address of `node`: its links in edge order, then its LAN address."""
        found = [link.address(node) for link in self.links if node in (link.a, link.b)]
        return found + ([self.lan_address(node)] if node in self.lan else [])

    # ------------------------------------------------------------ changing

    async def set_link(self, a: int, b: int, up: bool) -> None:
        """Bring both ends of the a-b link down or up: a silent cut, nothing is sent.

        TCP connections across the link are not reset; each side only stops hearing
        the other, exactly like a pulled cable. Addresses are kept, so bringing it up
        again restores the link as it was.
        """
        link = self.link(a, b)
        state = "up" if up else "down"
        for node in (link.a, link.b):
            await self._ip(["ip", "-n", self.ns(node), "link", "set", link.ifname, state])

    async def netem(self, a: int, b: int, delay_ms: float, loss_pct: float) -> None:
        """Delay and drop packets on the a-b link, in each direction; (0, 0) removes it."""
        if delay_ms < 0 or not 0 <= loss_pct <= 100:
            raise ValueError("need delay_ms >= 0 and 0 <= loss_pct <= 100")
        link = self.link(a, b)
        if link.kind == "relay":
            relay = self._relays[link.index]
            assert relay.stdin is not None
            await relay.stdin.send_all(f"{delay_ms:g} {loss_pct:g}\n".encode("ascii"))
            return
        if not self.netem_native:
            raise LabError(
                f"cannot impair link {a}-{b}: {self.netem_reason}; build the lab with "
                f"shaped=[({a}, {b})] to get a user-space relay on that link"
            )
        for node in (link.a, link.b):
            tc = [*self.exec_args(node), "tc", "qdisc"]
            if delay_ms == 0 and loss_pct == 0:
                await self._ip([*tc, "del", "dev", link.ifname, "root"], check=False)
            else:
                await self._ip([*tc, "replace", "dev", link.ifname, "root", "netem",
                                "delay", f"{delay_ms:g}ms", "loss", f"{loss_pct:g}%"])

    async def pids(self) -> dict[str, list[int]]:
        """Processes running in each of the lab's namespaces."""
        found: dict[str, list[int]] = {}
        for name in self._created:
            done = await self._ip(["ip", "netns", "pids", name], check=False)
            found[name] = [int(p) for p in done.stdout.decode().split() if p.isdigit()]
        return found

    # ------------------------------------------------------- build/teardown

    async def _build(self) -> None:
        for node in range(self.nodes):
            await self._add_ns(self.ns(node))
        if self._wanted_shaped:
            self.netem_native, self.netem_reason = await self._probe_netem(self.ns(0))
        for i, link in enumerate(self.links):
            relay = frozenset((link.a, link.b)) in self._wanted_shaped and not self.netem_native
            if relay:
                link = self.links[i] = LabLink(link.index, link.a, link.b, "relay")
                await self._build_relay_link(link)
            else:
                await self._ip(["ip", "-n", self.ns(link.a), "link", "add", link.ifname,
                                "type", "veth", "peer", "name", link.ifname,
                                "netns", self.ns(link.b)])
            for node in (link.a, link.b):
                ns = self.ns(node)
                await self._ip(["ip", "-n", ns, "addr", "add",
                                f"{link.address(node)}/24", "dev", link.ifname])
                await self._ip(["ip", "-n", ns, "link", "set", link.ifname, "up"])
        if self.lan:
            await self._build_lan()

    async def _add_ns(self, name: str) -> None:
        if (NETNS_DIR / name).exists():
            raise LabError(f"namespace {name} already exists")
        await self._ip(["ip", "netns", "add", name])
        self._created.append(name)
        await self._ip(["ip", "-n", name, "link", "set", "lo", "up"])

    async def _probe_netem(self, ns: str) -> tuple[bool, str]:
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
        done = await self._ip([*tc, "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                              check=False)
        if done.returncode != 0:
            why = done.stderr.decode("utf-8", "replace").strip()
            return False, f"the kernel has no netem qdisc (tc said: {why})"
        await self._ip([*tc, "del", "dev", "lo", "root"], check=False)
        return True, ""

    async def _build_relay_link(self, link: LabLink) -> None:
        for node in (link.a, link.b):
            await self._ip(["ip", "-n", self.ns(node), "tuntap", "add", "mode", "tap",
                            "name", link.ifname])
        argv = [sys.executable, "-m", "twinmesh.testing.netns", "relay",
                self.ns(link.a), link.ifname, self.ns(link.b), link.ifname]
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._relays[link.index] = process
        assert process.stdout is not None
        with trio.move_on_after(RELAY_READY_TIMEOUT):
            first = await process.stdout.receive_some(64)
            if first.startswith(b"ready"):
                return
        error: bytes | bytearray = b""
        if process.stderr is not None:
            with trio.move_on_after(1):
                error = await process.stderr.receive_some(4096)
        raise LabError(f"relay for link {link.a}-{link.b} did not start: "
                       f"{error.decode('utf-8', 'replace').strip() or 'no output'}")

    async def _build_lan(self) -> None:
        br = self.bridge_ns
        await self._add_ns(br)
        await self._ip(["ip", "-n", br, "link", "add", "br0", "type", "bridge",
                        "mcast_snooping", "0"])
        await self._ip(["ip", "-n", br, "link", "set", "br0", "up"])
        for node in self.lan:
            ns, port = self.ns(node), f"p{node}"
            await self._ip(["ip", "-n", ns, "link", "add", "lan0", "type", "veth",
                            "peer", "name", port, "netns", br])
            await self._ip(["ip", "-n", br, "link", "set", port, "master", "br0"])
            await self._ip(["ip", "-n", br, "link", "set", port, "up"])
            await self._ip(["ip", "-n", ns, "addr", "add",
                            f"{self.lan_address(node)}/{LAN_SUBNET.prefixlen}", "dev", "lan0"])
            await self._ip(["ip", "-n", ns, "link", "set", "lan0", "up"])

    async def _teardown(self) -> list[str]:
        """Kill what runs in the namespaces, stop relays, delete namespaces; the errors."""
        errors: list[str] = []
        for process in self._relays.values():
            if process.stdin is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await process.stdin.aclose()  # a relay exits when its stdin closes
        for _ in range(3):
            pids = await self.pids()
            if not any(pids.values()):
                break
            for pid in (p for group in pids.values() for p in group):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await trio.sleep(0.2)
        for process in self._relays.values():
            with trio.move_on_after(2):
                await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        left: list[str] = []
        for name in reversed(self._created):
            done = await self._ip(["ip", "netns", "del", name], check=False)
            if done.returncode != 0:
                errors.append(f"ip netns del {name}: {_output(done)}")
                left.append(name)
        self._created = left
        return errors

    async def _ip(self, argv: list[str], *, check: bool = True) -> _Done:
        with trio.fail_after(COMMAND_TIMEOUT):
            done = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False,
                stdin=subprocess.DEVNULL,
            )
        if check and done.returncode != 0:
            raise LabError(f"{' '.join(argv)}: {_output(done)}")
        return done


@asynccontextmanager
async def open_lab(
    nodes: int,
    edges: Sequence[tuple[int, int]] = (),
    *,
    lan: bool | Sequence[int] = False,
    shaped: Iterable[tuple[int, int]] = (),
) -> AsyncIterator[Lab]:
    """Build a lab of `nodes` namespaces linked along `edges`; tear it all down after.

    `lan=True` (or a list of nodes) also joins those nodes on one bridged segment.
    `shaped` names the edges the caller will `netem`: see the module docstring.
    Teardown errors are raised only when the body itself succeeded.
    """
    members = list(range(nodes)) if lan is True else list(lan or [])
    for _ in range(10):
        prefix = f"tm{secrets.token_hex(3)}"
        if not any(NETNS_DIR.glob(f"{prefix}-*")):
            break
    lab = Lab(prefix, nodes, list(edges), lan=members, shaped=shaped)
    failed = False
    try:
        await lab._build()
        yield lab
    except BaseException:
        failed = True
        raise
    finally:
        errors = [f"teardown took over {TEARDOWN_TIMEOUT:g} s"]
        with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_TIMEOUT):
            errors = await lab._teardown()
        for name in lab._created:  # only left when the teardown above was cut short
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _run_sync(["ip", "netns", "del", name])
        if errors and not failed:
            raise LabError("lab teardown: " + "; ".join(errors))


# --------------------------------------------------------------- pnicd per node


class LabNics:
    """One real `pnicd` per lab node; built by `open_lab_nics`.

    Node i's state directory is `root/nic<i>`; its key is created before the first
    start (so peers can pin it). Every NIC listens on `tcp://ADDR:port` for each of
    its node's addresses (the port is the same everywhere: each namespace has its own
    port space). With `peers=True`, the first node of each edge dials the second,
    pinned with `?key=`. `restart` keeps state dir, arguments and ports.
    """

    def __init__(
        self,
        lab: Lab,
        root: Path,
        *,
        config: Path | None = None,
        port: int = 9651,
        peers: bool = True,
        extra_args: Callable[[int], Sequence[str]] | None = None,
    ) -> None:
        self.lab = lab
        self.config = config
        self.port = port
        self.peers = peers
        self.extra_args = extra_args
        self.state_dirs = [root / f"nic{i}" for i in range(lab.nodes)]
        self.keys = [
            load_or_create_identity(d, KEY_FILE).public.text for d in self.state_dirs
        ]
        self.running: dict[int, PnicdProcess] = {}
        self._stacks: dict[int, AsyncExitStack] = {}

    def __getitem__(self, node: int) -> PnicdProcess:
        return self.running[node]

    def listen(self, node: int) -> list[str]:
        return [f"tcp://{addr}:{self.port}" for addr in self.lab.addresses(node)]

    def peer_uri(self, node: int, peer: int) -> str:
        """The URI `node` dials to reach `peer` across their link, pinned."""
        return f"tcp://{self.lab.address(peer, node)}:{self.port}?key={self.keys[peer]}"

    def args(self, node: int) -> list[str]:
        argv: list[str] = []
        if self.peers:
            for link in self.lab.links:
                if link.a == node:
                    argv += ["--peer", self.peer_uri(node, link.b)]
        if self.extra_args is not None:
            argv += list(self.extra_args(node))
        return argv

    async def start(self, node: int) -> PnicdProcess:
        """Start node's pnicd (again) and return it once its admin socket answers."""
        if node in self.running:
            raise RuntimeError(f"pnicd {node} is already running")
        stack = AsyncExitStack()
        try:
            nic = await stack.enter_async_context(
                run_pnicd(
                    self.state_dirs[node], *self.args(node), config=self.config,
                    health=False, listen=self.listen(node), prefix=self.lab.exec_args(node),
                )
            )
        except BaseException:
            await stack.aclose()
            raise
        self._stacks[node] = stack
        self.running[node] = nic
        return nic

    async def start_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for node in range(self.lab.nodes):
                nursery.start_soon(self.start, node)

    async def kill(self, node: int) -> None:
        """kill -9 node's pnicd (no goodbye to anyone) and reap it."""
        nic = self.running.pop(node)
        with contextlib.suppress(ProcessLookupError):
            nic.process.kill()
        await nic.process.wait()
        await self._stacks.pop(node).aclose()

    async def stop(self, node: int) -> None:
        """Stop node's pnicd cleanly (SIGTERM)."""
        self.running.pop(node)
        await self._stacks.pop(node).aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for node in list(self.running):
                    nursery.start_soon(self.stop, node)

    async def routes(self, node: int) -> dict[str, dict[str, Any]]:
        """node's routing table by destination key (through its admin socket)."""
        return await self.running[node].routes()

    async def reaches(
        self, src: int, dst: int, hops: int | None = None, timeout: float = 0.3
    ) -> bool:
        """One overlay ping src -> dst (in process): a reply came, over `hops` if given."""
        reply = await self.running[src].ping(self.keys[dst], timeout=timeout)
        return reply["rtt"] is not None and (hops is None or reply["hops"] == hops)

    async def wait_converged(
        self, nodes: Iterable[int] | None = None, timeout: float = 15.0
    ) -> None:
        """Wait until each of `nodes` (default: all running) has a route to each other."""
        group = sorted(self.running if nodes is None else nodes)
        wanted = {self.keys[i] for i in group}

        async def converged() -> bool:
            for node in group:
                if not wanted <= set(await self.routes(node)):
                    return False
            return True

        await wait_until(converged, timeout, interval=0.1, what="routes between all NICs")


@asynccontextmanager
async def open_lab_nics(
    lab: Lab,
    root: Path,
    *,
    start: bool = True,
    **options: Any,
) -> AsyncIterator[LabNics]:
    """`LabNics(lab, root, **options)`, all started unless `start=False`; stopped after."""
    nics = LabNics(lab, root, **options)
    try:
        if start:
            await nics.start_all()
        yield nics
    finally:
        await nics.aclose()


async def measure_until(
    predicate: Callable[[], Any],
    timeout: float,
    *,
    interval: float = 0.0,
    since: float | None = None,
) -> float | None:
    """Seconds until async `predicate()` first returns truthy, or None after `timeout`.

    The clock (`time.monotonic()`) starts at `since`, or when this is called;
    `predicate` is awaited back to back (with `interval` between tries).
    """
    started = time.monotonic() if since is None else since
    with trio.move_on_after(timeout):
        while True:
            if await predicate():
                return time.monotonic() - started
            await trio.sleep(interval)
    return None


# ------------------------------------------------------------------------ relay
#
# `python -m twinmesh.testing.netns relay NS_A TAP_A NS_B TAP_B`: joins two tap
# devices in two namespaces, copying Ethernet frames both ways. Each frame is dropped
# with probability loss% or delivered delay ms later. stdin takes lines
# "DELAY_MS LOSS_PCT"; the relay exits when stdin closes (its lab is gone), so it
# never outlives the test. Runs in its own process: entering a namespace (setns) is
# per thread and must never happen in the test process.

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_RELAY_QUEUE = 4096  # frames in flight per relay; more are dropped (a full queue)
_RELAY_MAX_SECONDS = 3600.0  # a relay never lives longer than this


def _enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns {name}: {os.strerror(code)}")
    finally:
        os.close(fd)


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    request = struct.pack("16sH22x", name.encode("ascii"), _IFF_TAP | _IFF_NO_PI)
    fcntl.ioctl(fd, _TUNSETIFF, request)
    return fd


def _relay(ns_a: str, tap_a: str, ns_b: str, tap_b: str) -> int:
    _enter_netns(ns_a)
    fa = _open_tap(tap_a)
    _enter_netns(ns_b)
    fb = _open_tap(tap_b)
    other = {fa: fb, fb: fa}
    delay, loss = 0.0, 0.0
    rng = random.Random()
    queue: list[tuple[float, int, int, bytes]] = []
    counter = 0
    stdin = sys.stdin.fileno()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    deadline = time.monotonic() + _RELAY_MAX_SECONDS
    pending = b""
    while time.monotonic() < deadline:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, fd, frame = heapq.heappop(queue)
            with contextlib.suppress(OSError):  # EIO: the tap is down; the frame is lost
                os.write(fd, frame)
        wait = max(0.0, queue[0][0] - now) if queue else 1.0
        readable, _, _ = select.select([fa, fb, stdin], [], [], wait)
        for fd in readable:
            if fd == stdin:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return 0
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    delay_ms, loss_pct = (float(x) for x in line.split())
                    delay, loss = delay_ms / 1000, loss_pct / 100
                continue
            for _ in range(64):  # drain, bounded
                try:
                    frame = os.read(fd, 65536)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EIO):
                        raise
                    break
                if rng.random() < loss or len(queue) >= _RELAY_QUEUE:
                    continue
                counter += 1
                heapq.heappush(queue, (time.monotonic() + delay, counter, other[fd], frame))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 5 or args[0] != "relay":
        print("usage: python -m twinmesh.testing.netns relay NS_A TAP_A NS_B TAP_B",
              file=sys.stderr)
        return 2
    try:
        return _relay(*args[1:])
    except (OSError, ValueError) as exc:
        print(f"relay: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
