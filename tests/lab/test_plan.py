"""From topology to command lines: who listens where, who dials whom, pinned to which key."""

from __future__ import annotations

import tomllib
from pathlib import Path

from twinmesh.lab.plan import (
    local_endpoints,
    netns_endpoints,
    plan_nodes,
    pnicd_config_text,
)
from twinmesh.lab.topology import Topology, parse_topology
from twinmesh.nic.config import load_config

TEXT = """\
[pnicd]
max_links = 8
[pnicd.link]
dead_after = 3.0

[[nic]]
name = "a"
[[nic]]
name = "b"
health = false
[[nic]]
name = "c"

[[link]]
from = "b"
to = "a"
delay_ms = 10
[[link]]
from = "c"
to = "b"
carrier = "ws"

[[twin]]
name = "alice"
nic = "a"
fallback = ["b"]
web = true
[[twin]]
name = "crowd"
nic = "c"
hosted = 3
"""
KEYS = {"a": "KA", "b": "KB", "c": "KC"}
PORTS = {"a": {"tcp": 1001, "ws": 1002, "health": 1003},
         "b": {"tcp": 2001, "ws": 2002, "health": 2003},
         "c": {"tcp": 3001, "ws": 3002, "health": 3003}}


def topology() -> Topology:
    return parse_topology(TEXT, Path("t.toml"))


def option_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_local_mode_dials_through_the_relay_of_an_impaired_link(tmp_path: Path) -> None:
    endpoints = local_endpoints(topology(), PORTS, relay_ports={0: 4444})
    nodes = {n.name: n for n in plan_nodes(topology(), tmp_path, endpoints, KEYS)}
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    assert option_values(a.argv, "--listen") == ["tcp://127.0.0.1:1001"]
    # b is dialed over ws by c, so it listens on both carriers.
    assert option_values(b.argv, "--listen") == ["tcp://127.0.0.1:2001",
                                                 "ws://127.0.0.1:2002/pnic"]
    assert option_values(b.argv, "--peer") == ["tcp://127.0.0.1:4444?key=KA"]  # the relay
    assert option_values(c.argv, "--peer") == ["ws://127.0.0.1:2002/pnic?key=KB"]
    assert option_values(a.argv, "--peer") == []
    assert option_values(a.argv, "--health") == ["127.0.0.1:1003"]
    assert option_values(b.argv, "--health") == [] and b.health == ""
    assert option_values(a.argv, "--state-dir") == [str(tmp_path / "a")]
    assert b.links == ["a", "c"] and a.prefix == []


def test_twins_attach_to_their_nic_state_dirs(tmp_path: Path) -> None:
    endpoints = local_endpoints(topology(), PORTS, relay_ports={})
    nodes = {n.name: n for n in plan_nodes(topology(), tmp_path, endpoints, KEYS)}
    alice, crowd = nodes["alice"], nodes["crowd"]
    assert option_values(alice.argv, "--nic") == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert option_values(alice.argv, "--http") == ["127.0.0.1:0"]
    assert option_values(alice.argv, "--state-dir") == [str(tmp_path / "alice")]
    assert alice.kind == "twin" and alice.twin_dirs() == [tmp_path / "alice"]
    assert option_values(crowd.argv, "--host") == ["3"]
    assert option_values(crowd.argv, "--state-root") == [str(tmp_path / "crowd")]
    assert "--http" not in crowd.argv
    assert crowd.twin_dirs() == [tmp_path / "crowd" / f"twin-{i:04d}" for i in range(3)]


def test_netns_mode_listens_on_link_addresses_inside_the_namespace(tmp_path: Path) -> None:
    addresses = {"a": ["10.231.0.2"], "b": ["10.231.0.1", "10.231.1.2"], "c": ["10.231.1.1"]}
    far = {0: "10.231.0.2", 1: "10.231.1.2"}
    endpoints = netns_endpoints(topology(), addresses, far)
    namespaces = {"a": "tmx-0", "b": "tmx-1", "c": "tmx-2"}
    nodes = {n.name: n for n in plan_nodes(topology(), tmp_path, endpoints, KEYS, namespaces)}
    b = nodes["b"]
    assert b.command[:4] == ["ip", "netns", "exec", "tmx-1"]
    assert option_values(b.argv, "--listen") == [
        "tcp://10.231.0.1:9651", "tcp://10.231.1.2:9651",
        "ws://10.231.0.1:9652/pnic", "ws://10.231.1.2:9652/pnic"]
    assert option_values(b.argv, "--peer") == ["tcp://10.231.0.2:9651?key=KA"]
    assert option_values(nodes["c"].argv, "--peer") == ["ws://10.231.1.2:9652/pnic?key=KB"]
    assert "--health" not in nodes["a"].argv  # unreachable from the host: left out
    assert nodes["alice"].prefix == []  # twins stay on the host, next to the browser


def test_pnicd_config_merges_lab_defaults_with_the_file() -> None:
    text = pnicd_config_text(topology())
    raw = tomllib.loads(text)
    assert raw == {"max_links": 8, "reconnect": {"initial": 0.2, "max": 2.0},
                   "link": {"dead_after": 3.0}}
    config = load_config(None, raw)  # pnicd itself accepts it
    assert config.reconnect.max == 2.0 and config.link.dead_after == 3.0
