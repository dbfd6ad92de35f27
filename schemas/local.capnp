@0xc43aee91380e3eb5;

using Route = import "route.capnp";
# Twin <-> NIC, on the NIC's Unix socket `twins.sock` (see docs/BUS.md).
# Frames as on links: 4-byte big-endian length, then one LocalMessage.
# Only ever add fields and union members; never renumber or change a type.
#
#   NIC  -> twin   challenge                  (as soon as the twin connects)
#   twin -> NIC    attach                     (proves the twin key: signature)
#   NIC  -> twin   attached | refused         (refused: then the NIC closes)
#   twin -> NIC    submit / status / publish  (any number, each with a requestId)
#   NIC  -> twin   result (per requestId), deliver, statusUpdate (pushed)

struct Challenge {
  version @0 :UInt16;        # local protocol version, 1
  nicKey @1 :Data;           # the NIC's ed25519 key
  nonce @2 :Data;            # 32 random bytes, fresh per connection
}

struct Attach {
  twinKey @0 :Data;
  signature @1 :Data;        # ed25519(twinKey) over "twinmesh/local/v1/attach" || nicKey || nonce || twinKey
  receive @2 :Bool;          # deliver incoming envelopes to this session
  batches @3 :Bool;          # this twin reads the list members (results, statusUpdates,
                             # deliveries): the NIC may answer many items in one frame
}

struct Attached {
  sessionId @0 :UInt32;
}

struct Refused {
  reason @0 :Text;
}

struct Submit {
  envelope @0 :Data;         # a sealed rmb.Envelope whose source is the attached twin
  reliable @1 :Bool;         # true: outbox, retries, status; false: one best-effort send (acks)
  failFast @2 :Bool;         # refuse with noRoute/offline instead of queueing
  payloadSize @3 :UInt32;    # the sealed payload's plaintext size, for the size limit
  requestId @4 :UInt32;      # in a `submits` list: this item's id (0: no answer wanted,
                             # only for reliable=false); a single submit uses the frame's
}

struct StatusQuery {
  messageId @0 :Data;
}

struct Result {
  requestId @0 :UInt32;
  ok @1 :Bool;
  code @2 :Text;             # when not ok: expired, noRoute, tooLarge, overloaded, unauthorized...
  message @3 :Text;
  status @4 :Text;           # for a status query: queued, sent, delivered, expired, failed, unknown
}

struct StatusUpdate {
  messageId @0 :Data;
  status @1 :Text;           # sent, delivered, expired, failed
  code @2 :Text;
}

struct LocalMessage {
  requestId @0 :UInt32;      # set on twin -> NIC requests; echoed in the Result
  union {
    challenge @1 :Challenge;
    attach @2 :Attach;
    attached @3 :Attached;
    refused @4 :Refused;
    submit @5 :Submit;
    status @6 :StatusQuery;
    publish @7 :Route.Location;  # the twin's signed location record (on attach, on moving)
    result @8 :Result;
    deliver @9 :Data;        # an rmb.Envelope addressed to this twin
    statusUpdate @10 :StatusUpdate;
    find @11 :Data;          # twin -> NIC: findDigitalTwinById, the twin key to look up
    found @12 :FindResult;   # NIC -> twin: the answer to a find (its requestId); when
                             # nothing is found the NIC answers a Result (ok=false, unknownTwin)
    # Batches: many items per frame, one frame per wake-up instead of one per message.
    submits @13 :List(Submit);           # twin -> NIC, each with its own requestId
    results @14 :List(Result);           # NIC -> twin (only to sessions attached with batches)
    statusUpdates @15 :List(StatusUpdate); # NIC -> twin (idem)
    deliveries @16 :List(Data);          # NIC -> twin: rmb.Envelopes, in order (idem)
  }
}

struct FindResult {
  location @0 :Route.Location; # the newest valid signed record found
  hops @1 :UInt8;              # overlay hops to the NIC the record points at (0 = this NIC)
  rounds @2 :UInt8;            # DHT lookup rounds it took
  queried @3 :UInt16;          # NICs asked
  elapsed @4 :Float64;         # seconds the NIC spent on the lookup
}

struct NicBus {
  # NIC <-> NIC bus traffic, carried as the payload of an overlay packet.
  union {
    envelope @0 :Data;       # deliver to the destination twin of this rmb.Envelope
    notice @1 :Notice;       # the destination NIC about an envelope it could not hand over
    dht @2 :Data;            # a DHT message between NICs (schemas/dht.capnp), for twin lookups
    envelopes @3 :List(Data);  # several `envelope`s in one overlay packet, in order
  }
}

struct Notice {
  messageId @0 :Data;
  twin @1 :Data;             # the destination twin it was for
  code @2 :Text;             # offline (twin not attached), unknownTwin
}
