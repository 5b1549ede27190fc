"""`keel shadow`. PLACEHOLDER: filled in by issue #6 work."""

from __future__ import annotations

import typer

shadow_app = typer.Typer(help="Shadow mode: run a candidate version beside the primary.", no_args_is_help=True)
