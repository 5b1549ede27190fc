"""`keel research QUESTION`: the orchestrator plans, retrieval and analysis agents work in parallel as child
workflows, a writer drafts, the orchestrator synthesizes and publishes the report. Prints the workflow id
and its Temporal UI link, then the report, every child (attempts, status, tokens, budget) and the usage of
the orchestrator's own calls against its children's."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table
from temporalio.client import Client

from activities.prompts import PROMPTS_DIR
from keel import names
from keel.policy import budget_for
from keel.pricing import UnpricedModelError, price_for
from keel.research import (
    RESEARCH_PROMPTS,
    ROLE_POLICIES,
    TASK_TYPE,
    ResearchInput,
    ResearchResult,
    question_problems,
)
from keel.types import Budget, InjectedFailure, ModelSpec, SimConfig, TaskUsage
from starter import patterns, views
from starter.console import client_or_exit, console, err, load_settings, run_task


def prompt_problems(version: str) -> list[str]:
    """Every prompt of the pattern must exist in `version` (the model calls would fail one by one)."""
    missing = [f"{name}.{version}.md" for name in RESEARCH_PROMPTS
               if not (PROMPTS_DIR / f"{name}.{version}.md").is_file()]
    if not missing:
        return []
    return [f"prompt version {version!r} is incomplete: missing {', '.join(missing)} under {PROMPTS_DIR}"]


def parse_child_budgets(specs: list[str]) -> dict[str, Budget]:
    """`NAME=TOKENS` pairs: a token cap per sub-task (its dollar cap stays the role's)."""
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


def parse_child_failures(specs: list[str]) -> dict[str, InjectedFailure]:
    """`NAME[:STEP]`: the sub-task's first attempt fails at model call STEP (default 2)."""
    out: dict[str, InjectedFailure] = {}
    for spec in specs:
        name, sep, step = spec.partition(":")
        if not name.strip() or (sep and not step.isdigit()) or (sep and int(step) < 1):
            raise typer.BadParameter(f"--fail-child {spec!r}: use NAME or NAME:STEP, e.g. analysis or writing:1")
        out[name.strip()] = InjectedFailure(at_step=int(step) if sep else 2, runs=1)
    return out


def usage_table(r: ResearchResult) -> Table:
    t = Table(title="usage", title_justify="left")
    for col in ("", "LLM calls", "tokens", "$"):
        t.add_column(col, justify="left" if not col else "right")

    def row(label: str, u: TaskUsage) -> None:
        t.add_row(label, str(u.llm_calls), f"{u.tokens:,}", f"{u.cost_usd:.5f}")

    row("orchestrator (plan, synthesize)", r.own_usage)
    row("children (all attempts)", r.children_usage)
    row("total", r.usage)
    return t


def print_result(r: ResearchResult) -> None:
    if r.status == "rejected":
        err.print(f"[red]research refused:[/red] {escape(r.reason)}")
        return
    console.print()
    console.print(Markdown(r.report or "(no report)"))
    console.print()
    console.print(patterns.children_table(r.children))
    console.print(usage_table(r))
    colour = {"completed": "green", "partial": "yellow"}.get(r.status, "red")
    plan = f"plan: {r.plan_source}" + (f" ({len(r.plan.subtasks)} sub-tasks)" if r.plan else "")
    console.print(f"[{colour}]{r.status}[/{colour}] · {plan} · report {r.report_id or '-'} · "
                  f"budget: {views.budget_text(r.budget)}")
    for m in r.missing:
        console.print(f"  [yellow]missing[/yellow] {escape(m)}")
    if any(d.kind in ("default_plan", "kill", "fallback") for d in r.decisions):
        for d in r.decisions:
            if d.kind in ("default_plan", "kill", "fallback"):
                console.print(f"  [dim]{d.kind}: {escape(d.reason)}[/dim]")


def research_cmd(
    question: Annotated[str, typer.Argument(help="The research question, e.g. 'Why did refunds rise in Q3?'")],
    watch: Annotated[bool, typer.Option("--watch", help="Draw the orchestrator's and its children's progress")] = (
        False),
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
    fail_child: Annotated[list[str] | None, typer.Option(
        "--fail-child", help="NAME[:STEP]: fault injection, the sub-task's first attempt fails at model call STEP "
                             "(default 2; the writer makes one call: writing:1), then it is retried alone")] = None,
    child_budget: Annotated[list[str] | None, typer.Option(
        "--child-budget", help="NAME=TOKENS: a sub-task's token cap (repeatable)")] = None,
    budget_tokens: Annotated[int | None, typer.Option(
        "--budget-tokens", min=1, help="The orchestrator's token budget for the whole family")] = None,
    sim_seed: Annotated[int | None, typer.Option(help="Seed of the sim model")] = None,
    prompt_version: Annotated[str, typer.Option(help="Prompt version (prompts/research/<name>.<version>.md)")] = (
        "v1"),
) -> None:
    """Research a question over the internal documents and data with an orchestrator and child agents."""
    settings = load_settings()
    problems = question_problems(question) + prompt_problems(prompt_version)
    try:
        small, large = ModelSpec.parse(settings.model_small), ModelSpec.parse(settings.model_large)
        for spec in (small, large):
            price_for(spec.provider, spec.model)
    except (ValueError, UnpricedModelError) as e:
        problems.append(str(e))
    if problems:
        err.print(f"[red]research refused:[/red] {escape('; '.join(problems))}")
        raise typer.Exit(2)
    budget = budget_for(TASK_TYPE)
    if budget_tokens is not None:
        budget = budget.model_copy(update={"max_tokens": budget_tokens})
    inp = ResearchInput(
        question=question,
        small_model=small,
        large_model=large,
        sim=SimConfig(seed=settings.sim_seed if sim_seed is None else sim_seed, spiral_rate=0.0),
        prompt_version=prompt_version,
        # Pinned in the input (and so in the history): a later policy change must not alter a running task.
        budget=budget,
        child_budgets=parse_child_budgets(child_budget or []),
        child_failures=parse_child_failures(fail_child or []),
        roles=dict(ROLE_POLICIES),
    )
    wid = patterns.new_id("research")

    async def run() -> None:
        client: Client = await client_or_exit(settings)
        handle = await patterns.start_pattern(
            client, settings, names.RESEARCH_REPORT_WORKFLOW, inp, wid, summary=f"research: {question[:80]}",
            task_type=TASK_TYPE, feature=inp.feature, customer=inp.customer, result_type=ResearchResult)
        if not as_json:
            console.print(f"started [bold]{handle.id}[/bold]  orchestrator {escape(large.label)}")
            console.print(f"  {views.workflow_url(settings, handle.id)}")
        res: ResearchResult = await (patterns.watch(client, console, handle) if watch and not as_json
                                     else handle.result())
        if as_json:
            print(json.dumps(res.model_dump(mode="json"), indent=2))
        else:
            print_result(res)

    run_task(run, "research")
