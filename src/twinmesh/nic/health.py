"""The health endpoint of pnicd: ``GET /healthz`` and ``GET /metrics`` over HTTP/1.1.

Theory of operation
-------------------
A deliberately tiny HTTP server for supervisors (systemd, Kubernetes probes) and
Prometheus. It binds loopback addresses only and serves one request per connection:

1. read the request head: at most MAX_HEAD bytes, complete within HEAD_TIMEOUT seconds;
2. parse it with `parse_request_head` (sans-I/O: bytes in, a RequestHead out, or
   RemoteProtocolError when the peer sent garbage);
3. answer with `respond` (no I/O: a RequestHead and a HealthSource in, response bytes out);
4. send the response -- always with ``Connection: close`` --, half-close, drain whatever the
   client still sends for a short while (so the kernel does not reset the connection and
   destroy the response), close.

Request bodies are never read. A bad head gets 400, a slow one 408, then the connection
closes. Nothing a connection does -- nor a HealthSource that raises -- reaches the accept
loop. At most MAX_CONNECTIONS connections are served at once; further ones are closed as
soon as they are accepted.

Everything here except `serve_health` is plain code that does no I/O and never blocks.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import urlsplit

import trio

from twinmesh.errors import ConfigError, RemoteProtocolError
from twinmesh.log import get_logger

if TYPE_CHECKING:
    from twinmesh.proto.dht import Dht
    from twinmesh.proto.outbox import Outbox

log = get_logger(component="health")

MAX_HEAD = 8 * 1024  # bytes, request line + headers + the blank line
HEAD_TIMEOUT = 5.0  # seconds from accept to a complete request head
SEND_TIMEOUT = 10.0  # seconds to hand the response to a client that is slow to read it
LINGER_TIMEOUT = 1.0  # seconds to wait for the client's EOF after our response
LINGER_MAX = 64 * 1024  # bytes of leftover request we are willing to drain
MAX_CONNECTIONS = 64
ACCEPT_BACKOFF = 0.1  # seconds to wait when accept() fails for lack of file descriptors

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"


# --- metrics -------------------------------------------------------------------------

MetricKind = Literal["counter", "gauge"]
Sample = tuple[dict[str, str], float]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True)
class Metric:
    """One metric family: its name, kind, help text and samples.

    Each sample is ``(labels, value)``; ``labels`` maps label names to string values (an
    empty dict for an unlabelled sample). Raises ValueError on an invalid name, kind, label
    or value, or on two samples with the same labels.
    """

    name: str
    kind: MetricKind
    help: str
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_metric(self)


class HealthSource(Protocol):
    """What the health endpoint asks. Both methods are called per request; neither may block."""

    def healthy(self) -> bool:
        """True when the daemon can do its job (``/healthz`` answers 200, else 503)."""
        ...

    def metrics(self) -> list[Metric]:
        """The current value of every metric, for ``/metrics``."""
        ...


def render_prometheus(metrics: Iterable[Metric]) -> str:
    """Render `metrics` in the Prometheus text exposition format, version 0.0.4.

    Every family gets its ``# HELP`` and ``# TYPE`` lines, then one line per sample; label
    values and help texts are escaped. Raises ValueError on two families with one name.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for metric in metrics:
        _check_metric(metric)  # samples is a list: it may have changed since construction
        if metric.name in seen:
            raise ValueError(f"duplicate metric name {metric.name!r}")
        seen.add(metric.name)
        lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            lines.append(f"{metric.name}{_format_labels(labels)} {_format_value(value)}")
    return "".join(line + "\n" for line in lines)


def _check_metric(metric: Metric) -> None:
    if not _METRIC_NAME.fullmatch(metric.name):
        raise ValueError(f"invalid metric name {metric.name!r}")
    if metric.kind not in ("counter", "gauge"):
        raise ValueError(f"metric {metric.name}: kind must be 'counter' or 'gauge'")
    seen: set[tuple[tuple[str, str], ...]] = set()
    for labels, value in metric.samples:
        for key, val in labels.items():
            if not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
                raise ValueError(f"metric {metric.name}: invalid label name {key!r}")
            if not isinstance(val, str):
                raise ValueError(f"metric {metric.name}: label {key} must be a string")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"metric {metric.name}: sample value {value!r} is not a number")
        key_set = tuple(sorted(labels.items()))
        if key_set in seen:
            raise ValueError(f"metric {metric.name}: two samples with labels {labels!r}")
        seen.add(key_set)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape_label_value(val)}"' for key, val in labels.items())
    return "{" + inner + "}"


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


# --- the DHT's figures (twin lookups) --------------------------------------------------

# Each counter family: name, help, and the `Dht.stats` keys it shows with their labels.
_DHT_COUNTERS: tuple[tuple[str, str, tuple[tuple[str, dict[str, str]], ...]], ...] = (
    ("twinmesh_dht_messages_total", "DHT messages received from and sent to other NICs.",
     (("messages_in", {"direction": "in"}), ("messages_out", {"direction": "out"}))),
    ("twinmesh_dht_queries_timed_out_total", "DHT queries and stores left unanswered.",
     (("queries_timed_out", {}),)),
    ("twinmesh_dht_lookups_total", "DHT lookups started (finds, stores, refreshes).",
     (("lookups", {}),)),
    ("twinmesh_dht_lookups_found_total", "Twin lookups that found a record.",
     (("lookups_found", {}),)),
    ("twinmesh_dht_store_lookups_total",
     "Lookups that stored a record of a twin attached here (publish, republish, restore).",
     (("store_lookups", {}),)),
    ("twinmesh_dht_restores_total",
     "Store lookups started because more NICs became known while a record was thin.",
     (("restores", {}),)),
    ("twinmesh_dht_stores_total", "Records other NICs asked this NIC to keep, by result.",
     (("stores_accepted", {"result": "accepted"}), ("stores_refused", {"result": "refused"}))),
    ("twinmesh_dht_malformed_total", "DHT messages that were malformed or broke the protocol.",
     (("malformed", {}),)),
    ("twinmesh_dht_rate_limited_total", "DHT requests dropped by the per-NIC rate limit.",
     (("rate_limited", {}),)),
    ("twinmesh_dht_unexpected_answers_total", "DHT answers arriving late or never asked for.",
     (("unexpected_answers", {}),)),
    ("twinmesh_dht_bad_records_total", "Records in DHT answers that were refused.",
     (("bad_records", {}),)),
    ("twinmesh_dht_contacts_evicted_total", "Contacts that left their bucket.",
     (("contacts_evicted", {}),)),
    ("twinmesh_dht_records_evicted_total", "Replica records dropped to make room.",
     (("records_evicted", {}),)),
    ("twinmesh_dht_candidates_ignored_total",
     "Contacts in answers ignored because a lookup had enough candidates.",
     (("candidates_ignored", {}),)),
)

# Gauges: name, help, the `DhtStatistics` field.
_DHT_GAUGES = (
    ("twinmesh_dht_contacts", "NICs in the DHT's buckets.", "contacts"),
    ("twinmesh_dht_lookups_running", "DHT lookups running, store lookups included.",
     "lookups_running"),
    ("twinmesh_dht_store_lookups_running", "Store lookups running.", "store_lookups_running"),
    ("twinmesh_dht_store_lookups_waiting", "Twins whose store waits for a free slot.",
     "store_lookups_waiting"),
    ("twinmesh_dht_records", "Records held as a replica for other NICs' twins.", "records"),
    ("twinmesh_dht_own_records", "Records of twins attached here.", "own"),
)


def dht_metrics(core: Dht) -> list[Metric]:
    """The DHT core's counters (`core.stats`) and gauges (`core.statistics()`)."""
    stats = core.stats
    families = [Metric(name, "counter", help_text,
                       [(dict(labels), float(stats.get(key, 0))) for key, labels in keys])
                for name, help_text, keys in _DHT_COUNTERS]
    state = core.statistics()
    families += [Metric(name, "gauge", help_text, [({}, float(getattr(state, attr)))])
                 for name, help_text, attr in _DHT_GAUGES]
    return families


def overlay_metrics(stats: Mapping[str, int], dropped: int) -> list[Metric]:
    """Overlay data packets by what became of them at this NIC: the router core's
    counters (`Router.stats`) and the packets the shell dropped (`Overlay.dropped`)."""
    kinds = (
        ("sent", stats.get("packets_sent", 0)),
        ("forwarded", stats.get("packets_forwarded", 0)),
        ("delivered", stats.get("packets_delivered", 0)),
        ("unreachable", stats.get("packets_unroutable", 0) + stats.get("packets_no_route", 0)),
        ("dropped", dropped),
    )
    return [Metric("twinmesh_overlay_packets_total", "counter",
                   "Overlay packets originated here (sent), passed on (forwarded), "
                   "addressed here (delivered), without a route or out of hops "
                   "(unreachable), dropped on a full or closed link (dropped).",
                   [({"kind": kind}, float(count)) for kind, count in kinds])]


# Outbox counters: name, help, the key in `TwinPort.counters`.
_OUTBOX_COUNTERS = (
    ("twinmesh_outbox_accepted_total",
     "Messages stored durably in the outbox (the twin heard accepted).", "outbox_accepted"),
    ("twinmesh_outbox_transmissions_total",
     "Sends of outbox messages onto the overlay, first sends and retries.",
     "outbox_transmissions"),
    ("twinmesh_outbox_retries_total", "Attempts after the first of outbox messages.",
     "outbox_retries"),
    ("twinmesh_outbox_commits_inline_total",
     "Power-safe outbox commits run on the event loop (quick disk).", "outbox_commits_inline"),
    ("twinmesh_outbox_commits_threaded_total",
     "Power-safe outbox commits run in a worker thread (after a slow one).",
     "outbox_commits_threaded"),
)
OUTBOX_FINAL = ("delivered", "expired", "failed")


def outbox_metrics(counters: Mapping[str, int], outbox: Outbox) -> list[Metric]:
    """The outbox's families: counters kept by the twin port (`TwinPort.counters`,
    `outbox_<what>` keys), the core's own (retry budget, away twins) and what it
    holds now."""
    pending = len(outbox)
    families = [Metric(name, "counter", help_text, [({}, float(counters.get(key, 0)))])
                for name, help_text, key in _OUTBOX_COUNTERS]
    families.append(Metric(
        "twinmesh_outbox_finished_total", "counter",
        "Outbox messages finished, by final status.",
        [({"status": status}, float(counters.get(f"outbox_{status}", 0)))
         for status in OUTBOX_FINAL]))
    families.append(Metric("twinmesh_outbox_pending", "gauge",
                           "Messages in the outbox waiting for their ack.",
                           [({}, float(pending))]))
    core: tuple[tuple[str, Literal["counter", "gauge"], str, float], ...] = (
        ("twinmesh_outbox_retries_held_total", "counter",
         "Retries postponed because the retry budget was spent (overload).",
         outbox.held_retries),
        ("twinmesh_outbox_parked_total", "counter",
         "Messages parked behind the probe of a twin that answered offline.",
         outbox.parked_total),
        ("twinmesh_outbox_rto_backoffs_total", "counter",
         "Doublings of the retransmission timeout (retries firing without answers).",
         outbox.rto_backoffs),
        ("twinmesh_outbox_held", "gauge", "Retries due now, waiting for the retry budget.",
         outbox.held),
        ("twinmesh_outbox_parked", "gauge", "Messages waiting for an away twin's probe.",
         outbox.parked),
        ("twinmesh_outbox_away_destinations", "gauge",
         "Destination twins that answered offline and have not acked since.", outbox.away),
        ("twinmesh_outbox_retry_tokens", "gauge", "Retries the retry budget allows now.",
         outbox.retry_tokens),
        ("twinmesh_outbox_retry_timeout_seconds", "gauge",
         "The wait before a first retry (srtt + 4 rttvar, backed off).",
         outbox.retry_timeout()),
    )
    for name, kind, help_text, value in core:
        families.append(Metric(name, kind, help_text, [({}, float(value))]))
    return families


# --- HTTP: parsing the request head ------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[!-~]+")  # visible ASCII, no spaces
_VERSIONS = ("HTTP/1.0", "HTTP/1.1")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB


@dataclass(frozen=True)
class RequestHead:
    """A parsed request line and headers. Header names are lower-cased, in order."""

    method: str
    target: str
    path: str  # the target's path: no query, no scheme or authority
    version: str
    headers: tuple[tuple[str, str], ...]


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int | None:
    """Return the index just past the blank line that ends a request head in `buf`, or None.

    `start` lets a caller that appends to `buf` skip what it already searched; pass the
    previous length minus 3. Bare LF line endings are accepted as well as CRLF.
    """
    ends = [
        i + len(sep)
        for sep in (b"\r\n\r\n", b"\n\n", b"\n\r\n")
        if (i := buf.find(sep, max(start, 0))) >= 0
    ]
    return min(ends) if ends else None


def parse_request_head(head: bytes | bytearray) -> RequestHead:
    """Parse a complete request head (as delimited by `find_head_end`).

    Raises RemoteProtocolError when it is not a valid HTTP/1.0 or HTTP/1.1 request head.
    """
    text = bytes(head).decode("latin-1")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise RemoteProtocolError("empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise RemoteProtocolError("malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise RemoteProtocolError("malformed method")
    if not _TARGET.fullmatch(target):
        raise RemoteProtocolError("malformed request target")
    if version not in _VERSIONS:
        raise RemoteProtocolError("unsupported HTTP version")

    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise RemoteProtocolError("obsolete header line folding")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise RemoteProtocolError("malformed header line")
        value = value.strip(" \t")
        if _CONTROL.search(value):
            raise RemoteProtocolError("control character in a header value")
        headers.append((name.lower(), value))

    hosts = sum(1 for name, _ in headers if name == "host")
    if hosts > 1 or (version == "HTTP/1.1" and hosts == 0):
        raise RemoteProtocolError("an HTTP/1.1 request needs exactly one Host header")

    return RequestHead(method, target, _target_path(target), version, tuple(headers))


def _target_path(target: str) -> str:
    if target.startswith("/"):
        return target.partition("?")[0]
    if target == "*":
        return target
    if target.lower().startswith(("http://", "https://")):
        return urlsplit(target).path or "/"
    raise RemoteProtocolError("malformed request target")


# --- HTTP: answering ---------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def build_response(
    status: int,
    body: str,
    content_type: str = TEXT_CONTENT_TYPE,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """Return a complete HTTP/1.1 response with a UTF-8 body and ``Connection: close``."""
    payload = body.encode("utf-8")
    head = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(payload)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in extra_headers),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


def _healthz(source: HealthSource) -> bytes:
    if source.healthy():
        return build_response(200, "ok\n")
    return build_response(503, "unavailable\n")


def _metrics(source: HealthSource) -> bytes:
    return build_response(200, render_prometheus(source.metrics()), PROMETHEUS_CONTENT_TYPE)


_ROUTES: dict[str, Callable[[HealthSource], bytes]] = {
    "/healthz": _healthz,
    "/metrics": _metrics,
}


def respond(head: RequestHead, source: HealthSource) -> bytes:
    """Return the response to `head`: 404 for an unknown path, 405 for a method other than
    GET on a known one, 500 if `source` raised."""
    route = _ROUTES.get(head.path)
    if route is None:
        return build_response(404, "not found\n")
    if head.method != "GET":
        return build_response(405, "method not allowed\n", extra_headers=[("Allow", "GET")])
    try:
        return route(source)
    except Exception:
        log.exception("health_source_failed", path=head.path)
        return build_response(500, "internal error\n")


# --- the trio shell ----------------------------------------------------------------------

# accept() errors that mean "out of resources, try again later" rather than "listener gone".
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def check_loopback(host: str) -> None:
    """Raise ConfigError unless `host` is a loopback IP address literal."""
    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise ConfigError(
            f"the health endpoint is loopback-only: {host!r} is not a loopback address"
            " (use 127.0.0.1 or ::1)"
        )


async def serve_health(
    host: str,
    port: int,
    source: HealthSource,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    max_connections: int = MAX_CONNECTIONS,
    head_timeout: float = HEAD_TIMEOUT,
) -> None:
    """Serve ``/healthz`` and ``/metrics`` on `host`:`port` until cancelled.

    `host` must be a loopback address literal (127.0.0.1, ::1, ...); anything else raises
    ConfigError before a socket is opened, as do an invalid port and a failed bind. Port 0
    picks a free port: ``await nursery.start(serve_health, ...)`` returns the
    ``(host, port)`` actually bound.
    """
    check_loopback(host)
    if not 0 <= port <= 65535:
        raise ConfigError(f"invalid health endpoint port {port}")
    if max_connections < 1:
        raise ConfigError("the health endpoint needs max_connections >= 1")
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot listen for health checks on {host}:{port}: {reason}") from exc

    server = _Server(source, max_connections, head_timeout)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(server.accept_loop, listener, nursery)
        bound_host, bound_port = listeners[0].socket.getsockname()[:2]
        log.info("health_listening", host=bound_host, port=bound_port)
        task_status.started((bound_host, bound_port))


class _Server:
    """Per-server state; `active` is only changed from this server's own tasks."""

    def __init__(self, source: HealthSource, max_connections: int, head_timeout: float) -> None:
        self.source = source
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.active = 0

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                        raise
                    log.warning("health_accept_failed", error=exc.strerror)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if self.active >= self.max_connections:
                    log.debug("health_connection_refused", reason="too many connections")
                    await trio.aclose_forcefully(stream)
                    continue
                self.active += 1
                nursery.start_soon(self.serve_connection, stream)

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                response = await self._read_and_respond(stream)
                if response is None:
                    return
                with trio.move_on_after(SEND_TIMEOUT):
                    await stream.send_all(response)
                    await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("health_connection_lost", error=repr(exc))
        except Exception:
            log.exception("health_connection_failed")
        finally:
            self.active -= 1

    async def _read_and_respond(self, stream: trio.SocketStream) -> bytes | None:
        """Read one request head and return the response; None if the client sent nothing."""
        buf = bytearray()
        searched = 0  # bytes of buf already searched for the end of the head
        with trio.move_on_after(self.head_timeout):
            while True:
                end = find_head_end(buf, searched)
                searched = max(0, len(buf) - 3)
                if end is not None:
                    try:
                        head = parse_request_head(buf[:end])
                    except RemoteProtocolError as exc:
                        log.debug("health_bad_request", reason=str(exc))
                        return build_response(400, f"bad request: {exc}\n")
                    return respond(head, self.source)
                if len(buf) >= MAX_HEAD:  # a full buffer without the end: the head is too long
                    log.debug("health_bad_request", reason="request head too large")
                    return build_response(400, "bad request: request head too large\n")
                data = await stream.receive_some(MAX_HEAD - len(buf))
                if not data:
                    if not buf:
                        return None
                    log.debug("health_bad_request", reason="incomplete request head")
                    return build_response(400, "bad request: incomplete request head\n")
                buf += data
        log.debug("health_bad_request", reason="request head timeout")
        return build_response(408, "request timeout\n")


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then read and drop what the client still sends until its EOF (bounded)."""
    with trio.move_on_after(LINGER_TIMEOUT):
        await stream.send_eof()
        drained = 0
        while drained < LINGER_MAX:
            data = await stream.receive_some(4096)
            if not data:
                return
            drained += len(data)
