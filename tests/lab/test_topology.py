"""The topology file: what a valid lab reads as, and one clear line for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinmesh.errors import ConfigError
from twinmesh.lab.topology import TopologyError, load_topology, parse_topology

LABS = Path(__file__).resolve().parents[2] / "labs"

LINE = """\
name = "t"

[[nic]]
name = "a"

[[nic]]
name = "b"

[[nic]]
name = "c"

[[link]]
from = "b"
to = "a"

[[link]]
from = "c"
to = "b"
carrier = "ws"
delay_ms = 20
loss_pct = 2.5

[[twin]]
name = "alice"
nic = "a"
fallback = ["b"]
web = true

[[twin]]
name = "many"
nic = "c"
hosted = 50
"""


def parse(text: str) -> object:
    return parse_topology(text, Path("lab.toml"))


def error_of(text: str) -> str:
    with pytest.raises(TopologyError) as info:
        parse_topology(text, Path("lab.toml"))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_line_reads_with_its_defaults() -> None:
    topology = parse_topology(LINE, Path("lab.toml"))
    assert [n.name for n in topology.nics] == ["a", "b", "c"]
    assert topology.nics[0].health and topology.nics[0].tcp_port == 0
    first, second = topology.links
    assert (first.dialer, first.listener, first.carrier, first.impaired) == ("b", "a", "tcp", False)
    assert (second.carrier, second.delay_ms, second.loss_pct, second.impaired) == (
        "ws", 20.0, 2.5, True)
    assert topology.neighbours("b") == ["a", "c"]
    assert topology.listens_ws("b") and not topology.listens_ws("a")
    alice, many = topology.twins
    assert (alice.nic, alice.fallback, alice.web, alice.count) == ("a", ("b",), True, 1)
    assert (many.hosted, many.count) == (50, 50)
    assert topology.twin_count == 51
    assert topology.components() == [{"a", "b", "c"}]


def test_the_name_defaults_to_the_file_name() -> None:
    topology = parse_topology('[[nic]]\nname = "a"\n', Path("labs/my-lab.toml"))
    assert topology.name == "my-lab"


def test_the_shipped_labs_are_valid() -> None:
    line3 = load_topology(LABS / "line3.toml")
    assert [n.name for n in line3.nics] == ["nic1", "nic2", "nic3"]
    assert {link.carrier for link in line3.links} == {"tcp", "ws"}
    assert len(line3.twins) == 3 and line3.twins[0].web
    ring = load_topology(LABS / "ring5-lossy.toml")
    assert len(ring.nics) == 5 and len(ring.links) == 5
    assert all(link.impaired for link in ring.links)


def test_an_unknown_node_in_a_link_names_file_line_and_field() -> None:
    text = LINE.replace('from = "c"', 'from = "nic9"')
    line = text.splitlines().index('from = "nic9"') + 1
    assert error_of(text) == f"lab.toml:{line}: link #2: 'from' names unknown NIC 'nic9'"


def test_a_link_to_a_twin_says_links_join_nics() -> None:
    assert "names a twin; links join NICs 'alice'" in error_of(
        LINE.replace('to = "a"', 'to = "alice"'))


def test_duplicate_names_are_refused_across_nics_and_twins() -> None:
    text = LINE.replace('name = "alice"', 'name = "b"')
    line = text.splitlines().index('name = "b"', 20) + 1
    assert error_of(text) == f"lab.toml:{line}: twin #1: name 'b' already used by a nic"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("delay_ms = 20", "delay_ms = -1", "link #2: delay_ms -1: must be in [0, 10000]"),
        ("delay_ms = 20", 'delay_ms = "fast"', "link #2: delay_ms must be a number"),
        ("loss_pct = 2.5", "loss_pct = 100", "link #2: loss_pct 100: must be in [0, 100)"),
        ('carrier = "ws"', 'carrier = "udp"', "link #2: carrier 'udp': use 'tcp' or 'ws'"),
        ('to = "a"', 'to = "b"', "link #1: links b to itself"),
        ('from = "c"\nto = "b"', 'from = "a"\nto = "b"', "link #2: a and b are already linked"),
        ('name = "a"', 'name = "a b"', "nic #1: name 'a b': use 1-32 letters"),
        ('name = "a"', 'name = "a"\ncolour = "red"', "nic #1 (a): unknown field 'colour'"),
        ('nic = "a"', 'nic = "z"', "twin #1 (alice): 'nic' names unknown NIC 'z'"),
        ('fallback = ["b"]', 'fallback = ["a"]', "twin #1 (alice): fallback repeats a NIC"),
        ("hosted = 50", "hosted = 50\nweb = true", "twin #2 (many): web: a hosted group"),
        ("hosted = 50", "hosted = -2", "twin #2 (many): hosted -2: must be in [0, 10000]"),
    ],
)
def test_each_mistake_gets_one_line_with_its_line_number(old: str, new: str, expected: str) -> None:
    text = LINE.replace(old, new, 1)
    message = error_of(text)
    assert message.startswith("lab.toml:") and expected in message
    number = int(message.split(":")[1])
    assert 1 <= number <= len(text.splitlines())
    section = expected.split(" #")[0]
    header_lines = [i + 1 for i, line in enumerate(text.splitlines()) if line == f"[[{section}]]"]
    assert number >= header_lines[0]  # points into the entry, not at the top of the file


def test_fixed_ports_must_not_clash() -> None:
    text = LINE.replace('name = "a"', 'name = "a"\ntcp_port = 9651').replace(
        'name = "c"', 'name = "c"\nws_port = 9651')
    assert "port 9651 used twice: a tcp_port and c ws_port" in error_of(text)
    assert "tcp_port 80: use 0" in error_of(LINE.replace('name = "a"', 'name = "a"\ntcp_port = 80'))


def test_pnicd_settings_are_checked_by_pnicd_own_rules() -> None:
    assert "[pnicd]" in error_of("[pnicd]\nmax_links = 0\n" + LINE.replace('name = "t"\n', ""))
    assert "listen: set by the lab itself" in error_of(
        '[pnicd]\nlisten = ["tcp://127.0.0.1:1"]\n[[nic]]\nname = "a"\n')
    ok = parse_topology('[pnicd.reconnect]\nmax = 1.0\n[[nic]]\nname = "a"\n', Path("x.toml"))
    assert ok.pnicd == {"reconnect": {"max": 1.0}}


def test_file_level_mistakes() -> None:
    assert error_of('name = "t"\n') == "lab.toml: no [[nic]]: a lab needs at least one NIC"
    assert error_of('nics = 3\n[[nic]]\nname = "a"\n').startswith(
        "lab.toml:1: unknown key 'nics'")
    assert error_of("[[nic]\n").startswith("lab.toml: invalid TOML:")
    assert "'link' must be an array of tables" in error_of('link = 3\n[[nic]]\nname = "a"\n')


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read topology"):
        load_topology(tmp_path / "missing.toml")
