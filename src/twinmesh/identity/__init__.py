"""Identities: an address *is* an ed25519 public key."""

from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.identity.keystore import load_or_create_identity

__all__ = ["Identity", "PublicKey", "load_or_create_identity"]
