"""Sans-I/O protocol cores: they take bytes and `now`, return events and bytes."""
