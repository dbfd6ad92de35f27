"""The twin's browser page and its websocket, on one loopback port.

Theory of operation
-------------------
One `websockets.trio` server answers every connection. Its `process_request` hook
(`route`, plain code without I/O) looks at the HTTP request first:

- ``GET /?token=T`` (or ``/index.html?token=T``) -> the page; without the right token 403.
- ``GET /twinmesh.js``, ``/app.js``, ``/style.css`` -> static files, no token needed (they
  are the same public code as in the repository; the page's secret is the token).
- ``GET /ws?token=T`` with a websocket upgrade -> accepted only when the token matches
  and the ``Origin`` header is the page's own origin (``http://127.0.0.1:PORT`` or
  ``http://localhost:PORT``) or absent (a program, not a browser page). This is what
  stops another web page open in the same browser from driving the twin: browsers
  always send the Origin of the page that opens a websocket.
- The ``Host`` header must name the loopback address or ``localhost`` with our port
  (defeats DNS rebinding); anything else, another path or another method is refused
  with a status and a one-line reason.

On an accepted websocket every text (or binary) message is one JSON request of
schemas/api.capnp; `twin.api.handle` validates and answers it, so a malformed request
gets ``{"id": .., "error": {"code": "malformed", ...}}`` and the connection stays
open. ``{"subscribe": null}`` additionally starts forwarding `twin.subscribe()` events
as ``{"event": {...}}`` messages.

Per connection: one reader (the handler), up to MAX_IN_FLIGHT requests answered
concurrently (a slow `ping` does not hold up a `status`), and ONE writer task that
owns every send -- websockets.trio must not have concurrent senders, and a single
writer keeps responses and events in one bounded queue. A browser that stops reading
never blocks the twin: events go into that queue without waiting; when it overflows
the connection is closed with code 1013 and a reason (the page reloads its state on
reconnect), and a send that makes no progress for SEND_TIMEOUT seconds aborts the
connection. Messages over MAX_MESSAGE bytes close the connection with code 1009;
requests between api.MAX_REQUEST and MAX_MESSAGE get a typed `malformed` error.
"""

from __future__ import annotations

import email.utils
import hmac
import ipaddress
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import trio
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.trio.server import ServerConnection, serve

from twinmesh.errors import ApiError, ConfigError, KeyFileError
from twinmesh.log import get_logger
from twinmesh.twin import api
from twinmesh.twin.service import WEB_TOKEN_FILE, WEB_URL_FILE, Twin

log = get_logger(component="web")

WS_PATH = "/ws"
MAX_MESSAGE = 4 * api.MAX_REQUEST  # bytes; larger messages close the connection (1009)
MAX_IN_FLIGHT = 32  # requests answered concurrently per connection; more wait their turn
EVENT_BACKLOG = 256  # events queued for one connection before it counts as lagging
SEND_TIMEOUT = 10.0  # seconds one send may take before the connection is aborted
MAX_CONNECTIONS = 32  # open websockets at once
TOKEN_BYTES = 32
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")

STATIC_FILES = {  # URL path -> (file in twinmesh/twin/static, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/twinmesh.js": ("twinmesh.js", "text/javascript; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_PATHS = ("/", "/index.html")  # need the token; the other files are public code


# --- the token and the page URL ----------------------------------------------------------

def load_or_create_token(state_dir: Path) -> str:
    """The web token in `state_dir/web.token`, created (mode 0600) on first use.

    A token file readable by others or holding garbage is refused with a one-line
    KeyFileError naming it, like a key file: we never silently replace a credential
    the user may have bookmarked.
    """
    path = state_dir / WEB_TOKEN_FILE
    if not path.exists():
        token = secrets.token_urlsafe(TOKEN_BYTES)
        _write_private(path, token + "\n")
        return token
    try:
        st = path.stat()
        text = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the web token: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: the web token is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(f"{path}: web token permissions {stat.S_IMODE(st.st_mode):04o} "
                           "are too open (must be 0600)")
    if not _TOKEN.fullmatch(text):
        raise KeyFileError(f"{path}: corrupt web token (expected 16-128 characters of "
                           "A-Z a-z 0-9 _ -); delete the file to make a new one")
    return text


def page_url(host: str, port: int, token: str) -> str:
    """The URL a user opens: ``http://127.0.0.1:PORT/?token=...``."""
    return f"http://{_netloc(host, port)}/?token={quote(token, safe='')}"


def write_page_url(state_dir: Path, url: str) -> Path:
    """Write `url` (it holds the token) to `state_dir/web.url`, mode 0600."""
    path = state_dir / WEB_URL_FILE
    _write_private(path, url + "\n")
    return path


def parse_http_address(text: str) -> tuple[str, int]:
    """``127.0.0.1:8080`` / ``[::1]:8080`` / ``localhost:0`` -> (host, port); ConfigError
    for anything else, including a host that is not loopback."""
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", text.strip())
    if match is None or int(match.group(2)) > 65535:
        raise ConfigError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = _loopback_host(match.group(1))
    return host, int(match.group(2))


def _write_private(path: Path, text: str) -> None:
    # Temporary name then rename: a crash never leaves a half-written secret.
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _loopback_host(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"  # one address, so port 0 means one port
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ConfigError(f"the twin's web page is loopback-only: {host!r} is not a loopback "
                      "address (use 127.0.0.1 or ::1)")


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- who may see the page and open the websocket (no I/O) --------------------------------

@dataclass(frozen=True)
class Access:
    """What a request must carry: the token, one of our Host names, our Origin."""

    token: str
    hosts: frozenset[str]  # acceptable Host headers, e.g. "127.0.0.1:8080"
    origins: frozenset[str]  # acceptable Origin headers of the websocket

    @classmethod
    def for_address(cls, token: str, host: str, port: int) -> Access:
        netlocs = {_netloc(host, port), f"localhost:{port}"}
        return cls(token, frozenset(netlocs), frozenset(f"http://{n}" for n in netlocs))

    def token_ok(self, query: Mapping[str, list[str]]) -> bool:
        given = query.get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str


def load_static() -> dict[str, StaticFile]:
    """The files of STATIC_FILES, read once from the installed package."""
    folder = resources.files("twinmesh.twin").joinpath("static")
    return {path: StaticFile(folder.joinpath(name).read_bytes(), ctype)
            for path, (name, ctype) in STATIC_FILES.items()}


def route(request: Request, access: Access, static: Mapping[str, StaticFile]) -> Response | None:
    """The HTTP response for `request`, or None to go on with the websocket upgrade."""
    if request.method != "GET":
        return respond(405, f"{request.method} is not supported here; only GET\n")
    if request.headers.get("Host", "") not in access.hosts:
        return respond(403, "wrong Host header: open the page at 127.0.0.1 or localhost\n")
    url = urlsplit(request.path)
    query = parse_qs(url.query)
    if url.path == WS_PATH:
        origin = request.headers.get("Origin")
        if origin is not None and origin not in access.origins:
            return respond(403, f"origin {origin[:100]!r} may not open this twin's websocket\n")
        if not access.token_ok(query):
            return respond(403, "missing or wrong token: connect with ?token=<web.token>\n")
        return None
    page = static.get(url.path)
    if page is None:
        return respond(404, f"no such page: {url.path[:100]}\n")
    if url.path in PAGE_PATHS and not access.token_ok(query):
        return respond(403, "missing or wrong token: open the URL that `twinctl web` prints\n")
    return respond(200, page.body, page.content_type, _page_headers(url.path, access))


def respond(status: int, body: str | bytes, content_type: str = "text/plain; charset=utf-8",
            extra: Mapping[str, str] | None = None) -> Response:
    """A complete HTTP response that closes the connection."""
    data = body.encode() if isinstance(body, str) else body
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Type", content_type),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),  # the page URL holds the token
    ])
    for name, value in (extra or {}).items():
        headers[name] = value
    reason = {200: "OK", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
              503: "Service Unavailable"}.get(status, "Error")
    return Response(status, reason, headers, data)


def _page_headers(path: str, access: Access) -> dict[str, str]:
    if path == "/twinmesh.js":
        # Public code: any page may import it (the websocket still checks the origin).
        return {"Access-Control-Allow-Origin": "*"}
    if path not in PAGE_PATHS:
        return {}
    sockets = " ".join(sorted("ws://" + netloc for netloc in access.hosts))
    return {
        "Content-Security-Policy": (
            f"default-src 'self'; connect-src 'self' {sockets}; img-src 'self' data:; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
        "X-Frame-Options": "DENY",
    }


# --- the trio shell ------------------------------------------------------------------------

@dataclass(frozen=True)
class WebLimits:
    """Bounds of the web server; the defaults suit a person's browser tabs."""

    max_message: int = MAX_MESSAGE
    max_in_flight: int = MAX_IN_FLIGHT
    event_backlog: int = EVENT_BACKLOG
    send_timeout: float = SEND_TIMEOUT
    max_connections: int = MAX_CONNECTIONS


@dataclass
class _Counters:
    limits: WebLimits
    open: int = 0  # websockets open right now
    served: int = 0  # websockets accepted since start


async def serve_web(
    twin: Twin,
    host: str,
    port: int,
    token: str,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    limits: WebLimits | None = None,
) -> None:
    """Serve the page and the websocket on `host`:`port` (0 = any free port) until
    cancelled; `task_status.started((host, port))` with the bound address.

    Raises ConfigError for a host that is not loopback or a token that is not one
    `load_or_create_token` would make (too short to be a secret).
    """
    host = _loopback_host(host)
    if not _TOKEN.fullmatch(token):
        raise ConfigError("the web token must be 16-128 characters of A-Z a-z 0-9 _ -")
    counters = _Counters(limits or WebLimits())
    static = load_static()
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {_netloc(host, port)}: {exc.strerror}") from None
    bound_port = listeners[0].socket.getsockname()[1]
    access = Access.for_address(token, host, bound_port)

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        response = route(request, access, static)
        if response is None and counters.open >= counters.limits.max_connections:
            return respond(503, f"too many open pages ({counters.limits.max_connections})\n")
        return response

    handler = partial(_serve_connection, twin, counters)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(
            serve, handler, listeners=listeners, process_request=process_request,
            compression=None, max_size=counters.limits.max_message, max_queue=16,
            close_timeout=2.0, server_header=None))
        log.info("web_listening", host=host, port=bound_port)
        task_status.started((host, bound_port))


class _Connection:
    """One websocket: its outgoing queue and whether it fell behind."""

    def __init__(self, ws: ServerConnection, limits: WebLimits) -> None:
        self.ws = ws
        self.limits = limits
        capacity = limits.max_in_flight + limits.event_backlog
        self.outbox_send, self.outbox = trio.open_memory_channel[str](capacity)
        self.in_flight = trio.Semaphore(limits.max_in_flight)
        self.lagging = False
        self.subscribed = False

    async def write_loop(self) -> None:
        """The only task that sends on this websocket."""
        async for text in self.outbox:
            if self.lagging:
                await self.ws.aclose(CloseCode.TRY_AGAIN_LATER,
                                     "the page fell behind on events; reconnect to catch up")
                return
            with trio.move_on_after(self.limits.send_timeout) as scope:
                try:
                    await self.ws.send(text)
                except ConnectionClosed:
                    return
            if scope.cancelled_caught:
                log.warning("web_send_timeout", seconds=self.limits.send_timeout)
                await self.ws.close_stream()  # a half-sent frame: only aborting is safe
                return

    async def answer(self, twin: Twin, raw: str | bytes, nursery: trio.Nursery) -> None:
        try:
            response = await api.handle(twin, raw)
            if "done" in response and not self.subscribed and _is_subscribe(raw):
                self.subscribed = True  # before any checkpoint: one subscription only
                try:
                    await nursery.start(self.forward_events, twin)
                except ApiError as exc:
                    self.subscribed = False
                    response = api.error_response(response["id"], exc.code, exc.message)
            await self.outbox_send.send(json.dumps(response))
        finally:
            self.in_flight.release()

    async def forward_events(self, twin: Twin, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        async with twin.subscribe() as events:
            task_status.started()
            async for event in events:
                try:
                    self.outbox_send.send_nowait(json.dumps({"event": event}))
                except trio.WouldBlock:
                    # Never wait on a slow page: close it with a reason instead.
                    self.lagging = True
                    return


async def _serve_connection(twin: Twin, counters: _Counters, ws: ServerConnection) -> None:
    connection = _Connection(ws, counters.limits)
    counters.open += 1
    counters.served += 1
    bound = log.bind(page=counters.served)
    bound.info("web_page_connected", open=counters.open)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_then_stop, connection, nursery.cancel_scope)
            try:
                async for raw in ws:
                    await connection.in_flight.acquire()
                    nursery.start_soon(connection.answer, twin, raw, nursery)
            except ConnectionClosed:
                pass
            nursery.cancel_scope.cancel()
    finally:
        counters.open -= 1
        bound.info("web_page_closed", code=ws.close_code, lagging=connection.lagging)


async def _write_then_stop(connection: _Connection, scope: trio.CancelScope) -> None:
    # Once the writer is done (closed, aborted, peer gone) nothing else may wait on it.
    await connection.write_loop()
    scope.cancel()


def _is_subscribe(raw: str | bytes) -> bool:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "subscribe" in obj
