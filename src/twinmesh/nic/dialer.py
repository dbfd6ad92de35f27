"""Keeps one configured outbound peer linked: dial, run, back off, dial again.

The delay schedule is a pure function (`backoff`) so it can be tested without
a clock: exponential from `initial`, capped at `max`, with +/- `jitter` spread so a
restarted hub is not hit by every peer in the same instant.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
import trio

from twinmesh.carriers.uri import PeerUri
from twinmesh.identity.keys import PublicKey
from twinmesh.nic.config import ReconnectConfig
from twinmesh.proto.backoff import backoff_delay

if TYPE_CHECKING:
    from twinmesh.nic.session import LinkSession

# A link that stayed up this long resets the backoff to `initial`.
STABLE_AFTER = 10.0
DIAL_TIMEOUT = 5.0


def backoff(failures: int, config: ReconnectConfig, rng: random.Random) -> float:
    """The wait before the next dial after `failures` consecutive failures (>= 1)."""
    return backoff_delay(
        failures, initial=config.initial, cap=config.max, jitter=config.jitter, rng=rng
    )


class Dialer:
    """State of one outbound peer, shown by the admin `peers` command.

    Mutable fields are written only by `run()`, `attach()` and `stop()`.
    """

    def __init__(
        self,
        uri: PeerUri,
        config: ReconnectConfig,
        link: Callable[[Dialer], Awaitable[None]],
        standby: Callable[[Dialer], Awaitable[None]],
        rng: random.Random,
    ) -> None:
        self.uri = uri
        self.config = config
        self.state = "connecting"
        self.last_error = ""
        self.retry_at: float | None = None  # trio clock
        self.session: LinkSession | None = None
        self.failures = 0
        self.learned_key: PublicKey | None = uri.key
        self._link = link
        self._standby = standby
        self._rng = rng
        self._cancel = trio.CancelScope()
        self.log = structlog.get_logger("twinmesh.dialer").bind(uri=str(uri))

    def stop(self) -> None:
        self._cancel.cancel()

    def attach(self, session: LinkSession) -> None:
        """Called by the link function once the carrier is connected."""
        self.session = session
        self.state = "handshaking"

    async def run(self) -> None:
        with self._cancel:
            while True:
                # Already linked to this peer (it dialled us): wait until that link ends.
                await self._standby(self)
                self.state = "connecting"
                self.retry_at = None
                started = time.monotonic()
                try:
                    # Connects (within DIAL_TIMEOUT), attaches and runs the session to its end.
                    await self._link(self)
                except OSError as exc:
                    self.last_error = f"dial failed: {_describe(exc)}"
                session, self.session = self.session, None
                if session is not None:
                    if session.peer is not None and session.up_since is not None:
                        self.learned_key = session.peer
                    if session.down is not None:
                        self.last_error = session.down.reason
                    if session.up_since is not None and time.monotonic() - started >= STABLE_AFTER:
                        self.failures = 0
                self.failures += 1
                delay = backoff(self.failures, self.config, self._rng)
                self.state = "backoff"
                self.retry_at = trio.current_time() + delay
                self.log.info(
                    "peer unreachable, retrying", error=self.last_error, retry_in=round(delay, 2)
                )
                await trio.sleep(delay)


def _describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError) and not exc.strerror:
        return str(exc) or "timed out"
    return exc.strerror or str(exc) or type(exc).__name__
