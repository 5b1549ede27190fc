"""What every `keel` command shares: the consoles, settings read once, a client or a clear error."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from sqlalchemy.engine import Engine
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ActivityError, ChildWorkflowError
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.service import RPCError

from keel.codec import EncryptionConfigError
from keel.pricing import load_prices
from keel.settings import KeelSettings
from starter.client import connect
from starter.rpc import TemporalCallError, is_timeout
from starter.stack import apply_stack_model, apply_traces_endpoint

# Piped output (make demo | tee, CI logs) gets a width that fits the batch table.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120
console = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)


def settings_problems(e: ValueError) -> str:
    """A settings error as lines `field: what is wrong` (not pydantic's dump)."""
    if not isinstance(e, ValidationError):
        return str(e)
    return "\n".join(f"{'.'.join(str(p) for p in x['loc']) or 'settings'}: {x['msg'].removeprefix('Value error, ')}"
                     for x in e.errors())


def load_settings() -> KeelSettings:
    """The settings, and the user's prices (KEEL_PRICES) made this process's; bad ones exit 2, saying why."""
    apply_stack_model(Path(os.environ.get("KEEL_HOME") or ".keel"))
    try:
        settings = KeelSettings()
        load_prices(settings.prices)
    except ValueError as e:
        err.print(f"[red]invalid settings:[/red] {escape(settings_problems(e))}")
        raise typer.Exit(2) from e
    apply_traces_endpoint(settings)
    return settings


def run_task(main: Callable[[], Coroutine[Any, Any, None]], what: str = "task") -> None:
    """Run a command's coroutine; a failed workflow or an unreachable Temporal is a clear error, exit 1."""
    try:
        asyncio.run(main())
    except WorkflowFailureError as e:
        err.print(f"[red]{what} failed:[/red] {escape(failure_text(e))}")
        raise typer.Exit(1) from e
    except TemporalCallError as e:  # a call that failed for good, by name
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(1) from e
    except RPCError as e:  # a call not made through starter.rpc: at least the command and what happened
        said = "timed out" if is_timeout(e) else f"failed: {e.message}"
        err.print(f"[red]Temporal: a call of {escape(what)} {escape(said)}[/red]")
        raise typer.Exit(1) from e
    except TimeoutError as e:  # e.g. a shadowed task's primary that no worker started in time
        err.print(f"[red]{what}: {e}[/red]")
        raise typer.Exit(1) from e


def failure_text(e: BaseException) -> str:
    """Why a task failed: the innermost error's own message (a model call's, a child's), not its wrappers'
    ("Activity task failed")."""
    cause = getattr(e, "cause", None) or e
    while isinstance(cause, ActivityError | ChildWorkflowError) and cause.cause is not None:
        cause = cause.cause
    return str(cause)


def ledger_engine() -> Engine:
    """The ledger database of the settings, brought up to date (an older file gets the new columns and
    tables) before a report reads it."""
    from activities.db import init_db, make_engine

    engine = make_engine(load_settings().db_url)
    init_db(engine)
    return engine


_RUNTIME: Runtime | None = None


def cli_runtime() -> Runtime:
    """The command line's Temporal runtime: the SDK core's own errors go to Python's logging (stderr), and
    its retry warnings not at all (they would land in stdout, in the middle of --json): a command says
    itself when Temporal does not answer (starter.rpc)."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(
            filter=TelemetryFilter(core_level="ERROR", other_level="ERROR"),
            forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")))))
    return _RUNTIME


async def client_or_exit(settings: KeelSettings) -> Client:
    """A client of Temporal; one that does not answer (a server restarting) is tried again with backoff for
    up to KEEL_TEMPORAL_WAIT_S, saying so, then a clear error (exit 1)."""
    start, delay, said = time.monotonic(), 0.5, False
    while True:
        try:
            return await connect(settings, runtime=cli_runtime())
        except EncryptionConfigError as e:
            err.print(f"[red]invalid encryption settings:[/red] {e}")
            raise typer.Exit(2) from e
        except RuntimeError as e:
            waited = time.monotonic() - start
            if waited + delay > settings.temporal_wait_s:
                err.print(f"[red]cannot reach Temporal at {settings.temporal_address}[/red]"
                          + (f" (tried for {waited:.0f} s)" if said else "") + f": {escape(str(e))}\n"
                          "Start the local stack with `keel up` (or `make up`), or set TEMPORAL_ADDRESS "
                          "(KEEL_TEMPORAL_WAIT_S: how long to wait for it).")
                raise typer.Exit(1) from e
            if not said or int(waited) // 10 != int(waited + delay) // 10:
                err.print(f"[yellow]waiting for Temporal at {settings.temporal_address} (not answering: "
                          f"{escape(str(e).splitlines()[0][:160])}); retrying for up to "
                          f"{settings.temporal_wait_s:g} s[/yellow]")
                said = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
