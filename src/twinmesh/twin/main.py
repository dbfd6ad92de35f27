"""`twind`: the twin daemon.

    twind --state-dir DIR --nic PATH [--nic PATH ...] [--http 127.0.0.1:PORT] [--name NAME]
          [--log-format console|json] [--log-level LEVEL]
    twind --host N --state-root DIR --nic PATH [--nic PATH ...]    # N twins, one process

PATH is a NIC's state dir or its `twins.sock`; with several, the first is preferred and
the others are where the twin moves when it stays unreachable. The twin's key is
created on first start (`twin.key`, dir 0700, key 0600); its control socket
`control.sock` (0600) serves `twinctl`; `--http` serves the browser page on loopback,
its URL with the access token written to `web.url` (and printed).

Hosting mode runs N twins in one process (for hosting providers and scale runs): twin
i lives in DIR/twin-NNNN with its own key, stores, control socket and NIC session,
attached to the i-th NIC of the list (round robin), the others its fallbacks.

SIGINT and SIGTERM stop it cleanly. Exit codes: 0 clean stop, 2 bad arguments, key
file or state dir (one line on stderr).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
import trio

from twinmesh import __version__
from twinmesh.daemon import lock_state_dir, sole_user_error
from twinmesh.errors import ConfigError, KeyFileError, StorageError
from twinmesh.group_sync import GroupSync
from twinmesh.heap import keep_heap
from twinmesh.identity.keystore import ensure_state_dir, load_or_create_identity
from twinmesh.log import configure_logging
from twinmesh.twin.control import serve_control
from twinmesh.twin.service import (
    CONTROL_SOCKET,
    KEY_FILE,
    WEB_URL_FILE,
    Twin,
    default_twin_dir,
)

LOCK_FILE = "twind.lock"
MAX_HOSTED = 100_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="twind", description="twinmesh twin daemon")
    parser.add_argument("--state-dir", type=Path,
                        help="the twin's keys and data (default: XDG state dir)")
    parser.add_argument("--nic", action="append", type=Path, metavar="PATH", required=True,
                        help="NIC state dir or twins.sock (repeatable: fallbacks)")
    parser.add_argument("--http", metavar="127.0.0.1:PORT",
                        help="serve the browser page on this loopback address (port 0: any)")
    parser.add_argument("--name", help="display name of this twin (kept in its store)")
    parser.add_argument("--host", type=int, metavar="N",
                        help="hosting mode: run N twins in this process under --state-root")
    parser.add_argument("--state-root", type=Path, metavar="DIR",
                        help="with --host: one state dir per twin under DIR")
    parser.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default="info")
    parser.add_argument("--version", action="version", version=f"twind {__version__}")
    args = parser.parse_args(argv)
    if args.host is not None:
        if args.state_root is None:
            parser.error("--host needs --state-root")
        if not 1 <= args.host <= MAX_HOSTED:
            parser.error(f"--host takes 1 to {MAX_HOSTED} twins")
        if args.http or args.state_dir:
            parser.error("--host runs without --http and --state-dir (one dir per twin)")
    return args


async def serve_twin(state_dir: Path, nics: list[Path], *, http: str | None = None,
                     name: str | None = None) -> None:
    """Run one twin with its control socket (and web page) until SIGINT/SIGTERM."""
    log = structlog.get_logger("twinmesh.twind")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            twin = await _start_twin(nursery, state_dir, nics)
            if name is not None:
                await twin.set_settings(name=name)
            url = ""
            stale = state_dir / WEB_URL_FILE
            stale.unlink(missing_ok=True)  # a page of an earlier run is not served now
            if http is not None:
                url = await _start_web(nursery, twin, http)
            log.info("twind ready", twin=twin.key.text, state_dir=str(state_dir),
                     control=str(state_dir / CONTROL_SOCKET), nic=str(nics[0]),
                     web=url or None)
            if url:
                print(f"twind: {twin.key.text} — open {url}", file=sys.stderr, flush=True)
            await _until_signal(signals, nursery, log)


async def serve_hosted(root: Path, count: int, nics: list[Path]) -> None:
    """Run `count` twins in this process, each in root/twin-NNNN."""
    log = structlog.get_logger("twinmesh.twind")
    ensure_state_dir(root)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        group_sync = GroupSync()  # the twins' inbox fsyncs go in rounds
        async with trio.open_nursery() as nursery:
            await nursery.start(group_sync.run)  # its thread, for the whole run
            for i in range(count):
                state_dir = ensure_state_dir(root / f"twin-{i:04d}")
                preferred = i % len(nics)
                await _start_twin(nursery, state_dir, nics[preferred:] + nics[:preferred],
                                  group_sync=group_sync)
            # Everything made so far lives as long as the process: out of the cyclic
            # collector's sight, so its full passes stop walking hundreds of twins.
            gc.freeze()
            log.info("twind ready", twins=count, state_root=str(root), nics=len(nics))
            await _until_signal(signals, nursery, log)


async def _start_twin(nursery: trio.Nursery, state_dir: Path, nics: list[Path], *,
                      group_sync: GroupSync | None = None) -> Twin:
    identity = load_or_create_identity(state_dir, KEY_FILE)
    twin = Twin(identity, state_dir, nics, group_sync=group_sync)
    await nursery.start(twin.run)
    await nursery.start(serve_control, twin, state_dir / CONTROL_SOCKET)
    return twin


async def _start_web(nursery: trio.Nursery, twin: Twin, http: str) -> str:
    from twinmesh.twin import web  # the page's modules load only when it is served

    host, port = web.parse_http_address(http)
    token = web.load_or_create_token(twin.state_dir)
    bound_host, bound_port = await nursery.start(web.serve_web, twin, host, port, token)
    url: str = web.page_url(bound_host, bound_port, token)
    web.write_page_url(twin.state_dir, url)
    return url


async def _until_signal(signals: AsyncIterator[int], nursery: trio.Nursery,
                        log: structlog.typing.FilteringBoundLogger) -> None:
    async for signum in signals:
        log.info("stopping", signal=signal.Signals(signum).name)
        nursery.cancel_scope.cancel()
        return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_heap()
    try:
        configure_logging(args.log_format, args.log_level)
        nics = [path.expanduser().resolve() for path in args.nic]
        if args.host is not None:
            root = args.state_root.expanduser()
            lock = lock_state_dir(ensure_state_dir(root), LOCK_FILE, "twind")
            try:
                trio.run(serve_hosted, root, args.host, nics)
            except BaseExceptionGroup as group:
                raise sole_user_error(group) from None
            finally:
                os.close(lock)
            return 0
        state_dir = ensure_state_dir((args.state_dir or default_twin_dir()).expanduser())
        lock = lock_state_dir(state_dir, LOCK_FILE, "twind")
        try:
            trio.run(lambda: serve_twin(state_dir, nics, http=args.http, name=args.name))
        except BaseExceptionGroup as group:
            raise sole_user_error(group) from None
        finally:
            os.close(lock)
    except (ConfigError, KeyFileError, StorageError) as exc:
        print(f"twind: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
