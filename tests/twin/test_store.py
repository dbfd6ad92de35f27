"""The twin's store: chat history, waiting envelopes, contacts, settings, bounds."""

from __future__ import annotations

import sqlite3

import pytest

from twinmesh.errors import StorageError
from twinmesh.twin.store import ChatRow, ContactRow, TwinStore, WaitingRow


def _chat(i: int, *, outgoing: bool = True, status: str = "waiting") -> ChatRow:
    return ChatRow(bytes([i]) * 16, b"p" * 32, outgoing, f"m{i}", float(i), status, "")


def _waiting(i: int) -> WaitingRow:
    return WaitingRow(bytes([i]) * 16, b"envelope", 10, 1e12)


def test_sent_messages_and_their_envelopes_survive_a_reopen(tmp_path):
    path = tmp_path / "twin.sqlite3"
    with TwinStore(path) as store:
        assert store.add_chat(_chat(1), _waiting(1))
        assert store.add_chat(_chat(2), _waiting(2))
    with TwinStore(path) as store:
        assert [w.id for w in store.waiting()] == [bytes([1]) * 16, bytes([2]) * 16]
        store.handed_over(bytes([1]) * 16)
        assert store.waiting_count() == 1
        assert [c.text for c in store.chat()] == ["m1", "m2"]
    assert (path.stat().st_mode & 0o777) == 0o600


def test_the_store_is_its_owners_alone_while_open(tmp_path):
    """Exclusive, like the inbox: others ask twind (`inbox`), they do not open it."""
    path = tmp_path / "twin.sqlite3"
    with TwinStore(path) as store:
        store.add_chat(_chat(1))
        with pytest.raises(StorageError, match="it is locked"):
            TwinStore(path)
        reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                reader.execute("SELECT text FROM chat").fetchall()
        finally:
            reader.close()
        assert store.add_chat(_chat(2))  # and the owner goes on
    with TwinStore(path) as store:
        assert [c.text for c in store.chat()] == ["m1", "m2"]


def test_entries_since_a_time_are_read_in_time_order_page_by_page(tmp_path):
    with TwinStore(tmp_path / "t") as store:
        # Recorded out of time order (a message received late), one peer apart.
        for i, at in ((1, 10.0), (2, 30.0), (3, 20.0), (4, 20.0), (5, 5.0)):
            store.add_chat(ChatRow(bytes([i]) * 16, b"p" * 32 if i != 4 else b"q" * 32,
                                   True, f"m{i}", at, "sent", ""))
        assert [c.text for c in store.chat_since(10.0, limit=2)] == ["m1", "m3"]
        # Reading on from the last time: that instant's entries come again.
        assert [c.text for c in store.chat_since(20.0, limit=10)] == ["m3", "m4", "m2"]
        assert [c.text for c in store.chat_since(20.0, b"q" * 32)] == ["m4"]
        assert store.chat_since(31.0) == []


def test_the_same_message_is_recorded_once(tmp_path):
    with TwinStore(tmp_path / "t") as store:
        assert store.add_chat(_chat(1, outgoing=False, status="received"))
        assert not store.add_chat(_chat(1, outgoing=False, status="received"))
        assert len(store.chat()) == 1


def test_a_final_status_is_never_overwritten(tmp_path):
    with TwinStore(tmp_path / "t") as store:
        store.add_chat(_chat(1), _waiting(1))
        message = bytes([1]) * 16
        assert store.set_status([(message, "queued", "")]) == [message]
        assert store.set_status([(message, "queued", "")]) == []  # no change, no event
        store.set_status([(message, "delivered", "")])
        store.set_status([(message, "sent", "")])  # a late update never goes back
        assert store.chat_entry(message).status == "delivered"


def test_statuses_arriving_together_end_as_they_would_one_by_one(tmp_path):
    with TwinStore(tmp_path / "t") as store:
        for i in (1, 2, 3):
            store.add_chat(_chat(i, status="queued"))
        one, two, three = (bytes([i]) * 16 for i in (1, 2, 3))
        changed = store.set_status([(one, "sent", ""), (two, "delivered", ""),
                                    (one, "delivered", ""), (two, "sent", ""),
                                    (three, "sent", ""), (three, "queued", "")])
        assert sorted(changed) == [one, two]  # three ends where it started
        assert [store.chat_entry(m).status for m in (one, two, three)] == [
            "delivered", "delivered", "queued"]


def test_a_message_that_failed_stops_waiting_even_among_other_updates(tmp_path):
    with TwinStore(tmp_path / "t") as store:
        store.add_chat(_chat(1), _waiting(1))
        message = bytes([1]) * 16
        assert store.set_status([(message, "queued", ""), (message, "failed", "noRoute"),
                                 (message, "sent", "")]) == [message]
        assert store.chat_entry(message).code == "noRoute"
        assert store.waiting_count() == 0


def test_expired_and_failed_messages_stop_waiting(tmp_path):
    with TwinStore(tmp_path / "t") as store:
        store.add_chat(_chat(1), _waiting(1))
        store.add_chat(_chat(2), _waiting(2))
        store.set_status([(bytes([1]) * 16, "expired", "expired"),
                          (bytes([2]) * 16, "failed", "tooLarge")])
        assert store.waiting_count() == 0


def test_waiting_envelopes_are_bounded(tmp_path):
    with TwinStore(tmp_path / "t", max_waiting=2) as store:
        store.add_chat(_chat(1), _waiting(1))
        store.add_chat(_chat(2), _waiting(2))
        with pytest.raises(StorageError, match="full"):
            store.add_chat(_chat(3), _waiting(3))
        assert store.chat_entry(bytes([3]) * 16) is None  # nothing half-recorded


def test_history_keeps_the_newest_entries(tmp_path):
    with TwinStore(tmp_path / "t", max_history=3) as store:
        for i in range(1, 6):
            store.add_chat(_chat(i, outgoing=False, status="received"))
        assert [c.text for c in store.chat()] == ["m3", "m4", "m5"]
        assert [c.text for c in store.chat(b"p" * 32, limit=2)] == ["m4", "m5"]


def test_a_long_history_stays_near_its_bound(tmp_path):
    with TwinStore(tmp_path / "t", max_history=640) as store:
        for i in range(1000):
            row = ChatRow(i.to_bytes(16, "big"), b"p" * 32, False, f"m{i}", float(i),
                          "received", "")
            store.add_chat(row)
        kept = store.chat(limit=10_000)
        assert 640 <= len(kept) <= 640 + 640 // 64
        assert kept[-1].text == "m999"


def test_unread_counts_incoming_after_mark_read(tmp_path):
    with TwinStore(tmp_path / "t") as store:
        store.add_chat(_chat(1, outgoing=False, status="received"))
        store.add_chat(_chat(2))
        assert store.unread() == 1
        store.mark_read()
        assert store.unread() == 0


def test_contacts_and_settings(tmp_path):
    with TwinStore(tmp_path / "t") as store:
        store.put_contact(ContactRow(b"b" * 32, "Bob", "requested", 1.0))
        store.put_contact(ContactRow(b"b" * 32, "Bob", "accepted", 2.0))
        assert store.contact(b"b" * 32).state == "accepted"
        assert len(store.contacts()) == 1
        assert store.remove_contact(b"b" * 32) and not store.remove_contact(b"b" * 32)
        assert store.setting("name", "none") == "none"
        store.set_setting("name", "Alice")
        assert store.setting("name") == "Alice"


def test_a_file_that_is_not_a_twin_store_is_refused_with_its_name(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StorageError, match=str(path)):
        TwinStore(path)
