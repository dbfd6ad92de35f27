"""The mDNS announcement record and the linking policy, without a network.

The real thing (zeroconf on a bridged LAN of namespaces) is tests/lab/test_netns_mdns.py.
The addresses below are values handed to pure functions: nothing is sent to them.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
import trio

from twinmesh.carriers.uri import PeerUri
from twinmesh.discovery.mdns import (
    TAG_CONTEXT,
    Announcement,
    MdnsDiscovery,
    announce_addresses,
    announcement_for,
    decode_txt,
    encode_txt,
    group_tag,
    link_decision,
    pick_address,
)
from twinmesh.errors import DecodeError
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.nic.config import load_config
from twinmesh.nic.main import build_config, parse_args
from twinmesh.testing.processes import run_pnicd_to_exit


def key() -> PublicKey:
    return Identity.generate().public


def as_zeroconf(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    """TXT properties as zeroconf's ServiceInfo.properties hands them over."""
    return {k.encode(): v.encode() for k, v in txt.items()}


# --- the tag ---------------------------------------------------------------------


def test_the_group_tag_is_hmac_sha256_of_the_raw_key_under_the_password() -> None:
    k = key()
    expected = hmac.new(b"s3cret", TAG_CONTEXT + k.raw, hashlib.sha256).digest()
    assert group_tag("s3cret", k) == expected
    assert len(expected) == 32


def test_a_tag_is_valid_only_for_its_key_and_password() -> None:
    a, b = key(), key()
    tagged = Announcement(a, tcp_port=9651, tag=group_tag("blue", a))
    assert tagged.tag_valid("blue")
    assert not tagged.tag_valid("red")
    assert not Announcement(b, tcp_port=9651, tag=group_tag("blue", a)).tag_valid("blue")
    assert not Announcement(a, tcp_port=9651).tag_valid("blue")


def test_a_password_is_utf8() -> None:
    k = key()
    assert group_tag("pässwörd", k) == hmac.new(
        "pässwörd".encode(), TAG_CONTEXT + k.raw, hashlib.sha256
    ).digest()


# --- TXT encode/decode ----------------------------------------------------------------


def test_txt_round_trips_through_zeroconf_bytes() -> None:
    k = key()
    ann = Announcement(k, tcp_port=9651, ws_port=9652, ws_path="/mesh", tag=group_tag("x", k))
    txt = encode_txt(ann)
    assert txt == {"v": "1", "key": k.text, "tcp": "9651", "ws": "9652", "path": "/mesh",
                   "tag": group_tag("x", k).hex()}
    assert all(len(name) + 1 + len(value) <= 255 for name, value in txt.items())
    assert decode_txt(as_zeroconf(txt)) == ann
    assert decode_txt(txt) == ann  # str keys and values are accepted too


def test_txt_of_a_tcp_only_untagged_nic() -> None:
    k = key()
    txt = encode_txt(Announcement(k, tcp_port=1234))
    assert txt == {"v": "1", "key": k.text, "tcp": "1234"}
    assert decode_txt(as_zeroconf(txt)) == Announcement(k, tcp_port=1234)


def test_unknown_txt_properties_and_valueless_ones_are_ignored() -> None:
    k = key()
    props: dict[bytes, bytes | None] = {**as_zeroconf(encode_txt(Announcement(k, tcp_port=1))),
                                        b"future": b"thing", b"flag": None}
    assert decode_txt(props) == Announcement(k, tcp_port=1)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": "2"}, "version"),
        ({"v": None}, "version"),
        ({"key": "not-a-key"}, "bad key"),
        ({"key": None}, "bad key"),
        ({"tcp": "0"}, "tcp port"),
        ({"tcp": "65536"}, "tcp port"),
        ({"tcp": "-1"}, "tcp port"),
        ({"ws": "http"}, "ws port"),
        ({"path": "pnic"}, "path"),
        ({"tag": "zz"}, "hex"),
        ({"tag": "abcd"}, "length"),
    ],
)
def test_malformed_txt_is_a_decode_error(change: dict[str, str | None], reason: str) -> None:
    txt: dict[str, str | None] = {"v": "1", "key": key().text, "tcp": "9651"}
    txt.update(change)
    props = {k: v for k, v in txt.items() if v is not None}
    with pytest.raises(DecodeError, match=reason):
        decode_txt(props)


def test_non_utf8_txt_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="UTF-8"):
        decode_txt({b"v": b"\xff"})


def test_announcement_for_takes_the_first_port_of_each_carrier() -> None:
    k = key()
    listening = [PeerUri.parse("ws://10.0.0.1:9700/x"), PeerUri.parse("tcp://10.0.0.1:9651"),
                 PeerUri.parse("tcp://10.0.1.1:9999")]
    ann = announcement_for(k, listening, "pw")
    assert (ann.tcp_port, ann.ws_port, ann.ws_path) == (9651, 9700, "/x")
    assert ann.tag_valid("pw")
    assert announcement_for(k, listening).tag is None


def test_the_uri_to_dial_is_pinned_and_prefers_tcp() -> None:
    k = key()
    both = Announcement(k, tcp_port=9651, ws_port=9652, ws_path="/p")
    assert both.uri("10.0.0.2") == PeerUri("tcp", "10.0.0.2", 9651, "", k)
    assert str(both.uri("10.0.0.2")) == f"tcp://10.0.0.2:9651?key={k.text}"
    ws_only = Announcement(k, ws_port=9652, ws_path="/p")
    assert str(ws_only.uri("fd00::2")) == f"ws://[fd00::2]:9652/p?key={k.text}"
    assert Announcement(k).uri("10.0.0.2") is None


# --- policy -----------------------------------------------------------------------------


def test_link_decision() -> None:
    me, them, stranger = key(), key(), key()
    plain = Announcement(them, tcp_port=1)
    tagged = Announcement(them, tcp_port=1, tag=group_tag("blue", them))
    wrong = Announcement(them, tcp_port=1, tag=group_tag("red", them))
    stolen = Announcement(them, tcp_port=1, tag=group_tag("blue", stranger))

    def decide(a: Announcement, *, allow: frozenset[PublicKey] | None = None,
               password: str | None = None) -> str | None:
        return link_decision(a, own_key=me, allow=allow, password=password)

    assert decide(plain) is None
    assert decide(tagged) is None  # a tag is fine when we have no password
    assert "own" in (decide(Announcement(me, tcp_port=1)) or "")
    assert "allow" in (decide(plain, allow=frozenset({stranger})) or "")
    assert decide(plain, allow=frozenset({them})) is None
    assert decide(tagged, password="blue") is None
    assert "no group tag" in (decide(plain, password="blue") or "")
    assert "does not match" in (decide(wrong, password="blue") or "")
    assert "does not match" in (decide(stolen, password="blue") or "")  # tag of another key
    assert "port" in (decide(Announcement(them)) or "")


def test_only_concrete_lan_addresses_are_announced() -> None:
    uris = [PeerUri.parse(u) for u in (
        "tcp://0.0.0.0:1", "tcp://[::]:1", "tcp://127.0.0.1:1", "tcp://[::1]:1",
        "tcp://[fe80::1]:1", "tcp://localhost:1", "tcp://10.231.250.1:1",
        "ws://10.231.250.1:2/pnic", "tcp://[fd00::5]:1", "memory://x",
    )]
    assert announce_addresses(uris) == ["10.231.250.1", "fd00::5"]


def test_pick_address_prefers_ipv4_and_skips_unusable_ones() -> None:
    assert pick_address(["fd00::2", "127.0.0.1", "10.0.0.2"]) == "10.0.0.2"
    assert pick_address(["fe80::1", "fd00::2"]) == "fd00::2"
    assert pick_address(["127.0.0.1", "0.0.0.0"]) is None
    assert pick_address([]) is None


# --- settings ---------------------------------------------------------------------------


def test_mdns_is_off_by_default_and_set_by_toml_or_flags(tmp_path: Path) -> None:
    assert build_config(parse_args([])).mdns is False
    toml = tmp_path / "pnicd.toml"
    toml.write_text('mdns = true\nmdns_password = "blue"\n', "utf-8")
    from_file = load_config(toml, {})
    assert (from_file.mdns, from_file.mdns_password) == (True, "blue")
    flags = build_config(parse_args(["--config", str(toml), "--mdns-password", "red"]))
    assert (flags.mdns, flags.mdns_password) == (True, "red")
    only_flag = build_config(parse_args(["--mdns"]))
    assert (only_flag.mdns, only_flag.mdns_password) == (True, None)


def test_a_non_boolean_mdns_setting_is_refused(tmp_path: Path) -> None:
    from twinmesh.errors import ConfigError

    toml = tmp_path / "pnicd.toml"
    toml.write_text('mdns = "yes"\n', "utf-8")
    with pytest.raises(ConfigError, match="mdns must be true or false"):
        load_config(toml, {})


@pytest.mark.process
async def test_pnicd_refuses_mdns_with_only_loopback_listeners(tmp_path: Path) -> None:
    # Nothing is sent: discovery refuses before zeroconf opens a socket.
    with trio.fail_after(30):
        done = await run_pnicd_to_exit(tmp_path / "nic", "--listen", "tcp://127.0.0.1:0",
                                       "--mdns")
    assert done.returncode == 2
    assert done.stderr_lines[-1].startswith("pnicd: mdns: no listen URI"), done.stderr


# --- the shell's decisions, with a stand-in NIC and zeroconf ------------------------------


class FakeInfo:
    def __init__(self, announcement: Announcement, addresses: list[str]) -> None:
        self.properties = as_zeroconf(encode_txt(announcement))
        self._addresses = addresses

    def parsed_addresses(self) -> list[str]:
        return self._addresses


class FakeZeroconf:
    """Answers `get_service_info` from a table, as the sync Zeroconf would."""

    def __init__(self) -> None:
        self.services: dict[str, FakeInfo] = {}

    def get_service_info(self, type_: str, name: str, timeout: int) -> FakeInfo | None:
        return self.services.get(name)


class FakeDialer:
    def __init__(self, uri: PeerUri) -> None:
        self.uri = uri
        self.learned_key: PublicKey | None = None


class FakeNic:
    """The part of `Nic` discovery uses: key, config.allow, listening, links, dialers."""

    def __init__(self, allow: frozenset[PublicKey] | None = None) -> None:
        self.key = key()
        self.config = type("Config", (), {"allow": allow})()
        self.listening = [PeerUri.parse("tcp://10.231.250.1:9651")]
        self.by_peer: dict[PublicKey, object] = {}
        self.dialers: dict[str, FakeDialer] = {}
        self.removed: list[str] = []

    def add_peer(self, uri: PeerUri) -> bool:
        name = str(uri.without_key())
        if name in self.dialers:
            return False
        self.dialers[name] = FakeDialer(uri)
        return True

    def remove_peer(self, text: str) -> int:
        self.removed.append(text)
        return 1 if self.dialers.pop(text, None) is not None else 0


def discovery_with(nic: FakeNic, password: str | None = None) -> MdnsDiscovery:
    return MdnsDiscovery(nic, password)


async def test_discovery_links_once_to_an_announced_nic_pinned_to_its_key() -> None:
    nic, zc = FakeNic(), FakeZeroconf()
    them = key()
    zc.services["pnic-them"] = FakeInfo(Announcement(them, tcp_port=9651),
                                        ["fd00::2", "10.231.250.2"])
    discovery = discovery_with(nic)
    await discovery._on_event(zc, "added", "pnic-them")
    await discovery._on_event(zc, "updated", "pnic-them")
    assert [str(d.uri) for d in nic.dialers.values()] == [
        f"tcp://10.231.250.2:9651?key={them.text}"
    ]
    assert discovery.ignored == {"pnic-them": "already a peer"}


async def test_discovery_never_dials_itself_or_an_already_linked_key() -> None:
    nic, zc = FakeNic(), FakeZeroconf()
    linked = key()
    nic.by_peer[linked] = object()
    zc.services["me-replayed"] = FakeInfo(Announcement(nic.key, tcp_port=9651), ["10.0.0.9"])
    zc.services["my-address"] = FakeInfo(Announcement(key(), tcp_port=9651), ["10.231.250.1"])
    zc.services["linked"] = FakeInfo(Announcement(linked, tcp_port=9651), ["10.231.250.3"])
    discovery = discovery_with(nic)
    for name in zc.services:
        await discovery._on_event(zc, "added", name)
    assert nic.dialers == {}
    assert discovery.ignored == {
        "me-replayed": "our own announcement",
        "my-address": "an address of this NIC",
        "linked": "already linked",
    }


async def test_discovery_respects_the_allow_list_and_the_group_password() -> None:
    allowed, other = key(), key()
    nic, zc = FakeNic(allow=frozenset({allowed})), FakeZeroconf()
    zc.services["allowed-tagged"] = FakeInfo(
        Announcement(allowed, tcp_port=1, tag=group_tag("blue", allowed)), ["10.0.0.2"])
    zc.services["other-tagged"] = FakeInfo(
        Announcement(other, tcp_port=1, tag=group_tag("blue", other)), ["10.0.0.3"])
    discovery = discovery_with(nic, password="blue")
    for name in zc.services:
        await discovery._on_event(zc, "added", name)
    assert [d.uri.key for d in nic.dialers.values()] == [allowed]
    assert discovery.ignored == {"other-tagged": "key not in the allow-list"}

    nic2 = FakeNic()
    zc.services["allowed-tagged"] = FakeInfo(
        Announcement(allowed, tcp_port=1, tag=group_tag("red", allowed)), ["10.0.0.2"])
    discovery2 = discovery_with(nic2, password="blue")
    await discovery2._on_event(zc, "added", "allowed-tagged")
    assert nic2.dialers == {}
    assert "does not match" in discovery2.ignored["allowed-tagged"]


async def test_a_withdrawn_announcement_drops_our_dialer_unless_the_link_is_up() -> None:
    nic, zc = FakeNic(), FakeZeroconf()
    a, b = key(), key()
    zc.services["a"] = FakeInfo(Announcement(a, tcp_port=1), ["10.0.0.2"])
    zc.services["b"] = FakeInfo(Announcement(b, tcp_port=1), ["10.0.0.3"])
    discovery = discovery_with(nic)
    for name in ("a", "b"):
        await discovery._on_event(zc, "added", name)
    nic.by_peer[b] = object()  # b's link is up
    for name in ("a", "b"):
        await discovery._on_event(zc, "removed", name)
    assert nic.removed == ["tcp://10.0.0.2:1"]
    assert [d.uri.key for d in nic.dialers.values()] == [b]


async def test_a_malformed_or_unresolvable_announcement_is_skipped() -> None:
    nic, zc = FakeNic(), FakeZeroconf()
    bad = FakeInfo(Announcement(key(), tcp_port=1), ["10.0.0.2"])
    bad.properties[b"v"] = b"9"
    zc.services["bad"] = bad
    discovery = discovery_with(nic)
    await discovery._on_event(zc, "added", "bad")
    await discovery._on_event(zc, "added", "gone")
    assert nic.dialers == {}
    assert "malformed" in discovery.ignored["bad"]
    assert "gone" not in discovery.ignored
