"""The one exception tree of twinmesh.

::

    TwinmeshError
    ├── ConfigError            a setting, flag or config file is wrong (exit with one line)
    ├── KeyFileError           a key file is missing, corrupt or too open (names the file)
    ├── ProtocolError          a protocol state machine cannot go on
    │   ├── LocalProtocolError   the caller misused the core (a bug on our side)
    │   └── RemoteProtocolError  the peer sent something invalid; close that link, keep running
    │       ├── FrameTooLarge      a length prefix over the cap
    │       ├── DecodeError        bytes that are not the Cap'n Proto message they claim to be
    │       ├── HandshakeRefused   wrong pinned key, not allowed, or the peer refused us
    │       ├── AuthenticationError  a bad signature, a tampered, replayed or reordered frame
    │       └── ExpiredError       an authentic message whose deadline has passed
    ├── LinkClosedError        the link is gone (locally closed or broken by the peer)
    ├── NoRouteError           the overlay has no route to that key
    ├── StorageError           a durable store cannot be opened or written (disk full, corrupt
    │                          file, read-only); the transaction was rolled back, keep running
    ├── AdminError             the admin API answered with an error
    └── ApiError               a twin's API refused a request; `code` says why (api.capnp)

Any other exception escaping a decoder is a bug; the fuzz tests check exactly that promise.
"""

from __future__ import annotations


class TwinmeshError(Exception):
    """Base of every error twinmesh raises on purpose."""


class ConfigError(TwinmeshError):
    """A setting, a command-line flag or a config file is invalid."""


class KeyFileError(TwinmeshError):
    """A key file cannot be used; the message names the file and the reason."""


class ProtocolError(TwinmeshError):
    """A protocol core cannot continue."""


class LocalProtocolError(ProtocolError):
    """The caller used a core wrongly (sent before the handshake, after close...)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid. The link is closed; the daemon keeps running."""


class FrameTooLarge(RemoteProtocolError):
    """A frame's length prefix exceeds the configured cap."""


class DecodeError(RemoteProtocolError):
    """Bytes that do not decode as the message they should be."""


class HandshakeRefused(RemoteProtocolError):
    """The handshake was refused: wrong pinned key, not allowed, or refused by the peer."""


class AuthenticationError(RemoteProtocolError):
    """A signature or AEAD tag failed, or a frame was replayed or reordered."""


class ExpiredError(RemoteProtocolError):
    """An authentic message arrived after its deadline; it must not be delivered."""


class LinkClosedError(TwinmeshError):
    """The link is closed; nothing more can be sent on it."""


class NoRouteError(TwinmeshError):
    """The overlay has no route to the destination key."""


class StorageError(TwinmeshError):
    """A durable store (outbox, inbox) cannot be opened or written; names the file.

    A failed write leaves the database as it was before the call (the transaction is
    rolled back), so the caller can refuse work (`overloaded`) and keep running.
    """


class AdminError(TwinmeshError):
    """The NIC's admin API answered a command with an error."""


class ApiError(TwinmeshError):
    """A request to a twin's API failed; `code` is the machine-readable reason
    (malformed, unknownTwin, offline, expired, noRoute, notContact, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
