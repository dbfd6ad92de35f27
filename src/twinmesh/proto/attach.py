"""Proving a twin key to the local NIC (the attach challenge), and location records.

A twin connecting to its NIC's `twins.sock` gets a fresh 32-byte nonce and answers
with its key and an ed25519 signature over the NIC key, the nonce and its own key.
Only the holder of the twin's private key can answer, so a local process without it
can neither send as that twin nor receive its traffic. Binding the NIC key stops a
malicious NIC from relaying the challenge of another NIC.

A location record says "twin T is reachable at NIC N until time E", signed by T, with
a sequence number so a newer record (the twin moved) replaces an older one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from twinmesh.errors import DecodeError
from twinmesh.identity.keys import KEY_SIZE, SIGNATURE_SIZE, Identity, PublicKey

ATTACH_CONTEXT = b"twinmesh/local/v1/attach"
LOCATION_CONTEXT = b"twinmesh/location/v1"
NONCE_SIZE = 32
_LOCATION_TAIL = struct.Struct(">Qd")


def attach_message(nic: PublicKey, nonce: bytes, twin: PublicKey) -> bytes:
    return ATTACH_CONTEXT + nic.raw + nonce + twin.raw


def sign_attach(twin: Identity, nic: PublicKey, nonce: bytes) -> bytes:
    return twin.sign(attach_message(nic, nonce, twin.public))


def verify_attach(nic: PublicKey, nonce: bytes, twin_raw: bytes, signature: bytes) -> PublicKey:
    """The proven twin key; ValueError with the reason when the proof fails."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError("challenge nonce has the wrong size")
    if len(twin_raw) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise ValueError("attach with a malformed key or signature")
    twin = PublicKey(twin_raw)
    if not twin.verify(signature, attach_message(nic, nonce, twin)):
        raise ValueError(f"attach signature for {twin.short} does not verify")
    return twin


@dataclass(frozen=True)
class Location:
    twin: PublicKey
    nic: PublicKey
    seqno: int
    expires: float
    signature: bytes

    @classmethod
    def sign(cls, twin: Identity, nic: PublicKey, seqno: int, expires: float) -> Location:
        signature = twin.sign(_location_message(twin.public, nic, seqno, expires))
        return cls(twin.public, nic, seqno, expires, signature)

    def verify(self) -> bool:
        return len(self.signature) == SIGNATURE_SIZE and self.twin.verify(
            self.signature, _location_message(self.twin, self.nic, self.seqno, self.expires)
        )

    def newer_than(self, other: Location | None) -> bool:
        return other is None or self.seqno > other.seqno

    def fill(self, builder: Any) -> None:
        """Write this record into a `Route.Location` builder."""
        builder.twin = self.twin.raw
        builder.nic = self.nic.raw
        builder.seqno = self.seqno
        builder.expires = self.expires
        builder.signature = self.signature

    @classmethod
    def read(cls, reader: Any) -> Location:
        """A record from a `Route.Location` reader (not yet verified: call `verify`).
        Raises DecodeError when a key is malformed."""
        if len(reader.twin) != 32 or len(reader.nic) != 32:
            raise DecodeError("location record with malformed keys")
        return cls(PublicKey(bytes(reader.twin)), PublicKey(bytes(reader.nic)),
                   int(reader.seqno), float(reader.expires), bytes(reader.signature))


def _location_message(twin: PublicKey, nic: PublicKey, seqno: int, expires: float) -> bytes:
    return LOCATION_CONTEXT + twin.raw + nic.raw + _LOCATION_TAIL.pack(seqno, expires)
