"""`keel research QUESTION`: the research assistant (agents/research) on the generic orchestrator.

Its configuration (which planner and writer agents, the family's budget, the orchestration's name) is
the agent package's own (`agents.research.orchestration`); this module only parses the flags, starts
the orchestration (starter.agents.start_orchestration) and prints its result: the report, its status,
its sources, what is missing, every child and the costs. The worker must serve the agents
(`KEEL_AGENTS=agents.research`): a worker without them refuses the plan with that reason.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table
from temporalio.client import Client

from agents.research import NAME, orchestration
from keel.orchestration import OrchestratorResult
from keel.types import Budget, SimConfig
from starter import patterns, views
from starter.agents import start_orchestration
from starter.console import client_or_exit, console, err, load_settings, run_task

MAX_QUESTION_CHARS = 2_000


def question_problems(question: str) -> list[str]:
    if not question.strip():
        return ["the question is empty"]
    if len(question) > MAX_QUESTION_CHARS:
        return [f"the question is {len(question):,} characters; the limit is {MAX_QUESTION_CHARS:,}"]
    return []


def parse_child_budgets(specs: list[str]) -> dict[str, Budget]:
    """`NAME=TOKENS` pairs: a token cap per child task (its dollar cap stays its agent's)."""
    out: dict[str, Budget] = {}
    for spec in specs:
        name, sep, tokens = spec.partition("=")
        try:
            value = int(tokens.replace("_", "").replace(",", ""))
        except ValueError:
            value = 0
        if not sep or not name.strip() or value <= 0:
            raise typer.BadParameter(f"--child-budget {spec!r}: use NAME=TOKENS, e.g. retrieval=2000")
        out[name.strip()] = Budget(max_tokens=value, max_usd=None)
    return out


def report_of(r: OrchestratorResult) -> dict[str, Any]:
    """The writer's structured report, or {} when it did not deliver one."""
    return dict(r.structured or {})


def costs_table(r: OrchestratorResult) -> Table:
    t = Table(title="costs", title_justify="left")
    for col in ("child", "agent", "status", "attempts", "LLM calls", "tokens", "$", "cap"):
        t.add_column(col, justify="left" if col in ("child", "agent", "status") else "right")
    for c in r.children:
        t.add_row(escape(c.name), escape(c.model), c.status, str(c.attempts), str(c.usage.llm_calls),
                  f"{c.usage.tokens:,}", f"{c.usage.cost_usd:.5f}",
                  f"{c.budget_tokens:,}" if c.budget_tokens is not None else "-")
    t.add_row("total", "", "", "", str(r.usage.llm_calls), f"{r.usage.tokens:,}", f"{r.usage.cost_usd:.5f}",
              f"{r.budget.max_tokens:,}" if r.budget.max_tokens is not None else "-", style="bold")
    return t


def print_result(r: OrchestratorResult, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(r.model_dump(mode="json"), indent=2))
        return
    if r.status == "rejected":
        err.print(f"[red]research refused:[/red] {escape(r.reason)}")
        return
    rep = report_of(r)
    console.print()
    console.print(Markdown(str(rep.get("report") or r.output or "(no report)")))
    console.print()
    console.print(costs_table(r))
    colour = {"completed": "green", "partial": "yellow"}.get(r.status, "red")
    sources = ", ".join(str(s) for s in rep.get("sources") or []) or "-"
    console.print(f"[{colour}]{r.status}[/{colour}] · plan: {r.plan_source} ({len(r.plan)} tasks) · "
                  f"report {rep.get('report_id') or '- (not published)'} · sources: {escape(sources)} · "
                  f"budget: {views.budget_text(r.budget)}")
    for m in r.missing:
        console.print(f"  [yellow]missing[/yellow] {escape(m)}")
    for d in r.decisions:
        if d.kind in ("skip_child", "shrink_child", "child_failed"):
            console.print(f"  [dim]{d.kind}: {escape(d.reason)}[/dim]")


def research_cmd(
    question: Annotated[str, typer.Argument(help="The research question, e.g. 'Why did refunds rise in Q3?'")],
    watch: Annotated[bool, typer.Option("--watch", help="Draw the orchestration's and its children's progress")] = (
        False),
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
    child_budget: Annotated[list[str] | None, typer.Option(
        "--child-budget", help="NAME=TOKENS: a child's token cap (retrieval, analysis, planner, synthesizer; "
                               "repeatable)")] = None,
    budget_tokens: Annotated[int | None, typer.Option(
        "--budget-tokens", min=1, help="The token budget of the whole family")] = None,
    key: Annotated[str, typer.Option("--key", help="Business key (workflow id research-<key>)")] = "",
    sim_seed: Annotated[int | None, typer.Option(help="Seed of the sim model")] = None,
) -> None:
    """Research a question over the internal documents and data: a planner, worker agents and a writer
    on the generic orchestrator (the worker must serve agents.research)."""
    settings = load_settings()
    problems = question_problems(question)
    if problems:
        err.print(f"[red]research refused:[/red] {escape('; '.join(problems))}")
        raise typer.Exit(2)
    try:
        base = orchestration(question)
        budget = base.budget if budget_tokens is None else base.budget.model_copy(update={"max_tokens": budget_tokens})
        inp = orchestration(question, budget=budget, child_budgets=parse_child_budgets(child_budget or []),
                            key=key or patterns.new_id(NAME).removeprefix(f"{NAME}-"),
                            sim=SimConfig(seed=settings.sim_seed if sim_seed is None else sim_seed, spiral_rate=0.0))
    except ValidationError as e:
        err.print(f"[red]research refused:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e

    async def run() -> None:
        client: Client = await client_or_exit(settings)
        handle = await start_orchestration(client, settings, inp)
        if not as_json:
            console.print(f"started [bold]{handle.id}[/bold]  planner {inp.planner} → writer {inp.synthesizer}")
            console.print(f"  {views.workflow_url(settings, handle.id)}")
        res: OrchestratorResult = await (patterns.watch(client, console, handle) if watch and not as_json
                                         else handle.result())
        print_result(res, as_json)

    run_task(run, "research")
