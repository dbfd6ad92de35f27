"""The twin daemon (twind): a user's keys, data and services. Arrives with the twin issue."""
