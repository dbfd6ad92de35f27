"""The health endpoint: metrics rendering and request parsing without I/O, then the
server on 127.0.0.1 spoken to over real loopback TCP."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from twinmesh.errors import ConfigError, RemoteProtocolError
from twinmesh.identity.keys import KEY_SIZE, Identity
from twinmesh.nic import health
from twinmesh.nic.health import (
    MAX_HEAD,
    PROMETHEUS_CONTENT_TYPE,
    Metric,
    dht_metrics,
    find_head_end,
    parse_request_head,
    render_prometheus,
    serve_health,
)
from twinmesh.proto.attach import Location
from twinmesh.proto.dht import Dht, DhtConfig
from twinmesh.wire import schemas

# --- helpers -------------------------------------------------------------------------------


@dataclass
class FakeSource:
    ok: bool = True
    families: list[Metric] = field(default_factory=list)
    broken: bool = False

    def healthy(self) -> bool:
        if self.broken:
            raise RuntimeError("source exploded")
        return self.ok

    def metrics(self) -> list[Metric]:
        if self.broken:
            raise RuntimeError("source exploded")
        return self.families


@asynccontextmanager
async def running(
    source: FakeSource, host: str = "127.0.0.1", **kwargs: Any
) -> AsyncIterator[tuple[str, int]]:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(serve_health, host, 0, source, **kwargs))
        yield bound
        nursery.cancel_scope.cancel()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def exchange(host: str, port: int, request: bytes) -> Response:
    """Send `request`, read until the server closes, parse the response."""
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(request)
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {bytes(data)!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    assert int(headers["content-length"]) == len(body)
    return Response(int(status), headers, body)


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n".encode()


# A deliberately nasty counter: a label value with a quote, a backslash and a newline, and a
# help text with a backslash and a newline.
NASTY = Metric(
    name="twinmesh_frames_total",
    kind="counter",
    help="Frames sent, by link.\nCounts \\ everything.",
    samples=[
        ({"link": 'tcp "a"\\b\nc', "dir": "out"}, 3),
        ({"link": "ws", "dir": "in"}, 0),
    ],
)
NASTY_LINES = [
    "# HELP twinmesh_frames_total Frames sent, by link.\\nCounts \\\\ everything.",
    "# TYPE twinmesh_frames_total counter",
    'twinmesh_frames_total{link="tcp \\"a\\"\\\\b\\nc",dir="out"} 3',
    'twinmesh_frames_total{link="ws",dir="in"} 0',
]


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_exposition(text: str) -> dict[str, Any]:
    """A strict little reader of the 0.0.4 text format: name -> help, type, samples."""
    assert text.endswith("\n")
    families: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            help_text = re.sub(r"\\[\\n]", lambda m: _UNESCAPE[m.group()], help_text)
            families[name] = {"help": help_text, "type": None, "samples": []}
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE ") :].split(" ")
            families[name]["type"] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, label_text, value = match.groups()
            labels = {}
            pos = 0
            while label_text and pos < len(label_text):
                lm = _LABEL.match(label_text, pos)
                assert lm, f"bad labels in {line!r}"
                labels[lm.group(1)] = re.sub(
                    r'\\[\\"n]', lambda m: _UNESCAPE[m.group()], lm.group(2)
                )
                pos = lm.end()
            families[name]["samples"].append((labels, float(value)))
    return families


# --- metrics rendering ------------------------------------------------------------------------


def test_render_exact_lines_with_escaping() -> None:
    gauge = Metric("twinmesh_links", "gauge", "Open links.", [({}, 2.5)])
    text = render_prometheus([NASTY, gauge])
    assert text.splitlines() == [
        *NASTY_LINES,
        "# HELP twinmesh_links Open links.",
        "# TYPE twinmesh_links gauge",
        "twinmesh_links 2.5",
    ]
    assert text.endswith("\n")


def test_render_round_trips_through_a_parser() -> None:
    families = parse_exposition(render_prometheus([NASTY]))
    family = families["twinmesh_frames_total"]
    assert family["help"] == NASTY.help
    assert family["type"] == "counter"
    assert family["samples"] == [(labels, float(value)) for labels, value in NASTY.samples]


def test_render_special_values_and_empty() -> None:
    gauge = Metric(
        "g",
        "gauge",
        "",
        [
            ({"v": "inf"}, float("inf")),
            ({"v": "-inf"}, float("-inf")),
            ({"v": "nan"}, float("nan")),
        ],
    )
    assert render_prometheus([gauge]).splitlines()[2:] == [
        'g{v="inf"} +Inf',
        'g{v="-inf"} -Inf',
        'g{v="nan"} NaN',
    ]
    assert render_prometheus([]) == ""
    assert render_prometheus([Metric("c_total", "counter", "No samples yet.")]) == (
        "# HELP c_total No samples yet.\n# TYPE c_total counter\n"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "bad-name"},
        {"name": "1st"},
        {"kind": "histogram"},
        {"samples": [({"bad-label": "x"}, 1)]},
        {"samples": [({"__reserved": "x"}, 1)]},
        {"samples": [({"n": 1}, 1)]},
        {"samples": [({}, "1")]},
        {"samples": [({}, True)]},
        {"samples": [({"a": "1"}, 1), ({"a": "1"}, 2)]},
    ],
)
def test_invalid_metric_is_refused(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"name": "ok_total", "kind": "counter", "help": "h", "samples": []}
    fields.update(kwargs)
    with pytest.raises(ValueError):
        Metric(**fields)


def test_duplicate_family_is_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        render_prometheus([NASTY, NASTY])


# --- request parsing (sans-I/O) ------------------------------------------------------------


def test_parse_request_head() -> None:
    head = parse_request_head(
        b"GET /metrics?x=1 HTTP/1.1\r\nHost: h\r\nAccept:  text/plain \r\n\r\n"
    )
    assert (head.method, head.target, head.path, head.version) == (
        "GET",
        "/metrics?x=1",
        "/metrics",
        "HTTP/1.1",
    )
    assert head.headers == (("host", "h"), ("accept", "text/plain"))
    assert (
        parse_request_head(b"GET http://h/healthz HTTP/1.1\r\nHost: h\r\n\r\n").path == "/healthz"
    )
    assert parse_request_head(b"GET / HTTP/1.0\n\n").version == "HTTP/1.0"  # bare LF, no Host


@pytest.mark.parametrize(
    "raw",
    [
        b"\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"GET  /healthz HTTP/1.1\r\nHost: h\r\n\r\n",
        b"G(T /healthz HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /healthz HTTP/2.0\r\nHost: h\r\n\r\n",
        b"GET healthz HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
        b"GET /h\xffz HTTP/1.1\r\nHost: h\r\n\r\n",
    ],
)
def test_parse_refuses_malformed_heads(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_request_head(raw)


@given(st.binary(max_size=300))
def test_parse_raises_only_remote_protocol_error(raw: bytes) -> None:
    with suppress(RemoteProtocolError):
        parse_request_head(raw)


@given(st.binary(max_size=200))
def test_find_head_end_incremental_equals_whole(raw: bytes) -> None:
    data = b"GET / HTTP/1.1\r\nHost: h\r\n" + raw + b"\r\n\r\n"
    whole = find_head_end(data)
    assert whole is not None
    buf = bytearray()
    found = None
    searched = 0
    for byte in data:  # byte by byte, the way a slow client sends it
        buf.append(byte)
        found = find_head_end(buf, searched)
        if found is not None:
            break
        searched = max(0, len(buf) - 3)
    assert found == whole


# --- the server over loopback TCP ------------------------------------------------------------


async def test_healthz_ok_then_unavailable() -> None:
    source = FakeSource(ok=True)
    with trio.fail_after(10):
        async with running(source) as (host, port):
            assert host == "127.0.0.1"
            assert port > 0
            ok = await exchange(host, port, get("/healthz"))
            assert ok.status == 200
            assert ok.body == b"ok\n"
            assert ok.headers["connection"] == "close"
            assert ok.headers["content-type"] == "text/plain; charset=utf-8"

            source.ok = False
            down = await exchange(host, port, get("/healthz"))
            assert down.status == 503
            assert down.body == b"unavailable\n"
            assert down.headers["connection"] == "close"


async def test_metrics_exposition() -> None:
    gauge = Metric("twinmesh_links", "gauge", "Open links.", [({}, 2)])
    source = FakeSource(families=[NASTY, gauge])
    with trio.fail_after(10):
        async with running(source) as (host, port):
            response = await exchange(host, port, get("/metrics"))
    assert response.status == 200
    assert response.headers["content-type"] == PROMETHEUS_CONTENT_TYPE
    assert response.headers["connection"] == "close"
    text = response.body.decode("utf-8")
    assert text.splitlines()[:4] == NASTY_LINES
    families = parse_exposition(text)
    assert families["twinmesh_links"] == {
        "help": "Open links.",
        "type": "gauge",
        "samples": [({}, 2.0)],
    }
    assert families["twinmesh_frames_total"]["samples"][0][0] == NASTY.samples[0][0]


async def test_not_found_and_method_not_allowed() -> None:
    with trio.fail_after(10):
        async with running(FakeSource()) as (host, port):
            missing = await exchange(host, port, get("/nope"))
            assert missing.status == 404
            assert missing.headers["connection"] == "close"
            assert (await exchange(host, port, get("/healthz/extra"))).status == 404
            assert (await exchange(host, port, get("/healthz?verbose=1"))).status == 200
            for method in ("POST", "HEAD", "DELETE"):
                refused = await exchange(host, port, get("/healthz", method))
                assert refused.status == 405
                assert refused.headers["allow"] == "GET"
                assert refused.headers["connection"] == "close"


async def test_garbage_gets_400_and_the_server_keeps_answering() -> None:
    with trio.fail_after(10):
        async with running(FakeSource()) as (host, port):
            for garbage in (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello, say
                b"hello there\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
            ):
                response = await exchange(host, port, garbage)
                assert response.status == 400
                assert response.headers["connection"] == "close"
            assert (await exchange(host, port, get("/healthz"))).status == 200


async def test_oversized_head_gets_400() -> None:
    padded = get("/healthz").replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"a" * MAX_HEAD + b"\r\n\r\n")
    with trio.fail_after(10):
        async with running(FakeSource()) as (host, port):
            response = await exchange(host, port, padded)
            assert response.status == 400
            assert b"too large" in response.body
            # A head of exactly MAX_HEAD bytes is still fine.
            base = get("/healthz")
            filler = MAX_HEAD - len(base) - len(b"X-Pad: \r\n")
            exact = base[:-2] + b"X-Pad: " + b"a" * filler + b"\r\n\r\n"
            assert len(exact) == MAX_HEAD
            assert (await exchange(host, port, exact)).status == 200
            assert (await exchange(host, port, exact[:-2] + b"a\r\n\r\n")).status == 400


async def test_request_with_a_body_still_gets_its_answer() -> None:
    body = b"x" * 20_000
    request = b"POST /healthz HTTP/1.1\r\nHost: h\r\nContent-Length: 20000\r\n\r\n" + body
    with trio.fail_after(10):
        async with running(FakeSource()) as (host, port):
            assert (await exchange(host, port, request)).status == 405


async def test_slow_head_gets_408() -> None:
    with trio.fail_after(10):
        async with running(FakeSource(), head_timeout=0.2) as (host, port):
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost:")  # ... and nothing more
                data = bytearray()
                while chunk := await stream.receive_some(4096):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            assert b"\r\nConnection: close\r\n" in data
            assert (await exchange(host, port, get("/healthz"))).status == 200


async def test_half_sent_head_then_eof_gets_400_and_silent_client_nothing() -> None:
    with trio.fail_after(10):
        async with running(FakeSource()) as (host, port):
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\n")
                await stream.send_eof()
                data = await stream.receive_some(4096)
                assert data.startswith(b"HTTP/1.1 400 ")
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_eof()  # connect and say nothing: closed without an answer
                assert await stream.receive_some(4096) == b""
            assert (await exchange(host, port, get("/healthz"))).status == 200


async def test_failing_source_gets_500_and_the_server_survives() -> None:
    source = FakeSource(broken=True)
    with trio.fail_after(10):
        async with running(source) as (host, port):
            assert (await exchange(host, port, get("/healthz"))).status == 500
            assert (await exchange(host, port, get("/metrics"))).status == 500
            source.broken = False
            assert (await exchange(host, port, get("/healthz"))).status == 200


async def test_connections_over_the_limit_are_closed_at_once() -> None:
    with trio.fail_after(10):
        async with running(FakeSource(), max_connections=2) as (host, port):
            idle = [await trio.open_tcp_stream(host, port) for _ in range(2)]
            async with await trio.open_tcp_stream(host, port) as extra:
                # An EOF, or a reset if it was closed before it was read: no answer either way.
                with suppress(trio.BrokenResourceError):
                    assert await extra.receive_some(4096) == b""
            # The held connections are still served...
            for stream in idle:
                async with stream:
                    await stream.send_all(get("/healthz"))
                    assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 OK\r\n")
            # ...and once the server has seen them go, there is room again.
            while True:
                with suppress(trio.BrokenResourceError):
                    async with await trio.open_tcp_stream(host, port) as stream:
                        await stream.send_all(get("/healthz"))
                        if (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 OK\r\n"):
                            break
                await trio.sleep(0.01)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "localhost", "example.org", ""])
async def test_non_loopback_bind_is_refused_without_binding(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_bind(*args: object, **kwargs: object) -> None:
        raise AssertionError("serve_health tried to bind")

    monkeypatch.setattr(trio, "open_tcp_listeners", no_bind)
    with trio.fail_after(5), pytest.raises(ConfigError) as info:
        await serve_health(host, 0, FakeSource())
    message = str(info.value)
    assert message.startswith("the health endpoint is loopback-only")
    assert "\n" not in message


async def test_port_in_use_is_a_config_error() -> None:
    with trio.fail_after(10):
        async with running(FakeSource()) as (host, port):
            with pytest.raises(ConfigError, match=f"{host}:{port}"):
                await serve_health(host, port, FakeSource())
    with pytest.raises(ConfigError, match="port"):
        await serve_health("127.0.0.1", 70000, FakeSource())


def _ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback_works(), reason="no IPv6 loopback here")
async def test_ipv6_loopback() -> None:
    with trio.fail_after(10):
        async with running(FakeSource(), host="::1") as (host, port):
            assert host == "::1"
            assert (await exchange(host, port, get("/healthz"))).status == 200


def test_module_constants_match_the_brief() -> None:
    assert health.MAX_HEAD == 8 * 1024
    assert health.HEAD_TIMEOUT == 5.0
    assert health.MAX_CONNECTIONS == 64


# --- the DHT's figures ------------------------------------------------------------------------

WALL = 1_800_000_000.0
ME = Identity(b"\x01" * KEY_SIZE).public
PEER = Identity(b"\x02" * KEY_SIZE).public


def store_request(location: Location) -> bytes:
    message = schemas.dht.DhtMessage.new_message()
    message.requestId = 9
    location.fill(message.init("store"))
    return bytes(message.to_bytes())


def test_dht_counters_and_gauges_render() -> None:
    core = Dht(ME, now=0.0, config=DhtConfig(k=4, alpha=2), wall_offset=WALL)
    core.add_contact(PEER, 0.0)  # the bootstrap lookup asks PEER, who never answers
    twin = Identity.generate()
    core.receive(PEER, store_request(Location.sign(twin, PEER, 1, WALL + 3600)), 0.5)
    core.receive(PEER, b"garbage", 0.5)
    core.handle_timer(5.0)
    families = parse_exposition(render_prometheus(dht_metrics(core)))
    assert families["twinmesh_dht_messages_total"] == {
        "help": "DHT messages received from and sent to other NICs.",
        "type": "counter",
        "samples": [({"direction": "in"}, 2.0), ({"direction": "out"}, 2.0)],
    }
    assert families["twinmesh_dht_queries_timed_out_total"]["samples"] == [({}, 1.0)]
    assert families["twinmesh_dht_stores_total"]["samples"] == [
        ({"result": "accepted"}, 1.0), ({"result": "refused"}, 0.0)]
    assert families["twinmesh_dht_malformed_total"]["samples"] == [({}, 1.0)]
    assert families["twinmesh_dht_lookups_total"]["samples"] == [({}, 1.0)]
    gauges = {name: family["samples"] for name, family in families.items()
              if family["type"] == "gauge"}
    assert gauges == {
        "twinmesh_dht_contacts": [({}, 1.0)],
        "twinmesh_dht_lookups_running": [({}, 0.0)],
        "twinmesh_dht_store_lookups_running": [({}, 0.0)],
        "twinmesh_dht_store_lookups_waiting": [({}, 0.0)],
        "twinmesh_dht_records": [({}, 1.0)],
        "twinmesh_dht_own_records": [({}, 0.0)],
    }


def test_every_dht_counter_is_on_metrics() -> None:
    core = Dht(ME, now=0.0, wall_offset=WALL)
    for n, key in enumerate(core.stats):
        core.stats[key] = 1000 + n
    shown = {value for metric in dht_metrics(core) if metric.kind == "counter"
             for _, value in metric.samples}
    assert shown == {float(1000 + n) for n in range(len(core.stats))}
