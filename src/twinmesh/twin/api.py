"""The twin's API: one JSON request in, one JSON response out (schemas/api.capnp).

The same dispatcher serves `twinctl` on the twin's control socket and the browser on
its websocket. Every request is checked against the `Request` struct before anything
runs: an unknown field, a wrong type or a missing union member is answered with a
`malformed` error naming the problem, never a dropped connection.

    response = await handle(twin, '{"id": 1, "send": {"twin": "...", "text": "hi"}}')
    # {"id": 1, "sent": {...ChatEntry...}}  or  {"id": 1, "error": {"code": ..., "message": ...}}
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from twinmesh.errors import ApiError, TwinmeshError
from twinmesh.wire import schemas

if TYPE_CHECKING:
    from twinmesh.twin.service import Twin

MAX_REQUEST = 64 * 1024  # bytes of JSON; a chat text is far below this
_api = schemas.api
_KJ_REASON = re.compile(r"failed: (?:expected [^;]*; )?(.*?)(?:\nstack:|$)", re.S)


def parse_request(raw: str | bytes) -> tuple[int, str, Any]:
    """(id, which, value) of a JSON request; ApiError(malformed) saying what is wrong."""
    if len(raw) > MAX_REQUEST:
        raise ApiError("malformed", f"request of {len(raw)} bytes exceeds {MAX_REQUEST}")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError("malformed", f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ApiError("malformed", "a request is a JSON object")
    common = _parse_common(obj)
    return common if common is not None else _parse_with_schema(obj)


def _parse_with_schema(obj: dict[str, Any]) -> tuple[int, str, Any]:
    """`parse_request` for any JSON object, checked against the `Request` struct."""
    request_id = obj.get("id", 0)
    try:
        message = _api.Request.new_message(**obj)
        which = str(message.which())
    except Exception as exc:  # pycapnp reports schema mismatches as KjException
        raise ApiError("malformed", _capnp_reason(exc)) from None
    if which not in obj:
        raise ApiError("malformed", "a request names one operation (e.g. \"status\": null)")
    value = getattr(message, which)
    if which == "setSettings" and isinstance(obj[which], dict):
        # Settings change only what the caller named (schema defaults are not a wish).
        value = {k: v for k, v in value.to_dict().items() if k in obj[which]}
    elif hasattr(value, "to_dict"):
        value = value.to_dict()
    elif which in _VOID_OPS:
        value = None
    return int(request_id) if isinstance(request_id, int) else 0, which, value


# Building a Cap'n Proto message to check a request costs ~40 µs; a chat `send` is
# most of what a busy twin is asked. These shapes are checked by hand instead, only
# where the result is exactly what `_parse_with_schema` would give (the tests compare
# both on valid and invalid requests); anything else goes the schema's way.
_VOID_OPS = frozenset(("identity", "status", "contacts", "getSettings", "subscribe"))
_TEXT_OPS = frozenset(("find", "messageStatus", "removeContact", "move"))
_SEND_FIELDS = frozenset(("twin", "text", "ttl", "wait"))
_U32 = 1 << 32
_EXACT_FLOAT = 1 << 53  # ints up to this convert to Float64 without rounding


def _parse_common(obj: dict[str, Any]) -> tuple[int, str, Any] | None:
    """(id, which, value) of a common, well-formed request; None: not sure, ask the schema."""
    request_id = obj.get("id", 0)
    if type(request_id) is not int or not 0 <= request_id < _U32:
        return None
    if len(obj) != (2 if "id" in obj else 1):
        return None
    which, value = next((k, v) for k, v in obj.items() if k != "id")
    if which in _VOID_OPS:
        return (request_id, which, None) if value is None else None
    if which in _TEXT_OPS:
        return (request_id, which, value) if _is_text(value) else None
    if which == "send" and type(value) is dict:
        send = _send_fields(value)
        return None if send is None else (request_id, which, send)
    return None


def _send_fields(value: dict[str, Any]) -> dict[str, Any] | None:
    if not value.keys() <= _SEND_FIELDS or "twin" not in value or "text" not in value:
        return None
    twin, text = value["twin"], value["text"]
    ttl, wait = value.get("ttl", 300.0), value.get("wait", False)
    if not (_is_text(twin) and _is_text(text) and type(wait) is bool):
        return None
    if type(ttl) is int and -_EXACT_FLOAT <= ttl <= _EXACT_FLOAT:
        ttl = float(ttl)
    elif type(ttl) is not float:
        return None
    return {"twin": twin, "text": text, "ttl": ttl, "wait": wait}


def _is_text(value: Any) -> bool:
    """A str the schema stores as Text (UTF-8: no lone surrogates)."""
    if type(value) is not str:
        return False
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


async def handle(twin: Twin, raw: str | bytes) -> dict[str, Any]:
    """Answer one request; never raises for anything the caller sent."""
    try:
        request_id, which, value = parse_request(raw)
    except ApiError as exc:
        return error_response(_guess_id(raw), exc.code, exc.message)
    return await answer(twin, request_id, which, value)


def answer_soon(twin: Twin, request_id: int, which: str, value: Any,
                done: Callable[[dict[str, Any]], None],
                spawn: Callable[[Callable[[], Awaitable[None]]], None]) -> bool:
    """Answer a parsed request through a callback where that saves a task: a chat
    `send` that does not wait (`Twin.send_text_soon`). True: `done` gets the response
    exactly once (perhaps already did); False: nothing was done, call `answer`."""
    if which != "send" or value["wait"]:
        return False

    def sent(result: dict[str, Any] | ApiError) -> None:
        if isinstance(result, ApiError):
            done(error_response(request_id, result.code, result.message))
        else:
            done({"id": request_id, "sent": result})

    try:
        return twin.send_text_soon(value["twin"], value["text"], ttl=value["ttl"],
                                   done=sent, spawn=spawn)
    except ApiError as exc:
        done(error_response(request_id, exc.code, exc.message))
        return True


async def answer(twin: Twin, request_id: int, which: str, value: Any) -> dict[str, Any]:
    """The response to a parsed request; never raises for anything the caller sent."""
    try:
        result = await dispatch(twin, which, value)
    except ApiError as exc:
        return error_response(request_id, exc.code, exc.message)
    except TwinmeshError as exc:  # e.g. a BusError from the bus client
        return error_response(request_id, getattr(exc, "code", "failed"), str(exc))
    return {"id": request_id, **result}


async def dispatch(twin: Twin, which: str, value: Any) -> dict[str, Any]:
    """The response body (one `Response` union member) for a parsed request."""
    if which == "identity":
        return {"identity": twin.identity_info()}
    if which == "status":
        return {"status": await twin.status()}
    if which == "ping":
        return {"ping": await twin.ping(value["twin"], timeout=value["timeout"],
                                        sequence=value["sequence"])}
    if which == "find":
        return {"find": await twin.find(value)}
    if which == "send":
        return {"sent": await twin.send_text(value["twin"], value["text"], ttl=value["ttl"],
                                             wait=value["wait"])}
    if which == "inbox":
        return {"inbox": await twin.inbox(value.get("peer", ""), limit=value["limit"],
                                          since=value.get("since", 0.0))}
    if which == "messageStatus":
        return {"messageStatus": await twin.message_status(value)}
    if which == "contacts":
        return {"contacts": await twin.contacts()}
    if which == "addContact":
        return {"contact": await twin.add_contact(value["twin"], value.get("name", ""))}
    if which == "acceptContact":
        return {"contact": await twin.accept_contact(value["twin"], value.get("name", ""))}
    if which == "removeContact":
        await twin.remove_contact(value)
        return {"done": None}
    if which == "getSettings":
        return {"settings": await twin.settings()}
    if which == "setSettings":
        return {"settings": await twin.set_settings(
            contacts_only=value.get("contactsOnly"), name=value.get("name"))}
    if which == "move":
        return {"identity": await twin.move(value)}
    if which == "subscribe":
        # The transport keeps the connection open and forwards `twin.subscribe()`.
        return {"done": None}
    raise ApiError("malformed", f"{which!r} is not an operation of this twin")


def error_response(request_id: int, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": {"code": code, "message": message[:500]}}


def validate(struct: Any, obj: dict[str, Any]) -> None:
    """Raise ApiError(malformed) unless `obj` fits `struct` (used on what we send, in
    tests, and by transports that accept typed events)."""
    try:
        struct.new_message(**obj)
    except Exception as exc:
        raise ApiError("malformed", _capnp_reason(exc)) from None


def _capnp_reason(exc: Exception) -> str:
    text = str(exc)
    match = _KJ_REASON.search(text)
    reason = match.group(1).strip() if match else text.splitlines()[0] if text else repr(exc)
    return reason.replace("\n", " ")[:300]


def _guess_id(raw: str | bytes) -> int:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return 0
    value = obj.get("id", 0) if isinstance(obj, dict) else 0
    return value if isinstance(value, int) and 0 <= value < 2**32 else 0
