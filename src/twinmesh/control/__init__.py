"""Local control planes over Unix sockets: the NIC admin API (and later twin control)."""
