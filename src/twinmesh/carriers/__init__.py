"""Carriers move bytes between NICs: TCP, websocket, in-memory. One small interface.

A carrier dials a `PeerUri` and returns a `trio.abc.Stream`, or listens on one and
hands every accepted connection to a handler as a stream. The link core does the
framing, so every carrier is just an ordered, reliable byte stream.
"""
