@0x9c7ad2403d302a23;
# Frames between two NICs (the node-to-node link protocol).
# Only ever add fields and union members; never renumber or change a type.
#
# On every carrier the byte stream is a sequence of frames: a 4-byte big-endian length,
# then that many bytes. The first frame each way is a plaintext `Handshake`; every later
# frame is an encrypted session frame: an 8-byte big-endian counter followed by the
# ChaCha20-Poly1305 (IETF) ciphertext of one `LinkMessage`.

struct Hello {
  # Initiator -> responder, plaintext.
  version @0 :UInt16;        # link protocol version, 1
  staticKey @1 :Data;        # initiator's ed25519 public key (its address)
  ephemeralKey @2 :Data;     # fresh X25519 public key, for forward secrecy
  signature @3 :Data;        # ed25519(staticKey) over "twinmesh/link/v1/hello" || ephemeralKey
  maxFrame @4 :UInt32;       # largest frame the initiator accepts
}

struct Accept {
  # Responder -> initiator, plaintext.
  version @0 :UInt16;
  staticKey @1 :Data;        # responder's ed25519 public key
  ephemeralKey @2 :Data;     # fresh X25519 public key
  signature @3 :Data;        # over "twinmesh/link/v1/accept" || blake2b(hello frame) || ephemeralKey
  maxFrame @4 :UInt32;
}

enum RefuseCode {
  notAllowed @0;             # the initiator's key is not on the responder's allow-list
  badVersion @1;             # no common protocol version
  badSignature @2;           # the hello signature does not verify
  selfLink @3;               # a NIC dialled itself
  malformed @4;              # the hello did not decode
}

struct Refuse {
  # Responder -> initiator, plaintext, then the responder closes.
  code @0 :RefuseCode;
  reason @1 :Text;
}

struct Handshake {
  union {
    hello @0 :Hello;
    accept @1 :Accept;
    refuse @2 :Refuse;
  }
}

struct Keepalive {
  sentAt @0 :Float64;        # sender's own clock; echoed back unchanged in keepaliveAck
  seq @1 :UInt32;
}

struct Close {
  reason @0 :Text;
}

struct LinkMessage {
  # The plaintext inside every encrypted session frame. Upper layers (routing, the
  # message bus) add their own union members here.
  union {
    keepalive @0 :Keepalive;
    keepaliveAck @1 :Keepalive;
    close @2 :Close;
    data @3 :Data;           # an opaque payload for the layer above the link
  }
}
