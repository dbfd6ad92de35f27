"""The twin API dispatcher: validation against api.capnp, typed errors, real twins."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinmesh.testing.twins import twin_mesh
from twinmesh.twin import api
from twinmesh.wire import schemas


@pytest.mark.parametrize(("raw", "needle"), [
    ("{not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"id": 1, "bogus": null}', "no such member"),
    ('{"id": 1, "send": {"twin": 5}}', "mismatch"),
    ('{"id": 1}', "names one operation"),
    ("x" * (api.MAX_REQUEST + 1), "exceeds"),
])
def test_malformed_requests_say_what_is_wrong(raw, needle):
    with pytest.raises(api.ApiError) as error:
        api.parse_request(raw)
    assert error.value.code == "malformed"
    assert needle in error.value.message
    assert "\n" not in error.value.message


_KEY = "a" * 52
# Requests a driver sends all day: they must take the hand-checked path.
_COMMON = [
    {"id": 1, "send": {"twin": _KEY, "text": "hi"}},
    {"id": 2**32 - 1, "send": {"twin": _KEY, "text": "hé 😀", "ttl": 60, "wait": True}},
    {"id": 0, "send": {"twin": "", "text": "", "ttl": 1e308, "wait": False}},
    {"send": {"text": "h\x00i", "twin": _KEY, "ttl": float("nan")}},
    {"id": 3, "send": {"twin": _KEY, "text": "x", "ttl": 2**53}},
    {"id": 4, "status": None},
    {"identity": None},
    {"id": 5, "contacts": None},
    {"id": 6, "getSettings": None},
    {"id": 7, "subscribe": None},
    {"id": 8, "messageStatus": "00ff"},
    {"id": 9, "find": _KEY},
    {"id": 10, "removeContact": ""},
    {"id": 11, "move": "/tmp/nic"},
]
# Near misses: each must come out exactly as the schema check says (mostly refused).
_EDGES = [
    {"id": True, "send": {"twin": _KEY, "text": "hi"}},
    {"id": 1.0, "send": {"twin": _KEY, "text": "hi"}},
    {"id": -1, "status": None},
    {"id": 2**32, "status": None},
    {"id": None, "status": None},
    {"id": "1", "status": None},
    {"id": 1},
    {},
    {"id": 1, "send": {"twin": _KEY, "text": "h\ud800i"}},
    {"id": 1, "send": {"twin": "\udfff", "text": "hi"}},
    {"id": 1, "send": {"twin": _KEY, "text": "hi", "ttl": True}},
    {"id": 1, "send": {"twin": _KEY, "text": "hi", "ttl": 2**53 + 1}},
    {"id": 1, "send": {"twin": _KEY, "text": "hi", "ttl": 10**30}},
    {"id": 1, "send": {"twin": _KEY, "text": "hi", "ttl": None}},
    {"id": 1, "send": {"twin": _KEY, "text": "hi", "ttl": "5"}},
    {"id": 1, "send": {"twin": _KEY, "text": "hi", "wait": 1}},
    {"id": 1, "send": {"twin": _KEY, "text": "hi", "wait": None}},
    {"id": 1, "send": {"twin": _KEY, "text": None}},
    {"id": 1, "send": {"twin": _KEY, "text": 5}},
    {"id": 1, "send": {"twin": _KEY}},
    {"id": 1, "send": {}},
    {"id": 1, "send": None},
    {"id": 1, "send": [_KEY, "hi"]},
    {"id": 1, "send": {"twin": _KEY, "text": "hi", "bogus": 1}},
    {"id": 1, "send": {"twin": _KEY, "text": "hi"}, "status": None},
    {"id": 1, "send": {"twin": _KEY, "text": "hi"}, "bogus": None},
    {"id": 1, "status": 1},
    {"id": 1, "status": {}},
    {"id": 1, "status": "x"},
    {"id": 1, "messageStatus": None},
    {"id": 1, "messageStatus": 5},
    {"id": 1, "messageStatus": "\ud800"},
    {"id": 1, "ping": {"twin": _KEY}},
    {"id": 1, "bogus": None},
]


def _outcome(parse, obj):
    try:
        return "ok", repr(parse(obj))  # repr: nan equals nan, 5 differs from 5.0
    except api.ApiError as exc:
        return exc.code, exc.message


def _check_same_as_schema(obj):
    fast = api._parse_common(obj)
    if fast is not None:
        assert _outcome(lambda _: fast, obj) == _outcome(api._parse_with_schema, obj)
    assert _outcome(api.parse_request, json.dumps(obj)) == _outcome(api._parse_with_schema,
                                                                   json.loads(json.dumps(obj)))


@pytest.mark.parametrize("obj", _COMMON)
def test_common_requests_skip_the_schema_and_parse_as_it_would(obj):
    assert api._parse_common(obj) is not None
    _check_same_as_schema(obj)


@pytest.mark.parametrize("obj", _EDGES)
def test_near_miss_requests_are_answered_as_the_schema_says(obj):
    _check_same_as_schema(obj)


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                          st.floats(allow_nan=False), st.text(max_size=5),
                          st.sampled_from(["\ud800", _KEY, "é"]))
_send_values = st.dictionaries(st.sampled_from(["twin", "text", "ttl", "wait", "x"]),
                               _json_scalars, max_size=5)


@settings(max_examples=300, deadline=None)
@given(request_id=st.one_of(st.just(None), _json_scalars),
       which=st.sampled_from(["send", "status", "identity", "find", "move", "ping", "x"]),
       value=st.one_of(_json_scalars, _send_values))
def test_any_request_parses_as_the_schema_says(request_id, which, value):
    obj = {which: value} if request_id is None else {"id": request_id, which: value}
    _check_same_as_schema(obj)


async def test_answers_mirror_the_response_struct(tmp_path):
    async with twin_mesh(tmp_path, nics=2) as mesh:
        alice, bob = mesh.twins
        requests = [
            {"id": 1, "identity": None},
            {"id": 2, "status": None},
            {"id": 3, "send": {"twin": bob.key.text, "text": "hi", "wait": True}},
            {"id": 4, "inbox": {"limit": 5}},
            {"id": 5, "ping": {"twin": bob.key.text, "timeout": 5}},
            {"id": 6, "contacts": None},
            {"id": 7, "addContact": {"twin": bob.key.text, "name": "Bob"}},
            {"id": 8, "setSettings": {"contactsOnly": False, "name": "Alice"}},
            {"id": 9, "send": {"twin": "nope", "text": "hi"}},
            {"id": 10, "bogus": 1},
        ]
        for request in requests:
            response = await api.handle(alice, json.dumps(request))
            assert response["id"] == request["id"]
            api.validate(schemas.api.Response, response)  # raises if it does not fit
        sent = await api.handle(alice, json.dumps(requests[2]))
        assert sent["sent"]["status"] == "delivered"
        refused = await api.handle(alice, json.dumps(requests[8]))
        assert refused["error"]["code"] == "malformed"
        inbox = await api.handle(bob, '{"id": 3, "inbox": {}}')
        assert [m["text"] for m in inbox["inbox"]] == ["hi", "hi"]


async def test_inbox_since_a_time_pages_through_both_directions_in_time_order(tmp_path):
    """What bench.scale reads instead of opening the twins' stores: id, direction and
    time of every entry recorded since a time, a page at a time."""
    async with twin_mesh(tmp_path, nics=2) as mesh:
        alice, bob = mesh.twins
        await alice.send_text(bob.key.text, "before", wait=True)
        since = time.time()
        ids = {(await alice.send_text(bob.key.text, f"m{i}", wait=True))["id"]
               for i in range(3)}
        ids.add((await bob.send_text(alice.key.text, "back", wait=True))["id"])
        seen: list[dict] = []
        start = since
        for _ in range(10):
            answer = await api.handle(
                alice, json.dumps({"id": 1, "inbox": {"since": start, "limit": 2}}))
            api.validate(schemas.api.Response, answer)
            page = answer["inbox"]
            seen += [m for m in page if m not in seen]
            if len(page) < 2:
                break
            start = page[-1]["at"]
        assert [m["text"] for m in seen] == ["m0", "m1", "m2", "back"]
        assert {m["id"] for m in seen} == ids
        assert [m["outgoing"] for m in seen] == [True, True, True, False]
        assert all(m["at"] >= since for m in seen)
        assert [m["at"] for m in seen] == sorted(m["at"] for m in seen)
        # Without `since`: the newest `limit`, as before.
        newest = await api.handle(alice, '{"id": 2, "inbox": {"limit": 2}}')
        assert [m["text"] for m in newest["inbox"]] == ["m2", "back"]


async def test_settings_change_only_the_fields_named(tmp_path):
    async with twin_mesh(tmp_path, nics=1) as mesh:
        twin = mesh.twins[0]
        await api.handle(twin, '{"id": 1, "setSettings": {"contactsOnly": true}}')
        answer = await api.handle(twin, '{"id": 2, "setSettings": {"name": "Alice"}}')
        assert answer["settings"] == {"contactsOnly": True, "name": "Alice"}
