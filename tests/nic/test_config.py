from pathlib import Path

import pytest

from twinmesh.carriers.uri import PeerUri
from twinmesh.errors import ConfigError
from twinmesh.identity.keys import Identity
from twinmesh.nic.config import load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pnicd.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None, {})
    assert config.listen == () and config.peers == () and config.allow is None
    assert config.health is None
    assert config.admin_socket.name == "admin.sock"


def test_file_settings_are_read(tmp_path: Path) -> None:
    key = Identity.generate().public
    path = write(tmp_path, f"""
state_dir = "{tmp_path / 'state'}"
listen = ["tcp://127.0.0.1:9651", "ws://127.0.0.1:9652/pnic"]
peers = ["tcp://127.0.0.1:9661?key={key.text}"]
allow = ["{key.text}"]
health = "127.0.0.1:9650"
log_format = "json"
[link]
keepalive_interval = 0.25
dead_after = 1.0
[reconnect]
initial = 0.1
max = 5.0
""")
    config = load_config(path, {})
    assert config.state_dir == tmp_path / "state"
    assert [str(u) for u in config.listen] == ["tcp://127.0.0.1:9651", "ws://127.0.0.1:9652/pnic"]
    assert config.peers == (PeerUri("tcp", "127.0.0.1", 9661, key=key),)
    assert config.allow == frozenset({key})
    assert config.health == ("127.0.0.1", 9650)
    assert config.log_format == "json"
    assert config.link.keepalive_interval == 0.25 and config.link.dead_after == 1.0
    assert config.reconnect.initial == 0.1 and config.reconnect.max == 5.0


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = ["tcp://127.0.0.1:1"]\nlog_format = "json"\n')
    config = load_config(path, {"listen": ["tcp://127.0.0.1:2"], "log_format": None})
    assert [u.port for u in config.listen] == [2]
    assert config.log_format == "json"  # a flag that was not given changes nothing


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("listen = [", "invalid TOML"),
        ("colour = 'blue'", "unknown setting(s): colour"),
        ("listen = ['udp://127.0.0.1:1']", "unknown scheme"),
        ("allow = ['nope']", "allow"),
        ("health = 'localhost'", "HOST:PORT"),
        ("[link]\nkeepalive_interval = 2.0\ndead_after = 1.0", "dead_after"),
        ("[link]\nspeed = 1", "unknown setting(s): speed"),
        ("max_links = 0", "max_links"),
        ("log_format = 'xml'", "log_format"),
    ],
)
def test_bad_settings_give_one_line_naming_the_file(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert str(path) in message and fragment in message
    assert "\n" not in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml", {})
