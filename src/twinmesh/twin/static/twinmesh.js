// twinmesh.js — talk to your twin from JavaScript. One ES module, no dependencies.
//
//   import { connect } from "./twinmesh.js";
//   const twin = await connect("http://127.0.0.1:8080/?token=...");
//   const me = await twin.identity();
//   twin.on("message", (entry) => console.log(entry.peerName || entry.peer, entry.text));
//   await twin.send(otherTwinId, "hello");
//
// Every request is a JSON object of schemas/api.capnp (`{"id": 7, "ping": {...}}`); the
// twin answers with the same id, so requests run concurrently and each returns a
// promise. A refused request rejects with a TwinError whose `code` says why
// (malformed, unknownTwin, offline, expired, noRoute, notContact, ... and, from this
// module, closed and timeout). Works in browsers, Deno, Bun and Node >= 22 (or pass
// `{WebSocket}` from the `ws` package to `connect`).

/** A request the twin refused, or a connection that failed. */
export class TwinError extends Error {
  constructor(code, message) {
    super(message ? `${code}: ${message}` : code);
    this.name = "TwinError";
    this.code = code;
    this.detail = message || "";
  }
}

export const EVENT_TYPES = ["message", "messageStatus", "contact", "connection"];
const DEFAULT_TIMEOUT = 60_000; // ms; a `send` with wait:true can take as long as its ttl

/** The websocket URL for a page URL ("http://127.0.0.1:8080/?token=T"), a bare
 * "http://127.0.0.1:8080" plus `token`, or a ws:// URL. */
export function socketUrl(url, token) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  const parsed = new URL(url, base);
  const key = token ?? parsed.searchParams.get("token");
  if (!key) throw new TwinError("noToken", "no token: pass it or use the URL `twinctl web` prints");
  const scheme = parsed.protocol === "https:" || parsed.protocol === "wss:" ? "wss:" : "ws:";
  return `${scheme}//${parsed.host}/ws?token=${encodeURIComponent(key)}`;
}

/** Open a connection to a twin; resolves with a `Twin` once the websocket is open. */
export function connect(url, token, { WebSocket: Socket = globalThis.WebSocket, timeout = 10_000 } = {}) {
  if (!Socket) throw new TwinError("unsupported", "no WebSocket here; pass {WebSocket} from the `ws` package");
  const ws = new Socket(socketUrl(url, token));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      ws.close();
      reject(new TwinError("timeout", `no answer from the twin within ${timeout} ms`));
    }, timeout);
    ws.onopen = () => {
      clearTimeout(timer);
      resolve(new Twin(ws));
    };
    ws.onclose = (ev) => {
      clearTimeout(timer);
      // Browsers hide why an upgrade failed; these are the reasons a twin refuses one.
      reject(new TwinError("refused", `the twin refused the connection (code ${ev.code}): ` +
        "wrong token, a page of another origin, or twind is not running"));
    };
  });
}

/** One open connection to a twin. */
export class Twin {
  constructor(ws) {
    this.ws = ws;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, timer}
    this._handlers = new Map(); // event type or "*" -> Set of functions
    this._subscribed = null; // the subscribe request's promise, once sent
    this.closeReason = null; // TwinError once closed
    this.closed = new Promise((resolve) => { this._onClosed = resolve; });
    ws.onmessage = (ev) => this._receive(ev.data);
    ws.onclose = (ev) => this._close(ev.code, ev.reason);
    ws.onerror = () => {}; // onclose follows with the code
  }

  /** Send one request: `op` is a Request union member ("status", "ping", ...), `value`
   * its argument (null for Void ones). Resolves with the Response's value (null for
   * `done`), rejects with TwinError. */
  request(op, value = null, { timeout = DEFAULT_TIMEOUT } = {}) {
    if (this.closeReason) return Promise.reject(this.closeReason);
    const id = this._nextId;
    this._nextId = this._nextId >= 0xffffffff ? 1 : this._nextId + 1; // 0 = "unknown id"
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new TwinError("timeout", `${op}: no answer within ${timeout} ms`));
      }, timeout);
      this._pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ id, [op]: value }));
    });
  }

  identity() { return this.request("identity"); }
  status() { return this.request("status"); }
  ping(twin, { timeout = 5, sequence = 0 } = {}) {
    return this.request("ping", { twin, timeout, sequence }, { timeout: timeout * 1000 + 5000 });
  }
  find(twin) { return this.request("find", twin); }
  send(twin, text, { ttl = 300, wait = false } = {}) {
    return this.request("send", { twin, text, ttl, wait }, { timeout: wait ? ttl * 1000 + 5000 : DEFAULT_TIMEOUT });
  }
  inbox({ peer = "", limit = 50 } = {}) { return this.request("inbox", { peer, limit }); }
  messageStatus(id) { return this.request("messageStatus", id); }
  contacts() { return this.request("contacts"); }
  addContact(twin, name = "") { return this.request("addContact", { twin, name }); }
  acceptContact(twin, name = "") { return this.request("acceptContact", { twin, name }); }
  removeContact(twin) { return this.request("removeContact", twin); }
  getSettings() { return this.request("getSettings"); }
  setSettings(settings) { return this.request("setSettings", settings); }
  move(nic) { return this.request("move", nic); }

  /** Ask the twin to push events on this connection (done once; `on` does it for you). */
  subscribe() {
    if (!this._subscribed) {
      this._subscribed = this.request("subscribe");
      this._subscribed.catch(() => { this._subscribed = null; });
    }
    return this._subscribed;
  }

  /** Call `handler(value, type)` for every event of `type` (one of EVENT_TYPES, or "*"
   * for all); also "close" (with a TwinError) and "error" (an error the twin could not
   * tie to a request). Returns a function that removes the handler. */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    if (type !== "close" && type !== "error") this.subscribe().catch(() => {});
    return () => this._handlers.get(type)?.delete(handler);
  }

  /** Close the connection; pending requests reject with TwinError("closed"). */
  close() {
    this.ws.close(1000, "closed by the page");
    return this.closed;
  }

  _receive(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this._emit("error", new TwinError("malformed", "the twin sent something that is not JSON"));
      return;
    }
    if (msg.event) {
      for (const [type, value] of Object.entries(msg.event)) this._emit(type, value);
      return;
    }
    const pending = this._pending.get(msg.id);
    if (!pending) {
      if (msg.error) this._emit("error", new TwinError(msg.error.code, msg.error.message));
      return;
    }
    this._pending.delete(msg.id);
    clearTimeout(pending.timer);
    if (msg.error) {
      pending.reject(new TwinError(msg.error.code, msg.error.message));
      return;
    }
    const keys = Object.keys(msg).filter((k) => k !== "id");
    pending.resolve(keys.length ? msg[keys[0]] : null);
  }

  _emit(type, value) {
    for (const key of [type, "*"]) {
      for (const handler of this._handlers.get(key) ?? []) {
        try {
          handler(value, type);
        } catch (err) {
          console.error("twinmesh: event handler failed", err);
        }
      }
    }
  }

  _close(code, reason) {
    this.closeReason = new TwinError("closed", reason || `connection closed (code ${code})`);
    this.closeReason.closeCode = code;
    for (const { reject, timer } of this._pending.values()) {
      clearTimeout(timer);
      reject(this.closeReason);
    }
    this._pending.clear();
    this._emit("close", this.closeReason);
    this._onClosed(this.closeReason);
  }
}
