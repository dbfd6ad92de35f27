import os

import pytest

from twinmesh.identity.keys import Identity
from twinmesh.proto.attach import Location, sign_attach, verify_attach

NIC = Identity.generate().public
TWIN = Identity.generate()


def test_the_twin_that_holds_the_key_attaches() -> None:
    nonce = os.urandom(32)
    assert verify_attach(NIC, nonce, TWIN.public.raw, sign_attach(TWIN, NIC, nonce)) == TWIN.public


@pytest.mark.parametrize("what", ["other nonce", "other nic", "other twin", "garbage"])
def test_a_proof_for_anything_else_is_refused(what: str) -> None:
    nonce = os.urandom(32)
    signature = sign_attach(TWIN, NIC, nonce)
    nic, twin_raw = NIC, TWIN.public.raw
    if what == "other nonce":
        nonce = os.urandom(32)
    elif what == "other nic":
        nic = Identity.generate().public  # a challenge relayed from another NIC
    elif what == "other twin":
        twin_raw = Identity.generate().public.raw  # claiming someone else's key
    else:
        signature = os.urandom(64)
    with pytest.raises(ValueError, match="does not verify"):
        verify_attach(nic, nonce, twin_raw, signature)


def test_malformed_inputs_are_value_errors() -> None:
    with pytest.raises(ValueError, match="nonce"):
        verify_attach(NIC, b"short", TWIN.public.raw, b"x" * 64)
    with pytest.raises(ValueError, match="malformed"):
        verify_attach(NIC, os.urandom(32), b"short", b"x" * 64)


def test_location_records_verify_and_order_by_seqno() -> None:
    older = Location.sign(TWIN, NIC, seqno=1, expires=1000.0)
    newer = Location.sign(TWIN, Identity.generate().public, seqno=2, expires=2000.0)
    assert older.verify() and newer.verify()
    assert newer.newer_than(older) and not older.newer_than(newer) and older.newer_than(None)
    forged = Location(TWIN.public, NIC, 3, 5000.0, older.signature)  # seqno bumped
    assert not forged.verify()
    moved = Location(TWIN.public, Identity.generate().public, 1, 1000.0, older.signature)
    assert not moved.verify()
