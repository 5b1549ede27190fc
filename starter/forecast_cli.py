"""`keel forecast --tasks-per-day N [--agent A] [--since 30d]`: daily and monthly spend from the ledger's
per-task costs (keel/forecast.py: a seeded bootstrap), set against the article's "budget for 3x"."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from keel.forecast import forecast
from starter import views
from starter.console import console, err, load_settings


def forecast_command(
    tasks_per_day: Annotated[int, typer.Option("--tasks-per-day", min=1, help="Tasks a day to forecast for")],
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's (or pattern's) tasks")] = None,
    since: Annotated[str | None, typer.Option(help="Tasks since: 24h, 7d, or an ISO date/time (UTC)")] = None,
    eval_run: Annotated[str | None, typer.Option("--eval", help="From a stored eval run's cost distribution "
                                                               "(run id, latest:SUITE) instead of the ledger")] = None,
    samples: Annotated[int, typer.Option("--samples", min=100, help="Bootstrap days drawn")] = 2_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Daily and monthly p50/p95 spend for N tasks a day, from the cost of the tasks in the ledger."""
    from activities.db import make_engine
    from activities.ledger import Ledger

    settings = load_settings()
    try:
        if eval_run is not None:
            from starter.eval_cli import load_eval

            doc = load_eval(settings.db_url, eval_run)
            sample = [float(r["cost_usd"]) for c in doc["cases"] for r in c.get("scores") or []]
            source = f"{len(sample):,} runs of eval {doc.get('run_id', eval_run)}"
        else:
            start = views.parse_since(since) if since else None
            sample = list(Ledger(make_engine(settings.db_url)).task_costs(agent, since=start).values())
            source = f"{len(sample):,} tasks in the ledger"
        f = forecast(sample, tasks_per_day, samples=samples, seed=seed)
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    if as_json:
        print(json.dumps({"agent": agent, "since": since, "eval": eval_run, **f.model_dump()}))
        return
    t = Table(title=f"Spend forecast: {tasks_per_day:,} tasks a day"
                    + (f" of {agent}" if agent else "") + f", from {source}")
    for c in ("", "expected", "p50", "p95", "budget 3x"):
        t.add_column(c, justify="right" if c else "left")
    t.add_row("per day", f"${f.daily_expected:,.4f}", f"${f.daily_p50:,.4f}", f"${f.daily_p95:,.4f}",
              f"${f.budget_3x_daily:,.4f}")
    t.add_row("per month (30 days)", f"${f.monthly_expected:,.2f}", f"${f.monthly_p50:,.2f}",
              f"${f.monthly_p95:,.2f}", f"${f.budget_3x_monthly:,.2f}")
    console.print(t)
    console.print(f"a task: mean ${f.cost_per_task_mean:.6f}, p50 ${f.cost_per_task_p50:.6f}, "
                  f"p95 ${f.cost_per_task_p95:.6f}, max ${f.cost_per_task_max:.6f}; bootstrap of {f.samples:,} days, "
                  f"seed {f.seed}")
    verdict = "fits in" if f.p95_within_3x else "[red]exceeds[/red]"
    console.print(f"the p95 day {verdict} 3x the expected day (the article's rule: budget for 3x)")
