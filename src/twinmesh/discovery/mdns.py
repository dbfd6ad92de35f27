"""LAN discovery over mDNS / DNS-SD (zeroconf): announce this NIC, link to the others.

Opt-in (`mdns = true` or `pnicd --mdns`); off by default.

Theory of operation
-------------------
*Announcing.* A NIC registers one `_pnic._tcp.local.` service named `pnic-<short
key>`. Its addresses are the hosts of the NIC's listen URIs; its SRV port is the
first tcp listen port (else the first ws one). The TXT record says what to dial
and whom to expect there::

    v=1  key=<printable public key>  tcp=<port>  ws=<port>  path=</ws path>  tag=<hex>

`tcp`, `ws`/`path` appear for the carriers the NIC listens on; `tag` only when the
NIC has a group password: HMAC-SHA256(key = the password in UTF-8, message =
`twinmesh/mdns/v1/` + the 32 raw bytes of the public key).

*Linking.* For every announcement it hears, the NIC decides (`link_decision`) and
then calls `nic.add_peer(PeerUri(..., key=<their key>))`: the dialer is pinned to the
announced key, so the link handshake proves the announcer holds it, whatever the
multicast said. Skipped: our own key, a key the allow-list does not admit, a key we
already have a link or a pinned dialer for, an address that is one of our own listen
addresses, and, when we have a group password, an announcement without a valid tag
for its key. At most `MAX_AUTO_PEERS` peers are added this way. When an announcement
is withdrawn and its NIC is not linked, the dialer we added for it is removed.

*What the tag proves.* Only that someone who knows the password vouched for that key.
The tag is public on the LAN, so it can be replayed, but only to point at an
address: the pinned handshake still requires the key's private half. A weak password
can be guessed offline from a tag; use a long one. The password decides only what
this NIC dials; to refuse inbound links from outsiders as well, use the allow-list.

*Threads.* The sync `Zeroconf` runs its own thread; this module never uses asyncio.
Blocking zeroconf calls (construct, register, resolve, unregister, close) run in
`trio.to_thread.run_sync`; the browser's callbacks, on zeroconf's thread, only
push `(change, name)` into a bounded trio channel through
`trio.from_thread.run_sync(..., trio_token=...)` and drop the event when the channel
is full or trio is gone. One task (`MdnsDiscovery.run`, in the NIC's nursery) owns
the Zeroconf instance and unregisters and closes it when cancelled.

*Interfaces.* Zeroconf is bound only to the addresses of the NIC's listen URIs
(`Zeroconf(interfaces=[...])`), never to every interface. Wildcard, loopback and
scope-less IPv6 link-local listen addresses are not announced; a NIC with nothing
else to announce on refuses to start discovery (ConfigError).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio
from zeroconf import ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

from twinmesh.carriers.uri import DEFAULT_WS_PATH, PeerUri
from twinmesh.errors import ConfigError, DecodeError
from twinmesh.identity.keys import PublicKey

if TYPE_CHECKING:
    from twinmesh.nic.node import Nic

SERVICE_TYPE = "_pnic._tcp.local."
TXT_VERSION = "1"
TAG_CONTEXT = b"twinmesh/mdns/v1/"
MAX_AUTO_PEERS = 64  # peers added from announcements, at most
MAX_EVENTS = 256  # browser events waiting for the trio task; more are dropped
MAX_KNOWN = 1024  # announcements remembered by name
RESOLVE_TIMEOUT_MS = 3000
CLOSE_TIMEOUT = 10.0  # unregister (sends goodbyes) and close, at most


# ---------------------------------------------------------------- the record


def group_tag(password: str, key: PublicKey) -> bytes:
    """The group tag of `key`: HMAC-SHA256(password, TAG_CONTEXT + raw key)."""
    return hmac.new(password.encode("utf-8"), TAG_CONTEXT + key.raw, hashlib.sha256).digest()


@dataclass(frozen=True)
class Announcement:
    """What a NIC's TXT record says: its key, where it listens, its group tag."""

    key: PublicKey
    tcp_port: int | None = None
    ws_port: int | None = None
    ws_path: str = DEFAULT_WS_PATH
    tag: bytes | None = None

    def tag_valid(self, password: str) -> bool:
        """True when the announcement carries the right tag for its key under `password`."""
        return self.tag is not None and hmac.compare_digest(
            self.tag, group_tag(password, self.key)
        )

    def uri(self, address: str) -> PeerUri | None:
        """The pinned URI to dial at `address`: tcp when offered, else ws; None if neither."""
        if self.tcp_port is not None:
            return PeerUri("tcp", address, self.tcp_port, "", self.key)
        if self.ws_port is not None:
            return PeerUri("ws", address, self.ws_port, self.ws_path, self.key)
        return None


def announcement_for(
    key: PublicKey, listening: Iterable[PeerUri], password: str | None = None
) -> Announcement:
    """This NIC's announcement: the first tcp and ws ports it listens on, and its tag."""
    tcp = next((u for u in listening if u.scheme == "tcp"), None)
    ws = next((u for u in listening if u.scheme == "ws"), None)
    return Announcement(
        key=key,
        tcp_port=tcp.port if tcp is not None else None,
        ws_port=ws.port if ws is not None else None,
        ws_path=ws.path if ws is not None else DEFAULT_WS_PATH,
        tag=group_tag(password, key) if password else None,
    )


def encode_txt(announcement: Announcement) -> dict[str, str]:
    """The TXT properties of `announcement` (every value well under 255 bytes)."""
    txt = {"v": TXT_VERSION, "key": announcement.key.text}
    if announcement.tcp_port is not None:
        txt["tcp"] = str(announcement.tcp_port)
    if announcement.ws_port is not None:
        txt["ws"] = str(announcement.ws_port)
        txt["path"] = announcement.ws_path
    if announcement.tag is not None:
        txt["tag"] = announcement.tag.hex()
    return txt


def decode_txt(properties: Mapping[Any, Any]) -> Announcement:
    """Parse TXT properties (str or bytes keys and values, as zeroconf hands them over).

    Raises DecodeError with the reason for anything that is not a version-1
    announcement: unknown version, missing or bad key, bad port, bad tag. Unknown
    properties are ignored (later versions only add).
    """
    txt: dict[str, str] = {}
    for name, value in properties.items():
        try:
            text_name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
            if value is None:
                continue
            txt[text_name] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise DecodeError("TXT property is not UTF-8") from None
    if txt.get("v") != TXT_VERSION:
        raise DecodeError(f"unsupported announcement version {txt.get('v')!r}")
    try:
        key = PublicKey.from_text(txt.get("key", ""))
    except ValueError as exc:
        raise DecodeError(f"bad key in announcement: {exc}") from None
    tag = None
    if "tag" in txt:
        try:
            tag = bytes.fromhex(txt["tag"])
        except ValueError:
            raise DecodeError("tag is not hex") from None
        if len(tag) != hashlib.sha256().digest_size:
            raise DecodeError("tag has the wrong length")
    path = txt.get("path", DEFAULT_WS_PATH)
    if not path.startswith("/") or len(path) > 200:
        raise DecodeError(f"bad ws path {path!r}")
    return Announcement(
        key=key, tcp_port=_port(txt, "tcp"), ws_port=_port(txt, "ws"), ws_path=path, tag=tag
    )


def _port(txt: Mapping[str, str], name: str) -> int | None:
    if name not in txt:
        return None
    text = txt[name]
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise DecodeError(f"bad {name} port {text!r}")
    return int(text)


def link_decision(
    announcement: Announcement,
    *,
    own_key: PublicKey,
    allow: frozenset[PublicKey] | None,
    password: str | None,
) -> str | None:
    """None when this NIC should link to the announcer; else why not (for the log)."""
    if announcement.key == own_key:
        return "our own announcement"
    if allow is not None and announcement.key not in allow:
        return "key not in the allow-list"
    if password:
        if announcement.tag is None:
            return "no group tag (we have a group password)"
        if not announcement.tag_valid(password):
            return "group tag does not match our password"
    if announcement.tcp_port is None and announcement.ws_port is None:
        return "announces no tcp or ws port"
    return None


def announce_addresses(listening: Iterable[PeerUri]) -> list[str]:
    """The listen hosts worth announcing on: concrete, non-loopback IP addresses."""
    found: list[str] = []
    for uri in listening:
        if uri.scheme not in ("tcp", "ws"):
            continue
        try:
            address = ipaddress.ip_address(uri.host)
        except ValueError:
            continue  # a host name: we cannot tell which interface it is
        if address.is_unspecified or address.is_loopback or address.is_multicast:
            continue
        if address.version == 6 and address.is_link_local:
            continue  # needs a scope id, which a listen URI does not carry
        if str(address) not in found:
            found.append(str(address))
    return found


def pick_address(addresses: Iterable[str]) -> str | None:
    """The address to dial from an announcement: the first usable IPv4, else IPv6."""
    usable = announce_addresses(PeerUri("tcp", a, 1) for a in addresses)
    v4 = [a for a in usable if ipaddress.ip_address(a).version == 4]
    if v4:
        return v4[0]
    return usable[0] if usable else None


# ---------------------------------------------------------------- the shell


class _Listener(ServiceListener):
    """zeroconf's ServiceListener: runs on zeroconf's thread, only hands events to trio."""

    def __init__(
        self, send: trio.MemorySendChannel[tuple[str, str]], token: trio.lowlevel.TrioToken
    ) -> None:
        self._send = send
        self._token = token
        self.dropped = 0

    def _push(self, change: str, name: str) -> None:
        try:
            trio.from_thread.run_sync(self._send.send_nowait, (change, name),
                                      trio_token=self._token)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.RunFinishedError, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # shutting down

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._push("added", name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._push("updated", name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._push("removed", name)


class MdnsDiscovery:
    """Announce `nic` on its listen addresses and link to what it hears; see the module doc.

    `added` (service name -> URI we added) and `ignored` (service name -> reason)
    are changed only by the task running `run`.
    """

    def __init__(self, nic: Nic, password: str | None = None) -> None:
        self.nic = nic
        self.password = password or None
        self.added: dict[str, PeerUri] = {}
        self.ignored: dict[str, str] = {}
        self.log = structlog.get_logger("twinmesh.mdns").bind(node=nic.key.short)

    @property
    def service_name(self) -> str:
        return f"pnic-{self.nic.key.short}.{SERVICE_TYPE}"

    def service_info(self, addresses: list[str]) -> ServiceInfo:
        announcement = announcement_for(self.nic.key, self.nic.listening, self.password)
        port = announcement.tcp_port or announcement.ws_port
        return ServiceInfo(
            SERVICE_TYPE,
            self.service_name,
            port=port,
            properties=encode_txt(announcement),
            server=f"pnic-{self.nic.key.short}.local.",
            addresses=[ipaddress.ip_address(a).packed for a in addresses],
        )

    async def run(
        self, *, task_status: trio.TaskStatus[MdnsDiscovery] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Announce and browse until cancelled; then unregister and close (bounded).

        Started (for `nursery.start`) once zeroconf is up and browsing; the
        registration itself (probing, about a second) happens after that.
        """
        addresses = announce_addresses(self.nic.listening)
        if not addresses:
            raise ConfigError(
                "mdns: no listen URI on a concrete, non-loopback IP address to announce on "
                "(mDNS is bound only to the NIC's listen addresses)"
            )
        send, receive = trio.open_memory_channel[tuple[str, str]](MAX_EVENTS)
        listener = _Listener(send, trio.lowlevel.current_trio_token())
        zc = await trio.to_thread.run_sync(functools.partial(Zeroconf, interfaces=addresses))
        browser: ServiceBrowser | None = None
        info: ServiceInfo | None = None
        try:
            browser = ServiceBrowser(zc, SERVICE_TYPE, listener=listener)
            task_status.started(self)
            info = self.service_info(addresses)
            await trio.to_thread.run_sync(zc.register_service, info)
            self.log.info("mdns announcing", name=self.service_name, addresses=addresses,
                          grouped=self.password is not None)
            async with receive:
                async for change, name in receive:
                    await self._on_event(zc, change, name)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await send.aclose()
                await trio.to_thread.run_sync(
                    functools.partial(_close, zc, browser, info)
                )

    async def _on_event(self, zc: Zeroconf, change: str, name: str) -> None:
        if name == self.service_name:
            return
        if change == "removed":
            self._on_removed(name)
            return
        info = await trio.to_thread.run_sync(zc.get_service_info, SERVICE_TYPE, name,
                                             RESOLVE_TIMEOUT_MS)
        if info is None:
            self.log.debug("mdns: no answer resolving", name=name)
            return
        try:
            announcement = decode_txt(info.properties)
        except DecodeError as exc:
            self._ignore(name, f"malformed announcement: {exc}")
            return
        reason = link_decision(announcement, own_key=self.nic.key,
                               allow=self.nic.config.allow, password=self.password)
        if reason is not None:
            self._ignore(name, reason)
            return
        address = pick_address(info.parsed_addresses())
        uri = announcement.uri(address) if address is not None else None
        if uri is None:
            self._ignore(name, "no usable address")
            return
        reason = self._local_reason(uri)
        if reason is not None:
            self._ignore(name, reason)
            return
        self.ignored.pop(name, None)
        if self.nic.add_peer(uri):
            self.added[name] = uri
            self.log.info("mdns: linking to discovered NIC", name=name, uri=str(uri))

    def _local_reason(self, uri: PeerUri) -> str | None:
        """Reasons to skip that depend on the NIC's current links and dialers."""
        assert uri.key is not None
        if any(uri.host == own.host and uri.port == own.port for own in self.nic.listening):
            return "an address of this NIC"
        if uri.key in self.nic.by_peer:
            return "already linked"
        for dialer in self.nic.dialers.values():
            if uri.key in (dialer.uri.key, dialer.learned_key):
                return "already a peer"
        if len(self.added) >= MAX_AUTO_PEERS:
            return f"already {MAX_AUTO_PEERS} discovered peers"
        return None

    def _ignore(self, name: str, reason: str) -> None:
        if self.ignored.get(name) != reason:
            # Policy refusals are worth seeing; "already linked" is the normal case.
            log = self.log.debug if reason.startswith("already") else self.log.info
            log("mdns: not linking", name=name, reason=reason)
        if len(self.ignored) < MAX_KNOWN or name in self.ignored:
            self.ignored[name] = reason

    def _on_removed(self, name: str) -> None:
        self.ignored.pop(name, None)
        uri = self.added.get(name)
        if uri is None or uri.key in self.nic.by_peer:
            return  # a live link stays; its dialer keeps it up
        del self.added[name]
        self.nic.remove_peer(str(uri.without_key()))
        self.log.info("mdns: discovered NIC withdrawn", name=name, uri=str(uri))


def _close(zc: Zeroconf, browser: ServiceBrowser | None, info: ServiceInfo | None) -> None:
    """Blocking shutdown, in a worker thread: stop browsing, say goodbye, close."""
    try:
        if browser is not None:
            browser.cancel()
        if info is not None:
            with contextlib.suppress(Exception):  # not registered yet, or already gone
                zc.unregister_service(info)
    finally:
        zc.close()


async def run_mdns(
    nic: Nic,
    password: str | None = None,
    *,
    task_status: trio.TaskStatus[MdnsDiscovery] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run LAN discovery for a running `nic` until cancelled (for `nursery.start`)."""
    await MdnsDiscovery(nic, password).run(task_status=task_status)


__all__ = [
    "MAX_AUTO_PEERS",
    "SERVICE_TYPE",
    "Announcement",
    "MdnsDiscovery",
    "announce_addresses",
    "announcement_for",
    "decode_txt",
    "encode_txt",
    "group_tag",
    "link_decision",
    "pick_address",
    "run_mdns",
]
