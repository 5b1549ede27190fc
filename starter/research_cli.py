"""`keel research`. PLACEHOLDER: filled in by issue #6 work."""

from __future__ import annotations

import typer


def research_cmd() -> None:
    """(not yet implemented)"""
    raise typer.Exit(2)
