"""Keel's built-in agents: examples on the public API (`keel`), each in a package of its own."""
