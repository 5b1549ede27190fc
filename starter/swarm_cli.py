"""`keel swarm`. PLACEHOLDER: filled in by issue #6 work."""

from __future__ import annotations

import typer


def swarm_cmd() -> None:
    """(not yet implemented)"""
    raise typer.Exit(2)
