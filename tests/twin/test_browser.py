"""The twin's page in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright's Python package; no browser download): a person opens the page, chats
with a twin two NICs away and sees the reply and the delivery arrive; another web
page in the same browser cannot drive the twin.

Playwright's sync API runs in a worker thread, so the twins keep running in trio.
Skipped with the reason when Chromium or Playwright is missing -- except under CI
(CI=true), where the setup installs both and a missing browser is a failure.
"""

from __future__ import annotations

import importlib.util
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from twinmesh.testing.twins import twin_mesh
from twinmesh.testing.web import friendly_twin, served_page

CHROMIUM = Path(os.environ.get("TWINMESH_CHROMIUM", "/usr/bin/chromium"))
ACTION_TIMEOUT_MS = 20_000  # each browser step; the mesh answers in milliseconds


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright's Python package is not installed (pip install playwright)"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


if (reason := _missing()) is not None and os.environ.get("CI"):
    pytest.fail(f"the browser test cannot run under CI: {reason}", pytrace=False)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(reason is not None, reason=reason or ""),
]


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)


def chat_in_browser(url: str, peer: str, text: str, expected_reply: str,
                    screenshot: Path) -> dict[str, Any]:
    """What a person does: open the page, open a chat with `peer`, send `text`, wait
    for the reply and the delivery mark, ping, add `peer` as a contact and see it
    accepted. Returns what the page showed."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.set_default_timeout(ACTION_TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_selector('#link-status[data-state="open"]')
            page.wait_for_selector('#nic-status[data-connected="true"]')
            shown = {"me": page.text_content("#me-id")}
            page.fill("#open-twin", peer)
            page.click("#open-chat button")
            page.fill("#message-text", text)
            page.click("#send")
            incoming = page.wait_for_selector("#messages li.incoming")
            shown["reply"] = incoming.query_selector(".text").text_content()
            page.wait_for_selector('#messages li.outgoing[data-status="delivered"]')
            shown["outgoing"] = page.text_content("#messages li.outgoing .text")
            page.click("#ping")
            page.wait_for_selector("#ping-result:has-text('RTT')")  # CSP: no eval
            shown["ping"] = page.text_content("#ping-result")
            page.fill("#add-twin", peer)
            page.fill("#add-name", "Carol")
            page.click("#add-contact button")
            page.wait_for_selector(f'#peers li[data-twin="{peer}"] .contact-state:text("accepted")')
            shown["peer"] = page.text_content(f'#peers li[data-twin="{peer}"] .peer')
            page.screenshot(path=str(screenshot), full_page=True)
            shown["errors"] = errors
            return shown
        finally:
            browser.close()


def drive_from_another_origin(page_url: str, other_url: str) -> dict[str, str]:
    """A page of another local web app (`other_url`) that even knows the token tries
    to open the twin's websocket, with twinmesh.js and with a bare WebSocket."""
    from playwright.sync_api import sync_playwright

    base = page_url.split("/?")[0]
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.set_default_timeout(ACTION_TIMEOUT_MS)
            page.goto(other_url)
            # The import working shows this page does reach the twin's server...
            with_module = page.evaluate("""async ([module, url]) => {
                const m = await import(module);
                try { await m.connect(url); return "open"; }
                catch (err) { return err.code; }
            }""", [f"{base}/twinmesh.js", page_url])
            # ...so only the websocket's Origin check can turn it away.
            bare = page.evaluate("""(url) => new Promise((resolve) => {
                const ws = new WebSocket(url);
                ws.onopen = () => resolve("open");
                ws.onclose = (ev) => resolve("closed " + ev.code);
            })""", page_url.replace("http://", "ws://").replace("/?token=", "/ws?token="))
            return {"module": with_module, "bare": bare}
        finally:
            browser.close()


async def serve_other_app(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    """Another web app on this machine: one static page on a loopback port."""
    page = b"<!doctype html><title>another local app</title><p>hello"
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(page))

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(10):
                await stream.receive_some()
                await stream.send_all(head + page)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, answer, listeners)
        task_status.started(f"http://127.0.0.1:{port}/")


async def test_a_person_chats_from_the_page_with_a_twin_two_hops_away(tmp_path: Path) -> None:
    async with twin_mesh(tmp_path, nics=3) as mesh:
        alice, carol = mesh.twins[0], mesh.twins[2]
        await mesh.nursery.start(partial(friendly_twin, carol, lambda text: f"carol got: {text}"))
        async with served_page(alice) as url:
            shown = await trio.to_thread.run_sync(partial(
                chat_in_browser, url, carol.key.text, "hello from the browser",
                "carol got: hello from the browser", tmp_path / "page.png"))
        history = await carol.inbox(alice.key.text)
    assert shown["errors"] == []
    assert shown["me"] == alice.key.text
    assert shown["outgoing"] == "hello from the browser"
    assert shown["reply"] == "carol got: hello from the browser"
    assert shown["ping"].startswith("RTT ") and shown["ping"].endswith(" ms")
    assert shown["peer"] == "Carol"
    assert ("hello from the browser", False) in [(m["text"], m["outgoing"]) for m in history]


async def test_another_page_in_the_same_browser_cannot_drive_the_twin(tmp_path: Path) -> None:
    async with twin_mesh(tmp_path, nics=1) as mesh, served_page(mesh.twins[0]) as url:
        other = await mesh.nursery.start(serve_other_app)
        outcome = await trio.to_thread.run_sync(drive_from_another_origin, url, other)
    assert outcome["module"] == "refused"
    assert outcome["bare"] == "closed 1006"
