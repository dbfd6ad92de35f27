"""pnicd settings: defaults, then the TOML file, then command-line flags.

Example `pnicd.toml` (every key optional)::

    listen = ["tcp://127.0.0.1:9651", "ws://127.0.0.1:9652/pnic"]
    peers = ["tcp://127.0.0.1:9661?key=..."]
    allow = []                      # peer keys; empty = any key may link
    health = "127.0.0.1:9650"       # loopback only; "" disables
    log_format = "console"          # or "json"
    log_level = "info"
    max_links = 256
    send_queue = 256                # payloads queued per link before senders wait
    mdns = false                    # LAN discovery: announce, and link to NICs heard
    mdns_password = ""              # link only to announcements tagged with this password

    [link]
    keepalive_interval = 0.4        # seconds
    dead_after = 1.5                # a link silent this long is declared down
    handshake_timeout = 5.0
    max_frame = 1048576

    [reconnect]
    initial = 0.5                   # first retry delay, doubled per failure
    max = 30.0                      # cap
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twinmesh.carriers.uri import PeerUri
from twinmesh.errors import ConfigError
from twinmesh.identity.keys import PublicKey
from twinmesh.proto.link import LinkConfig
from twinmesh.proto.router import RouterConfig

ADMIN_SOCKET = "admin.sock"
KEY_FILE = "nic.key"


def default_state_dir() -> Path:
    """The user's default NIC state directory under XDG_STATE_HOME."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "twinmesh" / "nic"


@dataclass(frozen=True)
class ReconnectConfig:
    initial: float = 0.5
    max: float = 30.0
    jitter: float = 0.25  # +/- this fraction of each delay

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.max:
            raise ConfigError("reconnect: need 0 < initial <= max")
        if not 0 <= self.jitter < 1:
            raise ConfigError("reconnect: jitter must be in [0, 1)")


@dataclass(frozen=True)
class NicConfig:
    state_dir: Path = field(default_factory=default_state_dir)
    listen: tuple[PeerUri, ...] = ()
    peers: tuple[PeerUri, ...] = ()
    allow: frozenset[PublicKey] | None = None
    health: tuple[str, int] | None = None
    log_format: str = "console"
    log_level: str = "info"
    max_links: int = 256
    send_queue: int = 256
    link: LinkConfig = field(default_factory=LinkConfig)
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    mdns: bool = False  # opt-in LAN discovery (twinmesh.discovery.mdns)
    mdns_password: str | None = None  # group password for discovery; None = no group

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / ADMIN_SOCKET


def load_config(path: Path | None, overrides: dict[str, Any]) -> NicConfig:
    """Read `path` (TOML) if given, then apply non-None `overrides` (from flags)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text("utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for key, value in overrides.items():
        if value is not None:
            raw[key] = value
    where = str(path) if path is not None else "settings"
    try:
        return _build(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


_TOP_KEYS = {
    "state_dir", "listen", "peers", "allow", "health", "log_format", "log_level",
    "max_links", "send_queue", "link", "reconnect", "mdns", "mdns_password",
}


def _build(raw: dict[str, Any]) -> NicConfig:
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    config = NicConfig()
    if "state_dir" in raw:
        config = replace(config, state_dir=Path(_str(raw, "state_dir")).expanduser())
    if "listen" in raw:
        config = replace(config, listen=tuple(PeerUri.parse(u) for u in _strs(raw, "listen")))
    if "peers" in raw:
        config = replace(config, peers=tuple(PeerUri.parse(u) for u in _strs(raw, "peers")))
    if raw.get("allow"):
        keys = set()
        for text in _strs(raw, "allow"):
            try:
                keys.add(PublicKey.from_text(text))
            except ValueError as exc:
                raise ConfigError(f"allow: {text!r}: {exc}") from None
        config = replace(config, allow=frozenset(keys))
    if "health" in raw:
        config = replace(config, health=parse_host_port(_str(raw, "health")))
    if "log_format" in raw:
        fmt = _str(raw, "log_format")
        if fmt not in ("console", "json"):
            raise ConfigError(f"log_format must be 'console' or 'json', not {fmt!r}")
        config = replace(config, log_format=fmt)
    if "log_level" in raw:
        config = replace(config, log_level=_str(raw, "log_level"))
    if "max_links" in raw:
        config = replace(config, max_links=_count(raw, "max_links"))
    if "send_queue" in raw:
        config = replace(config, send_queue=_count(raw, "send_queue"))
    if "mdns" in raw:
        if not isinstance(raw["mdns"], bool):
            raise ConfigError("mdns must be true or false")
        config = replace(config, mdns=raw["mdns"])
    if raw.get("mdns_password"):
        config = replace(config, mdns_password=_str(raw, "mdns_password"))
    if "link" in raw:
        config = replace(config, link=LinkConfig(**_table(raw, "link", LinkConfig)))
    if "reconnect" in raw:
        config = replace(
            config, reconnect=ReconnectConfig(**_table(raw, "reconnect", ReconnectConfig))
        )
    return config


def parse_host_port(text: str) -> tuple[str, int] | None:
    """'127.0.0.1:9650' -> ('127.0.0.1', 9650); '' -> None (disabled)."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"health: expected HOST:PORT, got {text!r}")
    return host, int(port)


def _count(raw: dict[str, Any], key: str) -> int:
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100_000:
        raise ConfigError(f"{key} must be an integer between 1 and 100000")
    return value


def _str(raw: dict[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string")
    return value


def _strs(raw: dict[str, Any], key: str) -> list[str]:
    value = raw[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of strings")
    return list(value)


def _table(raw: dict[str, Any], key: str, cls: type) -> dict[str, Any]:
    table = raw[key]
    if not isinstance(table, dict):
        raise ConfigError(f"[{key}] must be a table")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[{key}]: unknown setting(s): {', '.join(sorted(unknown))}")
    for name, value in table.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"[{key}] {name} must be a non-negative number")
    return dict(table)
