"""The twin API dispatcher: validation against api.capnp, typed errors, real twins."""

from __future__ import annotations

import json

import pytest

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


async def test_settings_change_only_the_fields_named(tmp_path):
    async with twin_mesh(tmp_path, nics=1) as mesh:
        twin = mesh.twins[0]
        await api.handle(twin, '{"id": 1, "setSettings": {"contactsOnly": true}}')
        answer = await api.handle(twin, '{"id": 2, "setSettings": {"name": "Alice"}}')
        assert answer["settings"] == {"contactsOnly": True, "name": "Alice"}
