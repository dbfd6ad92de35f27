@0xb91f5a199b816554;
# Overlay traffic between NICs: routing by public key and the packets it carries.
# One `Overlay` message travels as the payload of a link's `LinkMessage.data`, so every
# hop is already encrypted and authenticated by the link under it.
# Only ever add fields and union members; never renumber or change a type.

struct Announcement {
  # "I am reachable": made and signed only by the origin, carried unchanged by others.
  origin @0 :Data;           # the origin NIC's ed25519 public key: the destination
  seqno @1 :UInt64;          # higher is newer; the origin starts from its wall clock in ms
  signature @2 :Data;        # ed25519(origin) over "twinmesh/route/v1/announce" || origin || seqno (u64 BE)
}

struct Update {
  announcement @0 :Announcement;
  metric @1 :UInt16;         # cost from the sender to the origin (0 = the sender itself)
}

struct SeqnoRequest {
  # "Please make the origin announce at least this seqno": how a node that lost its
  # route (and cannot take another without risking a loop) gets a fresh one.
  origin @0 :Data;
  seqno @1 :UInt64;
  hopLimit @2 :UInt8;
}

struct Location {
  # "twin is reachable at nic until expires", signed by the twin. NICs flood these so
  # any NIC can find the NIC of a twin (a stand-in until the DHT lookup).
  twin @0 :Data;
  nic @1 :Data;
  seqno @2 :UInt64;
  expires @3 :Float64;       # unix seconds
  signature @4 :Data;        # ed25519(twin) over "twinmesh/location/v1" || twin || nic || seqno (u64 BE) || expires (f64 BE)
}

struct Routing {
  updates @0 :List(Update);
  retractions @1 :List(Data);   # origins the sender can no longer reach
  requests @2 :List(SeqnoRequest);
  locations @3 :List(Location); # twin location records, newest seqno wins
}

struct Ping {
  id @0 :UInt64;
  sentAt @1 :Float64;        # the pinging NIC's own clock, echoed back
  hops @2 :UInt8;            # in a pong: links the ping crossed
}

enum UnreachableCode {
  noRoute @0;
  hopLimitExceeded @1;
}

struct Unreachable {
  code @0 :UnreachableCode;
  destination @1 :Data;      # what could not be reached
  pingId @2 :UInt64;         # when the lost packet was a ping, its id (else 0)
}

struct Packet {
  source @0 :Data;
  destination @1 :Data;
  hopLimit @2 :UInt8;        # decremented by every forwarding NIC; 0 is never forwarded
  body :union {
    payload @3 :Data;        # for the layer above (the message bus)
    ping @4 :Ping;
    pong @5 :Ping;
    unreachable @6 :Unreachable;
  }
}

struct Overlay {
  union {
    routing @0 :Routing;
    packet @1 :Packet;
  }
}
