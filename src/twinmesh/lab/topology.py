"""The lab's topology file: NICs, the links between them, the twins on them.

    name = "line3"                # optional; default: the file's name without .toml

    [pnicd]                       # optional: pnicd settings for every NIC (nic/config.py),
    [pnicd.reconnect]             # e.g. shorter reconnect backoff than a real deployment
    max = 2.0

    [[nic]]
    name = "nic1"
    ws = true                     # also listen on a websocket (implied by a ws link to it)
    tcp_port = 0                  # 0: chosen at `lab up` (also ws_port, health_port)
    health = true                 # the loopback /healthz + /metrics endpoint

    [[link]]
    from = "nic2"                 # this NIC dials ...
    to = "nic1"                   # ... this one, pinned to its key
    carrier = "tcp"               # or "ws"
    delay_ms = 20                 # added in each direction
    loss_pct = 1                  # each direction, in [0, 100)

    [[twin]]
    name = "alice"
    nic = "nic1"
    fallback = ["nic2"]           # NICs the twin moves to when its own dies
    web = true                    # serve the browser page on 127.0.0.1 (web_port, 0: any)
    hosted = 0                    # > 0: one twind process hosting this many twins

Every mistake is refused with one line naming the file, the line when it can be
found, and the field: `labs/x.toml:14: link #2: 'to' names unknown NIC 'nic9'`.
tomllib reports no positions for values, so lines are found by scanning the text for
the N-th `[[link]]` header and the `key =` line below it; a file written with inline
tables still gets file and field, only without the line.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinmesh.errors import ConfigError
from twinmesh.nic.config import load_config

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
RESERVED_NAMES = frozenset({"logs"})  # folders of the lab directory itself
CARRIERS = ("tcp", "ws")
MAX_NICS = 200  # a netns lab gives every link its own /24 (testing/netns.MAX_EDGES)
MAX_LINKS = 200
MAX_TWINS = 1000
MAX_HOSTED = 10_000
MAX_DELAY_MS = 10_000.0
# The lab writes these itself; a [pnicd] table that set them would fight it.
LAB_OWNED_PNICD_KEYS = frozenset({"state_dir", "listen", "peers", "health"})

_TOP_KEYS = {"name", "pnicd", "nic", "link", "twin"}
_NIC_KEYS = {"name", "ws", "tcp_port", "ws_port", "health_port", "health"}
_LINK_KEYS = {"from", "to", "carrier", "delay_ms", "loss_pct"}
_TWIN_KEYS = {"name", "nic", "fallback", "web", "web_port", "hosted"}


class TopologyError(ConfigError):
    """The topology file is invalid; the message is one line naming file, line and field."""


@dataclass(frozen=True)
class NicSpec:
    name: str
    ws: bool = False
    tcp_port: int = 0
    ws_port: int = 0
    health_port: int = 0
    health: bool = True


@dataclass(frozen=True)
class LinkSpec:
    """`dialer` keeps a link to `listener`; impairment applies to each direction."""

    index: int
    dialer: str
    listener: str
    carrier: str = "tcp"
    delay_ms: float = 0.0
    loss_pct: float = 0.0

    @property
    def impaired(self) -> bool:
        return self.delay_ms > 0 or self.loss_pct > 0

    @property
    def label(self) -> str:
        return f"{self.dialer}->{self.listener}"


@dataclass(frozen=True)
class TwinSpec:
    name: str
    nic: str
    fallback: tuple[str, ...] = ()
    web: bool = False
    web_port: int = 0
    hosted: int = 0  # 0: one twin in its own process; N: one process hosting N twins

    @property
    def count(self) -> int:
        return self.hosted or 1


@dataclass(frozen=True)
class Topology:
    name: str
    source: Path
    nics: tuple[NicSpec, ...]
    links: tuple[LinkSpec, ...] = ()
    twins: tuple[TwinSpec, ...] = ()
    pnicd: dict[str, Any] = field(default_factory=dict)

    def nic(self, name: str) -> NicSpec:
        for nic in self.nics:
            if nic.name == name:
                return nic
        raise KeyError(name)

    def nic_index(self, name: str) -> int:
        return [n.name for n in self.nics].index(name)

    def neighbours(self, name: str) -> list[str]:
        """The NICs `name` has a link with, in link order (either direction)."""
        found = []
        for link in self.links:
            if link.dialer == name:
                found.append(link.listener)
            elif link.listener == name:
                found.append(link.dialer)
        return found

    def listens_ws(self, name: str) -> bool:
        return self.nic(name).ws or any(
            link.listener == name and link.carrier == "ws" for link in self.links
        )

    def components(self) -> list[set[str]]:
        """The NICs that can reach each other over the links, as groups."""
        groups: list[set[str]] = []
        for nic in self.nics:
            if any(nic.name in g for g in groups):
                continue
            group, todo = {nic.name}, [nic.name]
            while todo:
                for other in self.neighbours(todo.pop()):
                    if other not in group:
                        group.add(other)
                        todo.append(other)
            groups.append(group)
        return groups

    @property
    def twin_count(self) -> int:
        return sum(t.count for t in self.twins)


def load_topology(path: Path) -> Topology:
    """Read and check a topology file; TopologyError (one line) when it is wrong."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read topology: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TopologyError(f"{path}: not UTF-8 text") from None
    return parse_topology(text, path)


def parse_topology(text: str, source: Path) -> Topology:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{source}: invalid TOML: {exc}") from None
    return _Parser(text, source).topology(raw)


class _Parser:
    def __init__(self, text: str, source: Path) -> None:
        self.lines = text.splitlines()
        self.source = source

    # ----------------------------------------------------------- errors

    def error(
        self, what: str, *, section: str = "", index: int = -1, key: str = ""
    ) -> TopologyError:
        line = self.line_of(section, index, key)
        where = f"{self.source}:{line}" if line else str(self.source)
        return TopologyError(f"{where}: {what}")

    def line_of(self, section: str, index: int, key: str) -> int:
        """1-based line of `key` in the `index`-th `[[section]]` (top level if no section)."""
        start, end = 0, len(self.lines)
        if section:
            header = re.compile(rf"^\s*\[\[\s*{re.escape(section)}\s*\]\]")
            starts = [i for i, line in enumerate(self.lines) if header.match(line)]
            if index >= len(starts):
                return 0
            start = starts[index]
            following = [i for i, line in enumerate(self.lines)
                         if i > start and re.match(r"^\s*\[", line)]
            end = following[0] if following else len(self.lines)
            if not key:
                return start + 1
        else:
            tables = [i for i, line in enumerate(self.lines) if re.match(r"^\s*\[", line)]
            end = tables[0] if tables else len(self.lines)
        if key:
            pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
            for i in range(start, end):
                if pattern.match(self.lines[i]):
                    return i + 1
        return start + 1 if section else 0

    # ----------------------------------------------------------- parsing

    def topology(self, raw: dict[str, Any]) -> Topology:
        unknown = sorted(set(raw) - _TOP_KEYS)
        if unknown:
            raise self.error(f"unknown key '{unknown[0]}' (expected one of "
                             f"{', '.join(sorted(_TOP_KEYS))})", key=unknown[0])
        name = raw.get("name", self.source.stem)
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise self.error(f"name {name!r}: use 1-32 letters, digits, '-' or '_'", key="name")
        pnicd = self.pnicd(raw.get("pnicd", {}))
        nics = tuple(self.nic(i, item) for i, item in enumerate(self.entries(raw, "nic")))
        if not nics:
            raise self.error("no [[nic]]: a lab needs at least one NIC")
        if len(nics) > MAX_NICS:
            raise self.error(f"{len(nics)} NICs: at most {MAX_NICS}")
        links = tuple(self.link(i, item) for i, item in enumerate(self.entries(raw, "link")))
        if len(links) > MAX_LINKS:
            raise self.error(f"{len(links)} links: at most {MAX_LINKS}")
        twins = tuple(self.twin(i, item) for i, item in enumerate(self.entries(raw, "twin")))
        topology = Topology(name, self.source, nics, links, twins, pnicd)
        self.check_names(topology)
        self.check_links(topology)
        self.check_twins(topology)
        self.check_ports(topology)
        return topology

    def entries(self, raw: dict[str, Any], section: str) -> list[dict[str, Any]]:
        value = raw.get(section, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(f"'{section}' must be an array of tables ([[{section}]])",
                             key=section)
        return value

    def pnicd(self, table: Any) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.error("[pnicd] must be a table", key="pnicd")
        owned = sorted(LAB_OWNED_PNICD_KEYS & set(table))
        if owned:
            raise self.error(f"[pnicd] {owned[0]}: set by the lab itself, leave it out")
        try:
            load_config(None, dict(table))
        except ConfigError as exc:
            raise self.error(f"[pnicd] {exc}".replace("settings: ", "")) from None
        return dict(table)

    def check_keys(self, section: str, index: int, item: dict[str, Any], known: set[str]) -> None:
        name = item.get("name")
        label = f"{section} #{index + 1}" + (f" ({name})" if isinstance(name, str) else "")
        for key in item:
            if key not in known:
                raise self.error(
                    f"{label}: unknown field '{key}' (expected one of "
                    f"{', '.join(sorted(known))})", section=section, index=index, key=key)

    def nic(self, index: int, item: dict[str, Any]) -> NicSpec:
        self.check_keys("nic", index, item, _NIC_KEYS)
        get = _Getter(self, "nic", index, item)
        return NicSpec(
            name=get.name(),
            ws=get.boolean("ws", False),
            tcp_port=get.port("tcp_port"),
            ws_port=get.port("ws_port"),
            health_port=get.port("health_port"),
            health=get.boolean("health", True),
        )

    def link(self, index: int, item: dict[str, Any]) -> LinkSpec:
        self.check_keys("link", index, item, _LINK_KEYS)
        get = _Getter(self, "link", index, item)
        carrier = get.string("carrier", "tcp")
        if carrier not in CARRIERS:
            raise get.error("carrier", f"carrier {carrier!r}: use 'tcp' or 'ws'")
        delay = get.number("delay_ms", 0.0)
        if not 0 <= delay <= MAX_DELAY_MS:
            raise get.error("delay_ms", f"delay_ms {delay:g}: must be in [0, {MAX_DELAY_MS:g}]")
        loss = get.number("loss_pct", 0.0)
        if not 0 <= loss < 100:
            raise get.error("loss_pct", f"loss_pct {loss:g}: must be in [0, 100)")
        return LinkSpec(index, get.required_string("from"), get.required_string("to"),
                        carrier, delay, loss)

    def twin(self, index: int, item: dict[str, Any]) -> TwinSpec:
        self.check_keys("twin", index, item, _TWIN_KEYS)
        get = _Getter(self, "twin", index, item)
        fallback = item.get("fallback", [])
        if not isinstance(fallback, list) or not all(isinstance(f, str) for f in fallback):
            raise get.error("fallback", "fallback must be a list of NIC names")
        hosted = get.integer("hosted", 0)
        if not 0 <= hosted <= MAX_HOSTED:
            raise get.error("hosted", f"hosted {hosted}: must be in [0, {MAX_HOSTED}]")
        spec = TwinSpec(
            name=get.name(),
            nic=get.required_string("nic"),
            fallback=tuple(fallback),
            web=get.boolean("web", False),
            web_port=get.port("web_port"),
            hosted=hosted,
        )
        if spec.hosted and (spec.web or spec.web_port):
            raise get.error("web", "web: a hosted group has no browser page; "
                            "give the page to a twin of its own")
        return spec

    # ----------------------------------------------------------- checks

    def check_names(self, topology: Topology) -> None:
        seen: dict[str, str] = {}
        named = [("nic", i, n.name) for i, n in enumerate(topology.nics)]
        named += [("twin", i, t.name) for i, t in enumerate(topology.twins)]
        for section, index, name in named:
            if name in seen:
                raise self.error(f"{section} #{index + 1}: name '{name}' already used by a "
                                 f"{seen[name]}", section=section, index=index, key="name")
            seen[name] = section

    def check_links(self, topology: Topology) -> None:
        nics = {n.name for n in topology.nics}
        twins = {t.name for t in topology.twins}
        pairs: set[frozenset[str]] = set()
        for link in topology.links:
            for key, name in (("from", link.dialer), ("to", link.listener)):
                if name not in nics:
                    what = "a twin; links join NICs" if name in twins else "unknown NIC"
                    raise self.error(f"link #{link.index + 1}: '{key}' names {what} '{name}'",
                                     section="link", index=link.index, key=key)
            if link.dialer == link.listener:
                raise self.error(f"link #{link.index + 1}: links {link.dialer} to itself",
                                 section="link", index=link.index, key="to")
            pair = frozenset((link.dialer, link.listener))
            if pair in pairs:
                raise self.error(
                    f"link #{link.index + 1}: {link.dialer} and {link.listener} are already "
                    "linked", section="link", index=link.index)
            pairs.add(pair)

    def check_twins(self, topology: Topology) -> None:
        nics = {n.name for n in topology.nics}
        if topology.twin_count > MAX_TWINS:
            raise self.error(f"{topology.twin_count} twins: at most {MAX_TWINS}")
        for index, twin in enumerate(topology.twins):
            for key, names in (("nic", [twin.nic]), ("fallback", list(twin.fallback))):
                for name in names:
                    if name not in nics:
                        raise self.error(f"twin #{index + 1} ({twin.name}): '{key}' names "
                                         f"unknown NIC '{name}'",
                                         section="twin", index=index, key=key)
            if twin.nic in twin.fallback or len(set(twin.fallback)) != len(twin.fallback):
                raise self.error(f"twin #{index + 1} ({twin.name}): fallback repeats a NIC",
                                 section="twin", index=index, key="fallback")

    def check_ports(self, topology: Topology) -> None:
        used: dict[int, str] = {}
        fixed: list[tuple[str, int, str, int]] = []
        for index, nic in enumerate(topology.nics):
            fixed += [("nic", index, key, getattr(nic, key))
                      for key in ("tcp_port", "ws_port", "health_port")]
        fixed += [("twin", i, "web_port", t.web_port) for i, t in enumerate(topology.twins)]
        names = {"nic": [n.name for n in topology.nics], "twin": [t.name for t in topology.twins]}
        for section, index, key, port in fixed:
            if not port:
                continue
            owner = f"{names[section][index]} {key}"
            if port in used:
                raise self.error(f"port {port} used twice: {used[port]} and {owner}",
                                 section=section, index=index, key=key)
            used[port] = owner


class _Getter:
    """Typed fields of one `[[section]]` entry, each refused with its line."""

    def __init__(self, parser: _Parser, section: str, index: int, item: dict[str, Any]) -> None:
        self.parser, self.section, self.index, self.item = parser, section, index, item

    def error(self, key: str, what: str) -> TopologyError:
        label = f"{self.section} #{self.index + 1}"
        name = self.item.get("name")
        if isinstance(name, str) and key != "name":
            label += f" ({name})"
        return self.parser.error(f"{label}: {what}", section=self.section, index=self.index,
                                 key=key)

    def name(self) -> str:
        name = self.required_string("name")
        if not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
            raise self.error("name", f"name {name!r}: use 1-32 letters, digits, '-' or '_' "
                             f"(not {', '.join(sorted(RESERVED_NAMES))})")
        return name

    def required_string(self, key: str) -> str:
        if key not in self.item:
            raise self.error(key, f"'{key}' is missing")
        return self.string(key, "")

    def string(self, key: str, default: str) -> str:
        value = self.item.get(key, default)
        if not isinstance(value, str) or (key in self.item and not value):
            raise self.error(key, f"{key} must be a non-empty string")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.item.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"{key} must be true or false")
        return value

    def integer(self, key: str, default: int) -> int:
        value = self.item.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"{key} must be an integer")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.item.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(key, f"{key} must be a number")
        return float(value)

    def port(self, key: str) -> int:
        port = self.integer(key, 0)
        if port != 0 and not 1024 <= port <= 65535:
            raise self.error(key, f"{key} {port}: use 0 (chosen at start) or 1024-65535")
        return port

