"""The twin service on real in-process NICs: chat, ping, contacts, queueing, moving."""

from __future__ import annotations

import pytest
import trio

from twinmesh.errors import ApiError
from twinmesh.identity.keys import Identity
from twinmesh.testing.nics import wait_for
from twinmesh.testing.twins import twin_mesh
from twinmesh.twin.service import Twin

TIMEOUT = 20


async def test_chat_two_hops_is_delivered_once_and_recorded_on_both_sides(tmp_path):
    async with twin_mesh(tmp_path, nics=3) as mesh:
        alice, carol = mesh.twins[0], mesh.twins[2]
        with trio.fail_after(TIMEOUT):
            sent = await alice.send_text(carol.key.text, "hello carol", wait=True)
        assert sent["status"] == "delivered"
        received = await carol.inbox()
        assert [(m["text"], m["outgoing"], m["peer"]) for m in received] == [
            ("hello carol", False, alice.key.text)]
        assert received[0]["id"] == sent["id"]
        history = await alice.inbox(carol.key.text)
        assert [(m["text"], m["status"]) for m in history] == [("hello carol", "delivered")]
        assert (await alice.message_status(sent["id"]))["status"] == "delivered"


async def test_subscribers_see_arrivals_and_status_changes(tmp_path):
    async with twin_mesh(tmp_path, nics=2) as mesh:
        alice, bob = mesh.twins
        async with bob.subscribe() as bob_events, alice.subscribe() as alice_events:
            sent = await alice.send_text(bob.key.text, "live")
            with trio.fail_after(TIMEOUT):
                event = await bob_events.receive()
                while "message" not in event:
                    event = await bob_events.receive()
                assert event["message"]["text"] == "live"
                statuses = []
                async for event in alice_events:
                    if "messageStatus" in event and event["messageStatus"]["id"] == sent["id"]:
                        statuses.append(event["messageStatus"]["status"])
                        if statuses[-1] == "delivered":
                            break
        assert statuses[-1] == "delivered"


async def test_ping_measures_a_round_trip_to_another_twin(tmp_path):
    async with twin_mesh(tmp_path, nics=3) as mesh:
        alice, carol = mesh.twins[0], mesh.twins[2]
        with trio.fail_after(TIMEOUT):
            result = await alice.ping(carol.key.text, sequence=7)
        assert result["sequence"] == 7 and result["twin"] == carol.key.text
        assert result["rtt"] > 0


async def test_ping_to_a_twin_nobody_knows_fails_with_a_code(tmp_path):
    async with twin_mesh(tmp_path, nics=2) as mesh:
        stranger = Identity.generate().public
        with trio.fail_after(TIMEOUT), pytest.raises(ApiError) as error:
            await mesh.twins[0].ping(stranger.text, timeout=2.0)
        assert error.value.code in ("noRoute", "expired", "unknownTwin")


async def test_contact_request_and_accept(tmp_path):
    async with twin_mesh(tmp_path, nics=2) as mesh:
        alice, bob = mesh.twins
        await alice.set_settings(name="Alice")
        added = await alice.add_contact(bob.key.text, "Bob")
        assert added["state"] == "requested"

        async def bob_sees_request() -> bool:
            return any(c["twin"] == alice.key.text and c["state"] == "pending"
                       for c in await bob.contacts())

        with trio.fail_after(TIMEOUT):
            while not await bob_sees_request():
                await trio.sleep(0.02)
        assert (await bob.contacts())[0]["name"] == "Alice"  # the requester's own name
        await bob.accept_contact(alice.key.text)
        with trio.fail_after(TIMEOUT):
            while (await alice.contacts())[0]["state"] != "accepted":
                await trio.sleep(0.02)
        assert (await alice.contacts())[0]["name"] == "Bob"  # our name for them stays
        await alice.remove_contact(bob.key.text)
        assert await alice.contacts() == []
        with pytest.raises(ApiError) as error:
            await alice.remove_contact(bob.key.text)
        assert error.value.code == "unknownTwin"


async def test_contacts_only_refuses_chat_from_strangers(tmp_path):
    async with twin_mesh(tmp_path, nics=2) as mesh:
        alice, bob = mesh.twins
        await bob.set_settings(contacts_only=True)
        with trio.fail_after(TIMEOUT):
            sent = await alice.send_text(bob.key.text, "hi stranger", wait=True)
        assert (sent["status"], sent["code"]) == ("failed", "unauthorized")
        assert await bob.inbox() == []


async def test_messages_sent_without_a_nic_wait_in_the_twin_and_flush_on_attach(tmp_path):
    async with twin_mesh(tmp_path, nics=2) as mesh:
        bob = mesh.twins[1]
        state = tmp_path / "dana"
        state.mkdir(mode=0o700)
        dana = Twin(Identity.generate(), state, [tmp_path / "no-nic-here"])
        await mesh.nursery.start(dana.run)
        first = await dana.send_text(bob.key.text, "one")
        second = await dana.send_text(bob.key.text, "two")
        assert (first["status"], second["status"]) == ("waiting", "waiting")
        assert (await dana.status())["waiting"] == 2
        with trio.fail_after(TIMEOUT):
            await dana.move(str(mesh.nics[0].state_dir))
            await wait_for(lambda: mesh.nics[1].located(dana.key) is not None, step=0.02)
            while len(await bob.inbox()) < 2:
                await trio.sleep(0.02)
        assert [m["text"] for m in await bob.inbox()] == ["one", "two"]
        assert (await dana.status())["waiting"] == 0


async def test_a_twin_that_moves_keeps_receiving(tmp_path):
    async with twin_mesh(tmp_path, nics=3) as mesh:
        alice, carol = mesh.twins[0], mesh.twins[2]
        with trio.fail_after(TIMEOUT):
            moved = await carol.move(str(mesh.nics[1].state_dir))
            assert moved["nic"] == mesh.nics[1].key.text
            await wait_for(lambda: mesh.nics[0].located(carol.key) == mesh.nics[1].key,
                           step=0.02)
            sent = await alice.send_text(carol.key.text, "found you", wait=True)
        assert sent["status"] == "delivered"
        assert [m["text"] for m in await carol.inbox()] == ["found you"]


@pytest.mark.parametrize(("twin", "text", "ttl", "code"), [
    ("not-a-key", "hi", 60.0, "malformed"),
    (None, "", 60.0, "malformed"),
    (None, "x" * 20_000, 60.0, "tooLarge"),
    (None, "hi", 0.0, "malformed"),
    (None, "hi", 1e6, "malformed"),
])
async def test_bad_sends_are_refused_with_a_code_and_nothing_recorded(
        tmp_path, twin, text, ttl, code):
    async with twin_mesh(tmp_path, nics=1) as mesh:
        alice = mesh.twins[0]
        other = Identity.generate().public.text
        with pytest.raises(ApiError) as error:
            await alice.send_text(twin or other, text, ttl=ttl)
        assert error.value.code == code
        assert await alice.inbox() == []


async def test_a_send_answered_by_callback_is_recorded_and_delivered_once(tmp_path):
    async with twin_mesh(tmp_path, nics=2) as mesh:
        alice, bob = mesh.twins
        answers = []
        with trio.fail_after(TIMEOUT):
            assert alice.send_text_soon(bob.key.text, "soon", ttl=60.0, done=answers.append,
                                        spawn=mesh.nursery.start_soon)
            while not answers:
                await trio.sleep(0.01)
            (entry,) = answers
            assert entry["text"] == "soon" and entry["status"] in ("queued", "sent")
            while not await bob.inbox():
                await trio.sleep(0.01)
            sent = await alice.message_status(entry["id"])
            while sent["status"] != "delivered":
                await trio.sleep(0.01)
                sent = await alice.message_status(entry["id"])
        assert [m["text"] for m in await bob.inbox()] == ["soon"]
        assert [m["id"] for m in await alice.inbox()] == [entry["id"]]
        with pytest.raises(ApiError) as error:
            alice.send_text_soon(bob.key.text, "", ttl=60.0, done=answers.append,
                                 spawn=mesh.nursery.start_soon)
        assert error.value.code == "malformed" and len(answers) == 1


async def test_a_send_whose_nic_connection_breaks_mid_request_is_answered_once_and_kept(
        tmp_path):
    async with twin_mesh(tmp_path, nics=2) as mesh:
        alice, bob = mesh.twins
        answers = []
        with trio.fail_after(TIMEOUT):
            assert alice.send_text_soon(bob.key.text, "kept", ttl=60.0, done=answers.append,
                                        spawn=mesh.nursery.start_soon)
            # The session ends before the NIC's result is read (as `move` ends it).
            assert alice._session_scope is not None
            alice._session_scope.cancel()
            while not answers:
                await trio.sleep(0.01)
            (entry,) = answers
            assert entry["status"] == "waiting"  # kept in the twin, power safe
            await alice.wait_attached()
            while not await bob.inbox():
                await trio.sleep(0.01)
            await trio.sleep(0.2)  # a second copy would arrive meanwhile
        assert answers == [entry]
        assert [(m["text"], m["id"]) for m in await bob.inbox()] == [("kept", entry["id"])]
        assert (await alice.status())["waiting"] == 0
