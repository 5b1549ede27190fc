"""`keel plan SCENARIO`: a worker agent drafts a disaster-recovery plan, the supervisor checks it against the
runbook's rules and reviews it (accept, revise, escalate). Prints the workflow id and its Temporal UI link,
then every round (violations, verdict, feedback), the final plan, and the review overhead in tokens."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from temporalio.client import Client

from keel import names
from keel.policy import budget_for
from keel.runbooks import RUNBOOKS
from keel.supervisor import (
    TASK_TYPE,
    WORKER_BUDGET,
    Plan,
    SupervisedPlanInput,
    SupervisedPlanResult,
    input_problems,
)
from keel.types import ModelSpec, SimConfig
from starter import patterns, views
from starter.console import client_or_exit, console, err, load_settings, run_task


def plan_table(plan: Plan, title: str) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for col in ("#", "action", "target", "detail", "rollback", "verify"):
        t.add_column(col, justify="right" if col == "#" else "left", overflow="fold")
    for i, s in enumerate(plan.steps, 1):
        t.add_row(str(i), escape(s.action), escape(s.target), escape(s.detail), escape(s.rollback or "-"),
                  escape(s.verify or "-"))
    return t


def print_result(r: SupervisedPlanResult) -> None:
    if r.status == "rejected":
        err.print(f"[red]plan refused:[/red] {escape(r.reason)}")
        return
    for rec in r.rounds:
        head = (f"[bold]round {rec.round}[/bold]  worker {escape(rec.worker_id)} ({rec.worker_status}, "
                f"{rec.worker_usage.tokens:,} tokens)  review {rec.review_usage.tokens:,} tokens")
        console.print(head)
        if rec.plan is not None:
            console.print(f"  plan: {len(rec.plan.steps)} steps")
        if rec.violations:
            for v in rec.violations:
                console.print(f"  [red]violation[/red] {escape(v.line())}")
        elif rec.plan is not None:
            console.print("  [green]every rule passes[/green]")
        verdict = rec.verdict or "(invalid review: counted as revise)"
        console.print(f"  reviewer: [bold]{verdict}[/bold]" + (f"  {escape(rec.note)}" if rec.note else ""))
        for f in rec.feedback:
            console.print(f"    - {escape(f)}")
        console.print(f"  -> {rec.action or '-'}")
    if r.plan is not None:
        title = "accepted plan" if r.status == "accepted" else "last draft (not accepted)"
        console.print(plan_table(r.plan, title))
    if r.status == "accepted":
        console.print(f"[green]accepted[/green]: published as {r.report_id or 'a report'} ({escape(r.reason)})")
    else:
        console.print(f"[yellow]escalated[/yellow] to the human queue ({r.queue_item_id}): {escape(r.reason)}")
    u, w, rv = r.usage, r.worker_usage, r.review_usage
    console.print(f"tokens: worker {w.tokens:,} ({w.llm_calls} calls, ${w.cost_usd:.5f}) + review {rv.tokens:,} "
                  f"({rv.llm_calls} calls, ${rv.cost_usd:.5f}) = {u.tokens:,} (${u.cost_usd:.5f}); "
                  f"review overhead {r.review_overhead:.0%} of tokens")


def plan_cmd(
    scenario: Annotated[str, typer.Argument(help="What happened, e.g. 'payments-db primary in eu-west-1 is down'")],
    runbook: Annotated[str, typer.Option("--runbook", "-r", help=f"Runbook topic: {', '.join(sorted(RUNBOOKS))}")] = (
        "database_failover"),
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1, max=10, help="Drafts before a human decides")] = 3,
    worker_model: Annotated[str, typer.Option(help="Model spec of the worker agent")] = "sim:sim-large",
    reviewer_model: Annotated[str, typer.Option(help="Model spec of the supervisor's review")] = "sim:sim-large",
    sim_seed: Annotated[int, typer.Option(help="Seed of the sim model")] = 0,
    watch: Annotated[bool, typer.Option("--watch", help="Draw the supervisor's and its workers' progress")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
    prompt_version: Annotated[str, typer.Option(help="Prompt version (prompts/dr/<name>.<version>.md)")] = "v1",
) -> None:
    """Draft a disaster-recovery plan under supervision: rules, LLM review, revise or escalate."""
    settings = load_settings()
    try:
        worker, reviewer = ModelSpec.parse(worker_model), ModelSpec.parse(reviewer_model)
    except ValueError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    wid = patterns.new_id("plan")
    inp = SupervisedPlanInput(scenario=scenario, runbook=runbook, max_rounds=max_rounds, worker_model=worker,
                              reviewer_model=reviewer, sim=SimConfig(seed=sim_seed, spiral_rate=0.0),
                              prompt_version=prompt_version, key=wid,
                              # Pinned in the input (and so in the history): a later policy change must
                              # not alter a running task or its replay.
                              budget=budget_for(TASK_TYPE), worker_budget=WORKER_BUDGET)
    problems = input_problems(inp)
    if problems:
        err.print(f"[red]plan refused:[/red] {'; '.join(problems)}")
        raise typer.Exit(2)

    async def run() -> None:
        client: Client = await client_or_exit(settings)
        handle = await patterns.start_pattern(
            client, settings, names.SUPERVISED_PLAN_WORKFLOW, inp, wid,
            summary=f"supervised {runbook} plan: {scenario[:60]}", task_type=TASK_TYPE, feature=inp.feature,
            customer=inp.customer, result_type=SupervisedPlanResult)
        if not as_json:
            console.print(f"started [bold]{handle.id}[/bold]  worker {escape(worker.label)}, "
                          f"reviewer {escape(reviewer.label)}, at most {max_rounds} round(s)")
            console.print(f"  {views.workflow_url(settings, handle.id)}")
        res: SupervisedPlanResult = await (patterns.watch(client, console, handle) if watch and not as_json
                                           else handle.result())
        if as_json:
            print(json.dumps(res.model_dump(mode="json"), indent=2))
        else:
            if watch:
                console.print()
            print_result(res)

    run_task(run, "plan")
