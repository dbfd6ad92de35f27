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
    routes @5 :Void;
    route @6 :Text;          # a destination key: the route the NIC would use
    ping @7 :PingRequest;
  }
}

struct PingRequest {
  key @0 :Text;              # destination NIC key
  timeout @1 :Float64;       # seconds to wait for the pong
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

struct RouteInfo {
  destination @0 :Text;
  nextHop @1 :Text;          # empty for the NIC itself
  metric @2 :UInt16;         # hops
  seqno @3 :UInt64;          # the destination's announcement sequence number
  age @4 :Float64;           # seconds since the route was last refreshed
  alternatives @5 :UInt32;   # other feasible routes held (for fast repair)
}

struct PingResult {
  rtt @0 :Float64;           # seconds; -1 when lost
  hops @1 :UInt8;
  error @2 :Text;            # "" | "timeout" | "noRoute" | "hopLimitExceeded"
  reportedBy @3 :Text;       # the NIC that reported an error
}

struct AdminResponse {
  id @0 :UInt32;
  union {
    error @1 :Text;
    self @2 :SelfInfo;
    peers @3 :List(PeerInfo);
    addPeer @4 :AddPeerResult;
    removePeer @5 :RemovePeerResult;
    routes @6 :List(RouteInfo);
    route @7 :RouteInfo;
    ping @8 :PingResult;
  }
}
