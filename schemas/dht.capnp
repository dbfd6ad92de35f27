@0xca6dca11dd2d98c3;

using Route = import "route.capnp";
# Twin lookups (findDigitalTwinById): a Kademlia-style DHT over the NICs.
# One DhtMessage travels as `NicBus.dht` (schemas/local.capnp) inside an overlay payload
# packet, NIC to NIC. Node ids are NIC keys, record keys are twin keys, XOR distance.
# Only ever add fields and union members; never renumber or change a type.
#
#   requester -> responder   findNode | findValue | store      (requestId chosen by the requester)
#   responder -> requester   nodes | value | stored            (the same requestId)

struct Value {
  location @0 :Route.Location;  # the newest record the responder holds for the twin asked
  contacts @1 :List(Data);      # and up to k NIC keys it knows closest to that twin
}

struct Stored {
  accepted @0 :Bool;
  reason @1 :Text;              # when refused: signature, older, expired, full
}

struct DhtMessage {
  requestId @0 :UInt64;
  union {
    findNode @1 :Data;          # a 32-byte id: answer with the k closest NIC keys you know
    findValue @2 :Data;         # a twin key: answer its record (value) or closer NICs (nodes)
    store @3 :Route.Location;   # keep this signed record (newest seqno wins)
    nodes @4 :List(Data);       # answer: up to k NIC keys, closest to the id asked
    value @5 :Value;            # answer to findValue when the responder holds a record
    stored @6 :Stored;          # answer to store
  }
}
