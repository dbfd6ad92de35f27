"""The twin's web server: token file and URL helpers, the HTTP routes, the websocket's
guards (token, Origin, Host), typed errors, events and slow pages -- over real loopback
TCP. The transport tests use `TwinDouble`, a stand-in for `Twin` with only the methods
they call; the end-to-end tests at the bottom run real twins on a real mesh."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import trio.lowlevel
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.trio.client import ClientConnection, connect

from twinmesh.errors import ApiError, ConfigError, KeyFileError
from twinmesh.testing.twins import twin_mesh
from twinmesh.testing.web import friendly_twin, served_page
from twinmesh.twin import api
from twinmesh.twin.web import (
    WebLimits,
    load_or_create_token,
    page_url,
    parse_http_address,
    serve_web,
    write_page_url,
)
from twinmesh.wire import schemas

TOKEN = "t" * 43
PEER = "b" * 52


# --- a stand-in for Twin ----------------------------------------------------------------------


class TwinDouble:
    """Test double for `twinmesh.twin.service.Twin`: canned answers, events on demand."""

    def __init__(self) -> None:
        self.subscribers: list[trio.MemorySendChannel[dict[str, Any]]] = []
        self.sent: list[tuple[str, str]] = []
        self.ping_release = trio.Event()
        self.subscribe_error: ApiError | None = None

    def identity_info(self) -> dict[str, Any]:
        return {"twin": "a" * 52, "name": "alice", "nic": "n" * 52, "nicSocket": "/x"}

    async def status(self) -> dict[str, Any]:
        return {"twin": "a" * 52, "name": "alice", "connected": True, "nic": "n" * 52}

    async def ping(self, twin: str, *, timeout: float = 5.0, sequence: int = 0) -> dict[str, Any]:
        await self.ping_release.wait()
        return {"twin": twin, "sequence": sequence, "rtt": 0.001}

    async def send_text(self, twin: str, text: str, *, ttl: float = 300.0,
                        wait: bool = False) -> dict[str, Any]:
        self.sent.append((twin, text))
        return entry(text, outgoing=True)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        if self.subscribe_error is not None:
            raise self.subscribe_error
        send, receive = trio.open_memory_channel[dict[str, Any]](64)
        self.subscribers.append(send)
        try:
            yield receive
        finally:
            self.subscribers.remove(send)

    def emit(self, event: dict[str, Any]) -> None:
        """Like the real twin: a subscriber that does not keep up loses events."""
        for send in self.subscribers:
            with suppress(trio.WouldBlock):
                send.send_nowait(event)


def entry(text: str, *, outgoing: bool = False, message_id: str = "ab12") -> dict[str, Any]:
    return {"id": message_id, "peer": PEER, "outgoing": outgoing, "text": text, "at": 1.0,
            "status": "queued" if outgoing else "received"}


# --- helpers -------------------------------------------------------------------------------


@asynccontextmanager
async def web_server(twin: Any, **limits: Any) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(partial(serve_web, twin, "127.0.0.1", 0, TOKEN,
                                              limits=WebLimits(**limits)))
        yield port
        nursery.cancel_scope.cancel()


def page(port: int, *, token: str = TOKEN, origin: str | None = "own",
         stream: trio.abc.Stream | None = None, max_queue: int = 16) -> connect:
    if origin == "own":
        origin = f"http://127.0.0.1:{port}"
    return connect(f"ws://127.0.0.1:{port}/ws?token={token}", origin=origin,  # type: ignore[arg-type]
                   proxy=None, compression=None, stream=stream, max_queue=max_queue)


async def small_window_stream(port: int) -> trio.SocketStream:
    """A TCP connection whose receive buffer stays tiny, so a reader that stops
    reading stalls the sender after a few kilobytes."""
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def ask(ws: ClientConnection, request: dict[str, Any] | str) -> dict[str, Any]:
    await ws.send(request if isinstance(request, str) else json.dumps(request))
    with trio.fail_after(10):
        reply: dict[str, Any] = json.loads(await ws.recv())
    return reply


async def http_get(port: int, path: str, *, host: str | None = None,
                   method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        host = host or f"127.0.0.1:{port}"
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# --- token and URL helpers -----------------------------------------------------------------


def test_token_is_created_private_and_kept(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path)
    assert len(token) >= 43
    assert stat.S_IMODE((tmp_path / "web.token").stat().st_mode) == 0o600
    assert load_or_create_token(tmp_path) == token


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    load_or_create_token(tmp_path)
    (tmp_path / "web.token").chmod(0o644)
    with pytest.raises(KeyFileError, match=r"web.token.*too open"):
        load_or_create_token(tmp_path)


def test_a_corrupt_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "web.token").write_text("short\n")
    (tmp_path / "web.token").chmod(0o600)
    with pytest.raises(KeyFileError, match="corrupt web token"):
        load_or_create_token(tmp_path)


def test_page_url_and_url_file(tmp_path: Path) -> None:
    assert page_url("127.0.0.1", 8080, "abc") == "http://127.0.0.1:8080/?token=abc"
    assert page_url("::1", 8080, "abc") == "http://[::1]:8080/?token=abc"
    path = write_page_url(tmp_path, "http://127.0.0.1:8080/?token=abc")
    assert path.read_text() == "http://127.0.0.1:8080/?token=abc\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_http_address_must_be_loopback() -> None:
    assert parse_http_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_http_address("[::1]:0") == ("::1", 0)
    assert parse_http_address("localhost:9") == ("127.0.0.1", 9)
    with pytest.raises(ConfigError, match="loopback-only"):
        parse_http_address("0.0.0.0:8080")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_http_address("127.0.0.1")


async def test_serving_on_a_non_loopback_address_is_refused() -> None:
    for host in ("0.0.0.0", "192.0.2.1", "example.org"):
        with pytest.raises(ConfigError, match="loopback-only"):
            await serve_web(TwinDouble(), host, 0, TOKEN)  # type: ignore[arg-type]


# --- the page over HTTP --------------------------------------------------------------------


async def test_the_page_needs_the_token() -> None:
    async with web_server(TwinDouble()) as port:
        status, headers, body = await http_get(port, f"/?token={TOKEN}")
        assert status == 200
        assert headers["content-type"].startswith("text/html")
        assert b'src="app.js"' in body
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["referrer-policy"] == "no-referrer"
        for path in ("/", "/?token=wrong", "/index.html"):
            status, _, body = await http_get(port, path)
            assert status == 403
            assert body.decode().count("\n") == 1
            assert b"token" in body


async def test_static_files_unknown_paths_and_methods() -> None:
    async with web_server(TwinDouble()) as port:
        status, headers, body = await http_get(port, "/twinmesh.js")
        assert status == 200
        assert headers["content-type"].startswith("text/javascript")
        assert b"export function connect" in body
        assert (await http_get(port, "/style.css"))[0] == 200
        assert (await http_get(port, "/app.js"))[0] == 200
        assert (await http_get(port, "/../pyproject.toml"))[0] == 404
        assert (await http_get(port, "/secret"))[0] == 404
        assert (await http_get(port, "/", method="DELETE"))[0] == 405


async def test_a_foreign_host_header_is_refused() -> None:
    # DNS rebinding: evil.example resolving to 127.0.0.1 still names itself in Host.
    async with web_server(TwinDouble()) as port:
        status, _, body = await http_get(port, f"/?token={TOKEN}", host=f"evil.example:{port}")
        assert status == 403
        assert b"Host" in body
        assert (await http_get(port, f"/?token={TOKEN}", host=f"localhost:{port}"))[0] == 200


# --- the websocket's guards ----------------------------------------------------------------


async def test_websocket_needs_the_token() -> None:
    async with web_server(TwinDouble()) as port:
        with pytest.raises(InvalidStatus) as refused:
            async with page(port, token="wrong"):
                pass
        assert refused.value.response.status_code == 403
        assert b"token" in refused.value.response.body


async def test_websocket_refuses_other_origins() -> None:
    async with web_server(TwinDouble()) as port:
        for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null"):
            with pytest.raises(InvalidStatus) as refused:
                async with page(port, origin=origin):
                    pass
            assert refused.value.response.status_code == 403
            assert b"origin" in refused.value.response.body
        for allowed in ("own", f"http://localhost:{port}", None):
            async with page(port, origin=allowed) as ws:
                assert "status" in await ask(ws, {"id": 1, "status": None})


async def test_too_many_pages_are_refused_with_a_reason() -> None:
    async with (
        web_server(TwinDouble(), max_connections=2) as port,
        page(port) as one,
        page(port) as two,
    ):
        await ask(one, {"id": 1, "status": None})
        await ask(two, {"id": 1, "status": None})
        with pytest.raises(InvalidStatus) as refused:
            async with page(port):
                pass
        assert refused.value.response.status_code == 503


# --- requests and typed errors ---------------------------------------------------------------


async def test_requests_are_answered_with_their_id() -> None:
    twin = TwinDouble()
    async with web_server(twin) as port, page(port) as ws:
        reply = await ask(ws, {"id": 7, "send": {"twin": PEER, "text": "hi"}})
        assert reply["id"] == 7
        api.validate(schemas.api.Response, reply)
        assert reply["sent"]["text"] == "hi"
        assert twin.sent == [(PEER, "hi")]
        assert (await ask(ws, {"id": 8, "identity": None}))["identity"]["name"] == "alice"


@pytest.mark.parametrize("bad", [
    "{not json",
    "[1, 2]",
    '{"id": 3, "launch": {}}',
    '{"id": 3, "send": {"twin": 5}}',
    '{"id": 3}',
])
async def test_malformed_requests_get_a_typed_error_and_the_page_stays(bad: str) -> None:
    async with web_server(TwinDouble()) as port, page(port) as ws:
        reply = await ask(ws, bad)
        assert reply["error"]["code"] == "malformed"
        assert reply["error"]["message"]
        api.validate(schemas.api.Response, reply)
        assert (await ask(ws, {"id": 4, "status": None}))["id"] == 4


async def test_a_large_request_gets_an_error_a_huge_one_closes_with_a_code() -> None:
    async with web_server(TwinDouble()) as port, page(port) as ws:
        large = json.dumps({"id": 5, "send": {"twin": PEER, "text": "x" * (100 * 1024)}})
        reply = await ask(ws, large)
        assert reply["error"]["code"] == "malformed"
        assert "exceeds" in reply["error"]["message"]
        assert (await ask(ws, {"id": 6, "status": None}))["id"] == 6
        await ws.send("x" * (1024 * 1024))
        with pytest.raises(ConnectionClosed):
            with trio.fail_after(10):
                await ws.recv()
        assert ws.close_code == 1009  # message too big


async def test_a_slow_request_does_not_hold_up_the_others() -> None:
    twin = TwinDouble()
    async with web_server(twin) as port, page(port) as ws:
        await ws.send(json.dumps({"id": 1, "ping": {"twin": PEER}}))
        assert (await ask(ws, {"id": 2, "status": None}))["id"] == 2
        twin.ping_release.set()
        with trio.fail_after(10):
            reply = json.loads(await ws.recv())
        assert reply["id"] == 1
        assert reply["ping"]["twin"] == PEER


# --- events ----------------------------------------------------------------------------------


async def test_events_flow_only_after_subscribe() -> None:
    twin = TwinDouble()
    async with web_server(twin) as port, page(port) as ws:
        twin.emit({"message": entry("before")})  # nobody subscribed yet: not sent
        assert (await ask(ws, {"id": 1, "subscribe": None})) == {"id": 1, "done": None}
        twin.emit({"message": entry("after")})
        twin.emit({"messageStatus": {"id": "ab12", "status": "delivered", "code": ""}})
        with trio.fail_after(10):
            first = json.loads(await ws.recv())
            second = json.loads(await ws.recv())
        assert first == {"event": {"message": entry("after")}}
        assert second["event"]["messageStatus"]["status"] == "delivered"
        api.validate(schemas.api.Event, first["event"])
        assert (await ask(ws, {"id": 2, "subscribe": None}))["id"] == 2
        assert len(twin.subscribers) == 1  # subscribing twice does not double events
    with trio.fail_after(10):
        while twin.subscribers:  # the page closed: its subscription ends
            await trio.sleep(0.01)


async def test_subscribing_twice_at_once_gives_one_stream_of_events() -> None:
    twin = TwinDouble()
    async with web_server(twin) as port, page(port) as ws:
        await ws.send(json.dumps({"id": 1, "subscribe": None}))
        await ws.send(json.dumps({"id": 2, "subscribe": None}))
        with trio.fail_after(10):
            replies = [json.loads(await ws.recv()) for _ in range(2)]
        assert sorted(r["id"] for r in replies) == [1, 2]
        assert all("done" in r for r in replies)
        assert len(twin.subscribers) == 1


async def test_a_refused_subscription_is_a_typed_error() -> None:
    twin = TwinDouble()
    twin.subscribe_error = ApiError("offline", "no events now")
    async with web_server(twin) as port, page(port) as ws:
        reply = await ask(ws, {"id": 1, "subscribe": None})
        assert reply["error"] == {"code": "offline", "message": "no events now"}


@pytest.mark.parametrize("limits, close_code", [
    ({"event_backlog": 8}, 1013),  # events pile up: closed with a reason
    ({"event_backlog": 100_000, "send_timeout": 0.5}, 1006),  # a send stalls: aborted
])
async def test_a_page_that_stops_reading_never_blocks_the_twin(
    limits: dict[str, Any], close_code: int
) -> None:
    twin = TwinDouble()
    async with web_server(twin, **limits) as port, page(
        port, stream=await small_window_stream(port), max_queue=1
    ) as slow:
        await ask(slow, {"id": 1, "subscribe": None})
        # `slow` now reads nothing: its client stops reading the socket once one
        # message is queued, so kernel buffers fill and the server's sends stall.
        big = entry("x" * 16_000)
        with trio.fail_after(20):
            for _ in range(1_000):  # 16 MB: far more than the buffers between them
                if not twin.subscribers:
                    break
                twin.emit({"message": big})
                await trio.lowlevel.checkpoint()
            while twin.subscribers:  # cut off: the server let go of the subscription
                await trio.sleep(0.01)
        async with page(port) as other:  # meanwhile the twin serves everyone else
            assert (await ask(other, {"id": 2, "status": None}))["status"]["name"] == "alice"
        with trio.fail_after(20), pytest.raises(ConnectionClosed):
            while True:
                await slow.recv()
        assert slow.close_code == close_code
        if close_code == 1013:
            assert "fell behind" in (slow.close_reason or "")


# --- end to end: a page on a real twin, chatting across a real mesh --------------------------


class PageClient:
    """What a page does over the websocket: requests by id, events on the side."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.next_id = 1

    async def request(self, op: str, value: Any = None) -> dict[str, Any]:
        request_id, self.next_id = self.next_id, self.next_id + 1
        await self.ws.send(json.dumps({"id": request_id, op: value}))
        while True:
            message = await self.receive()
            if message.get("id") == request_id:
                return message

    async def receive(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await self.ws.recv())
        if "event" in message:
            api.validate(schemas.api.Event, message["event"])
            self.events.append(message["event"])
        else:
            api.validate(schemas.api.Response, message)
        return message

    async def wait_event(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        seen = 0
        while True:
            for event in self.events[seen:]:
                if match(event):
                    return event
            seen = len(self.events)
            await self.receive()


@asynccontextmanager
async def open_page(url: str) -> AsyncIterator[PageClient]:
    parts = urlsplit(url)
    ws_url = f"ws://{parts.netloc}/ws?{parts.query}"
    async with connect(ws_url, origin=f"http://{parts.netloc}",  # type: ignore[arg-type]
                       proxy=None) as ws:
        yield PageClient(ws)


async def test_a_page_chats_with_a_twin_two_hops_away(tmp_path: Path) -> None:
    async with twin_mesh(tmp_path, nics=3) as mesh:
        alice, carol = mesh.twins[0], mesh.twins[2]
        await mesh.nursery.start(partial(friendly_twin, carol, lambda text: f"carol got: {text}"))
        with trio.fail_after(30):
            async with served_page(alice) as url, open_page(url) as page_:
                status = await page_.request("status")
                assert status["status"]["connected"] is True
                assert status["status"]["twin"] == alice.key.text
                assert (await page_.request("subscribe")) == {"id": 2, "done": None}
                sent = (await page_.request("send", {"twin": carol.key.text,
                                                     "text": "hello"}))["sent"]
                assert sent["outgoing"] and sent["text"] == "hello"
                reply = await page_.wait_event(
                    lambda e: "message" in e and not e["message"]["outgoing"])
                assert reply["message"]["text"] == "carol got: hello"
                assert reply["message"]["peer"] == carol.key.text
                await page_.wait_event(lambda e: e.get("messageStatus", {}) == {
                    "id": sent["id"], "status": "delivered", "code": ""})
                pong = await page_.request("ping", {"twin": carol.key.text, "sequence": 3})
                assert pong["ping"]["sequence"] == 3 and pong["ping"]["rtt"] > 0
                unknown = await page_.request("ping", {"twin": "x"})
                assert unknown["error"]["code"] == "malformed"
