"""Deterministic orchestration only. Imports `keel` through the sandbox's pass-through.

The list of workflows a worker registers is in `workflows.registry`: importing this package must stay
cheap, because the sandbox re-imports it for every workflow run.
"""
