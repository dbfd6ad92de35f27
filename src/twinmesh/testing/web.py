"""Helpers for tests of the twin's web page: serve a twin's page, and a friendly twin
that answers every chat message and accepts every contact request.

    async with twin_mesh(tmp_path, nics=3) as mesh, served_page(mesh.twins[0]) as url:
        await mesh.nursery.start(friendly_twin, mesh.twins[2], lambda text: f"re: {text}")
        ...  # open `url` in a browser, chat with mesh.twins[2]
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio

from twinmesh.twin.service import Twin
from twinmesh.twin.web import page_url, serve_web


@asynccontextmanager
async def served_page(twin: Twin) -> AsyncIterator[str]:
    """Serve `twin`'s page on a free loopback port; yields the page URL with its token."""
    token = secrets.token_urlsafe(32)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(partial(serve_web, twin, "127.0.0.1", 0, token))
        yield page_url(host, port, token)
        nursery.cancel_scope.cancel()


async def friendly_twin(twin: Twin, reply: Callable[[str], str], *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer every chat message `twin` receives with `reply(text)` and accept every
    contact request, until cancelled."""
    async with twin.subscribe() as events:
        task_status.started()
        async for event in events:
            message = event.get("message")
            if message is not None and not message["outgoing"]:
                await twin.send_text(message["peer"], reply(message["text"]))
            contact = event.get("contact")
            if contact is not None and contact["state"] == "pending":
                await twin.accept_contact(contact["twin"])
