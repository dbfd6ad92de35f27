"""`pnicd`: the Planetary NIC daemon.

    pnicd --state-dir DIR [--config FILE] [--listen URI ...] [--peer URI ...]
          [--allow KEY ...] [--health HOST:PORT] [--log-format console|json]
          [--mdns [--mdns-password PASSWORD]]

Settings come from defaults, then the TOML file, then flags (a flag given replaces
the file's value). SIGINT and SIGTERM stop it cleanly. Exit codes: 0 clean stop,
2 bad configuration or key file (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import structlog
import trio

from twinmesh import __version__
from twinmesh.daemon import lock_state_dir, sole_user_error
from twinmesh.errors import ConfigError, KeyFileError
from twinmesh.heap import keep_heap
from twinmesh.identity.keystore import ensure_state_dir, load_or_create_identity
from twinmesh.log import configure_logging
from twinmesh.nic.admin.server import AdminServer
from twinmesh.nic.config import KEY_FILE, NicConfig, load_config
from twinmesh.nic.health import serve_health
from twinmesh.nic.lookup import TwinLookup
from twinmesh.nic.node import Nic
from twinmesh.nic.twins import TwinPort

LOCK_FILE = "pnicd.lock"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pnicd", description="twinmesh Planetary NIC daemon")
    parser.add_argument("--state-dir", type=Path, help="keys, admin socket (default: XDG state)")
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument("--listen", action="append", metavar="URI",
                        help="tcp://HOST:PORT or ws://HOST:PORT/PATH (repeatable)")
    parser.add_argument("--peer", action="append", metavar="URI",
                        help="peer to keep linked, optionally ?key=PINNED (repeatable)")
    parser.add_argument("--allow", action="append", metavar="KEY",
                        help="only these peer keys may link (repeatable)")
    parser.add_argument("--health", metavar="HOST:PORT", help="loopback health/metrics endpoint")
    parser.add_argument("--mdns", action="store_true", default=None,
                        help="LAN discovery: announce on the listen addresses, link to NICs heard")
    parser.add_argument("--mdns-password", metavar="PASSWORD",
                        help="with --mdns: link only to NICs announcing this group password")
    parser.add_argument("--log-format", choices=("console", "json"))
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--version", action="version", version=f"pnicd {__version__}")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> NicConfig:
    overrides = {
        "state_dir": str(args.state_dir) if args.state_dir else None,
        "listen": args.listen,
        "peers": args.peer,
        "allow": args.allow,
        "health": args.health,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "mdns": args.mdns,
        "mdns_password": args.mdns_password,
    }
    return load_config(args.config, overrides)


async def serve(config: NicConfig) -> None:
    """Run a NIC with its admin socket and health endpoint until SIGINT/SIGTERM."""
    log = structlog.get_logger("twinmesh.pnicd")
    identity = load_or_create_identity(config.state_dir, KEY_FILE)
    nic = Nic(identity, config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(nic.run)
            health_url = ""
            if config.health is not None:
                host, port = await nursery.start(serve_health, *config.health, nic)
                health_url = f"http://{host}:{port}/"
            # The twin port first: once the admin socket answers, everything serves.
            twins = TwinPort(nic, config.state_dir, locate=nic.overlay.locate,
                             publish=nic.overlay.publish_location)
            nic.overlay.on_packet = twins.on_packet
            # Twin lookups (the DHT) before the port serves: twins publish on attach.
            await nursery.start(TwinLookup(nic, twins).run)
            await nursery.start(twins.serve)
            admin = AdminServer(nic, config.admin_socket, health_url)
            await nursery.start(admin.serve)
            if config.mdns:
                from twinmesh.discovery.mdns import run_mdns  # imports zeroconf

                await nursery.start(run_mdns, nic, config.mdns_password)
            log.info(
                "pnicd ready",
                key=identity.public.text,
                listen=[str(u) for u in nic.listening],
                admin=str(config.admin_socket),
                twins=str(twins.socket_path),
                health=health_url or None,
            )
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_heap()
    try:
        config = build_config(args)
        configure_logging(config.log_format, config.log_level)
        ensure_state_dir(config.state_dir)
        lock = lock_state_dir(config.state_dir, LOCK_FILE, "pnicd")
        try:
            trio.run(serve, config)
        except BaseExceptionGroup as group:
            raise sole_user_error(group) from None
        finally:
            os.close(lock)
    except (ConfigError, KeyFileError) as exc:
        print(f"pnicd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
