"""twinctl: parse arguments, call a control API, render a table or --json."""
