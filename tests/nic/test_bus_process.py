"""The message bus across real pnicd processes, and kill -9 with messages in flight.

Three NICs in a line on 127.0.0.1 (a <- b -> c: a and c dial b), short link timers.
The twins run in the test process and attach with `BusClient` to each NIC's
`twins.sock`: Alice at a, Bob at c. Bob's application counts what it receives by id
and consumes it in his inbox store, so a message handed to it twice, also across a
reattachment with a new client, would show.

"Accepted" means `send` returned: the NIC has committed the message. A NIC killed
with SIGKILL and restarted on the same state directory must then lose none of them
and deliver none twice. Nothing sleeps for a fixed time except where the test
waits for duplicates that must not come; every wait is a generous poll.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from twinmesh.bus.client import BusClient, BusError, text_message
from twinmesh.bus.inbox_store import InboxStore
from twinmesh.carriers.unix import connect_unix
from twinmesh.identity.keys import Identity
from twinmesh.nic.outbox_store import OutboxStore
from twinmesh.nic.twins import OUTBOX_FILE, TWINS_SOCKET
from twinmesh.testing.processes import (
    PnicdProcess,
    free_port,
    run_pnicd,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.process

TIMEOUT = 120  # per test; every wait inside is far shorter
DELIVERY = 60.0  # how long a message may take after a restart (retry cap is 8 s)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "fast.toml")


@dataclass
class Bob:
    """Bob's application: what it received, by id (attached to c, inbox store)."""

    identity: Identity
    inbox: InboxStore
    received: Counter[bytes] = field(default_factory=Counter)
    attachments: int = 0

    async def run(
        self, nic: Path, *, task_status: trio.TaskStatus[BusClient] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Attach, receive and consume until cancelled."""
        async with BusClient.connect(self.identity, nic, inbox=self.inbox) as bus:
            self.attachments += 1
            task_status.started(bus)
            while True:
                message = await bus.receive()
                self.received[message.id] += 1
                await trio.to_thread.run_sync(self.inbox.consume, message.id, time.time())

    def got_all(self, ids: list[bytes]) -> bool:
        return all(self.received[i] for i in ids)

    def duplicates(self) -> dict[str, int]:
        return {i.hex(): n for i, n in self.received.items() if n > 1}


@asynccontextmanager
async def bob_attached(bob: Bob, nic: PnicdProcess) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(bob.run, nic.state_dir)
        yield
        nursery.cancel_scope.cancel()


def nic_args(peer: PnicdProcess) -> list[str]:
    return ["--peer", peer.uri()]


@asynccontextmanager
async def line_of_three(
    tmp_path: Path, config: Path, *, a_listen: list[str] | None = None,
    b_listen: list[str] | None = None,
) -> AsyncIterator[tuple[PnicdProcess, PnicdProcess, PnicdProcess]]:
    """pnicd a, b, c in state dirs tmp_path/{a,b,c}; a and c dial b. Yields them once
    both links are up. Stopped (and reaped) on the way out, even if killed."""
    tcp = ["tcp://127.0.0.1:0"]
    async with (
        run_pnicd(tmp_path / "b", config=config, listen=b_listen or tcp) as b,
        run_pnicd(tmp_path / "a", *nic_args(b), config=config, listen=a_listen or tcp) as a,
        run_pnicd(tmp_path / "c", *nic_args(b), config=config) as c,
    ):
        await a.wait_peer_up(b.key, timeout=20)
        await c.wait_peer_up(b.key, timeout=20)
        for nic in (a, c):
            await twins_ready(nic)
        yield a, b, c


async def twins_ready(nic: PnicdProcess) -> None:
    """Wait until the NIC's twins.sock takes connections (pnicd opens it after its
    admin socket, which is what `run_pnicd` waits for)."""

    async def accepts() -> bool:
        try:
            stream = await connect_unix(nic.state_dir / TWINS_SOCKET)
        except OSError:
            return False
        await stream.aclose()
        return True

    await wait_until(accepts, 20, what=f"{nic.state_dir.name}/twins.sock accepting")


async def send_all(alice: BusClient, bob: Identity, count: int, label: str) -> list[bytes]:
    """Send `count` messages; the ids, each accepted (stored by Alice's NIC)."""
    return [await alice.send(bob.public, text_message(f"{label} {i}")) for i in range(count)]


async def all_delivered(alice: BusClient, ids: list[bytes]) -> dict[bytes, tuple[str, str]]:
    statuses = {}
    for message_id in ids:
        statuses[message_id] = await alice.wait_status(message_id, timeout=DELIVERY)
    return statuses


def stored_ids(state_dir: Path) -> set[bytes]:
    """The ids in a (stopped) NIC's outbox file."""
    with OutboxStore(state_dir / OUTBOX_FILE) as store:
        return {entry.id for entry in store.load()}


async def test_messages_cross_two_hops_exactly_once(tmp_path: Path, config: Path) -> None:
    alice, bob = Identity.generate(), Bob(Identity.generate(),
                                          InboxStore(tmp_path / "bob-inbox.sqlite3"))
    with trio.fail_after(TIMEOUT), bob.inbox:
        async with (
            line_of_three(tmp_path, config) as (a, _, c), bob_attached(bob, c),
            BusClient.connect(alice, a.state_dir) as a_bus,
        ):
            ids = await send_all(a_bus, bob.identity, 20, "hello")
            statuses = await all_delivered(a_bus, ids)
            await wait_until(lambda: bob.got_all(ids), DELIVERY, what="all received")
    assert set(statuses.values()) == {("delivered", "")}
    assert set(bob.received) == set(ids) and not bob.duplicates()


async def test_kill_9_of_the_middle_nic_loses_and_duplicates_nothing(
    tmp_path: Path, config: Path
) -> None:
    alice, bob = Identity.generate(), Bob(Identity.generate(),
                                          InboxStore(tmp_path / "bob-inbox.sqlite3"))
    b_listen = [f"tcp://127.0.0.1:{free_port()}"]  # it comes back on the same address
    with trio.fail_after(TIMEOUT), bob.inbox:
        async with (
            line_of_three(tmp_path, config, b_listen=b_listen) as (a, b, c), bob_attached(bob, c),
            BusClient.connect(alice, a.state_dir) as a_bus,
        ):
            ids = await send_all(a_bus, bob.identity, 15, "before")
            b.process.kill()  # SIGKILL, with some of them in flight through b
            await b.process.wait()
            # Accepted while the path is down: they wait in a's outbox.
            ids += await send_all(a_bus, bob.identity, 15, "while b is down")
            async with run_pnicd(tmp_path / "b", config=config, listen=b_listen) as again:
                assert again.key == b.key
                await twins_ready(again)
                ids += await send_all(a_bus, bob.identity, 5, "after")
                statuses = await all_delivered(a_bus, ids)
                await wait_until(lambda: bob.got_all(ids), DELIVERY, what="all received")
                await trio.sleep(1.0)  # retries still in the air would land now
    assert {s for s in statuses.values()} == {("delivered", "")}, statuses
    assert set(bob.received) == set(ids) and len(ids) == 35
    assert not bob.duplicates(), bob.duplicates()


@pytest.mark.parametrize("bob_away", [False, True], ids=["bob-attached", "bob-away"])
async def test_kill_9_of_the_source_nic_loses_and_duplicates_nothing(
    tmp_path: Path, config: Path, bob_away: bool
) -> None:
    """Alice's NIC is killed right after `send` returned for every message. With Bob
    attached, some are delivered (and perhaps acked) before the kill, the rest are on
    the way; with Bob away, all of them wait in the outbox. After the restart, and
    with Bob reattached with a new client on the same inbox, each arrives once."""
    alice, bob = Identity.generate(), Bob(Identity.generate(),
                                          InboxStore(tmp_path / "bob-inbox.sqlite3"))
    a_listen = [f"tcp://127.0.0.1:{free_port()}"]
    with trio.fail_after(TIMEOUT), bob.inbox:
        async with line_of_three(tmp_path, config, a_listen=a_listen) as (a, b, c):
            if bob_away:
                # Bob says where he is, then leaves: messages for him wait at a.
                async with bob_attached(bob, c):
                    pass
            async with trio.open_nursery() as bob_side:
                if not bob_away:
                    await bob_side.start(bob.run, c.state_dir)
                async with BusClient.connect(alice, a.state_dir) as a_bus:
                    ids = await send_all(a_bus, bob.identity, 40, "accepted")
                    a.process.kill()  # right after the last "accepted"
                    await a.process.wait()
                    # The client notices: no receive() or wait_status() hangs on.
                    with pytest.raises(BusError) as info:
                        await a_bus.receive()
                    assert info.value.code == "offline"
                    await a_bus.wait_status(ids[-1], timeout=TIMEOUT)
                bob_side.cancel_scope.cancel()  # Bob detaches too
            stored = stored_ids(a.state_dir)
            # Every accepted message is still in the outbox or was acked, and an ack
            # only ever follows Bob's inbox storing it.
            assert all(i in stored or bob.inbox.remembers(i) for i in ids)
            if bob_away:
                assert stored == set(ids)

            async with run_pnicd(tmp_path / "a", *nic_args(b), config=config,
                                 listen=a_listen) as again:
                assert again.key == a.key
                await twins_ready(again)
                async with (
                    BusClient.connect(alice, again.state_dir) as a_bus,
                    bob_attached(bob, c),
                ):
                    await wait_until(lambda: bob.got_all(ids), DELIVERY,
                                     what="all received")
                    statuses = await all_delivered(a_bus, ids)
                    await trio.sleep(1.0)  # retries still in the air would land now
    assert set(bob.received) == set(ids), len(set(ids) - set(bob.received))
    assert not bob.duplicates(), bob.duplicates()
    # Acked before the kill or after the restart: the restarted NIC knows each
    # finished status (it keeps them in the outbox file), none is "unknown".
    assert set(statuses.values()) == {("delivered", "")}, statuses
    assert bob.attachments >= 2
