import pytest

from twinmesh.carriers.uri import DEFAULT_WS_PATH, PeerUri
from twinmesh.errors import ConfigError
from twinmesh.identity.keys import Identity

KEY = Identity(bytes(range(32))).public


@pytest.mark.parametrize(
    "text",
    [
        "tcp://127.0.0.1:9651",
        "tcp://[::1]:9651",
        "tcp://example.org:0",
        "ws://127.0.0.1:9652/pnic",
        "ws://[::1]:9652/custom/path",
        "memory://nic1",
        f"tcp://127.0.0.1:9651?key={KEY.text}",
        f"ws://[::1]:9652/pnic?key={KEY.text}",
        f"memory://nic1?key={KEY.text}",
    ],
)
def test_print_then_parse_round_trips(text: str) -> None:
    uri = PeerUri.parse(text)
    assert str(uri) == text
    assert PeerUri.parse(str(uri)) == uri


def test_fields() -> None:
    uri = PeerUri.parse(f"ws://[::1]:9652/x?key={KEY.text}")
    assert (uri.scheme, uri.host, uri.port, uri.path, uri.key) == ("ws", "::1", 9652, "/x", KEY)


def test_key_pins_and_can_be_dropped() -> None:
    uri = PeerUri.parse(f"tcp://127.0.0.1:9651?key={KEY.text}")
    assert uri.key == KEY
    assert uri.without_key() == PeerUri("tcp", "127.0.0.1", 9651)
    assert str(uri.without_key()) == "tcp://127.0.0.1:9651"


def test_ws_path_defaults_to_pnic() -> None:
    assert PeerUri.parse("ws://127.0.0.1:9652").path == DEFAULT_WS_PATH == "/pnic"
    assert str(PeerUri.parse("ws://127.0.0.1:9652")) == "ws://127.0.0.1:9652/pnic"


def test_tcp_has_no_path_and_tolerates_a_slash() -> None:
    assert PeerUri.parse("tcp://127.0.0.1:9651/") == PeerUri("tcp", "127.0.0.1", 9651)


def test_scheme_and_host_are_case_insensitive() -> None:
    assert PeerUri.parse(" TCP://LocalHost:1 ") == PeerUri("tcp", "localhost", 1)


def test_with_port_keeps_the_rest() -> None:
    uri = PeerUri.parse(f"ws://127.0.0.1:0/pnic?key={KEY.text}")
    assert uri.with_port(4242) == PeerUri("ws", "127.0.0.1", 4242, "/pnic", KEY)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("udp://127.0.0.1:1", "unknown scheme"),
        ("127.0.0.1:9651", "unknown scheme"),
        ("tcp://127.0.0.1", "needs a host and a port"),
        ("tcp://:9651", "needs a host and a port"),
        ("tcp://127.0.0.1:99999", "out of range"),
        ("tcp://127.0.0.1:port", "port"),
        ("tcp://127.0.0.1:1/pnic", "no path"),
        ("tcp://127.0.0.1:1?color=red", "unknown URI parameter"),
        ("tcp://127.0.0.1:1?key=tooshort", "bad key"),
        ("memory://", "needs a name"),
    ],
)
def test_bad_uris_give_one_line_config_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        PeerUri.parse(text)
    message = str(info.value)
    assert reason in message
    assert repr(text.strip()) in message
    assert "\n" not in message
