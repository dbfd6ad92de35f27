"""Fuzz the DHT core: whatever a NIC sends, it never raises and never keeps a lie.

The promise checked here:

- `receive` and `handle_timer` never raise;
- outputs are only `SendDht` (bytes that decode as a `DhtMessage`), `LookupDone` and
  `Violation`;
- every record the core holds or returns verifies under its twin's key (a mutated
  record never gets in), and a lookup's record is for the twin it looked up.

Inputs are random bytes and mutations (bit flips, truncation, duplication, splicing)
of real messages: requests, and answers carrying the request id of a query the
target really has in flight (so mutated answers reach the lookup code).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinmesh.identity.keys import KEY_SIZE, Identity
from twinmesh.proto.attach import Location
from twinmesh.proto.dht import Dht, DhtConfig, LookupDone, SendDht, Violation
from twinmesh.wire import schemas

WALL = 1_800_000_000.0
ME = Identity(b"\x01" * KEY_SIZE).public
PEER = Identity(b"\x02" * KEY_SIZE).public
TWIN = Identity(b"\x03" * KEY_SIZE)
CONTACTS = [Identity(bytes([i]) * KEY_SIZE).public for i in range(4, 12)]
RECORD = Location.sign(TWIN, PEER, 5, WALL + 3600)
CONFIG = DhtConfig(k=4, alpha=2)


def fresh() -> tuple[Dht, int]:
    """A core that knows PEER and has a find for TWIN in flight to it; and that
    query's request id."""
    core = Dht(ME, now=0.0, config=CONFIG, wall_offset=WALL)
    core.add_contact(PEER, 0.0)
    core.handle_timer(5.0)  # let the bootstrap lookup time out
    _, outputs = core.find(TWIN.public, 10.0)
    (query,) = [o for o in outputs if isinstance(o, SendDht)]
    with schemas.dht.DhtMessage.from_bytes(query.data) as reader:
        return core, int(reader.requestId)


def real_messages(request_id: int) -> list[bytes]:
    out = []
    for which in ("findNode", "findValue", "store", "nodes", "value", "stored"):
        message = schemas.dht.DhtMessage.new_message()
        message.requestId = request_id
        if which in ("findNode", "findValue"):
            setattr(message, which, TWIN.public.raw)
        elif which == "store":
            RECORD.fill(message.init("store"))
        elif which == "nodes":
            keys = message.init("nodes", len(CONTACTS))
            for i, key in enumerate(CONTACTS):
                keys[i] = key.raw
        elif which == "value":
            value = message.init("value")
            RECORD.fill(value.init("location"))
            keys = value.init("contacts", 2)
            keys[0], keys[1] = CONTACTS[0].raw, CONTACTS[1].raw
        else:
            stored = message.init("stored")
            stored.accepted = False
            stored.reason = "older"
        out.append(bytes(message.to_bytes()))
    return out


@st.composite
def mutated(draw: st.DrawFn, real: bytes) -> bytes:
    data = bytearray(real)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            data = bytearray(draw(st.binary(min_size=1, max_size=16)))
            continue
        op = draw(st.sampled_from(["flip", "truncate", "duplicate", "splice", "zero"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "zero":
            j = draw(st.integers(i, min(len(data), i + 8)))
            data[i:j] = bytes(j - i)
        elif op == "truncate":
            del data[i:]
        elif op == "duplicate":
            j = draw(st.integers(i, len(data)))
            data[j:j] = data[i:j] or data[i : i + 1]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


@st.composite
def inputs(draw: st.DrawFn, request_id: int) -> list[bytes]:
    reals = real_messages(request_id)
    one = st.one_of(
        st.binary(max_size=300),
        st.sampled_from(reals).flatmap(mutated),
        st.sampled_from(reals),
    )
    return draw(st.lists(one, min_size=1, max_size=6))


def check(core: Dht, outputs: list[object]) -> None:
    for output in outputs:
        assert isinstance(output, SendDht | LookupDone | Violation)
        if isinstance(output, SendDht):
            schemas.decode(schemas.dht.DhtMessage, output.data, lambda r: r.which())
        if isinstance(output, LookupDone) and output.location is not None:
            assert output.location.twin == TWIN.public
            assert output.location.verify()
    for table in (core.records, core.own):
        for twin, location in table.items():
            assert location.twin == twin and location.verify()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_input_is_handled_without_raising_or_keeping_a_bad_record(
    data: st.DataObject,
) -> None:
    core, request_id = fresh()
    sources = st.sampled_from([PEER, CONTACTS[0]])
    for message in data.draw(inputs(request_id)):
        check(core, core.receive(data.draw(sources), message, 11.0))
    check(core, core.handle_timer(30.0))
    assert core.cached(TWIN.public, 30.0) in (None, RECORD)
