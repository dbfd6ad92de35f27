"""Peer and listen URIs: `tcp://127.0.0.1:9651`, `ws://127.0.0.1:9652/pnic?key=...`."""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass, replace

from twinmesh.errors import ConfigError
from twinmesh.identity.keys import PublicKey

SCHEMES = ("tcp", "ws", "memory")
DEFAULT_WS_PATH = "/pnic"


@dataclass(frozen=True)
class PeerUri:
    scheme: str
    host: str
    port: int
    path: str = ""
    key: PublicKey | None = None

    @classmethod
    def parse(cls, text: str) -> PeerUri:
        """Parse a URI; raises ConfigError with a one-line reason."""
        parts = urllib.parse.urlsplit(text.strip())
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ConfigError(
                f"{text!r}: unknown scheme {scheme!r} (use one of {', '.join(SCHEMES)})"
            )
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"key"}
        if unknown:
            raise ConfigError(f"{text!r}: unknown URI parameter(s) {', '.join(sorted(unknown))}")
        key = None
        if "key" in query:
            try:
                key = PublicKey.from_text(query["key"][-1])
            except ValueError as exc:
                raise ConfigError(f"{text!r}: bad key parameter: {exc}") from None
        if scheme == "memory":
            if not parts.netloc:
                raise ConfigError(f"{text!r}: a memory URI needs a name, e.g. memory://nic1")
            return cls(scheme, parts.netloc, 0, "", key)
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ConfigError(f"{text!r}: {exc}") from None
        if not host or port is None:
            raise ConfigError(f"{text!r}: needs a host and a port, e.g. {scheme}://127.0.0.1:9651")
        path = parts.path or (DEFAULT_WS_PATH if scheme == "ws" else "")
        if scheme == "tcp" and path not in ("", "/"):
            raise ConfigError(f"{text!r}: a tcp URI has no path")
        return cls(scheme, host, port, path if scheme == "ws" else "", key)

    def with_port(self, port: int) -> PeerUri:
        return replace(self, port=port)

    def without_key(self) -> PeerUri:
        return replace(self, key=None)

    def __str__(self) -> str:
        if self.scheme == "memory":
            base = f"memory://{self.host}"
        else:
            host = f"[{self.host}]" if _is_ipv6(self.host) else self.host
            base = f"{self.scheme}://{host}:{self.port}{self.path}"
        return f"{base}?key={self.key.text}" if self.key is not None else base


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
