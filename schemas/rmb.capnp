@0xbfffec0323c02a56;
# The reliable message bus: twin-to-twin envelopes (see docs/BUS.md).
# NICs read only the clear header; the payload is sealed for the destination twin.
# Only ever add fields and enumerants; never renumber or change a type.

enum Kind {
  message @0;
  ack @1;                    # "I have it": carries the delivery token
  error @2;                  # a typed error reply (sealed ErrorBody)
}

struct Envelope {
  id @0 :Data;               # 16 random bytes chosen by the source twin
  source @1 :Data;           # source twin key (ed25519, 32 bytes)
  destination @2 :Data;      # destination twin key
  created @3 :Float64;       # unix seconds, stamped by the source twin
  deadline @4 :Float64;      # unix seconds; nobody may extend it
  kind @5 :Kind;
  replyTo @6 :Data;          # the id this answers; empty when none
  schemaId @7 :UInt64;       # Cap'n Proto type id of the payload; 0 for acks
  ackHash @8 :Data;          # BLAKE2b-128 of the delivery token sealed in a message
  ackToken @9 :Data;         # in an ack: the delivery token of the message acked
  ephemeral @10 :Data;       # the sender's epoch X25519 public key
  nonce @11 :Data;           # 24 bytes, XChaCha20-Poly1305
  sealed @12 :Data;          # AEAD(SealedBody), associated data = the clear header
  moreAcks @13 :List(Acked); # an ack for several messages of one source: the others
                             # (replyTo/ackToken name the first); covered by the AEAD
}

struct Acked {
  id @0 :Data;               # a message id
  token @1 :Data;            # its delivery token
}

struct SealedBody {
  # What only the destination twin reads.
  token @0 :Data;            # delivery token (messages only): its hash is ackHash
  payload @1 :Data;          # Cap'n Proto message of type schemaId
}

enum ErrorCode {
  expired @0;
  noRoute @1;
  unknownTwin @2;
  rejectedSchema @3;
  tooLarge @4;
  unauthorized @5;
  overloaded @6;
  offline @7;
}

struct ErrorBody {
  code @0 :ErrorCode;
  message @1 :Text;
}

# --- services on the bus (typed payloads) -----------------------------------------

struct TextMessage {
  # A plain text message (chat-like); the first service payload, used by tests.
  body @0 :Text;
}

struct Ping {
  sentAt @0 :Float64;
  sequence @1 :UInt32;
}

struct ContactRequest {
  # "May I add you as a contact?" Answered with ContactAccept once the user accepts.
  name @0 :Text;             # the requester's display name
  note @1 :Text;
}

struct ContactAccept {
  name @0 :Text;             # the accepter's display name
}
