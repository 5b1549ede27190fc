"""What every `keel` command shares: the consoles, settings read once, a client or a clear error."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from sqlalchemy.engine import Engine
from temporalio.client import Client

from core.codec import EncryptionConfigError
from core.settings import KeelSettings
from starter.client import connect
from starter.stack import apply_traces_endpoint

# Piped output (make demo | tee, CI logs) gets a width that fits the batch table.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120
console = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)


def load_settings() -> KeelSettings:
    try:
        settings = KeelSettings()
    except ValueError as e:
        err.print(f"[red]invalid settings:[/red] {e}")
        raise typer.Exit(2) from e
    apply_traces_endpoint(settings)
    return settings


def ledger_engine() -> Engine:
    """The ledger database of the settings, brought up to date (an older file gets the new columns and
    tables) before a report reads it."""
    from activities.db import init_db, make_engine

    engine = make_engine(load_settings().db_url)
    init_db(engine)
    return engine


async def client_or_exit(settings: KeelSettings) -> Client:
    try:
        return await connect(settings)
    except EncryptionConfigError as e:
        err.print(f"[red]invalid encryption settings:[/red] {e}")
        raise typer.Exit(2) from e
    except RuntimeError as e:
        err.print(f"[red]cannot reach Temporal at {settings.temporal_address}[/red]: {e}\n"
                  "Start the local stack with `keel up` (or `make up`), or set TEMPORAL_ADDRESS.")
        raise typer.Exit(1) from e
