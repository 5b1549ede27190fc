"""`keel chaos run SUITE --tool-error-rate 0.3 ...`: a suite run twice, fault-free and with faults
injected into the tool and model calls (keel/chaos.py), compared case by case: does the agent degrade
gracefully? Calls per task bounded (no retry storm), budgets respected, escalation on persistent failure,
no task lost. Exit 1 when one of those does not hold."""

from __future__ import annotations

import json
import statistics
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from keel.chaos import Chaos
from keel.types import AgentResult
from starter.agents import command_models
from starter.console import client_or_exit, console, err, load_settings, run_task
from starter.eval_cli import SuiteError, SuiteRunner, load_scorer, load_suite

chaos_app = typer.Typer(help="Fault injection: a suite with and without faults, compared.", no_args_is_help=True)
CALLS_BOUND = 3.0
"""Graceful: a task under faults makes at most this many times the calls of its fault-free runs' worst."""


def _calls(r: AgentResult) -> int:
    return r.llm_calls + len(r.tools_executed) + len(r.tools_blocked)


def _over_budget(r: AgentResult) -> bool:
    b = r.budget
    return bool((b.max_tokens is not None and r.tokens > b.max_tokens)
                or (b.max_usd is not None and r.cost_usd > b.max_usd + 1e-9))


def degradation(base: dict[str, list[AgentResult | str]], faulty: dict[str, list[AgentResult | str]]) -> dict[str, Any]:
    """Per case and overall: completion, calls per task, budgets, escalations, lost tasks."""
    cases, problems = [], []
    for cid in base:
        b = [r for r in base[cid] if isinstance(r, AgentResult)]
        f = [r for r in faulty[cid] if isinstance(r, AgentResult)]
        lost = [r for r in faulty[cid] if isinstance(r, str)]
        worst_base = max((_calls(r) for r in b), default=0)
        worst = max((_calls(r) for r in f), default=0)
        over = [r.workflow_id for r in f if _over_budget(r)]
        unhandled = [r.workflow_id for r in f if r.status not in ("completed", "escalated", "budget_exceeded")]
        row = {"id": cid, "completed_base": sum(r.status == "completed" for r in b) / max(1, len(b)),
               "completed_chaos": sum(r.status == "completed" for r in f) / max(1, len(f)),
               "escalated_chaos": sum(r.status == "escalated" for r in f),
               "calls_base_mean": round(statistics.fmean(_calls(r) for r in b), 2) if b else 0,
               "calls_chaos_mean": round(statistics.fmean(_calls(r) for r in f), 2) if f else 0,
               "calls_chaos_max": worst, "over_budget": len(over), "lost": len(lost)}
        cases.append(row)
        if lost:
            problems.append(f"{cid}: {len(lost)} task(s) lost ({lost[0][:120]})")
        if worst_base and worst > CALLS_BOUND * worst_base:
            problems.append(f"{cid}: {worst} calls in a task under faults, over {CALLS_BOUND:g}x the fault-free "
                            f"worst ({worst_base}): a retry storm")
        if over:
            problems.append(f"{cid}: {len(over)} task(s) over the budget ({over[0]})")
        if unhandled:
            problems.append(f"{cid}: tasks neither completed nor handed to a person: {unhandled[:3]}")
    return {"cases": cases, "graceful": not problems, "problems": problems}


@chaos_app.command("run")
def run_cmd(
    suite_file: Annotated[Path, typer.Argument(help="The suite (YAML)")],
    tool_error_rate: Annotated[float, typer.Option("--tool-error-rate", min=0, max=1)] = 0.0,
    tool_timeout_rate: Annotated[float, typer.Option("--tool-timeout-rate", min=0, max=1)] = 0.0,
    tool_garbage_rate: Annotated[float, typer.Option("--garbage-rate", min=0, max=1)] = 0.0,
    tool_latency_ms: Annotated[int, typer.Option("--tool-latency-ms", min=0)] = 0,
    provider_429_rate: Annotated[float, typer.Option("--provider-429-rate", min=0, max=1)] = 0.0,
    provider_500_rate: Annotated[float, typer.Option("--provider-500-rate", min=0, max=1)] = 0.0,
    runs: Annotated[int, typer.Option("--runs", min=1, max=200)] = 3,
    model: Annotated[str | None, typer.Option("--model", help="provider:model for every tier")] = None,
    spiral_rate: Annotated[float | None, typer.Option("--spiral-rate", help="Sim: chance of a spiral")] = 0.0,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1)] = 20,
    case_ids: Annotated[list[str] | None, typer.Option("--case", help="Only these cases (repeatable)")] = None,
    tool_rates: Annotated[list[str] | None, typer.Option(
        "--tool-error-rate-for", help="TOOL=RATE: one tool's own error rate (repeatable)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the fault draws")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Run a suite fault-free, then with the faults, and show how the agent degrades."""
    settings = load_settings()
    try:
        per_tool = {k.strip(): float(v) for k, v in (x.split("=", 1) for x in tool_rates or [])}
        chaos = Chaos(tool_error_rate=tool_error_rate, tool_timeout_rate=tool_timeout_rate,
                      tool_garbage_rate=tool_garbage_rate, tool_latency_ms=tool_latency_ms,
                      provider_429_rate=provider_429_rate, provider_500_rate=provider_500_rate,
                      tool_error_rates=per_tool, seed=seed)
    except ValueError as e:
        err.print(f"[red]bad fault: {escape(str(e))} (--tool-error-rate-for TOOL=RATE, rates 0 to 1)[/red]")
        raise typer.Exit(2) from e
    try:
        suite = load_suite(suite_file)
        for spec in [*suite.scorers, *(x for c in suite.cases for x in c.scorers)]:
            load_scorer(spec)
        models = command_models(settings, model)
    except (SuiteError, ValueError) as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    if not chaos.active and suite.chaos is not None:
        chaos = suite.chaos  # the suite's own faults
    if not chaos.active:
        err.print("[red]no fault given: set at least one of --tool-error-rate, --tool-error-rate-for, "
                  "--tool-timeout-rate, --garbage-rate, --tool-latency-ms, --provider-429-rate, --provider-500-rate, "
                  "or `chaos:` in the suite[/red]")
        raise typer.Exit(2)
    cases = [c for c in suite.cases if not case_ids or c.id in case_ids]
    prefix = f"chaos-{suite.suite}-{uuid.uuid4().hex[:6]}"

    async def main() -> None:
        client = await client_or_exit(settings)
        runner = SuiteRunner(client, settings, suite, models=models, prompt_version=None, temperature=0.0,
                             spiral_rate=spiral_rate, concurrency=concurrency)
        _, base = await runner.run(cases, runs, f"{prefix}-base", quiet=as_json)
        _, faulty = await runner.run(cases, runs, f"{prefix}-faults", quiet=as_json, chaos=chaos)
        report = {"suite": suite.suite, "runs": runs, "chaos": chaos.model_dump(), **degradation(base, faulty)}
        if as_json:
            print(json.dumps(report))
        else:
            t = Table(title=f"{suite.suite}: fault-free against {escape(_describe(chaos))}, {runs} runs a case")
            for col in ("case", "completed", "completed (faults)", "escalated (faults)", "calls/task",
                        "calls/task (faults)", "max calls", "over budget", "lost"):
                t.add_column(col, justify="left" if col == "case" else "right")
            for r in report["cases"]:
                t.add_row(r["id"], f"{r['completed_base']:.0%}", f"{r['completed_chaos']:.0%}",
                          str(r["escalated_chaos"]), str(r["calls_base_mean"]), str(r["calls_chaos_mean"]),
                          str(r["calls_chaos_max"]), str(r["over_budget"]), str(r["lost"]))
            console.print(t)
            if report["graceful"]:
                console.print("[green]graceful:[/green] no task lost, calls per task bounded, budgets respected, "
                              "every task completed or handed to a person")
            else:
                console.print("[red]not graceful:[/red] " + escape("; ".join(report["problems"])))
        if not report["graceful"]:
            raise typer.Exit(1)

    run_task(main, f"chaos {suite.suite}")


def _describe(c: Chaos) -> str:
    parts = [f"{k.removesuffix('_rate')} {v:.0%}" if isinstance(v, float) else f"{k} {v}"
             for k, v in c.model_dump().items() if v and k != "seed"]
    return ", ".join(parts)
