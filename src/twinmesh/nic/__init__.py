"""pnicd: the NIC daemon that drives the protocol cores over carriers."""
