"""One twin: its identity, its store, its NIC session and the services it runs.

`Twin.run()` keeps the twin attached to a NIC for as long as it runs: it tries the
NICs it was given in order, reconnects with a capped, jittered backoff when the NIC
goes away, and moves to the next NIC in its list when one stays unreachable (or when
told to, `move`). Each attach re-publishes the twin's signed location record with a
newer sequence number, so messages queued for it find it at its new NIC.

What the user sends is sealed here and written to the twin's store together with the
envelope before the API answers; a NIC that takes it stores it durably and only then
is it forgotten here. While no NIC is reachable the envelopes wait in the store and
are handed over, oldest first, on the next attach: nothing is lost to a NIC restart.

Services on the bus (typed payloads, schemas/rmb.capnp): chat (`TextMessage`), ping
(`Ping`, answered with the same struct), contacts (`ContactRequest` /
`ContactAccept`), and `ErrorBody` replies (a twin that refuses chat from strangers
says `unauthorized`). Other schemas are answered `rejectedSchema` by the bus client.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
import trio

from twinmesh import __version__
from twinmesh.bus import local_frames
from twinmesh.bus.client import BusClient, BusError, Received
from twinmesh.bus.crypto import MAX_PAYLOAD, MAX_TTL, TwinCrypto
from twinmesh.bus.inbox_store import InboxStore
from twinmesh.errors import ApiError, StorageError
from twinmesh.group_sync import GroupSync
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.twin.store import ChatRow, ContactRow, TwinStore, WaitingRow, collapse_statuses
from twinmesh.wire import schemas

KEY_FILE = "twin.key"
STORE_FILE = "twin.sqlite3"
INBOX_FILE = "inbox.sqlite3"
CONTROL_SOCKET = "control.sock"
WEB_TOKEN_FILE = "web.token"
WEB_URL_FILE = "web.url"

RECONNECT_INITIAL = 0.2
RECONNECT_MAX = 5.0
MOVE_AFTER_FAILURES = 3  # consecutive failed attaches before trying the next NIC
SUBSCRIBER_QUEUE = 256
RECENT_STATUSES = 10_000
MAX_TEXT = 16 * 1024  # characters of one chat message
MAX_INBOX = 10_000  # chat entries in one `inbox` answer
MOVE_TIMEOUT = 10.0
_FINAL = ("delivered", "expired", "failed")

_rmb = schemas.rmb
ACCEPTED = (_rmb.TextMessage, _rmb.Ping, _rmb.ContactRequest, _rmb.ContactAccept,
            _rmb.ErrorBody)
_TEXT_ID = _rmb.TextMessage.schema.node.id
_PING_ID = _rmb.Ping.schema.node.id
_CONTACT_REQUEST_ID = _rmb.ContactRequest.schema.node.id
_CONTACT_ACCEPT_ID = _rmb.ContactAccept.schema.node.id
_ERROR_ID = _rmb.ErrorBody.schema.node.id


class Twin:
    def __init__(self, identity: Identity, state_dir: Path, nics: list[Path], *,
                 group_sync: GroupSync | None = None) -> None:
        if not nics:
            raise ValueError("a twin needs at least one NIC socket")
        self.identity = identity
        self.key = identity.public
        self.state_dir = state_dir  # immutable after construction
        self.nics = list(nics)  # the NICs to try, preferred first; changed by `move`
        self.crypto = TwinCrypto(identity)
        # One per process: the inbox fsyncs of all its twins go in rounds. Its worker
        # thread runs in the daemon's nursery, or in `run` when it is this twin's own.
        self._own_group_sync = group_sync is None
        self.group_sync = group_sync if group_sync is not None else GroupSync()
        self.store: TwinStore | None = None
        self.inbox_store: InboxStore | None = None
        self.bus: BusClient | None = None  # set while attached
        self.nic_path: Path | None = None
        self.started_at = time.time()
        self.dropped_events = 0
        # Mirrors of the store for the bus client's screen (called synchronously for
        # every arriving message): changed only together with the store.
        self._contacts_only = False
        self._accepted_contacts: set[bytes] = set()
        # Contact names by twin, for chat entries (another mirror of the store).
        self._contact_names: dict[bytes, str] = {}
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self._attached = trio.Event()
        self._session_scope: trio.CancelScope | None = None
        self._flush_lock = trio.Lock()
        self._recent_status: dict[bytes, tuple[str, str]] = {}  # newest last, bounded
        # What the store holds for recent outgoing messages (newest last, bounded):
        # changes only from `send_text` and `_update_statuses`, with the store.
        self._stored_status: dict[bytes, tuple[str, str]] = {}
        # Messages `send_text` handed to the NIC and has not recorded yet.
        self._recording: set[bytes] = set()
        self._has_waiting = True  # until a flush finds the store's waiting list empty
        self.log = structlog.get_logger("twinmesh.twin").bind(twin=self.key.short)

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[Twin] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the stores, keep a NIC session, run the services until cancelled;
        `started` once the stores are open (not waiting for a NIC)."""
        self.store = await trio.to_thread.run_sync(TwinStore, self.state_dir / STORE_FILE)
        try:
            self.inbox_store = await trio.to_thread.run_sync(
                InboxStore, self.state_dir / INBOX_FILE)
            await self._load_screen()
            async with trio.open_nursery() as nursery:
                if self._own_group_sync:
                    await nursery.start(self.group_sync.run)
                nursery.start_soon(self._stay_attached)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                for store in (self.inbox_store, self.store):
                    if store is not None:
                        await trio.to_thread.run_sync(store.close)

    async def _stay_attached(self) -> None:
        failures = 0
        delay = RECONNECT_INITIAL
        while True:
            nic = self.nics[0]
            try:
                with trio.CancelScope() as self._session_scope:
                    async with BusClient.connect(self.identity, nic, inbox=self.inbox_store,
                                                 accepted=ACCEPTED,
                                                 group_sync=self.group_sync,
                                                 crypto=self.crypto) as bus:
                        failures, delay = 0, RECONNECT_INITIAL
                        await self._attached_session(bus, nic)
            except Exception as exc:  # whatever broke, the twin reconnects
                failures += 1
                self.log.info("NIC unreachable", nic=str(nic), failures=failures,
                              reason=str(exc) or type(exc).__name__)
            finally:
                self._session_scope = None
                if self.bus is not None:
                    self.bus = None
                    self.nic_path = None
                    self._attached = trio.Event()
                    self._emit({"connection": self.identity_info()})
            if failures >= MOVE_AFTER_FAILURES and len(self.nics) > 1:
                # This NIC stays away: try the next one (it is tried again later).
                self.nics.append(self.nics.pop(0))
                self.log.warning("moving to another NIC", nic=str(self.nics[0]))
                failures = 0
            await trio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(RECONNECT_MAX, delay * 2)

    async def _attached_session(self, bus: BusClient, nic: Path) -> None:
        bus.on_statuses = self._on_statuses
        bus.on_message = self._on_message
        bus.screen = self._screen
        self.bus = bus
        self.nic_path = nic
        self._attached.set()
        self.log.info("attached", nic=bus.nic.short, socket=str(nic))
        self._emit({"connection": self.identity_info()})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.flush_waiting)
            try:
                while True:
                    received = await bus.receive()
                    try:
                        await self._dispatch(bus, received)
                    except (BusError, StorageError) as exc:
                        self.log.warning("message not handled", id=received.id.hex(),
                                         reason=str(exc))
            except BusError as exc:
                # The NIC went away (receive says "offline"): reconnect.
                self.log.warning("NIC connection lost", reason=str(exc))
            nursery.cancel_scope.cancel()

    async def flush_waiting(self) -> None:
        """Hand the envelopes sealed while no NIC took them to the NIC, oldest first."""
        async with self._flush_lock:
            store = self._store()
            while (bus := self.bus) is not None:
                batch = store.waiting(256)
                if not batch:
                    self._has_waiting = False
                    return
                for row in batch:
                    if not await self._hand_over(bus, row):
                        return

    async def _hand_over(self, bus: BusClient, row: WaitingRow) -> bool:
        """False when the NIC is gone (the envelope keeps waiting)."""
        store = self._store()
        if row.deadline <= time.time():
            self._update_statuses([(row.id, "expired", "expired")])
            return True
        try:
            await bus.submit_sealed(row.envelope, row.payload_size, message_id=row.id)
        except BusError as exc:
            if exc.code == "offline":
                return False
            self._update_statuses([(row.id, "failed", exc.code)])
            return True
        store.handed_over(row.id)
        self._update_statuses([(row.id, "queued", "")])
        return True

    # ---------------------------------------------------------------- services

    async def _dispatch(self, bus: BusClient, received: Received) -> None:
        schema_id = received.schema_id
        if schema_id == _PING_ID:
            fields = received.decode(_rmb.Ping)
            answer = _rmb.Ping.new_message(sentAt=fields["sentAt"],
                                           sequence=fields["sequence"])
            await bus.reply(received, answer, ttl=30.0)
        elif schema_id == _TEXT_ID:
            self._chat_arrived(received)
        elif schema_id == _CONTACT_REQUEST_ID:
            await self._contact_requested(bus, received)
        elif schema_id == _CONTACT_ACCEPT_ID:
            await self._contact_accepted(received)
        elif schema_id == _ERROR_ID and received.reply_to:
            fields = received.decode(_rmb.ErrorBody)
            self._update_statuses([(received.reply_to, "failed", str(fields["code"]))])

    def _screen(self, source: PublicKey, schema_id: int) -> tuple[str, str] | None:
        if (schema_id == _TEXT_ID and self._contacts_only
                and source.raw not in self._accepted_contacts):
            return "unauthorized", "this twin accepts chat from its contacts only"
        return None

    async def _save_contact(self, row: ContactRow) -> None:
        self._store().put_contact(row)
        self._contact_names[row.twin] = row.name
        if row.state == "accepted":
            self._accepted_contacts.add(row.twin)
        else:
            self._accepted_contacts.discard(row.twin)

    async def _load_screen(self) -> None:
        store = self._store()
        self._contacts_only = await self._contacts_only_setting()
        rows = store.contacts()
        self._accepted_contacts = {row.twin for row in rows if row.state == "accepted"}
        self._contact_names = {row.twin: row.name for row in rows}

    def _on_message(self, received: Received) -> bool:
        """The bus client's offer of a new message, in its reader: chat is recorded
        right there (no task switch); the rest goes to `_dispatch` through
        `receive()`, since answering may wait for the NIC, which that reader reads."""
        if received.schema_id != _TEXT_ID:
            return False
        try:
            self._chat_arrived(received)
        except (BusError, StorageError) as exc:  # as `_attached_session` does
            self.log.warning("message not handled", id=received.id.hex(), reason=str(exc))
        return True

    def _chat_arrived(self, received: Received) -> None:
        store = self._store()
        text = str(received.decode(_rmb.TextMessage)["body"])
        row = ChatRow(received.id, received.source.raw, False, text, time.time(),
                      "received", "")
        if store.add_chat(row) and self._subscribers:
            self._emit({"message": self._chat_entry(row)})

    async def _contact_requested(self, bus: BusClient, received: Received) -> None:
        store = self._store()
        fields = received.decode(_rmb.ContactRequest)
        peer = received.source.raw
        current = store.contact(peer)
        if current is not None and current.state == "accepted":
            # They lost us (or asked twice): confirm again.
            await bus.send(received.source, self._accept_message(), ttl=300.0)
            return
        if current is not None and current.state == "requested":
            row = ContactRow(peer, current.name or str(fields["name"]), "accepted", time.time())
            await bus.send(received.source, self._accept_message(), ttl=300.0)
        else:
            row = ContactRow(peer, str(fields["name"])[:100], "pending", time.time())
        await self._save_contact(row)
        self._emit({"contact": _contact_dict(row)})

    async def _contact_accepted(self, received: Received) -> None:
        store = self._store()
        fields = received.decode(_rmb.ContactAccept)
        current = store.contact(received.source.raw)
        if current is None or current.state == "accepted":
            return  # we never asked (or already know): nothing to accept
        row = ContactRow(current.twin, current.name or str(fields["name"])[:100], "accepted",
                         time.time())
        await self._save_contact(row)
        self._emit({"contact": _contact_dict(row)})

    def _accept_message(self) -> Any:
        return _rmb.ContactAccept.new_message(name=self._name_cached)

    # --------------------------------------------------------------- statuses

    def _on_statuses(self, changes: list[tuple[bytes, str, str]]) -> None:
        # Called in the bus client's reader with the changes of one frame: recorded
        # right here, in one transaction without an fsync (tens of microseconds),
        # which is cheaper than waking a task of our own to do it.
        recent = self._recent_status
        for message_id, status, code in changes:
            recent[message_id] = (status, code)
            if len(recent) > RECENT_STATUSES:
                del recent[next(iter(recent))]
        # `send_text` records a message it is sending with its latest status itself.
        self._update_statuses([change for change in changes
                               if change[0] not in self._recording])

    def _update_statuses(self, changes: list[tuple[bytes, str, str]]) -> None:
        store = self._store()
        stored = self._stored_status
        # A change the store already holds (or one after a final status) changes
        # nothing there: not even a statement for it. E.g. the NIC's `sent` that came
        # before `send_text` recorded the message as sent.
        changes = [change for change in changes if not _holds(stored.get(change[0]), change)]
        if not changes:
            return
        try:
            changed = store.set_status(changes)
        except StorageError as exc:
            self.log.error("status not recorded", reason=str(exc))
            return
        if not changed:
            return
        folded = collapse_statuses(changes)
        for message_id in changed:
            self._stored(message_id, folded[message_id])
        if not self._subscribers:
            return
        for message_id in changed:
            status, code = folded[message_id]
            self._emit({"messageStatus": {"id": message_id.hex(), "status": status,
                                          "code": code}})

    def _stored(self, message_id: bytes, status: tuple[str, str]) -> None:
        self._stored_status[message_id] = status
        if len(self._stored_status) > RECENT_STATUSES:
            del self._stored_status[next(iter(self._stored_status))]

    # --------------------------------------------------------------------- API

    def identity_info(self) -> dict[str, Any]:
        bus = self.bus
        return {"twin": self.key.text, "name": self._name_cached,
                "nic": bus.nic.text if bus is not None else "",
                "nicSocket": str(self.nic_path) if self.nic_path is not None else ""}

    @property
    def _name_cached(self) -> str:
        store = self.store
        if store is None:
            return ""
        try:
            return store.setting("name")
        except StorageError:
            return ""

    async def status(self) -> dict[str, Any]:
        store = self._store()
        waiting = store.waiting_count()
        unread = store.unread()
        contacts = store.contacts()
        info = self.identity_info()
        return {"twin": info["twin"], "name": info["name"], "connected": self.bus is not None,
                "nic": info["nic"], "nicSocket": info["nicSocket"],
                "uptime": time.time() - self.started_at, "waiting": waiting, "unread": unread,
                "contacts": len(contacts), "version": __version__}

    async def ping(self, twin: str, *, timeout: float = 5.0, sequence: int = 0) -> dict[str, Any]:
        peer = parse_twin(twin)
        bus = self._bus()
        sent = time.time()
        message = _rmb.Ping.new_message(sentAt=sent, sequence=sequence)
        timeout = min(max(timeout, 0.1), 60.0)
        start = trio.current_time()
        try:
            reply = await bus.request(peer, message, ttl=max(1.0, timeout), timeout=timeout)
        except BusError as exc:
            raise ApiError(exc.code, _reason(exc)) from None
        fields = reply.decode(_rmb.Ping)
        if int(fields["sequence"]) != sequence:
            raise ApiError("malformed", "the pong names another sequence number")
        return {"twin": peer.text, "sequence": sequence, "rtt": trio.current_time() - start}

    async def find(self, twin: str) -> dict[str, Any]:
        peer = parse_twin(twin)
        bus = self._bus()
        start = trio.current_time()
        try:
            found = await bus.find(peer)
        except BusError as exc:
            raise ApiError(exc.code, _reason(exc)) from None
        location = found.location
        return {"twin": location.twin.text, "nic": location.nic.text,
                "name": getattr(location, "name", "") or "",
                "seqno": location.seqno, "expires": location.expires,
                "hops": min(found.hops, 255), "rounds": min(found.rounds, 255),
                "queried": min(found.queried, 65535),
                "elapsed": trio.current_time() - start}

    async def send_text(self, twin: str, text: str, *, ttl: float = 300.0,
                        wait: bool = False) -> dict[str, Any]:
        """Record and send a chat message; with `wait`, answer once it is delivered,
        expired or failed."""
        peer, payload = _chat_payload(twin, text, ttl)
        now = time.time()
        envelope, header = self.crypto.seal_message(
            peer, payload, _TEXT_ID, now=now, ttl=ttl)
        bus = self.bus
        waiting: WaitingRow | None = None
        if bus is not None and not self._has_waiting:
            # The usual case: the NIC stores it durably, then we record it (one commit
            # here). In order behind any envelopes still waiting, never ahead of them.
            self._recording.add(header.id)
            try:
                await bus.submit_sealed(envelope, len(payload), message_id=header.id)
            except BusError as exc:
                if exc.code != "offline":
                    raise ApiError(exc.code, _reason(exc)) from None
                waiting = WaitingRow(header.id, envelope, len(payload), header.deadline)
            finally:
                # From here on (no await before the row is written) `_on_statuses`
                # queues changes again.
                self._recording.discard(header.id)
        else:
            waiting = WaitingRow(header.id, envelope, len(payload), header.deadline)
        if waiting is None:
            row = self._record_handed_over(peer, text, now, header.id)
            if not wait:
                return self._chat_entry(row)  # nothing awaited since: the store holds `row`
        else:
            row = await self._record_waiting(peer, text, now, waiting)
        if wait:
            await self._wait_final(header.id, header.deadline + 5.0 - time.time())
        current = self._store().chat_entry(header.id)
        return self._chat_entry(current or row)

    def send_text_soon(self, twin: str, text: str, *, ttl: float,
                       done: Callable[[dict[str, Any] | ApiError], None],
                       spawn: Callable[[Callable[[], Awaitable[None]]], None]) -> bool:
        """`send_text` (without `wait`) for a caller that takes the answer as a
        callback: no task waits for the NIC. `done` gets the chat entry or the
        ApiError, exactly once: usually from the bus client's reader when the NIC's
        result arrives; when the NIC turns out to be gone, from a task started with
        `spawn` that keeps the message waiting here (power safe), as `send_text` does.
        Raises ApiError at once for a request that is not valid (`done` is not
        called then). False (nothing done): this needs waiting (no NIC, envelopes
        still waiting, a NIC that is not reading): call `send_text`."""
        bus = self.bus
        if bus is None or self._has_waiting:
            return False
        peer, payload = _chat_payload(twin, text, ttl)
        now = time.time()
        envelope, header = self.crypto.seal_message(peer, payload, _TEXT_ID, now=now, ttl=ttl)

        def submitted(error: BusError | None) -> None:
            self._recording.discard(header.id)
            answer: dict[str, Any] | ApiError
            try:
                if error is not None and error.code == "offline":
                    waiting = WaitingRow(header.id, envelope, len(payload), header.deadline)
                    spawn(functools.partial(self._keep_waiting, peer, text, now, waiting,
                                            done))
                    return
                if error is not None:
                    answer = ApiError(error.code, _reason(error))
                else:
                    answer = self._chat_entry(self._record_handed_over(
                        peer, text, now, header.id))
            except ApiError as exc:
                answer = exc
            except Exception as exc:  # a bug here must still answer the request
                self.log.exception("send not recorded")
                answer = ApiError("internal", repr(exc))
            done(answer)

        # `_on_statuses` leaves it to `submitted` (which records the latest status).
        self._recording.add(header.id)
        if not bus.submit_sealed_soon(envelope, len(payload), header.id, submitted):
            self._recording.discard(header.id)
            return False
        return True

    async def _keep_waiting(self, peer: PublicKey, text: str, now: float,
                            waiting: WaitingRow,
                            done: Callable[[dict[str, Any] | ApiError], None]) -> None:
        answer: dict[str, Any] | ApiError = ApiError("offline", "the twin is stopping")
        try:
            row = await self._record_waiting(peer, text, now, waiting)
            current = self._store().chat_entry(waiting.id)
            answer = self._chat_entry(current or row)
        except ApiError as exc:
            answer = exc
        finally:
            done(answer)

    def _record_handed_over(self, peer: PublicKey, text: str, now: float,
                            message_id: bytes) -> ChatRow:
        """Record a message the NIC took (one commit, no fsync)."""
        # The NIC's updates can overtake our own record of the message: recorded as it
        # stands now (`set_status` would give the same row).
        status, code = self._recent_status.get(message_id, ("queued", ""))
        row = ChatRow(message_id, peer.raw, True, text, now, status, code)
        try:
            self._store().add_chat(row)
        except StorageError as exc:
            # Not recorded here; the NIC took it, so it is still delivered.
            raise ApiError("overloaded", str(exc)) from None
        self._stored(message_id, (row.status, row.code))
        if self._subscribers:
            self._emit({"message": self._chat_entry(row)})
        return row

    async def _record_waiting(self, peer: PublicKey, text: str, now: float,
                              waiting: WaitingRow) -> ChatRow:
        """Record a message no NIC took, with its envelope (power safe: an fsync, off
        the event loop), then hand what waits to the NIC if one is attached."""
        row = ChatRow(waiting.id, peer.raw, True, text, now, "waiting", "")
        try:
            await trio.to_thread.run_sync(self._store().add_chat, row, waiting)
        except StorageError as exc:
            raise ApiError("overloaded", str(exc)) from None
        self._stored(waiting.id, (row.status, row.code))
        self._has_waiting = True
        if self._subscribers:
            self._emit({"message": self._chat_entry(row)})
        if self.bus is not None:
            await self.flush_waiting()
        return row

    async def _wait_final(self, message_id: bytes, timeout: float) -> None:
        with trio.move_on_after(max(0.0, timeout)):
            async with self.subscribe() as events:
                entry = self._store().chat_entry(message_id)
                if entry is not None and entry.status in _FINAL:
                    return
                async for event in events:
                    status = event.get("messageStatus")
                    if status and status["id"] == message_id.hex() and \
                            status["status"] in _FINAL:
                        return

    async def inbox(self, peer: str = "", *, limit: int = 50, since: float = 0.0
                    ) -> list[dict[str, Any]]:
        """The newest `limit` chat entries (with `peer`), oldest first; `since` > 0:
        the first `limit` entries recorded at or after that unix time."""
        store = self._store()
        key = parse_twin(peer).raw if peer else None
        limit = max(1, min(limit, MAX_INBOX))
        if since > 0:
            rows = await trio.to_thread.run_sync(store.chat_since, since, key, limit)
        else:
            rows = await trio.to_thread.run_sync(store.chat, key, limit)
        store.mark_read()
        return [_chat_dict(row, self._contact_names) for row in rows]

    async def message_status(self, message_id: str) -> dict[str, Any]:
        try:
            raw = bytes.fromhex(message_id)
        except ValueError:
            raise ApiError("malformed", f"{message_id!r} is not a message id (hex)") from None
        entry = self._store().chat_entry(raw)
        if entry is not None and entry.outgoing:
            return {"id": message_id, "status": entry.status, "code": entry.code}
        if self.bus is not None:
            status, code = await self.bus.status(raw)
            return {"id": message_id, "status": status, "code": code}
        raise ApiError("unknown", f"no message {message_id} sent by this twin")

    async def contacts(self) -> list[dict[str, Any]]:
        rows = self._store().contacts()
        return [_contact_dict(row) for row in rows]

    async def add_contact(self, twin: str, name: str = "") -> dict[str, Any]:
        """Add a contact and ask it to add us back (accepted once it answers)."""
        peer = parse_twin(twin)
        if peer == self.key:
            raise ApiError("malformed", "a twin cannot be its own contact")
        store = self._store()
        current = store.contact(peer.raw)
        if current is not None and current.state == "pending":
            return await self.accept_contact(twin, name)
        state = current.state if current is not None else "requested"
        row = ContactRow(peer.raw, name[:100] or (current.name if current else ""), state,
                         current.since if current else time.time())
        await self._save_contact(row)
        self._emit({"contact": _contact_dict(row)})
        if state != "accepted":
            request = _rmb.ContactRequest.new_message(name=self._name_cached)
            await self._send_service(peer, request)
        return _contact_dict(row)

    async def accept_contact(self, twin: str, name: str = "") -> dict[str, Any]:
        peer = parse_twin(twin)
        store = self._store()
        current = store.contact(peer.raw)
        if current is None:
            raise ApiError("unknownTwin", f"{peer.text} has not asked to be a contact")
        row = ContactRow(peer.raw, name[:100] or current.name, "accepted", time.time())
        await self._save_contact(row)
        self._emit({"contact": _contact_dict(row)})
        if current.state != "accepted":
            await self._send_service(peer, self._accept_message())
        return _contact_dict(row)

    async def remove_contact(self, twin: str) -> None:
        peer = parse_twin(twin)
        if not self._store().remove_contact(peer.raw):
            raise ApiError("unknownTwin", f"{peer.text} is not a contact")
        self._accepted_contacts.discard(peer.raw)
        self._contact_names.pop(peer.raw, None)
        self._emit({"contact": {"twin": peer.text, "name": "", "state": "removed",
                                "since": time.time()}})

    async def settings(self) -> dict[str, Any]:
        return {"contactsOnly": await self._contacts_only_setting(), "name": self._name_cached}

    async def set_settings(self, *, contacts_only: bool | None = None,
                           name: str | None = None) -> dict[str, Any]:
        store = self._store()
        if contacts_only is not None:
            store.set_setting("contacts_only", "1" if contacts_only else "0")
        if name is not None:
            store.set_setting("name", name[:100])
        await self._load_screen()
        return await self.settings()

    async def move(self, nic: str) -> dict[str, Any]:
        """Attach to another NIC (its state dir or twins.sock) and re-publish there."""
        path = Path(nic).expanduser()
        if not path.exists():
            raise ApiError("malformed", f"{path}: no such NIC socket or state dir")
        path = path.resolve()
        if path in self.nics:
            self.nics.remove(path)
        self.nics.insert(0, path)
        if self._session_scope is not None:
            self._session_scope.cancel()
        with trio.move_on_after(MOVE_TIMEOUT):
            while True:
                await self._attached.wait()
                if self.nic_path == path:
                    return self.identity_info()
                await trio.sleep(0.05)
        raise ApiError("offline", f"could not attach to the NIC at {path}")

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """Events (dicts mirroring `Event`) from now on, until the block exits. A
        subscriber that does not keep up loses events (bounded), never the twin."""
        send, receive = trio.open_memory_channel[dict[str, Any]](SUBSCRIBER_QUEUE)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()

    async def wait_attached(self) -> None:
        await self._attached.wait()

    # --------------------------------------------------------------- internals

    async def _send_service(self, peer: PublicKey, message: Any) -> None:
        bus = self._bus()
        try:
            await bus.send(peer, message, ttl=600.0)
        except BusError as exc:
            raise ApiError(exc.code, _reason(exc)) from None

    async def _contacts_only_setting(self) -> bool:
        value = self._store().setting("contacts_only", "0")
        return value == "1"

    def _chat_entry(self, row: ChatRow) -> dict[str, Any]:
        return _chat_dict(row, self._contact_names)

    def _emit(self, event: dict[str, Any]) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber.send_nowait(event)
            except trio.WouldBlock:
                self.dropped_events += 1
            except trio.BrokenResourceError:
                self._subscribers.discard(subscriber)

    def _store(self) -> TwinStore:
        if self.store is None:
            raise ApiError("offline", "the twin is not running")
        return self.store

    def _bus(self) -> BusClient:
        bus = self.bus
        if bus is None:
            raise ApiError("offline", "the twin is not attached to a NIC right now")
        return bus


def _holds(stored: tuple[str, str] | None, change: tuple[bytes, str, str]) -> bool:
    """Whether a store holding status `stored` stays as it is after `change`."""
    return stored is not None and (stored[0] in _FINAL or stored == change[1:])


def _reason(exc: BusError) -> str:
    text = str(exc)
    return text.removeprefix(f"{exc.code}: ")


def _chat_payload(twin: str, text: str, ttl: float) -> tuple[PublicKey, bytes]:
    """The destination and payload of a chat message; ApiError saying what is wrong."""
    peer = parse_twin(twin)
    if not text:
        raise ApiError("malformed", "an empty message")
    if len(text) > MAX_TEXT:
        raise ApiError("tooLarge", f"a message of {len(text)} characters exceeds {MAX_TEXT}")
    if not 1.0 <= ttl <= MAX_TTL:
        raise ApiError("malformed", f"ttl must be between 1 and {MAX_TTL:g} seconds")
    payload = local_frames.text_payload(text)
    if len(payload) > MAX_PAYLOAD:
        raise ApiError("tooLarge", "the message does not fit in one bus message")
    return peer, payload


def parse_twin(text: str) -> PublicKey:
    """A twin id from its text form; ApiError(malformed) saying why not."""
    try:
        return _twin_from_text(text.strip())
    except ValueError as exc:
        raise ApiError("malformed", f"{text[:60]!r} is not a twin id: {exc}") from None


# A twin talks to the same few peers over and over: their keys' text forms (base32,
# and the checks that come with it) are worked out once. Keys are immutable.
@functools.lru_cache(maxsize=4096)
def _twin_from_text(text: str) -> PublicKey:
    return PublicKey.from_text(text)


@functools.lru_cache(maxsize=4096)
def _twin_text(raw: bytes) -> str:
    return PublicKey(raw).text


def _chat_dict(row: ChatRow, names: dict[bytes, str]) -> dict[str, Any]:
    return {"id": row.id.hex(), "peer": _twin_text(row.peer),
            "peerName": names.get(row.peer, ""), "outgoing": row.outgoing, "text": row.text,
            "at": row.at, "status": row.status, "code": row.code}


def _contact_dict(row: ContactRow) -> dict[str, Any]:
    return {"twin": PublicKey(row.twin).text, "name": row.name, "state": row.state,
            "since": row.since}


def default_twin_dir() -> Path:
    """The user's default twin state directory under XDG_STATE_HOME."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "twinmesh" / "twin"
