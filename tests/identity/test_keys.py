"""Identities and their printable form (twinmesh.identity.keys)."""

from __future__ import annotations

import base64

import nacl.bindings
import pytest

from twinmesh.identity.keys import KEY_SIZE, SIGNATURE_SIZE, TEXT_SIZE, Identity, PublicKey

B32_ALPHABET = set("abcdefghijklmnopqrstuvwxyz234567")


def fixed_identity(n: int) -> Identity:
    return Identity(bytes([n]) * KEY_SIZE)


# ----------------------------------------------------------------- printable form


def test_text_is_52_lowercase_base32_chars_without_padding() -> None:
    for _ in range(20):
        key = Identity.generate().public
        assert len(key.text) == TEXT_SIZE == 52
        assert set(key.text) <= B32_ALPHABET
        assert "=" not in key.text
        assert str(key) == key.text
        assert key.short == key.text[:12]


def test_text_is_rfc4648_base32_of_the_raw_key() -> None:
    key = fixed_identity(7).public
    expected = base64.b32encode(key.raw).decode("ascii").rstrip("=").lower()
    assert key.text == expected


def test_text_round_trip() -> None:
    for _ in range(20):
        key = Identity.generate().public
        parsed = PublicKey.from_text(key.text)
        assert parsed == key
        assert parsed.raw == key.raw
        assert parsed.text == key.text


def test_from_text_forgives_case_and_surrounding_whitespace() -> None:
    key = fixed_identity(3).public
    assert PublicKey.from_text(f"  {key.text.upper()}\n") == key


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a" * 51,
        "a" * 53,
        "a" * 56,  # the padded length
        "1" * 52,  # 0, 1, 8 and 9 are not in the base32 alphabet
        "a" * 48 + "====",
        "a" * 51 + "!",
    ],
)
def test_from_text_refuses_what_is_not_a_key(text: str) -> None:
    with pytest.raises(ValueError, match=r"key"):
        PublicKey.from_text(text)


def test_from_text_refuses_non_ascii() -> None:
    with pytest.raises(ValueError):
        PublicKey.from_text("é" * 52)


def test_from_text_refuses_non_canonical_spelling() -> None:
    # 52 base32 characters carry 260 bits; the last 4 must be zero. Without that check
    # sixteen different strings would name the same address.
    for n in range(8):
        key = fixed_identity(n).public
        refused = 0
        for last in sorted(B32_ALPHABET - {key.text[-1]}):
            try:
                other = PublicKey.from_text(key.text[:-1] + last)
            except ValueError:
                refused += 1
            else:
                # The last character's top bit is still key material: another key.
                assert other != key
                assert other.text == key.text[:-1] + last
        assert refused == 30


def test_public_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        PublicKey(b"\x01" * 31)
    with pytest.raises(ValueError, match="32 bytes"):
        Identity(b"\x01" * 33)


# ------------------------------------------------------------- signatures


def test_sign_and_verify() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"hello")
    assert len(signature) == SIGNATURE_SIZE
    assert identity.public.verify(signature, b"hello")
    # Verifying twice reuses the cached verify key and still answers right.
    assert identity.public.verify(signature, b"hello")


def test_verify_is_false_for_another_message_or_a_damaged_signature() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"hello")
    assert not identity.public.verify(signature, b"hellp")
    damaged = bytes([signature[0] ^ 1]) + signature[1:]
    assert not identity.public.verify(damaged, b"hello")
    assert not identity.public.verify(signature[:-1], b"hello")
    assert not identity.public.verify(b"", b"hello")


def test_verify_with_the_wrong_key_is_false() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    assert not bob.public.verify(alice.sign(b"hello"), b"hello")


def test_verify_with_a_key_that_is_not_a_curve_point_is_false() -> None:
    # Any 32 bytes make a PublicKey; verify must answer False, not raise.
    for raw in (bytes(32), b"\xff" * 32, bytes(range(32))):
        assert not PublicKey(raw).verify(b"\x00" * SIGNATURE_SIZE, b"hello")


def test_identity_from_seed_is_deterministic() -> None:
    a, b = fixed_identity(5), fixed_identity(5)
    assert a.public == b.public
    assert a.seed == bytes([5]) * KEY_SIZE
    assert a.sign(b"m") == b.sign(b"m")  # ed25519 signatures are deterministic
    assert repr(a) == f"Identity({a.public.text})"
    assert a.seed.hex() not in repr(a)


# ---------------------------------------------------------- key agreement


def test_x25519_derivation_agrees_on_both_sides() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    secret_a = nacl.bindings.crypto_scalarmult(alice.x25519_private(), bob.public.to_x25519())
    secret_b = nacl.bindings.crypto_scalarmult(bob.x25519_private(), alice.public.to_x25519())
    assert secret_a == secret_b
    assert secret_a != bytes(32)


def test_x25519_public_matches_the_private() -> None:
    identity = Identity.generate()
    assert nacl.bindings.crypto_scalarmult_base(identity.x25519_private()) == (
        identity.public.to_x25519()
    )


def test_x25519_secret_differs_for_a_third_party() -> None:
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    ab = nacl.bindings.crypto_scalarmult(alice.x25519_private(), bob.public.to_x25519())
    cb = nacl.bindings.crypto_scalarmult(carol.x25519_private(), bob.public.to_x25519())
    assert ab != cb


# --------------------------------------------------------- equality and hash


def test_equality_and_hash_are_by_bytes() -> None:
    a1 = fixed_identity(1).public
    a2 = PublicKey(bytes(a1.raw))
    b = fixed_identity(2).public
    assert a1 == a2
    assert a1 is not a2
    assert hash(a1) == hash(a2)
    assert a1 != b
    assert {a1, a2, b} == {a1, b}
    assert len({a1, a2, b}) == 2
    assert a1 != a1.raw  # never equal to its bytes or its text
    assert a1 != a1.text
    assert {a1: "x"}[a2] == "x"


def test_ordering_is_by_bytes() -> None:
    keys = [Identity.generate().public for _ in range(10)]
    assert [k.raw for k in sorted(keys)] == sorted(k.raw for k in keys)


def test_repr_shows_the_text() -> None:
    key = fixed_identity(4).public
    assert repr(key) == f"PublicKey({key.text})"
