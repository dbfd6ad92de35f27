"""The reliable message bus, twin side: end-to-end sealing of envelopes (see docs/BUS.md)."""
