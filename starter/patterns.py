"""Starting multi-agent pattern workflows and drawing their progress (the parent and its children)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from pydantic import BaseModel
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError

from keel import names
from keel.settings import KeelSettings
from keel.types import ChildRecord, PatternProgress, Progress
from starter.views import budget_text

SA_CUSTOMER = SearchAttributeKey.for_keyword(names.SA_CUSTOMER)
SA_TASK_TYPE = SearchAttributeKey.for_keyword(names.SA_TASK_TYPE)
SA_FEATURE = SearchAttributeKey.for_keyword(names.SA_FEATURE)
SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)

ACTIVE = ("pending", "running")


def new_id(prefix: str) -> str:
    """Unique per run: the ledger and write idempotency are keyed on workflow ids (children's include it)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def start_pattern(
    client: Client, settings: KeelSettings, workflow: str, inp: BaseModel, workflow_id: str, *,
    summary: str, task_type: str, feature: str, tenant: str = "internal", result_type: type[Any] | None = None,
) -> WorkflowHandle[Any, Any]:
    """Start a pattern's parent workflow with the search attributes a user filters on."""
    return await client.start_workflow(
        workflow,
        inp,
        id=workflow_id,
        task_queue=settings.task_queue,
        result_type=result_type,
        static_summary=summary,
        search_attributes=TypedSearchAttributes([
            SearchAttributePair(SA_CUSTOMER, tenant),
            SearchAttributePair(SA_TASK_TYPE, task_type),
            SearchAttributePair(SA_FEATURE, feature),
            SearchAttributePair(SA_STATUS, "running"),
        ]),
    )


async def pattern_progress(client: Client, workflow_id: str) -> PatternProgress:
    p: PatternProgress = await client.get_workflow_handle(workflow_id).query(
        names.PROGRESS_QUERY, result_type=PatternProgress)
    return p


async def _child_progress(client: Client, records: list[ChildRecord]) -> dict[str, Progress]:
    async def one(wid: str) -> tuple[str, Progress | None]:
        try:
            p: Progress = await client.get_workflow_handle(wid).query(names.PROGRESS_QUERY, result_type=Progress)
        except RPCError:
            return wid, None  # not started yet, or just finished
        return wid, p

    running = [r.workflow_id for r in records if r.status == "running" and r.workflow_id]
    return {wid: p for wid, p in await asyncio.gather(*(one(w) for w in running)) if p is not None}


def children_table(records: list[ChildRecord], live: dict[str, Progress] | None = None) -> Table:
    t = Table(title="children", title_justify="left", expand=False)
    for col in ("child", "role", "model", "status", "attempts", "tokens", "$", "budget", "now"):
        t.add_column(col, justify="right" if col in ("attempts", "tokens", "$") else "left")
    for r in records:
        p = (live or {}).get(r.workflow_id)
        tokens = r.usage.tokens + (p.tokens if p else 0)
        cost = r.usage.cost_usd + (p.cost_usd if p else 0.0)
        cap = f"{r.budget_tokens:,} tok" if r.budget_tokens is not None else "-"
        now = f"step {p.step}: {p.action}" if p else (r.reason[:60] if r.reason else "")
        status = r.status if not r.failures else f"{r.status} ({len(r.failures)} failed)"
        t.add_row(escape(r.name), r.role, escape(r.model), status, str(r.attempts), f"{tokens:,}",
                  f"{cost:.4f}", cap, escape(now))
    return t


def pattern_panel(workflow_id: str, p: PatternProgress | None, live: dict[str, Progress] | None = None) -> Panel:
    if p is None:
        return Panel("starting...", title=workflow_id)
    head = f"[bold]{p.status}[/bold] · phase: {escape(p.phase)} · {p.tokens:,} tokens · ${p.cost_usd:.4f}"
    if p.budget is not None:
        head += f"\nbudget: {budget_text(p.budget)}"
    return Panel(Group(head, children_table(p.children, live)), title=workflow_id)


async def watch(client: Client, console: Console, handle: WorkflowHandle[Any, Any]) -> Any:
    """Draw the parent's phase and every child's live progress until the parent ends; its result."""
    done = asyncio.ensure_future(handle.result())
    p: PatternProgress | None = None
    with Live(pattern_panel(handle.id, None), console=console, refresh_per_second=8) as live:
        while not done.done():
            with contextlib.suppress(RPCError):
                p = await pattern_progress(client, handle.id)
                live.update(pattern_panel(handle.id, p, await _child_progress(client, p.children)))
            await asyncio.wait({done}, timeout=0.25)
        with contextlib.suppress(RPCError):
            live.update(pattern_panel(handle.id, await pattern_progress(client, handle.id)))
    return done.result()
