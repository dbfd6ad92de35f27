"""Ed25519 identities and their printable form.

The public key is the address. Its printable form is lowercase RFC 4648 base32
without padding (52 characters), used in CLI output, config files and logs.
"""

from __future__ import annotations

import base64
import binascii
import operator
from typing import TYPE_CHECKING

import nacl.bindings
import nacl.exceptions
import nacl.signing
import nacl.utils

KEY_SIZE = 32
SIGNATURE_SIZE = 64
TEXT_SIZE = 52


class PublicKey:
    """An ed25519 public key: immutable, hashable, comparable by bytes."""

    __slots__ = ("_raw", "_text", "_verify_key")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_SIZE:
            raise ValueError(f"a public key is {KEY_SIZE} bytes, got {len(raw)}")
        self._raw = bytes(raw)
        # Computed on first use: packets build keys on the hot path and rarely print them.
        self._text: str | None = None
        self._verify_key: nacl.signing.VerifyKey | None = None

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        """Parse the printable form; raises ValueError naming what is wrong."""
        cleaned = text.strip().lower()
        if len(cleaned) != TEXT_SIZE:
            raise ValueError(f"a key is {TEXT_SIZE} base32 characters, got {len(cleaned)}")
        try:
            raw = base64.b32decode(cleaned.upper() + "====")
        except binascii.Error as exc:
            raise ValueError(f"not a base32 key: {exc}") from None
        key = cls(raw)
        # 52 characters carry 260 bits: the last 4 must be zero, so that each key has
        # exactly one printable form.
        if key.text != cleaned:
            raise ValueError("not a canonical base32 key (the last character is wrong)")
        return key

    if TYPE_CHECKING:
        @property
        def raw(self) -> bytes: ...
    else:
        # A getter in C: hot tables key by `key.raw` (a bytes hash is cached, a
        # PublicKey's `__hash__` is a Python call), and this must cost less than it.
        raw = property(operator.attrgetter("_raw"), doc="The 32 key bytes.")

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = base64.b32encode(self._raw).decode("ascii").rstrip("=").lower()
        return self._text

    @property
    def short(self) -> str:
        """A prefix that is unique enough for log lines and tables."""
        return self.text[:12]

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when `signature` is this key's signature over `message`."""
        if self._verify_key is None:
            self._verify_key = nacl.signing.VerifyKey(self._raw)
        try:
            self._verify_key.verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
            return False
        return True

    def to_x25519(self) -> bytes:
        """The X25519 public key derived from this ed25519 key (for key agreement)."""
        return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(self._raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other._raw == self._raw

    def __lt__(self, other: PublicKey) -> bool:
        return self._raw < other._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.text})"

    def __str__(self) -> str:
        return self.text


class Identity:
    """A private ed25519 identity. Only the keystore reads or writes it to disk."""

    __slots__ = ("_signing_key", "public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_SIZE:
            raise ValueError(f"a private seed is {KEY_SIZE} bytes, got {len(seed)}")
        self._signing_key = nacl.signing.SigningKey(seed)
        self.public = PublicKey(bytes(self._signing_key.verify_key))

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.utils.random(KEY_SIZE))

    @property
    def seed(self) -> bytes:
        return bytes(self._signing_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached signature of `message`."""
        return self._signing_key.sign(message).signature

    def x25519_private(self) -> bytes:
        """The X25519 private key derived from this identity (for key agreement)."""
        return nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(
            self.seed + self.public.raw
        )

    def __repr__(self) -> str:
        return f"Identity({self.public.text})"
