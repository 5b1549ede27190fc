"""How results look in the terminal: tables, panels, JSON."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from keel.settings import KeelSettings
from keel.types import SIM_LABEL, AgentResult, BudgetReport, Progress, TicketResult


def workflow_url(settings: KeelSettings, workflow_id: str) -> str:
    return f"{settings.ui_url}/namespaces/{settings.temporal_namespace}/workflows/{quote(workflow_id, safe='')}"


def result_json(r: TicketResult) -> dict[str, Any]:
    return {
        "workflow_id": r.workflow_id,
        "ticket_id": r.ticket_id,
        "status": r.status,
        "category": r.category,
        "route": r.route,
        "reason": r.reason,
        "tools_executed": r.tools_executed,
        "tools_blocked": [b.model_dump() for b in r.tools_blocked],
        "tokens": r.tokens,
        "cost_usd": r.cost_usd,
        "budget": r.budget.model_dump(),
        "models": r.models,
        "reply": r.reply,
    }


def _sim_note(models: list[str]) -> str:
    return f"  [dim]({SIM_LABEL}: simulated tokens and costs)[/dim]" if any(SIM_LABEL in m for m in models) else ""


def result_panel(r: TicketResult) -> Panel:
    t = Table.grid(padding=(0, 2))
    t.add_row("status", f"[bold]{r.status}[/bold] -> {r.route}")
    t.add_row("reason", r.reason)
    t.add_row("category", f"{r.category} ({r.urgency}, confidence {r.confidence})")
    t.add_row("tools", ", ".join(r.tools_executed) or "-")
    if r.tools_blocked:
        t.add_row("blocked", "\n".join(f"{b.tool}: {b.reason}" for b in r.tools_blocked))
    t.add_row("usage", f"{r.llm_calls} LLM calls, {r.tokens:,} tokens, ${r.cost_usd:.5f}" + _sim_note(r.models))
    t.add_row("models", escape(", ".join(r.models)))
    t.add_row("budget", budget_text(r.budget))
    if r.reasoning_loops or r.repeated_calls:
        t.add_row("spiral", f"{r.reasoning_loops} reasoning loops, {r.repeated_calls} repeated calls not paid twice")
    if r.partial_output:
        t.add_row("partial", r.partial_output)
    if r.approvals:
        t.add_row("approvals", escape("; ".join(
            f"{a.action_id} {a.decision} by {a.approver}" + ("" if a.accepted else f" (ignored: {a.note})")
            for a in r.approvals)))
    if r.redactions:
        t.add_row("redacted", ", ".join(f"{v} {k}" for k, v in r.redactions.items()))
    if r.reply:
        t.add_row("reply", r.reply)
    return Panel(t, title=r.workflow_id)


def agent_result_view(r: AgentResult) -> Group:
    """A KeelAgent task's result (`keel run --wait`, `keel result`, `keel watch`, `keel status` once done)."""
    colour = {"completed": "green", "escalated": "yellow"}.get(r.status, "red")
    lines: list[RenderableType] = [
        f"[bold]{escape(r.workflow_id)}[/bold]  agent {escape(r.agent)}  [{colour}]{r.status}[/{colour}]  "
        f"{escape(r.reason)}",
        f"steps {r.steps} · {r.llm_calls} model calls · {r.tokens:,} tokens · ${r.cost_usd:.4f} · "
        f"models {escape(', '.join(r.models) or '-')} · tools {escape(', '.join(r.tools_executed) or '-')}"
        + _sim_note(r.models),
        f"budget {budget_text(r.budget)}",
    ]
    for b in r.tools_blocked:
        lines.append(f"  [yellow]blocked[/yellow] {escape(b.tool)}: {escape(b.reason)}")
    for a in r.approvals:
        lines.append(escape(f"  approval {a.action_id} {a.decision} by {a.approver}"
                            + ("" if a.accepted else f" (ignored: {a.note})")))
    if r.redactions:
        lines.append("  redacted " + ", ".join(f"{v} {k}" for k, v in r.redactions.items()))
    if r.output:
        lines.append(escape(r.output))
    elif r.partial_output:
        lines.append(f"[dim](held back)[/dim] {escape(r.partial_output)}")
    return Group(*lines)


def progress_panel(workflow_id: str, p: Progress | None, agent: str | None = None) -> Panel:
    """A task's live progress; `agent`: a KeelAgent task's agent (shown instead of a ticket's category)."""
    if p is None:
        return Panel("starting...", title=workflow_id)
    t = Table.grid(padding=(0, 2))
    if agent is not None:
        t.add_row("agent", escape(agent))
    t.add_row("status", f"[bold]{p.status}[/bold]")
    t.add_row("step", escape(f"{p.step}: {p.action}"))
    if agent is None:
        t.add_row("category", p.category or "-")
    if agent is not None and p.triage:
        t.add_row("triage", escape(", ".join(f"{k} {v}" for k, v in p.triage.items())))
    if p.acknowledgement:
        t.add_row("ack", escape(p.acknowledgement))
    t.add_row("tokens", f"{p.tokens:,} ({p.llm_calls} LLM calls, ${p.cost_usd:.5f})")
    t.add_row("tools", ", ".join(p.tools_executed) or "-")
    if p.budget is not None:
        t.add_row("budget", budget_text(p.budget))
    if p.pending_action is not None:
        a = p.pending_action
        t.add_row("approval", escape(f"{a.action_id}: {a.tool} {json.dumps(a.arguments, sort_keys=True)} "
                                     f"(approvers: {', '.join(a.approvers)})"))
    return Panel(t, title=workflow_id)


def budget_text(b: BudgetReport) -> str:
    if b.max_tokens is None and b.max_usd is None and not b.limit_hit:
        return "no budget"
    parts = []
    if b.max_tokens is not None:
        parts.append(f"{b.used_tokens:,}/{b.max_tokens:,} tokens")
    if b.max_usd is not None:
        parts.append(f"${b.used_usd:.4f}/${b.max_usd:.4f}")
    text = f"{b.state}: " + ", ".join(parts)
    if b.limit_hit:
        text += f"  [bold]limit: {b.limit_hit}[/bold] ({escape(b.detail)})"
    return text


def batch_table(results: list[TicketResult]) -> Group:
    t = Table(title=f"{len(results)} support tickets", box=box.SIMPLE_HEAD)
    for col in ("ticket", "customer", "category", "conf", "status", "route", "tools", "blocked", "tokens", "cost $"):
        t.add_column(col, justify="right" if col in ("conf", "tokens", "cost $", "tools", "blocked") else "left")
    for r in results:
        t.add_row(r.ticket_id, r.customer_id, r.category or "-",
                  f"{r.confidence:.2f}" if r.confidence is not None else "-",
                  r.status, r.route, str(len(r.tools_executed)), str(len(r.tools_blocked)),
                  f"{r.tokens:,}", f"{r.cost_usd:.5f}")
    n = len(results) or 1
    human = sum(r.route == "human" for r in results)
    tokens = sum(r.tokens for r in results)
    cost = sum(r.cost_usd for r in results)
    models = sorted({m for r in results for m in r.models})
    waiting = [r for r in results if r.status == "awaiting_approval"]
    summary = (f"resolved {sum(r.status == 'resolved' for r in results)}, to the human queue {human} "
               f"({human / n:.0%}); {tokens:,} tokens, ${cost:.4f} in all, ${cost / n:.5f} per ticket; "
               f"models: {escape(', '.join(models))}" + _sim_note(models))
    parts: list[Any] = [t, summary]
    if waiting:
        parts.append(f"{len(waiting)} ticket(s) wait for a human's approval of a refund: `keel approvals` lists "
                     f"them; e.g. `keel approve {waiting[0].workflow_id} --as alice` or `keel reject ... --as bob`.")
    return Group(*parts)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`24h`, `7d`, `30m`, `90s`, or an ISO date/time (taken as UTC when it has no zone)."""
    now = now or datetime.now(UTC)
    m = re.fullmatch(r"(\d+)\s*([smhd])", text.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return now - timedelta(**{unit: int(m.group(1))})
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError as e:
        raise ValueError(f"--since {text!r}: use 24h, 7d, 30m or an ISO date such as 2026-11-01") from e
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def print_rows(console: Console, rows: list[dict[str, Any]], keys: list[str], fmt: str, title: str) -> None:
    if fmt == "json":
        console.print_json(json.dumps(rows, default=str))
        return
    cols = list(rows[0]) if rows else keys
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        print(buf.getvalue(), end="")
        return
    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(f"{v:.6f}" if isinstance(v, float) else str(v) for v in r.values()))
    console.print(t)
