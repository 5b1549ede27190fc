"""Keel's contract: types, policies, pricing and settings shared by every other package.

Pure and deterministic: nothing here does I/O, reads the clock or draws random numbers
(the seeded generators in `dataset` and `samples` take their seed explicitly).
"""
