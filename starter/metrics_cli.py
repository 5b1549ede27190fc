"""`keel metrics` (the agent's figures from the ledger) and `keel alerts` (behavioral alerts)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from starter.console import console, err, ledger_engine
from starter.views import parse_since

SinceOpt = Annotated[str | None, typer.Option("--since", help="Only tasks since: 24h, 7d, 30m, or an ISO date (UTC)")]


def _since(since: str | None) -> datetime | None:
    try:
        return parse_since(since) if since else None
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e



def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def metrics(
    since: SinceOpt = "24h",
    task_type: Annotated[str | None, typer.Option("--task-type", help="Only this task type")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
) -> None:
    """Agent figures from the ledger: steps, tools, reasoning loops, token efficiency, consistency, outcomes."""
    from activities.ledger import Ledger
    from keel.metrics import summarize

    start = _since(since)
    rows = Ledger(ledger_engine()).outcomes(since=start, task_type=task_type)
    doc = {"since": start.isoformat() if start else None, "task_type": task_type, **summarize(rows)}
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
        return
    scope = f"task type {task_type}" if task_type else "all task types"
    t = Table(title=f"Agent metrics: {scope}, {doc['tasks']} tasks" + (f" since {since}" if since else ""),
              show_header=False)
    s, loops, eff, cons = doc["steps"], doc["reasoning_loops"], doc["token_efficiency"], doc["consistency"]
    t.add_row("steps per task", f"mean {_num(s['mean'], '.1f')}, p50 {_num(s['p50'], '.0f')}, "
                                f"p95 {_num(s['p95'], '.0f')}")
    calls = doc["tool_calls"]
    t.add_row("tool calls", f"{calls['total']:,} ({_num(calls['per_task'], '.1f')} per task)")
    for tool, c in calls["by_tool"].items():
        t.add_row(f"  {escape(tool)}", f"{c['calls']:,} ({c['share']:.1%} of calls, in {c['tasks']} tasks)")
    t.add_row("reasoning loops", f"mean {_num(loops['mean'])}, {_pct(loops['share_with_any'])} of tasks have any")
    t.add_row("repeated calls", f"mean {_num(doc['repeated_calls']['mean'])}")
    t.add_row("token efficiency", f"mean {_pct(eff['mean'])} of a task's tokens are the final answer")
    t.add_row("consistency", f"{_pct(cons['rate'])} of {cons['repeated_inputs']} inputs run more than once got "
                             f"the same category every time")
    t.add_row("abandonment", f"{_pct(doc['abandonment_rate'])} (budget kill switch or circuit breaker)")
    t.add_row("escalation", f"{_pct(doc['escalation_rate'])} (routed to a human)")
    t.add_row("outcomes", ", ".join(f"{k} {v}" for k, v in doc["by_status"].items()) or "-")
    t.add_row("usage", f"{doc['tokens']:,} tokens, ${doc['cost_usd']:.4f}")
    console.print(t)


def alerts(
    since: SinceOpt = "24h",
    task_type: Annotated[str | None, typer.Option("--task-type", help="Only this task type")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list")] = False,
) -> None:
    """Behavioral alerts raised by the workers (steps, tokens, new tools, category shifts), latest first."""
    from activities.alerts import list_alerts

    rows = list_alerts(ledger_engine(), since=_since(since), task_type=task_type)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    t = Table(title=f"{len(rows)} alerts" + (f" seen since {since}" if since else ""))
    for c in ("last seen", "rule", "task type", "count", "alert"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["last_seen_at"])[:19], r["rule"], escape(r["task_type"]), str(r["count"]),
                  escape(r["message"]))
    console.print(t)
