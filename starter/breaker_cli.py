"""`keel breaker status [TYPE]` and `keel breaker reset TYPE`: the cost circuit breakers, by query and update."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from temporalio.client import Client, WorkflowQueryFailedError, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from keel.breaker import (
    BREAKER_RESET_UPDATE,
    BREAKER_STATE_QUERY,
    BREAKER_WORKFLOW,
    BreakerState,
    ResetRequest,
    breaker_workflow_id,
)
from keel.settings import KeelSettings
from starter import views
from starter.console import client_or_exit, console, err, load_settings

breaker_app = typer.Typer(help="Cost circuit breakers, one per task type: status and manual reset.",
                          no_args_is_help=True)
QUERY_TIMEOUT = timedelta(seconds=5)
"""A breaker answers in milliseconds; silence means no worker polls the task queue it runs on."""
RUNNING_BREAKERS = f"WorkflowType = '{BREAKER_WORKFLOW}' AND ExecutionStatus = 'Running'"



class BreakerNotFound(Exception):
    def __init__(self, task_type: str, scope: str = "") -> None:
        where = f" on task queue {scope!r}" if scope else ""
        super().__init__(f"no cost circuit breaker is running for task type {task_type!r}{where} "
                         "(one starts with the first task of that type)")
        self.task_type = task_type
        self.scope = scope


# -- client calls (testable without the command line) ---------------------------------------------


async def running_breaker_ids(client: Client) -> list[str]:
    """Workflow ids of the running breakers, from visibility (eventually consistent)."""
    return sorted({wf.id async for wf in client.list_workflows(RUNNING_BREAKERS)})


async def breaker_state(client: Client, task_type: str, scope: str = "") -> BreakerState:
    try:
        state: BreakerState = await client.get_workflow_handle(breaker_workflow_id(task_type, scope)).query(
            BREAKER_STATE_QUERY, result_type=BreakerState, rpc_timeout=QUERY_TIMEOUT
        )
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise BreakerNotFound(task_type, scope) from e
        raise
    return state


@dataclass
class BreakerListing:
    states: list[BreakerState] = field(default_factory=list)
    """Sorted by task type."""
    unreachable: dict[str, str] = field(default_factory=dict)
    """Workflow id -> why its state could not be read (e.g. no worker polls the queue it runs on)."""


async def _query_or_why(client: Client, wf_id: str) -> BreakerState | str | None:
    # The handle has no run id, so a breaker that continued as new since the listing is still found.
    handle = client.get_workflow_handle(wf_id)
    try:
        state: BreakerState = await handle.query(BREAKER_STATE_QUERY, result_type=BreakerState,
                                                 rpc_timeout=QUERY_TIMEOUT)
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return None  # terminated since the listing
        if e.status in (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED):
            return f"no answer within {QUERY_TIMEOUT.total_seconds():g}s (is a worker polling its task queue?)"
        return e.message
    except WorkflowQueryFailedError as e:
        return str(e)
    return state


async def breaker_states(client: Client, task_type: str | None = None, scope: str = "") -> BreakerListing:
    """One breaker's state, or every running breaker's. A breaker nobody answers for does not hide
    the others: it is listed as unreachable."""
    if task_type is not None:
        return BreakerListing(states=[await breaker_state(client, task_type, scope)])
    ids = await running_breaker_ids(client)
    listing = BreakerListing()
    for wf_id, got in zip(ids, await asyncio.gather(*(_query_or_why(client, i) for i in ids)), strict=True):
        if isinstance(got, BreakerState):
            listing.states.append(got)
        elif got is not None:
            listing.unreachable[wf_id] = got
    listing.states.sort(key=lambda s: (s.config.task_type, s.config.scope))
    return listing


async def reset_breaker(client: Client, task_type: str, req: ResetRequest, scope: str = "") -> BreakerState:
    handle = client.get_workflow_handle(breaker_workflow_id(task_type, scope))
    try:
        state: BreakerState = await handle.execute_update(BREAKER_RESET_UPDATE, req, result_type=BreakerState)
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise BreakerNotFound(task_type, scope) from e
        raise
    return state


# -- presentation ---------------------------------------------------------------------------------


def state_json(s: BreakerState) -> dict[str, Any]:
    doc = s.model_dump(mode="json")
    doc["window_tasks"] = len(s.window)
    doc["window_avg_tokens"] = round(s.window_avg_tokens, 1)
    doc["threshold_tokens"] = s.config.threshold_tokens
    doc["half_opens_at"] = s.half_opens_at.isoformat() if s.half_opens_at else None
    return doc


def _when(t: datetime | None) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}" if t is not None else "-"


_STATUS_STYLE = {"closed": "green", "open": "bold red", "half_open": "yellow"}


def states_table(states: list[BreakerState]) -> Table:
    t = Table(title="Cost circuit breakers", box=box.SIMPLE_HEAD)
    numeric = {"window tasks", "window avg tokens", "threshold", "trips", "rejected"}
    # Breakers are scoped by task queue: with more than one queue, the same type appears once per queue.
    scoped = len({s.config.scope for s in states}) > 1
    for col in ("task type", *(["task queue"] if scoped else []), "status", "window tasks", "window avg tokens",
                "threshold", "trips", "rejected", "opened at (UTC)", "half-opens at (UTC)"):
        t.add_column(col, justify="right" if col in numeric else "left")
    for s in states:
        t.add_row(
            escape(s.config.task_type),
            *([escape(s.config.scope or "-")] if scoped else []),
            f"[{_STATUS_STYLE[s.status]}]{s.status}[/]",
            str(len(s.window)),
            f"{s.window_avg_tokens:,.0f}",
            f"{s.config.threshold_tokens:,.0f}",
            str(s.trips),
            str(s.rejected),
            _when(s.opened_at),
            _when(s.half_opens_at),
        )
    return t


def _print_states(states: list[BreakerState], as_json: bool, settings: KeelSettings) -> None:
    if as_json:
        print(json.dumps([state_json(s) for s in states], indent=2))
        return
    console.print(states_table(states))
    for s in states:
        if s.reason:
            console.print(f"[bold]{escape(s.config.task_type)}[/bold]: {escape(s.reason)}")
    if len(states) == 1:
        cfg = states[0].config
        console.print(f"  {views.workflow_url(settings, breaker_workflow_id(cfg.task_type, cfg.scope))}")


# -- commands -------------------------------------------------------------------------------------


def _run(settings: KeelSettings, fn: Callable[[Client], Awaitable[None]]) -> None:
    async def run() -> None:
        await fn(await client_or_exit(settings))

    try:
        asyncio.run(run())
    except BreakerNotFound as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(1) from e
    except WorkflowUpdateFailedError as e:
        err.print(f"[red]the breaker refused:[/red] {escape(str(e.cause))}")
        raise typer.Exit(1) from e
    except WorkflowQueryFailedError as e:
        err.print(f"[red]the breaker's query failed:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    except RPCError as e:
        err.print(f"[red]Temporal: {escape(e.message)}[/red]")
        raise typer.Exit(1) from e


@breaker_app.command("status")
def status(
    task_type: Annotated[
        str | None, typer.Argument(metavar="TYPE", help="One task type (default: every running breaker)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the state as JSON")] = False,
) -> None:
    """The breakers' state: status, window, threshold, trips, rejections, when an open one half-opens."""
    settings = load_settings()

    async def run(client: Client) -> None:
        listing = await breaker_states(client, task_type, settings.task_queue)
        if listing.states or as_json:
            _print_states(listing.states, as_json, settings)
        elif not listing.unreachable:
            console.print("no cost circuit breakers are running (one starts with the first task of a type)")
        for wf_id, why in listing.unreachable.items():
            err.print(f"[red]{escape(wf_id)}: state unreadable[/red]: {escape(why)}")
        if listing.unreachable:
            raise typer.Exit(1)

    _run(settings, run)


@breaker_app.command("reset")
def reset(
    task_type: Annotated[str, typer.Argument(metavar="TYPE", help="The task type whose breaker to close")],
    by: Annotated[str | None, typer.Option("--as", help="Who resets it (default: $USER)")] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why, kept in the breaker's state")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the new state as JSON")] = False,
) -> None:
    """Close a breaker by hand: clears its window and probes; new tasks run the model again."""
    settings = load_settings()
    req = ResetRequest(by=by or os.environ.get("USER") or "operator", reason=reason)

    async def run(client: Client) -> None:
        state = await reset_breaker(client, task_type, req, settings.task_queue)
        if not as_json:
            console.print(f"reset the cost circuit breaker of [bold]{escape(task_type)}[/bold] "
                          f"as {escape(req.by)}")
        _print_states([state], as_json, settings)

    _run(settings, run)
