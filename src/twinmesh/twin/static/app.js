// The twin's page: identity and NIC status, people, one chat at a time, ping.
// Everything shown comes from the twin over twinmesh.js; text from others is only ever
// put into the page with textContent, never as HTML.

import { connect, TwinError } from "./twinmesh.js";

const $ = (id) => document.getElementById(id);
const RECONNECT_MAX = 15_000; // ms between attempts when the twin is away
const HISTORY = 200; // messages loaded per conversation

const state = {
  twin: null,
  me: null,
  peers: new Map(), // twin id -> {twin, name, contact, unread}
  chats: new Map(), // twin id -> Map(message id -> ChatEntry)
  selected: null,
};

// --- connection ---------------------------------------------------------------------------

async function start() {
  let delay = 1000;
  for (;;) {
    try {
      setLink("connecting", "connecting to your twin…");
      const twin = await connect(location.href);
      state.twin = twin;
      delay = 1000;
      twin.on("message", onMessage);
      twin.on("messageStatus", onMessageStatus);
      twin.on("contact", onContact);
      twin.on("connection", showNic);
      await load(twin);
      setLink("open", "connected");
      const reason = await twin.closed;
      state.twin = null;
      setLink("closed", `disconnected (${reason.detail}); reconnecting…`);
    } catch (err) {
      setLink("closed", `${describe(err)}; retrying in ${Math.round(delay / 1000)} s`);
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, RECONNECT_MAX);
  }
}

async function load(twin) {
  const [me, status, contacts, inbox] = await Promise.all([
    twin.identity(), twin.status(), twin.contacts(), twin.inbox({ limit: HISTORY }),
  ]);
  state.me = me;
  $("me-name").textContent = me.name || "";
  $("me-id").textContent = me.twin;
  showNic({ nic: status.connected ? status.nic : "" });
  state.peers.clear();
  state.chats.clear();
  for (const c of contacts) peer(c.twin, c.name).contact = c.state;
  for (const entry of inbox.reverse()) addEntry(entry, false);
  renderPeers();
  if (state.selected) select(state.selected);
}

function setLink(name, text) {
  const el = $("link-status");
  el.dataset.state = name;
  el.textContent = text;
}

function showNic(identity) {
  const el = $("nic-status");
  const up = Boolean(identity.nic);
  el.dataset.connected = String(up);
  el.textContent = up ? `NIC ${short(identity.nic)}` : "no NIC: messages wait in your twin";
  el.title = up ? identity.nic : "";
}

// --- events from the twin -----------------------------------------------------------------

function onMessage(entry) {
  const fresh = addEntry(entry, !entry.outgoing && entry.peer !== state.selected);
  renderPeers();
  if (entry.peer === state.selected && fresh) renderMessages();
}

function onMessageStatus(update) {
  for (const chat of state.chats.values()) {
    const entry = chat.get(update.id);
    if (entry) {
      entry.status = update.status;
      entry.code = update.code;
      const li = document.querySelector(`#messages li[data-id="${CSS.escape(update.id)}"]`);
      if (li) renderStatus(li, entry);
    }
  }
}

function onContact(contact) {
  const p = peer(contact.twin, contact.name);
  p.contact = contact.state === "removed" ? "" : contact.state;
  renderPeers();
  if (contact.twin === state.selected) renderChatHeader();
}

// --- state --------------------------------------------------------------------------------

function peer(twin, name = "") {
  let p = state.peers.get(twin);
  if (!p) {
    p = { twin, name: "", contact: "", unread: 0 };
    state.peers.set(twin, p);
  }
  if (name) p.name = name;
  return p;
}

function addEntry(entry, unread) {
  const p = peer(entry.peer, entry.peerName);
  if (!state.chats.has(entry.peer)) state.chats.set(entry.peer, new Map());
  const chat = state.chats.get(entry.peer);
  const fresh = !chat.has(entry.id);
  chat.set(entry.id, entry);
  if (fresh && unread) p.unread += 1;
  return fresh;
}

// --- rendering ----------------------------------------------------------------------------

function renderPeers() {
  const list = $("peers");
  list.replaceChildren();
  const peers = [...state.peers.values()].sort((a, b) => lastAt(b.twin) - lastAt(a.twin));
  for (const p of peers) {
    const li = document.createElement("li");
    li.dataset.twin = p.twin;
    li.classList.toggle("selected", p.twin === state.selected);
    const open = document.createElement("button");
    open.type = "button";
    open.className = "peer";
    open.textContent = p.name || short(p.twin);
    open.title = p.twin;
    open.onclick = () => select(p.twin);
    li.append(open);
    if (p.contact) li.append(tag(p.contact, "contact-state"));
    if (p.unread) li.append(tag(String(p.unread), "unread"));
    if (p.contact === "pending") {
      const accept = document.createElement("button");
      accept.type = "button";
      accept.className = "accept";
      accept.textContent = "Accept";
      accept.onclick = () => act(() => state.twin.acceptContact(p.twin, p.name));
      li.append(accept);
    }
    list.append(li);
  }
  $("no-peers").hidden = peers.length > 0;
}

function select(twin) {
  state.selected = twin;
  peer(twin).unread = 0;
  $("chat").hidden = false;
  $("no-chat").hidden = true;
  $("ping-result").textContent = "";
  renderChatHeader();
  renderPeers();
  renderMessages();
  $("message-text").focus();
}

function renderChatHeader() {
  const p = peer(state.selected);
  $("chat-name").textContent = p.name || "";
  $("chat-peer").textContent = p.twin;
}

function renderMessages() {
  const list = $("messages");
  list.replaceChildren();
  const chat = state.chats.get(state.selected) ?? new Map();
  for (const entry of [...chat.values()].sort((a, b) => a.at - b.at)) {
    const li = document.createElement("li");
    li.dataset.id = entry.id;
    li.className = entry.outgoing ? "outgoing" : "incoming";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = entry.text;
    const meta = document.createElement("span");
    meta.className = "meta";
    li.append(text, meta);
    renderStatus(li, entry);
    list.append(li);
  }
  list.scrollTop = list.scrollHeight;
}

function renderStatus(li, entry) {
  li.dataset.status = entry.status;
  const time = new Date(entry.at * 1000).toLocaleTimeString();
  const status = entry.outgoing ? ` · ${entry.status}${entry.code ? ` (${entry.code})` : ""}` : "";
  li.querySelector(".meta").textContent = time + status;
}

function lastAt(twin) {
  let last = 0;
  for (const entry of state.chats.get(twin)?.values() ?? []) last = Math.max(last, entry.at);
  return last;
}

function tag(text, className) {
  const span = document.createElement("span");
  span.className = `tag ${className}`;
  span.textContent = text;
  return span;
}

function short(key) {
  return key.length > 12 ? `${key.slice(0, 6)}…${key.slice(-4)}` : key;
}

function describe(err) {
  return err instanceof TwinError ? err.message : String(err);
}

function showError(err) {
  const el = $("error");
  el.textContent = err ? describe(err) : "";
  el.hidden = !err;
}

async function act(action) {
  if (!state.twin) {
    showError(new TwinError("closed", "not connected to your twin"));
    return null;
  }
  try {
    const result = await action();
    showError(null);
    return result;
  } catch (err) {
    showError(err);
    return null;
  }
}

// --- forms and buttons --------------------------------------------------------------------

$("send-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = $("message-text");
  const text = input.value;
  const entry = await act(() => state.twin.send(state.selected, text));
  if (entry) {
    input.value = "";
    onMessage(entry);
  }
});

$("open-chat").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const twin = $("open-twin").value.trim();
  $("open-twin").value = "";
  if (twin) select(twin);
});

$("add-contact").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const contact = await act(() => state.twin.addContact($("add-twin").value.trim(), $("add-name").value.trim()));
  if (contact) {
    $("add-twin").value = "";
    $("add-name").value = "";
    onContact(contact);
  }
});

$("ping").addEventListener("click", async () => {
  const out = $("ping-result");
  out.textContent = "pinging…";
  const result = await act(() => state.twin.ping(state.selected));
  out.textContent = result ? `RTT ${(result.rtt * 1000).toFixed(1)} ms` : "no reply";
});

$("copy-id").addEventListener("click", () => {
  navigator.clipboard?.writeText($("me-id").textContent).catch(() => {});
});

start();
