@0x832bc03c0b765d80;
# The twin's own API: what `twinctl` (on the twin's control socket) and the browser (on
# the twin's websocket) send to their twin. On both transports a message is one JSON
# object that mirrors these structs field for field (camelCase names, twin keys and
# message ids as text); the twin validates every request against `Request` and answers
# a malformed one with a `Response` whose error code is `malformed`.
# Only ever add fields and union members; never renumber or change a type.

struct PingRequest {
  twin @0 :Text;             # twin id (52-char base32)
  timeout @1 :Float64 = 5.0; # seconds to wait for the reply
  sequence @2 :UInt32;       # echoed in the result (ping(8)'s icmp_seq)
}

struct SendRequest {
  twin @0 :Text;
  text @1 :Text;
  ttl @2 :Float64 = 300.0;   # seconds until the message expires (cap 1800)
  wait @3 :Bool;             # answer only once delivered, expired or failed
}

struct InboxRequest {
  peer @0 :Text;             # only the conversation with this twin ("" = all)
  limit @1 :UInt32 = 50;     # the newest this many, oldest first
  since @2 :Float64;         # > 0: instead the first `limit` entries recorded at or after
                             # this time (unix seconds), in time order; read on from the
                             # last one's `at` (entries of that very time come again)
}

struct ContactRequest {
  twin @0 :Text;
  name @1 :Text;             # a local name for the contact ("" = keep / none)
}

struct Settings {
  contactsOnly @0 :Bool;     # refuse chat from twins that are not accepted contacts
  name @1 :Text;             # this twin's display name (published in its location record)
}

struct Request {
  id @0 :UInt32;             # chosen by the caller, echoed in the Response
  union {
    identity @1 :Void;
    status @2 :Void;
    ping @3 :PingRequest;
    find @4 :Text;           # twin id
    send @5 :SendRequest;
    inbox @6 :InboxRequest;
    messageStatus @7 :Text;  # message id (hex)
    contacts @8 :Void;       # list
    addContact @9 :ContactRequest;    # also sends a contact request to that twin
    acceptContact @10 :ContactRequest;
    removeContact @11 :Text; # twin id
    getSettings @12 :Void;
    setSettings @13 :Settings;
    move @14 :Text;          # path of another NIC's twins.sock (or its state dir)
    subscribe @15 :Void;     # push Events on this connection from now on
  }
}

struct Identity {
  twin @0 :Text;
  name @1 :Text;
  nic @2 :Text;              # the NIC this twin is attached to ("" when none)
  nicSocket @3 :Text;
}

struct Status {
  twin @0 :Text;
  name @1 :Text;
  connected @2 :Bool;        # attached to a NIC right now
  nic @3 :Text;
  nicSocket @4 :Text;
  uptime @5 :Float64;        # seconds since twind started this twin
  waiting @6 :UInt32;        # sent while no NIC took them: flushed on reconnect
  unread @7 :UInt32;
  contacts @8 :UInt32;
  version @9 :Text;
}

struct PingResult {
  twin @0 :Text;
  sequence @1 :UInt32;
  rtt @2 :Float64;           # seconds, twin to twin and back
}

struct FindResult {
  twin @0 :Text;
  nic @1 :Text;
  name @2 :Text;
  seqno @3 :UInt64;
  expires @4 :Float64;
  hops @5 :UInt8;            # overlay hops from our NIC to the twin's NIC
  rounds @6 :UInt8;          # DHT lookup rounds
  queried @7 :UInt16;        # NICs asked
  elapsed @8 :Float64;       # seconds, as this twin measured the whole lookup
}

struct ChatEntry {
  id @0 :Text;               # message id (hex)
  peer @1 :Text;             # the other twin
  peerName @2 :Text;         # its contact name, when it is a contact
  outgoing @3 :Bool;
  text @4 :Text;
  at @5 :Float64;            # unix seconds (sent or received)
  status @6 :Text;           # outgoing: waiting, queued, sent, delivered, expired, failed; incoming: received
  code @7 :Text;             # why it failed
}

struct Contact {
  twin @0 :Text;
  name @1 :Text;
  state @2 :Text;            # accepted, requested (we asked), pending (they asked)
  since @3 :Float64;
}

struct MessageStatus {
  id @0 :Text;
  status @1 :Text;
  code @2 :Text;
}

struct Error {
  code @0 :Text;             # malformed, unknownTwin, offline, expired, noRoute, notContact, ...
  message @1 :Text;
}

struct Response {
  id @0 :UInt32;
  union {
    error @1 :Error;
    done @2 :Void;           # done, nothing to return
    identity @3 :Identity;
    status @4 :Status;
    ping @5 :PingResult;
    find @6 :FindResult;
    sent @7 :ChatEntry;
    inbox @8 :List(ChatEntry);
    messageStatus @9 :MessageStatus;
    contacts @10 :List(Contact);
    contact @11 :Contact;
    settings @12 :Settings;
  }
}

struct Event {
  # Pushed to subscribed connections.
  union {
    message @0 :ChatEntry;          # a chat message arrived (or one we sent was recorded)
    messageStatus @1 :MessageStatus; # one of our messages changed status
    contact @2 :Contact;            # a contact was added, requested, accepted or removed
    connection @3 :Identity;        # attached to a NIC (nic set) or lost it (nic "")
  }
}
