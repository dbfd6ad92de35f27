"""Peer systems, measured in the same run: Reticulum and py-libp2p (/work/shared/PEERS.md).

The peers never enter twinmesh's environment. They live in a separate benchmark venv
(`BENCH_VENV`, default `.venv-bench`, which `make bench` creates with pinned versions
and this project); each peer's driver script in this folder runs under that venv's
python as its own processes and prints one JSON object, which this group turns into
figures. Without that venv, or when a driver fails, the peer's rows say "not measured"
and why, and the rest of the run goes on.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

import trio

from bench.measure import Context, Figure, Stats

TITLE = "Peer systems"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DRIVER_TIMEOUT = {"reticulum": 420.0, "libp2p": 300.0}  # one driver run, all included
LARGE = 64 * 1024

# key → (shown name, unit): every figure this group adds, measured or not.
EXPECTED: dict[str, tuple[str, str, str]] = {
    "peer.rns.channel.direct": ("reticulum", "Reticulum Channel, acked 100 B msgs, direct",
                                "msgs/s"),
    "peer.rns.channel.2hop": ("reticulum",
                              "Reticulum Channel, acked 100 B msgs, 2 hops (via a transport "
                              "node)", "msgs/s"),
    "peer.rns.resource.64k": ("reticulum", "Reticulum Resource, 64 KiB each, direct", "MB/s"),
    "peer.rns.rtt": ("reticulum", "Reticulum delivery-proof RTT, 100 B, direct", "ms"),
    "peer.rns.rtt.2hop": ("reticulum", "Reticulum delivery-proof RTT, 100 B, 2 hops", "ms"),
    "peer.rns.link": ("reticulum", "Reticulum Link setup, direct", "ms"),
    "peer.libp2p.stream.100b": ("libp2p",
                                "libp2p stream, 100 B writes, un-acked, direct", "msgs/s"),
    "peer.libp2p.stream.64k": ("libp2p", "libp2p stream, 64 KiB writes, direct", "MB/s"),
    "peer.libp2p.rtt": ("libp2p", "libp2p stream echo RTT, 100 B, direct", "ms"),
    "peer.libp2p.connect": ("libp2p",
                            "libp2p connect (TCP + Noise XX + yamux), "
                            "max_connections_per_peer=1", "ms"),
}
FLOORS = {
    "peer.rns.channel.direct": "floor.tcp_100b",
    "peer.rns.channel.2hop": "floor.tcp_100b",
    "peer.rns.resource.64k": "floor.tcp_64k",
    "peer.rns.rtt": "floor.echo_rtt",
    "peer.rns.rtt.2hop": "floor.echo_rtt",
    "peer.libp2p.stream.100b": "floor.tcp_100b",
    "peer.libp2p.stream.64k": "floor.tcp_64k",
    "peer.libp2p.rtt": "floor.echo_rtt",
}

_versions: dict[str, str] = {}  # peer → version, as the drivers reported
_plans: dict[str, dict[str, int]] = {}
_notes: list[str] = []


def bench_python() -> Path:
    venv = Path(os.environ.get("BENCH_VENV", ROOT / ".venv-bench"))
    if not venv.is_absolute():
        venv = ROOT / venv
    return venv / "bin" / "python"


def machine_rows() -> list[tuple[str, str]]:
    """For the report's machine table: the peers' versions in this run."""
    if not _versions:
        return []
    shown = ", ".join(f"{name} {version}" for name, version in sorted(_versions.items()))
    return [("peers", f"{shown} (in {bench_python().parent.parent.name}, not in the project)")]


async def run(ctx: Context) -> None:
    python = bench_python()
    for peer, driver in (("reticulum", "reticulum_driver.py"), ("libp2p", "libp2p_driver.py")):
        ctx.progress.start(f"peer {peer}: driver under {python.parent.parent.name}")
        if not python.exists():
            reason = (f"no benchmark environment ({python.parent.parent.name}; "
                      "`make bench` creates it)")
            _missing(ctx, peer, reason)
            ctx.progress.done(text=f"not measured: {reason}")
            continue
        data = await _run_driver(python, HERE / driver, ctx.quick, DRIVER_TIMEOUT[peer])
        if "error" in data:
            _missing(ctx, peer, str(data["error"])[:300])
            ctx.progress.done(text=f"not measured: {str(data['error'])[:120]}")
            continue
        _versions["rns" if peer == "reticulum" else "libp2p"] = str(data.get("version", "?"))
        _plans[peer] = dict(data.get("plan", {}))
        if peer == "reticulum":
            _reticulum(ctx, data)
        else:
            _libp2p(ctx, data)
        ctx.progress.done(text="done")


async def _run_driver(python: Path, driver: Path, quick: bool, timeout: float) -> dict[str, Any]:
    cmd = [str(python), str(driver), "run", *(["--quick"] if quick else [])]
    env = dict(os.environ)
    env.pop("BENCH_PROFILE", None)
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                          check=False, stdin=subprocess.DEVNULL, env=env)
    except trio.TooSlowError:
        return {"error": f"the driver did not finish within {timeout:g} s"}
    except OSError as exc:
        return {"error": f"cannot run {python}: {exc}"}
    lines = [line for line in done.stdout.decode("utf-8", "replace").splitlines()
             if line.startswith("{")]
    if not lines:
        tail = done.stderr.decode("utf-8", "replace").strip()[-300:]
        return {"error": f"the driver exited {done.returncode} without a result: {tail}"}
    try:
        data: dict[str, Any] = json.loads(lines[-1])
    except ValueError as exc:
        return {"error": f"unreadable driver output: {exc}"}
    return data


def _missing(ctx: Context, peer: str, reason: str) -> None:
    for key, (owner, name, unit) in EXPECTED.items():
        if owner == peer:
            ctx.add(Figure(key=key, group=TITLE, name=name, value=float("nan"),
                           unit=unit,  # type: ignore[arg-type]
                           missing=reason))


def _add(ctx: Context, key: str, samples: list[float], *, spread: str = "minmax",
         detail: str = "", notes: list[str] | None = None, missing: str = "") -> None:
    _, name, unit = EXPECTED[key]
    if not samples:
        ctx.add(Figure(key=key, group=TITLE, name=name, value=float("nan"),
                       unit=unit,  # type: ignore[arg-type]
                       missing=missing or "no complete run",
                       notes=notes or []))
        return
    stats = Stats.of(samples)
    if spread == "pct":
        bounds, kind = (stats.p10, stats.p90), "p10-p90"
    else:
        bounds, kind = (stats.low, stats.high), f"min-max of {stats.n}"
    ctx.add(Figure(key=key, group=TITLE, name=name, value=stats.median,
                   unit=unit,  # type: ignore[arg-type]
                   spread=bounds, spread_kind=kind, detail=detail, notes=notes or [],
                   floor_key=FLOORS.get(key)))


def _floats(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else []


def _reticulum(ctx: Context, data: dict[str, Any]) -> None:
    for hops in ("direct", "2hop"):
        result = data.get(hops, {})
        error = str(result.get("error", ""))
        notes = [str(n) for n in result.get("notes", [])]
        received = result.get("server_received", {})
        sent = result.get("channel_sent")
        check = ""
        if isinstance(received, dict) and sent is not None:
            check = (f"; the server got {received.get('channel')} of {sent} messages"
                     if received.get("channel") != sent else
                     f"; the server got all {sent} messages")
        rates = _floats(result.get("channel_msgs_per_s"))
        retransmitted = (f"; {result['channel_timeouts']} packet timeout(s), each a retransmission"
                         if "channel_timeouts" in result else "")
        _add(ctx, f"peer.rns.channel.{hops}", rates, missing=error, notes=notes,
             detail=f"window max {result.get('channel_window_max', '?')}{retransmitted}"
                    f"{check}" if rates else "")
        rtts = _floats(result.get("rtt_ms"))
        rtt_key = "peer.rns.rtt" if hops == "direct" else "peer.rns.rtt.2hop"
        _add(ctx, rtt_key, rtts, spread="pct", missing=error,
             notes=[str(n) for n in result.get("rtt_notes", [])],
             detail=f"p99 {Stats.of(rtts).p99:.2f} ms, n={len(rtts)}" if rtts else "")
        if hops == "direct":
            link = result.get("link_setup_ms")
            _add(ctx, "peer.rns.link", [float(link)] if link is not None else [],
                 missing=error, detail=f"path lookup {float(result.get('path_s', 0)) * 1e3:.1f} ms"
                 if link is not None else "")
            mbs = _floats(result.get("resource_mb_per_s"))
            per = _floats(result.get("resource_ms"))
            _add(ctx, "peer.rns.resource.64k", mbs, missing=error,
                 detail=(f"{statistics.median(per):.1f} ms per Resource (median, "
                         f"n={len(per)})") if per else "")
        elif "path_s" in result:
            _notes.append(f"Reticulum, 2 hops: the client found the path through the "
                          f"transport node in {float(result['path_s']) * 1e3:.0f} ms "
                          f"({result.get('path_hops')} hops).")


def _libp2p(ctx: Context, data: dict[str, Any]) -> None:
    result = data.get("direct", {})
    error = str(result.get("error", ""))
    notes = [str(n) for n in result.get("notes", [])]
    small = _floats(result.get("small"))
    _add(ctx, "peer.libp2p.stream.100b", small, missing=error, notes=notes,
         detail=f"{statistics.median(small) * 100 / 1e6:.2f} MB/s; no per-message ack"
         if small else "")
    large = _floats(result.get("large"))
    _add(ctx, "peer.libp2p.stream.64k", [r * LARGE / 1e6 for r in large], missing=error,
         detail=f"{statistics.median(large):,.0f} msgs/s" if large else "")
    rtts = _floats(result.get("rtt_ms"))
    _add(ctx, "peer.libp2p.rtt", rtts, spread="pct", missing=error,
         detail=f"p99 {Stats.of(rtts).p99:.2f} ms, n={len(rtts)}" if rtts else "")
    connects = _floats(result.get("connect_ms"))
    _add(ctx, "peer.libp2p.connect", connects, missing=error,
         detail=f"n={len(connects)}, each a new dialing host" if connects else "")


def method(ctx: Context) -> str:
    rns = _plans.get("reticulum", {})
    p2p = _plans.get("libp2p", {})
    extra = "".join(f"\n- {note}" for note in _notes)
    return f"""\
Run side by side with twinmesh in this run, on 127.0.0.1 only, from the driver scripts
in `bench/peers/` under the benchmark venv's python (`{bench_python().parent.parent.name}`,
created by `make bench` with pinned versions; the peers are never dependencies of
twinmesh). Every node is its own process. Ratios: against this run's floors, as for
twinmesh; twinmesh ÷ peer ratios are in the *Message bus* section.

**Reticulum** (`rns`): config files written before each node starts, with
`share_instance = No`, no AutoInterface, `discover_interfaces = No`, probes and remote
management off, and only `TCPServerInterface` / `TCPClientInterface` on 127.0.0.1
(`ingress_control = No` on them: the lab's nodes are all new, and its announce burst
limits are not what is measured). *Direct*: the server listens, the client dials it.
*2 hops*: a transport node (`enable_transport = Yes`) listens, the server and the
client both dial it. The server announces one `SINGLE` IN destination that proves every
packet and accepts every `Resource`; the client requests a path to it, opens a `Link`
and measures:

- **Channel msgs/s** (acked, sequenced, retried, like the bus): 100 B messages of a
  registered `MessageBase` type, `channel.send()` whenever `is_ready_to_send()`
  (its own adaptive window; a 0.2 ms sleep otherwise), timed until the last one is
  acknowledged (the transmit ring is empty); {rns.get("msgs", "?")} messages per run,
  median and min-max of {rns.get("runs", "?")} runs after a warm-up run. The detail
  checks the server's count.
- **delivery-proof RTT**: a 100 B packet on the link until its proof comes back;
  {rns.get("pings", "?")} after 10 warm-up ones; median, p10-p90.
- **Resource, 64 KiB** (direct): one `Resource` of 64 KiB random bytes at a time
  (`auto_compress=False`: random data does not compress), from creation to its
  concluded callback; {rns.get("resources", "?")} per run, MB/s over the run, median of
  {rns.get("resource_runs", "?")} runs. (A link packet carries at most ~16 KB on TCP, so
  64 KiB needs a Resource.)
- **Link setup**: `RNS.Link()` → established callback, once.

**py-libp2p** (`libp2p`): a listening host and a dialing host, each its own process and
trio loop; security pinned to Noise (the default also offers plaintext), yamux, mDNS,
UPnP and QUIC off, `ConnectionConfig(max_connections_per_peer=1)` (without it
`connect()` waits ~250 ms).

- **stream msgs/s, 100 B** and **MB/s, 64 KiB**: one stream, {p2p.get("small", "?")} x
  100 B or {p2p.get("large", "?")} x 64 KiB separate `write()`s, **no per-message ack**
  (libp2p has no app-level ack, retry or dedup); the server reads until it has all the
  bytes and writes one byte back, which ends the timing; median and min-max of
  {p2p.get("runs", "?")} runs after a warm-up run.
- **stream echo RTT**: 100 B written, echoed by the server's handler, read back (timed
  here: libp2p's ping helper reports whole milliseconds); {p2p.get("pings", "?")} after
  20 warm-up ones.
- **connect**: `host.connect()` of a fresh dialing host (TCP, multistream, Noise XX,
  yamux); {p2p.get("connects", "?")} times.
{extra}
"""
