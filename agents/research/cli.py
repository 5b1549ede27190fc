"""`keel research "QUESTION"`: the research assistant on the generic orchestrator, as a verb of this package.

The planner splits the question into tasks for the retrieval and analysis agents, the writer turns their
findings into a cited report. The generic CLI starts the orchestration (keel.Command), prints its id and
UI link, waits (or draws the family's progress with --watch) and prints what `show` yields: the report,
every child and its costs, the status, the sources and what is missing. The worker must serve the agents
(`KEEL_AGENTS=agents.research`): a worker without them refuses the plan with that reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table

import keel
from agents.research.agent import orchestration

MAX_QUESTION_CHARS = 2_000


def question_problems(question: str) -> list[str]:
    if not question.strip():
        return ["the question is empty"]
    if len(question) > MAX_QUESTION_CHARS:
        return [f"the question is {len(question):,} characters; the limit is {MAX_QUESTION_CHARS:,}"]
    return []


def parse_child_budgets(specs: list[str]) -> dict[str, keel.Budget]:
    """`NAME=TOKENS` pairs: a token cap per child task (its dollar cap stays its agent's)."""
    out: dict[str, keel.Budget] = {}
    for spec in specs:
        name, sep, tokens = spec.partition("=")
        try:
            value = int(tokens.replace("_", "").replace(",", ""))
        except ValueError:
            value = 0
        if not sep or not name.strip() or value <= 0:
            raise ValueError(f"--child-budget {spec!r}: use NAME=TOKENS, e.g. retrieval=2000")
        out[name.strip()] = keel.Budget(max_tokens=value, max_usd=None)
    return out


def research(
    question: Annotated[str, typer.Argument(help="The research question, e.g. 'Why did refunds rise in Q3?'")],
    child_budget: Annotated[list[str] | None, typer.Option(
        "--child-budget", help="NAME=TOKENS: a child's token cap (retrieval, analysis, planner, synthesizer; "
                               "repeatable)")] = None,
    budget_tokens: Annotated[int | None, typer.Option(
        "--budget-tokens", min=1, help="The token budget of the whole family")] = None,
    key: Annotated[str, typer.Option("--key", help="Business key (workflow id research-<key>)")] = "",
    tenant: Annotated[str, typer.Option("--tenant", help="Chargeback tag: who it is for")] = "internal",
    sim_seed: Annotated[int, typer.Option("--sim-seed", help="Seed of the sim model")] = 0,
) -> keel.OrchestratorInput:
    """Research a question over the internal documents and data: a planner, worker agents and a writer
    on the generic orchestrator (the worker must serve agents.research)."""
    problems = question_problems(question)
    if problems:
        raise ValueError("; ".join(problems))
    base = orchestration(question)
    budget = base.budget if budget_tokens is None else base.budget.model_copy(update={"max_tokens": budget_tokens})
    return orchestration(question, budget=budget, child_budgets=parse_child_budgets(child_budget or []), key=key,
                         tenant=tenant, sim=keel.SimConfig(seed=sim_seed, spiral_rate=0.0))


def costs_table(r: keel.OrchestratorResult) -> Table:
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


def show(r: keel.OrchestratorResult) -> Iterator[Any]:
    """The report, the costs of every child, the status with the plan, the report id and the sources."""
    if r.status == "rejected":
        yield f"[red]research refused:[/red] {escape(r.reason)}"
        return
    rep = dict(r.structured or {})
    yield ""
    yield Markdown(str(rep.get("report") or r.output or "(no report)"))
    yield ""
    yield costs_table(r)
    yield keel.models_line(r.results)
    colour = {"completed": "green", "partial": "yellow"}.get(r.status, "red")
    listed = rep.get("sources")
    sources = ", ".join(str(s) for s in listed) if isinstance(listed, list) and listed else "-"
    b = r.budget
    budget = f"{b.used_tokens:,}" + (f"/{b.max_tokens:,}" if b.max_tokens is not None else "") + " tokens"
    yield (f"[{colour}]{r.status}[/{colour}] · plan: {r.plan_source} ({len(r.plan)} tasks) · "
           f"report {rep.get('report_id') or '- (not published)'} · sources: {escape(sources)} · budget: {budget}")
    for m in r.missing:
        yield f"  [yellow]missing[/yellow] {escape(m)}"
    for d in r.decisions:
        if d.kind in ("skip_child", "shrink_child", "child_failed"):
            yield f"  [dim]{d.kind}: {escape(d.reason)}[/dim]"


COMMANDS = [keel.Command("research", research, show)]
