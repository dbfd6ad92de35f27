"""`twinctl id|status|ping|find|send|inbox|contacts|settings|web|move`: drive your twin.

Every command talks to the twin's control socket (`--twin` names its state dir or the
socket) and returns (data for --json, text for humans[, exit code]); commands that
stream (`ping`, `inbox --follow`) print as they go and return what is left to print.
Twin ids are checked here, before anything is sent, so a typo is a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from twinmesh.cli import render
from twinmesh.cli.nic import ping_summary
from twinmesh.control.twin_client import (
    CALL_TIMEOUT,
    TwinClient,
    connect_twin,
    control_socket_path,
    twin_call,
)
from twinmesh.errors import ApiError
from twinmesh.identity.keys import PublicKey
from twinmesh.twin.service import WEB_URL_FILE

Outcome = tuple[Any, str | None] | tuple[Any, str | None, int]

MAX_TTL = 1800.0
MAX_INBOX = 10_000
FINAL_FAILURES = ("expired", "failed")
# Codes that end a ping run: the twin itself is gone, not just one echo.
FATAL_PING_CODES = ("notRunning", "disconnected", "malformed")


def twin_id(text: str) -> str:
    """argparse type: a twin id (52 base32 characters), canonical lowercase."""
    try:
        return PublicKey.from_text(text).text
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not a twin id: {exc}") from None


def bounded(kind: Callable[[str], float], low: float, high: float, *,
            low_open: bool = False) -> Callable[[str], float]:
    """argparse type: a number of `kind` in [low, high] (or (low, high])."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value > high or value < low or (low_open and value == low):
            opening = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"{text} is not in {opening}{low:g}, {high:g}]")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def point_in_time(text: str) -> float:
    """argparse type: a time as unix seconds or ISO 8601 (`2026-11-21T20:00`, local
    time unless it names a zone); unix seconds out."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = datetime.datetime.fromisoformat(text).timestamp()
        except (ValueError, OverflowError, OSError):
            raise argparse.ArgumentTypeError(
                f"{text[:60]!r} is not a time (unix seconds or ISO 8601, e.g. "
                f"2026-11-21T20:00)") from None
    if not 0 < value < 1e11:
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not a time after 1970")
    return value


def message_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty message (give the text to send)")
    return text


def on_off(text: str) -> bool:
    if text.lower() in ("on", "yes", "true", "1"):
        return True
    if text.lower() in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected on or off")


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    def command(name: str, run: Callable[[argparse.Namespace], Awaitable[Outcome]],
                help_text: str, parent: Any = subparsers) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(name, help=help_text,
                                                            parents=[common])
        parser.set_defaults(run=run)
        return parser

    command("id", show_id, "print this twin's id")
    command("status", status, "identity, NIC, uptime, queued and unread messages")

    ping_parser = command("ping", ping, "ping another twin (round trip through the bus)")
    ping_parser.add_argument("twin_id", type=twin_id, metavar="TWIN_ID")
    ping_parser.add_argument("-c", "--count", type=bounded(int, 1, 1_000_000),
                             help="stop after N pings (default: until Ctrl-C)")
    ping_parser.add_argument("-i", "--interval", type=bounded(float, 0.01, 60), default=1.0,
                             help="seconds between pings (default 1)")
    ping_parser.add_argument("-W", "--timeout", type=bounded(float, 0, 60, low_open=True),
                             default=5.0, help="seconds to wait for each reply (default 5)")

    find_parser = command("find", find, "look a twin up: identity, NIC, hops, lookup time")
    find_parser.add_argument("twin_id", type=twin_id, metavar="TWIN_ID")

    send_parser = command("send", send, "send a chat message")
    send_parser.add_argument("twin_id", type=twin_id, metavar="TWIN_ID")
    send_parser.add_argument("text", type=message_text, metavar="TEXT")
    send_parser.add_argument("--ttl", type=bounded(float, 1, MAX_TTL), default=300.0,
                             help="seconds until the message expires (default 300)")
    send_parser.add_argument("--wait", action="store_true",
                             help="return once delivered (exit 1 if it expires or fails)")

    inbox_parser = command("inbox", inbox, "conversation history, oldest first")
    inbox_parser.add_argument("--with", dest="peer", type=twin_id, metavar="TWIN_ID",
                              help="only the conversation with this twin")
    inbox_parser.add_argument("-n", "--limit", type=bounded(int, 1, MAX_INBOX), default=50,
                              help="the newest N messages (default 50); with --since, "
                                   "the first N from then on")
    inbox_parser.add_argument("--since", type=point_in_time, metavar="TIME",
                              help="messages recorded at or after TIME (unix seconds or "
                                   "ISO 8601, local time unless it names a zone)")
    inbox_parser.add_argument("-f", "--follow", action="store_true",
                              help="then print new messages and status changes until Ctrl-C")

    contacts_parser = subparsers.add_parser("contacts", help="your trusted network",
                                            parents=[common])
    contacts = contacts_parser.add_subparsers(dest="contacts_command", required=True,
                                              metavar="COMMAND")
    command("list", list_contacts, "contacts and pending requests", contacts)
    add = command("add", add_contact, "add a contact and ask it to add you back", contacts)
    add.add_argument("twin_id", type=twin_id, metavar="TWIN_ID")
    add.add_argument("--name", default="", help="your name for this contact")
    accept = command("accept", accept_contact, "accept a contact request", contacts)
    accept.add_argument("twin_id", type=twin_id, metavar="TWIN_ID")
    accept.add_argument("--name", default="", help="your name for this contact")
    remove = command("remove", remove_contact, "forget a contact", contacts)
    remove.add_argument("twin_id", type=twin_id, metavar="TWIN_ID")

    settings_parser = command("settings", settings, "show or change this twin's settings")
    settings_parser.add_argument("--contacts-only", type=on_off, metavar="on|off",
                                 help="refuse chat from twins that are not contacts")
    settings_parser.add_argument("--name", help="this twin's display name")

    command("web", web, "print the browser page's URL (with its access token)")
    move_parser = command("move", move, "attach the twin to another NIC")
    move_parser.add_argument("nic_path", type=Path, metavar="NIC_PATH",
                             help="the NIC's state dir or its twins.sock")


# ------------------------------------------------------------------ commands


async def show_id(args: argparse.Namespace) -> Outcome:
    identity = await twin_call(args.twin, "identity")
    return identity, identity["twin"]


async def status(args: argparse.Namespace) -> Outcome:
    info = await twin_call(args.twin, "status")
    return info, render_status(info)


async def find(args: argparse.Namespace) -> Outcome:
    found = await twin_call(args.twin, "find", args.twin_id)
    return found, render_found(found)


async def send(args: argparse.Namespace) -> Outcome:
    entry = await twin_call(args.twin, "send", {"twin": args.twin_id, "text": args.text,
                                                "ttl": args.ttl, "wait": args.wait})
    if args.wait and entry["status"] in FINAL_FAILURES:
        why = f": {entry['code']}" if entry.get("code") else ""
        raise ApiError(entry["status"], f"message {entry['id'][:16]} to {peer_label(entry)} "
                                        f"was not delivered ({entry['status']}{why})")
    return entry, f"{entry['status']}: message {entry['id'][:16]} to {peer_label(entry)}"


async def inbox(args: argparse.Namespace) -> Outcome:
    request: dict[str, Any] = {"peer": args.peer or "", "limit": args.limit}
    if args.since is not None:
        request["since"] = args.since
    if not args.follow:
        entries = await twin_call(args.twin, "inbox", request)
        return entries, "\n".join(map(render_entry, oldest_first(entries))) or "no messages"
    async with connect_twin(args.twin) as client:
        await client.subscribe()  # before the history: nothing falls in between
        entries = await client.call("inbox", request)
        await until_interrupted(lambda: follow(args, client, oldest_first(entries)))
    return None, None


async def follow(args: argparse.Namespace, client: TwinClient,
                 history: list[dict[str, Any]]) -> None:
    shown = {entry["id"] for entry in history}
    for entry in history:
        emit(args, {"message": entry}, render_entry(entry))
    async for event in client.events():
        message = event.get("message")
        if message is not None:
            if message["id"] in shown or (args.peer and message["peer"] != args.peer):
                continue
            shown.add(message["id"])
        changed = event.get("messageStatus")
        if changed is not None and args.peer and changed["id"] not in shown:
            continue  # a message with someone else
        contact = event.get("contact")
        if contact is not None and args.peer and contact["twin"] != args.peer:
            continue
        emit(args, event, render_event(event))


async def list_contacts(args: argparse.Namespace) -> Outcome:
    rows = await twin_call(args.twin, "contacts")
    return rows, render.table(rows, CONTACT_COLUMNS) if rows else "no contacts"


async def add_contact(args: argparse.Namespace) -> Outcome:
    contact = await twin_call(args.twin, "addContact", {"twin": args.twin_id, "name": args.name})
    if contact["state"] == "accepted":
        return contact, f"accepted: {contact_label(contact)} is a contact"
    return contact, (f"requested: asked {contact_label(contact)} to add you back "
                     "(accepted once they accept)")


async def accept_contact(args: argparse.Namespace) -> Outcome:
    contact = await twin_call(args.twin, "acceptContact",
                              {"twin": args.twin_id, "name": args.name})
    return contact, f"accepted: {contact_label(contact)} is a contact"


async def remove_contact(args: argparse.Namespace) -> Outcome:
    await twin_call(args.twin, "removeContact", args.twin_id)
    return {"removed": args.twin_id}, f"removed {args.twin_id}"


async def settings(args: argparse.Namespace) -> Outcome:
    async with connect_twin(args.twin) as client:
        current = await client.call("getSettings")
        if args.contacts_only is not None or args.name is not None:
            # Settings is one struct: send both fields so the one not named stays as is.
            wanted = {
                "contactsOnly": current["contactsOnly"] if args.contacts_only is None
                else args.contacts_only,
                "name": current["name"] if args.name is None else args.name,
            }
            current = await client.call("setSettings", wanted)
    return current, render.key_values([
        ("contacts only", "on" if current["contactsOnly"] else "off"),
        ("name", current["name"] or "-"),
    ])


async def web(args: argparse.Namespace) -> Outcome:
    await twin_call(args.twin, "identity")  # a URL is only useful while twind runs
    url_file = twin_state_dir(args.twin) / WEB_URL_FILE
    try:
        url = url_file.read_text().strip()
    except FileNotFoundError:
        url = ""
    if not url:
        raise ApiError("noWeb", f"the twin at {twin_state_dir(args.twin)} serves no web page "
                                "(start twind with --http 127.0.0.1:PORT)")
    return {"url": url}, url


async def move(args: argparse.Namespace) -> Outcome:
    # The twin resolves the path in its own working directory: hand it an absolute one.
    path = args.nic_path.expanduser().absolute()
    if not path.exists():
        raise ApiError("malformed", f"no NIC at {path} (give a NIC's state dir or twins.sock)")
    identity = await twin_call(args.twin, "move", str(path))
    return identity, f"moved: attached to NIC {identity['nic']} ({identity['nicSocket']})"


async def ping(args: argparse.Namespace) -> Outcome:
    """Like ping(8): a ping every interval (not waiting for the last reply), a line per
    reply, a summary at -c N or Ctrl-C; exit 1 when nothing answered."""
    replies: dict[int, dict[str, Any]] = {}
    short = render.short_key(args.twin_id)
    async with connect_twin(args.twin) as client:

        async def one(seq: int) -> None:
            replies[seq] = {"seq": seq, "rtt": None, "error": "interrupted"}
            request = {"twin": args.twin_id, "timeout": args.timeout, "sequence": seq}
            try:
                result = await client.call("ping", request,
                                           timeout=args.timeout + CALL_TIMEOUT)
            except ApiError as exc:
                if exc.code in FATAL_PING_CODES:
                    raise
                replies[seq] = {"seq": seq, "rtt": None, "error": exc.code,
                                "message": exc.message}
                line = f"no reply: seq={seq} {exc.code}: {exc.message}"
            else:
                replies[seq] = {"seq": seq, "rtt": result["rtt"], "error": None}
                line = f"reply from {short}: seq={seq} rtt={result['rtt'] * 1e3:.2f} ms"
            if not args.json:
                print(line, file=args.out, flush=True)

        async def pings() -> None:
            async with trio.open_nursery() as nursery:
                for seq in itertools.count(1):
                    nursery.start_soon(one, seq)
                    if args.count is not None and seq >= args.count:
                        return
                    await trio.sleep(args.interval)

        if not args.json:
            print(f"PING {args.twin_id}", file=args.out, flush=True)
        await until_interrupted(pings)
    ordered = [replies[seq] for seq in sorted(replies)]
    summary = ping_summary(ordered)
    return ({"twin": args.twin_id, "replies": ordered, **summary},
            render_ping_summary(short, summary), 0 if summary["received"] else 1)


# ------------------------------------------------------------------ helpers


def oldest_first(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Times are all this twin's clock (sent or received here); stable for equal times.
    return sorted(entries, key=lambda entry: float(entry["at"]))


def twin_state_dir(path: Path) -> Path:
    """The state dir behind `--twin` (given as the dir or as its control socket)."""
    return control_socket_path(path).parent


async def until_interrupted(body: Callable[[], Awaitable[None]]) -> bool:
    """Run `body` until it returns or Ctrl-C; True when interrupted. Ctrl-C here is
    an ordinary way to end (ping's summary still prints), not an error."""
    interrupted = False
    async with trio.open_nursery() as nursery:

        async def watch(task_status: trio.TaskStatus[None]) -> None:
            nonlocal interrupted
            with trio.open_signal_receiver(signal.SIGINT) as signals:
                task_status.started()
                async for _ in signals:
                    interrupted = True
                    nursery.cancel_scope.cancel()

        # Signal handlers belong to the main thread; tests run twinctl in a worker.
        if threading.current_thread() is threading.main_thread():
            await nursery.start(watch)
        await body()
        nursery.cancel_scope.cancel()
    return interrupted


def emit(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, sort_keys=True) if args.json else human, file=args.out, flush=True)


CONTACT_COLUMNS: list[render.Column] = [
    ("TWIN", "twin", render.text),
    ("NAME", "name", render.text),
    ("STATE", "state", render.text),
    ("SINCE", "since", render.since),
]


def render_status(info: dict[str, Any]) -> str:
    if info["connected"]:
        nic = f"{info['nic']} (connected via {info['nicSocket']})"
    else:
        nic = "not attached (waiting for a NIC; messages queue meanwhile)"
    return render.key_values([
        ("twin", info["twin"]),
        ("name", info["name"] or "-"),
        ("nic", nic),
        ("uptime", render.duration(info["uptime"])),
        ("waiting", f"{info['waiting']} message(s) queued for the NIC"),
        ("unread", str(info["unread"])),
        ("contacts", str(info["contacts"])),
        ("version", info["version"]),
    ])


def render_found(found: dict[str, Any]) -> str:
    return render.key_values([
        ("twin", found["twin"]),
        ("name", found["name"] or "-"),
        ("nic", found["nic"]),
        ("hops", str(found["hops"])),
        ("rounds", f"{found['rounds']} ({found['queried']} NIC(s) asked)"),
        ("seqno", str(found["seqno"])),
        ("expires", "in " + render.duration(found["expires"] - time.time())),
        ("lookup", f"{found['elapsed'] * 1e3:.2f} ms"),
    ])


def render_ping_summary(short: str, summary: dict[str, Any]) -> str:
    human = (f"--- {short} ping statistics ---\n"
             f"{summary['sent']} sent, {summary['received']} received, "
             f"{summary['loss'] * 100:.0f}% loss")
    if summary["received"]:
        human += ("\nrtt min/avg/max/p99 = " + "/".join(
            f"{summary[k] * 1e3:.3f}" for k in ("min", "avg", "max", "p99")) + " ms")
    return human


def peer_label(entry: dict[str, Any]) -> str:
    short = render.short_key(entry["peer"])
    return f"{entry['peerName']} ({short})" if entry.get("peerName") else short


def contact_label(contact: dict[str, Any]) -> str:
    short = render.short_key(contact["twin"])
    return f"{contact['name']} ({short})" if contact.get("name") else short


def render_entry(entry: dict[str, Any]) -> str:
    """One chat line: time, direction and peer, status of ours, the text."""
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["at"]))
    arrow = "→" if entry["outgoing"] else "←"
    state = f" [{entry['status']}]" if entry["outgoing"] else ""
    text = entry["text"].replace("\r", "").replace("\n", " ⏎ ")
    return f"{at}  {arrow} {peer_label(entry)}{state}  {text}"


def render_event(event: dict[str, Any]) -> str:
    if "message" in event:
        return render_entry(event["message"])
    if "messageStatus" in event:
        changed = event["messageStatus"]
        why = f" ({changed['code']})" if changed.get("code") else ""
        return f"message {changed['id'][:16]} is {changed['status']}{why}"
    if "contact" in event:
        contact = event["contact"]
        return f"contact {contact_label(contact)}: {contact['state']}"
    if "connection" in event:
        identity = event["connection"]
        if identity.get("nic"):
            return f"attached to NIC {render.short_key(identity['nic'])}"
        return "lost the NIC (messages queue until the twin is attached again)"
    return json.dumps(event, sort_keys=True)
