"""Real `pnicd` and `twinctl` processes on 127.0.0.1, for end-to-end tests.

    async with (
        run_pnicd(tmp_path / "a") as a,                       # tcp://127.0.0.1:0
        run_pnicd(tmp_path / "b", "--peer", a.uri("tcp")) as b,  # pinned to a's key
    ):
        await b.wait_peer_up(a.key)
        rows = await twinctl_json("--nic", b.state_dir, "nic", "peers")

`run_pnicd` starts the real `pnicd` console script in a state directory, waits until
its admin socket answers `self`, and yields a `PnicdProcess` holding what it bound
(key, listen URIs, health URL). Leaving the block stops the daemon -- SIGTERM, then
SIGKILL after `stop_timeout` -- and always reaps it, also when the test failed or the
test already killed it. Ports are chosen by the kernel (`:0`) and read back through
the admin socket; a daemon that must come back on the same port takes `free_port()`.

`prefix` runs the daemon under another command, e.g. inside a network namespace
(`netns.Lab.exec_args(node)` gives `ip netns exec NS`). The admin socket is a Unix
socket in the state directory on the shared filesystem, so everything here (and
`twinctl --nic DIR`) still reaches it from the host.

Nothing here sleeps for a fixed time: wait for a condition with `wait_until`, always
inside the test's own `trio.fail_after`.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

import trio

from twinmesh.control.admin_client import admin_call
from twinmesh.errors import AdminError

T = TypeVar("T")

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0

# Short timers so reconnects and dead-link detection happen within a second or two.
FAST_CONFIG = """\
[reconnect]
initial = 0.1
max = 1.0

[link]
keepalive_interval = 0.2
dead_after = 1.0
"""


def console_script(name: str) -> list[str]:
    """The command that runs console script `name` of this environment.

    The script next to the running interpreter (the venv's `bin/`) when it exists,
    else `python -m` on its module, so tests also run from an uninstalled tree.
    """
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    modules = {"pnicd": "twinmesh.nic.main", "twinctl": "twinmesh.cli.twinctl"}
    return [sys.executable, "-m", modules[name]]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, close).

    Someone else may take it before it is used again; only use this where a fixed
    port is needed (a daemon restarted on the same address).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(path: Path, text: str = FAST_CONFIG) -> Path:
    """Write a TOML config file for `pnicd --config` and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    return path


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T | None]],
    timeout: float = ...,
    *,
    interval: float = ...,
    what: str = ...,
) -> T: ...


@overload
async def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = ...,
    *,
    interval: float = ...,
    what: str = ...,
) -> T: ...


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    *,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Call `predicate` (sync or async) until it returns something truthy; return that.

    Raises AssertionError naming `what` and the last value seen when `timeout`
    seconds pass first. Exceptions from `predicate` propagate.
    """
    last: Any = None
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            last = result
            if result:
                return result
            await trio.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout:g} s; last value: {last!r}")


async def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """GET `url` (plain http://HOST:PORT/PATH) with one HTTP/1.0 request: (status, body)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ValueError(f"expected http://HOST:PORT/PATH, got {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"GET {target} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n"
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        async with stream:
            await stream.send_all(request.encode("ascii"))
            chunks = []
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode("utf-8", "replace")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for every sample line (comments skipped)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@dataclass
class CompletedCommand:
    """What a finished command printed and how it exited (output decoded as UTF-8)."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


async def run_command(
    args: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> CompletedCommand:
    """Run a command to completion, capturing stdout and stderr; never raises on exit code."""
    argv = [os.fspath(a) for a in args]
    with trio.fail_after(timeout):
        done = await trio.run_process(
            argv,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=_child_env(env),
        )
    return CompletedCommand(
        argv, done.returncode, done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


async def twinctl(*args: str | os.PathLike[str]) -> CompletedCommand:
    """Run the real `twinctl` console script with `args`."""
    return await run_command([*console_script("twinctl"), *args])


async def twinctl_json(*args: str | os.PathLike[str]) -> Any:
    """Run `twinctl ARGS --json`; return the parsed JSON. AssertionError if it fails."""
    done = await twinctl(*args, "--json")
    if done.returncode != 0:
        raise AssertionError(
            f"twinctl {' '.join(done.args[1:])} exited {done.returncode}: {done.stderr.strip()}"
        )
    return json.loads(done.stdout)


async def run_pnicd_to_exit(
    state_dir: Path,
    *args: str | os.PathLike[str],
    timeout: float = 20.0,
    prefix: Sequence[str] = (),
) -> CompletedCommand:
    """Run `pnicd --state-dir STATE_DIR ARGS` expecting it to exit by itself (bad setup)."""
    return await run_command(
        [*prefix, *console_script("pnicd"), "--state-dir", state_dir, *args], timeout=timeout
    )


@dataclass
class PnicdProcess:
    """A running pnicd and what it reported through its admin socket at start."""

    state_dir: Path
    process: trio.Process
    stderr_path: Path
    key: str = ""
    listen: list[str] = field(default_factory=list)
    health_url: str = ""
    pid: int = 0

    def uri(self, scheme: str = "tcp", *, pinned: bool = True) -> str:
        """The first listen URI with `scheme`, with `?key=` pinning this NIC by default."""
        for uri in self.listen:
            if uri.startswith(f"{scheme}://"):
                return f"{uri}?key={self.key}" if pinned else uri
        raise AssertionError(f"{self.state_dir.name} does not listen on {scheme}: {self.listen}")

    @property
    def port(self) -> int:
        """The port of the first listen URI."""
        return int(self.listen[0].rsplit(":", 1)[1].split("/", 1)[0])

    async def self_info(self) -> Any:
        """`self` through the admin socket, in process (fast; for polling)."""
        return await admin_call(self.state_dir, "self")

    async def peers(self) -> list[dict[str, Any]]:
        """`peers` through the admin socket, in process (fast; for polling)."""
        rows: list[dict[str, Any]] = await admin_call(self.state_dir, "peers")
        return rows

    async def peer(self, key: str) -> dict[str, Any] | None:
        """The row for `key`, preferring one that is up; None when there is none."""
        rows = [r for r in await self.peers() if r["key"] == key]
        rows.sort(key=lambda r: r["state"] != "up")
        return rows[0] if rows else None

    async def routes(self) -> dict[str, dict[str, Any]]:
        """`routes` through the admin socket, in process, by destination key."""
        rows: list[dict[str, Any]] = await admin_call(self.state_dir, "routes")
        return {row["destination"]: row for row in rows}

    async def ping(self, key: str, timeout: float = 2.0) -> dict[str, Any]:
        """One overlay ping through the admin socket, in process (fast; for polling).

        {"rtt": seconds or None, "hops": N, "error": "" | "timeout" | "noRoute" | ...}
        """
        reply: dict[str, Any] = await admin_call(self.state_dir, "ping", key, timeout=timeout)
        return reply

    async def wait_peer_up(self, key: str, timeout: float = 10.0) -> dict[str, Any]:
        async def up() -> dict[str, Any] | None:
            row = await self.peer(key)
            return row if row is not None and row["state"] == "up" else None

        return await wait_until(up, timeout, what=f"link to {key[:12]} up on {self.state_dir.name}")

    def stderr_text(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        try:
            return self.stderr_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` and wait for the exit code (SIGKILL if it outlives `timeout`)."""
        await _stop(self.process, sig, timeout)
        assert self.process.returncode is not None
        return self.process.returncode


@asynccontextmanager
async def run_pnicd(
    state_dir: Path,
    *args: str | os.PathLike[str],
    config: Path | None = None,
    health: bool = True,
    listen: Sequence[str] | None = ("tcp://127.0.0.1:0",),
    start_timeout: float = START_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
    prefix: Sequence[str] = (),
) -> AsyncIterator[PnicdProcess]:
    """Start `pnicd` in `state_dir` and yield it once its admin socket answers.

    The command line is `prefix` (e.g. `ip netns exec NS`, which execs pnicd in
    place, so the process is still pnicd itself), then `pnicd --state-dir`, then
    `--config` when given, one `--listen` per `listen` URI, `--health 127.0.0.1:0`
    unless `health` is false, then `args`. Stderr goes to `<state_dir>.stderr.log`
    next to the state directory. On exit the daemon is stopped (SIGTERM, SIGKILL after
    `stop_timeout`) and reaped.
    """
    argv: list[str] = [*prefix, *console_script("pnicd"), "--state-dir", str(state_dir)]
    if config is not None:
        argv += ["--config", str(config)]
    for uri in listen or ():
        argv += ["--listen", uri]
    if health:
        argv += ["--health", "127.0.0.1:0"]
    argv += [os.fspath(a) for a in args]
    stderr_path = state_dir.with_name(state_dir.name + ".stderr.log")
    stderr_path.parent.mkdir(parents=True, exist_ok=True)
    with open(stderr_path, "ab") as stderr:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            env=_child_env(None),
        )
    nic = PnicdProcess(state_dir, process, stderr_path)
    try:
        info = await _wait_admin(nic, start_timeout)
        nic.key, nic.listen, nic.pid = info["key"], list(info["listen"]), int(info["pid"])
        nic.health_url = str(info["health"])
        yield nic
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process, signal.SIGTERM, stop_timeout)


async def _wait_admin(nic: PnicdProcess, timeout: float) -> Any:
    with trio.move_on_after(timeout):
        while True:
            if nic.process.returncode is not None:
                raise AssertionError(
                    f"pnicd in {nic.state_dir} exited with {nic.process.returncode} "
                    f"before its admin socket answered; stderr:\n{nic.stderr_text()}"
                )
            try:
                return await nic.self_info()
            except AdminError:
                await trio.sleep(0.05)
    raise AssertionError(
        f"pnicd in {nic.state_dir} did not answer on its admin socket within {timeout:g} s; "
        f"stderr:\n{nic.stderr_text()}"
    )


async def _stop(process: trio.Process, sig: int, timeout: float) -> None:
    """Signal `process` unless it already exited; SIGKILL after `timeout`; always reap."""
    if process.returncode is None:
        with suppress(ProcessLookupError):
            process.send_signal(sig)
        with trio.move_on_after(timeout):
            await process.wait()
    if process.returncode is None:
        with suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # Only ever in the test's terminal: keep colour codes out of captured logs.
    env.pop("FORCE_COLOR", None)
    if extra:
        env.update(extra)
    return env


@dataclass
class TwindProcess:
    """A running `twind` (one twin): its state dir, key and the process."""

    state_dir: Path
    process: trio.Process
    stderr_path: Path
    key: str = ""

    async def call(self, which: str, value: Any = None, **options: Any) -> Any:
        """One request on the twin's control socket (`twinmesh.control.twin_client`)."""
        from twinmesh.control.twin_client import twin_call

        return await twin_call(self.state_dir, which, value, **options)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        await _stop(self.process, sig, timeout)
        assert self.process.returncode is not None
        return self.process.returncode


@asynccontextmanager
async def run_twind(
    state_dir: Path,
    *nics: Path,
    args: Sequence[str] = (),
    start_timeout: float = START_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
    attached: bool = True,
) -> AsyncIterator[TwindProcess]:
    """Start `twind --state-dir DIR --nic ...` and yield it once its control socket
    answers (and, with `attached`, once it is attached to a NIC). Stopped and reaped
    on exit like `run_pnicd`; stderr in `<state_dir>.stderr.log`."""
    from twinmesh.errors import ApiError

    argv = [*console_script("twind"), "--state-dir", str(state_dir)]
    for nic in nics:
        argv += ["--nic", str(nic)]
    argv += list(args)
    stderr_path = state_dir.with_name(state_dir.name + ".stderr.log")
    stderr_path.parent.mkdir(parents=True, exist_ok=True)
    with open(stderr_path, "ab") as stderr:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            env=_child_env(None))
    twin = TwindProcess(state_dir, process, stderr_path)
    try:
        with trio.move_on_after(start_timeout):
            while True:
                if process.returncode is not None:
                    raise AssertionError(f"twind in {state_dir} exited with "
                                         f"{process.returncode}; stderr:\n{twin.stderr_text()}")
                try:
                    status = await twin.call("status")
                    if status["connected"] or not attached:
                        twin.key = status["twin"]
                        break
                except ApiError:
                    pass
                await trio.sleep(0.05)
        if not twin.key:
            raise AssertionError(f"twind in {state_dir} not ready within {start_timeout:g} s; "
                                 f"stderr:\n{twin.stderr_text()}")
        yield twin
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process, signal.SIGTERM, stop_timeout)
