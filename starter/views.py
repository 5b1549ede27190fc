"""How results look in the terminal: tables, panels, JSON."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from keel.pricing import SELF_HOSTED_LABEL, is_self_hosted, user_prices
from keel.settings import KeelSettings
from keel.types import SIM_LABEL, AgentResult, BudgetReport, Progress


def workflow_url(settings: KeelSettings, workflow_id: str) -> str:
    return f"{settings.ui_url}/namespaces/{settings.temporal_namespace}/workflows/{quote(workflow_id, safe='')}"


def _sim_note(models: list[str]) -> str:
    """What the costs beside these models are: simulated (the sim), a declared estimate (self-hosted)."""
    notes = [f"{SIM_LABEL}: simulated tokens and costs"] if any(SIM_LABEL in m for m in models) else []
    if any(f"[{SELF_HOSTED_LABEL}]" in m for m in models):
        notes.append(f"{SELF_HOSTED_LABEL}: costs are your declared estimate (KEEL_PRICES), not a bill")
    return f"  [dim]({'; '.join(notes)})[/dim]" if notes else ""


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
    """A task's live progress; `agent`: a KeelAgent task's agent (shown with its triage)."""
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


def self_hosted_note(model_names: list[str]) -> str:
    """The self-hosted note for costs beside these model names (no provider: a swarm's peers), else ""."""
    mine = {k.split(":", 1)[1] for k, p in user_prices().items() if p.self_hosted}
    named = {n.strip() for names in model_names for n in names.split(" / ")}
    return _sim_note([f"[{SELF_HOSTED_LABEL}]"]) if named & mine else ""


def label_self_hosted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cost rows with a self-hosted model's name marked `[self-hosted]` (its costs are the user's estimate)."""
    mine = {k.split(":", 1)[1] for k, p in user_prices().items() if p.self_hosted}

    def hosted(r: dict[str, Any]) -> bool:
        return is_self_hosted(str(r["provider"]), str(r["model"])) if "provider" in r else str(r["model"]) in mine

    return [{**r, "model": f"{r['model']} [{SELF_HOSTED_LABEL}]"} if "model" in r and hosted(r) else r for r in rows]


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
