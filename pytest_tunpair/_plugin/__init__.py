"""The pytest side's parts: options, stash keys, scopes, rootless threads, reports."""
