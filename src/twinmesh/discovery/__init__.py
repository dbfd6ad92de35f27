"""Finding other NICs without configuring them: opt-in LAN discovery over mDNS.

`mdns.MdnsDiscovery` announces a NIC as `_pnic._tcp.local.` on its listen addresses
and links to the NICs it hears (pinned to their announced keys), within the NIC's
allow-list and an optional group password. pnicd runs it with `--mdns`; zeroconf is
imported only then.
"""
