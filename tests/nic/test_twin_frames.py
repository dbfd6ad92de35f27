"""The NIC's twin frames without pycapnp (twinmesh.nic.twin_frames): a twin's
submissions read as pycapnp reads them (or are left to it), and results and status
updates written so that pycapnp and the twin's own reader read what was meant."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinmesh.bus import local_frames
from twinmesh.errors import DecodeError
from twinmesh.nic.twin_frames import read_submits, results_parts, updates_parts
from twinmesh.nic.twins import _read_request
from twinmesh.wire import schemas

LocalMessage = schemas.local.LocalMessage

submits = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=300),
                             st.booleans(), st.booleans(), st.integers(0, 2**32 - 1)),
                   min_size=1, max_size=8)
texts = st.text(alphabet=st.characters(blacklist_characters="\0",
                                       blacklist_categories=("Cs",)), max_size=40)


def with_pycapnp(body: bytes) -> tuple[int, str, Any] | None:
    try:
        return schemas.decode(LocalMessage, body, _read_request)
    except DecodeError:
        return None


@given(items=submits)
def test_a_twins_submits_read_as_pycapnp_reads_them(items: list[Any]) -> None:
    body = local_frames.submits(items)
    assert read_submits(body) == (0, items)
    assert with_pycapnp(body) == (0, "submits", items)


def test_a_single_submit_reads_with_the_frames_request_id() -> None:
    message = LocalMessage.new_message(num_first_segment_words=64)
    message.requestId = 7
    submit = message.init("submit")
    submit.envelope = b"sealed"
    submit.reliable = True
    submit.payloadSize = 100
    assert read_submits(message.to_bytes()) == (7, [(7, b"sealed", True, False, 100)])


def test_frames_of_other_members_or_several_segments_go_to_pycapnp() -> None:
    status = LocalMessage.new_message()
    status.requestId = 3
    status.init("status").messageId = bytes(16)
    assert read_submits(status.to_bytes()) is None
    big = LocalMessage.new_message()  # a small first segment: several of them
    listed = big.init("submits", 3)
    for item in listed:
        item.envelope = bytes(3000)
    assert read_submits(big.to_bytes()) is None
    assert read_submits(b"short") is None


@pytest.mark.parametrize("seed", range(30))
def test_damaged_submits_read_as_pycapnp_reads_them_or_go_to_it(seed: int) -> None:
    rng = random.Random(seed)
    items = [(n, rng.randbytes(rng.randrange(60)), True, n % 2 == 1, n)
             for n in range(rng.randrange(1, 5))]
    body = bytearray(local_frames.submits(items))
    for _ in range(rng.randrange(1, 4)):
        body[rng.randrange(len(body))] = rng.randrange(256)
    ours = read_submits(bytes(body))
    if ours is not None:
        request_id, read = ours
        assert with_pycapnp(bytes(body)) == (request_id, "submits", read)


def read_back(parts: tuple[list[bytes], int]) -> Any:
    """What pycapnp reads from a written frame: (member, items)."""
    body = b"".join(parts[0])
    assert len(body) == parts[1]

    def read(reader: Any) -> Any:
        which = str(reader.which())
        if which in ("result", "results"):
            listed = [reader.result] if which == "result" else reader.results
            return which, [(int(r.requestId), bool(r.ok), str(r.code), str(r.message),
                            str(r.status)) for r in listed]
        listed = [reader.statusUpdate] if which == "statusUpdate" else reader.statusUpdates
        return which, [(bytes(u.messageId), str(u.status), str(u.code)) for u in listed]

    return schemas.decode(LocalMessage, body, read), local_frames.read(body)


@given(run=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.booleans(), texts, texts,
                              texts), min_size=1, max_size=6))
def test_results_read_back_as_written(run: list[Any]) -> None:
    (which, read), twins_read = read_back(results_parts(run))
    assert read == run
    if len(run) == 1:
        assert which == "result" and twins_read == ("result", (run[0][0], run[0][1:]))
    else:
        assert which == "results"
        assert twins_read == ("results", [(r[0], r[1:]) for r in run])


@given(run=st.lists(st.tuples(st.binary(max_size=20), texts, texts), min_size=1,
                    max_size=6))
def test_status_updates_read_back_as_written(run: list[Any]) -> None:
    (which, read), twins_read = read_back(updates_parts(run))
    assert read == run
    member = "statusUpdate" if len(run) == 1 else "statusUpdates"
    assert which == member
    assert twins_read == (member, run[0] if len(run) == 1 else run)


def test_a_single_result_carries_its_request_id_in_the_frame_too() -> None:
    body = b"".join(results_parts([(42, True, "", "", "sent")])[0])
    assert schemas.decode(LocalMessage, body, lambda r: int(r.requestId)) == 42
