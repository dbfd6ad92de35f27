"""What goes on the wire: Cap'n Proto schemas and length-prefixed framing."""
