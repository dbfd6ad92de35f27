@0xe9e4800f3a0f02d2;
# The NIC admin API on its Unix socket (what `twinctl nic ...` speaks).
# Frames as on links: 4-byte big-endian length, then one message. Only ever add fields.

struct AdminRequest {
  id @0 :UInt32;             # echoed in the response so replies can be matched
  union {
    self @1 :Void;
    peers @2 :Void;
    addPeer @3 :Text;        # a peer URI, e.g. tcp://127.0.0.1:9651?key=...
    removePeer @4 :Text;     # a peer key (printable form) or the URI it was added with
  }
}

struct SelfInfo {
  key @0 :Text;              # printable public key: the NIC's address
  keyHex @1 :Text;
  listen @2 :List(Text);     # URIs the NIC listens on (with real ports)
  uptime @3 :Float64;        # seconds
  version @4 :Text;
  pid @5 :UInt32;
  health @6 :Text;           # health endpoint URL, empty when disabled
}

struct PeerInfo {
  key @0 :Text;              # empty while not yet linked with an unpinned peer
  uri @1 :Text;              # the URI we dial, or the remote address of an inbound link
  direction @2 :Text;        # "outbound" | "inbound"
  state @3 :Text;            # "up" | "connecting" | "handshaking" | "backoff"
  upSince @4 :Float64;       # unix time the link came up, 0 when not up
  rtt @5 :Float64;           # seconds, from keepalives; -1 when unknown
  bytesIn @6 :UInt64;
  bytesOut @7 :UInt64;
  framesIn @8 :UInt64;
  framesOut @9 :UInt64;
  lastError @10 :Text;
  retryIn @11 :Float64;      # seconds until the next dial when in backoff
  carrier @12 :Text;         # "tcp" | "ws" | "memory"
}

struct AddPeerResult {
  uri @0 :Text;
  created @1 :Bool;          # false when the URI was already configured
}

struct RemovePeerResult {
  removed @0 :UInt32;        # peers and links closed
}

struct AdminResponse {
  id @0 :UInt32;
  union {
    error @1 :Text;
    self @2 :SelfInfo;
    peers @3 :List(PeerInfo);
    addPeer @4 :AddPeerResult;
    removePeer @5 :RemovePeerResult;
  }
}
