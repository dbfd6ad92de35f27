"""findDigitalTwinById across real pnicd processes: three NICs in a line on 127.0.0.1
(b dials a, c dials b), Alice attached at a, Bob at c; Alice's `BusClient.find`
returns Bob's signed record, naming c, two overlay hops away."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from twinmesh.bus.client import BusClient, BusError, Found
from twinmesh.carriers.unix import connect_unix
from twinmesh.identity.keys import Identity, PublicKey
from twinmesh.nic.twins import TWINS_SOCKET
from twinmesh.testing.processes import PnicdProcess, run_pnicd, wait_until, write_config

pytestmark = pytest.mark.process


async def twins_ready(nic: PnicdProcess) -> bool:
    try:
        stream = await connect_unix(nic.state_dir / TWINS_SOCKET)
    except OSError:
        return False
    await stream.aclose()
    return True


async def test_find_across_three_nics_in_a_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "fast.toml")
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(90):
        async with (
            run_pnicd(tmp_path / "a", config=config) as a,
            run_pnicd(tmp_path / "b", "--peer", a.uri(), config=config) as b,
            run_pnicd(tmp_path / "c", "--peer", b.uri(), config=config) as c,
        ):
            for nic in (a, c):
                await wait_until(lambda nic=nic: twins_ready(nic), 20, what="twins.sock")
            async with (
                BusClient.connect(alice, a.state_dir) as a_bus,
                BusClient.connect(bob, c.state_dir),
            ):
                async def found() -> Found | None:
                    # Until the NICs know each other and Bob's record reached its
                    # replicas, the lookup answers unknownTwin.
                    try:
                        answer = await a_bus.find(bob.public)
                    except BusError as exc:
                        assert exc.code == "unknownTwin"
                        return None
                    return answer if answer.hops == 2 else None

                answer = await wait_until(found, 30, interval=0.2, what="Bob found from a")
                assert answer.location.twin == bob.public
                assert answer.location.nic == PublicKey.from_text(c.key)
                assert answer.location.verify()
                assert answer.queried >= 1
