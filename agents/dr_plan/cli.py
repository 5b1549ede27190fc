"""`keel plan "SCENARIO"`: a disaster-recovery plan under supervision, as a verb of this agent package.

The planner drafts, the runbook's rules check it (each a named check of the planner), the reviewer
reviews a plan that keeps them; a plan that is not accepted goes back to the planner, up to
--max-rounds, then to a human. The generic CLI starts the supervision (keel.Command), prints its id and
UI link, waits, and prints what `show` yields: every round, the plan, the verdict and the costs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

import keel
from agents.dr_plan.agent import BUDGET, Plan, supervision
from agents.dr_plan.runbooks import RUNBOOKS


def plan(
    scenario: Annotated[str, typer.Argument(help="What happened, e.g. 'payments-db primary in eu-west-1 is down'")],
    runbook: Annotated[str, typer.Option("--runbook", "-r", help=f"Runbook topic: {', '.join(sorted(RUNBOOKS))}")] = (
        "database_failover"),
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1, max=10, help="Drafts before a human decides")] = 3,
    sim_seed: Annotated[int, typer.Option("--sim-seed", help="Seed of the sim model")] = 0,
    key: Annotated[str, typer.Option("--key", help="Business key (workflow id dr_plan-<key>)")] = "",
    tenant: Annotated[str, typer.Option("--tenant", help="Chargeback tag: who it is for")] = "internal",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="The whole family's token budget")] = (
        BUDGET.max_tokens or 40_000),
    max_usd: Annotated[float, typer.Option("--max-usd", help="The whole family's dollar budget")] = (
        BUDGET.max_usd or 0.25),
) -> keel.SupervisorInput:
    """Draft a disaster-recovery plan under supervision: the runbook's rules, a reviewer, rounds back to the
    planner, a human when no plan is accepted."""
    return supervision(scenario, runbook, max_rounds=max_rounds, key=key, tenant=tenant, sim_seed=sim_seed,
                       budget=keel.Budget(max_tokens=max_tokens, max_usd=max_usd))


def plan_table(p: Plan, title: str) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for col in ("#", "action", "target", "detail", "rollback", "verify"):
        t.add_column(col, justify="right" if col == "#" else "left", overflow="fold")
    for i, s in enumerate(p.steps, 1):
        t.add_row(str(i), escape(s.action), escape(s.target), escape(s.detail), escape(s.rollback or "-"),
                  escape(s.verify or "-"))
    return t


def _tokens(res: keel.SupervisorResult, name: str) -> int:
    return sum(c.usage.tokens for c in res.children if c.name == name)


def show(res: keel.SupervisorResult) -> Iterator[Any]:
    """Every round (the planner's plan, the rule violations, the review), the plan, the verdict, the costs."""
    if res.status == "rejected":
        yield f"[red]plan refused:[/red] {escape(res.reason)}"
        return
    last: Plan | None = None
    for r in res.rounds:
        yield (f"[bold]round {r.round}[/bold]  {r.worker} ({r.worker_status}, {_tokens(res, r.worker):,} tokens)"
               + (f"  {r.reviewer} ({_tokens(res, r.reviewer):,} tokens)" if r.reviewer else ""))
        if r.structured is not None:
            last = Plan.model_validate(r.structured)
            yield f"  plan: {len(last.steps)} steps"
        for v in r.violations:
            yield f"  [red]violation[/red] {escape(v)}"
        if r.structured is not None and not r.violations:
            yield "  [green]every rule passes[/green]"
        if r.review is not None:
            yield f"  reviewer: [bold]{'approved' if r.review.approved else 'not approved'}[/bold]"
            for issue in r.review.issues:
                yield f"    - {escape(issue)}"
        elif r.violations:
            yield "  reviewer: not asked (the plan breaks a rule)"
        if r.worker_status == "completed":
            yield "  -> accepted" if r.accepted else "  -> sent back to the planner"
    if last is not None:
        yield plan_table(last, "accepted plan" if res.status == "completed" else "last draft (not accepted)")
    colour = {"completed": "green", "escalated": "yellow"}.get(res.status, "red")
    verdict = {"completed": "accepted", "escalated": "escalated to the human queue"}.get(res.status, res.status)
    yield f"[{colour}]{verdict}[/{colour}]: {escape(res.reason)}"
    worker = sum(c.usage.tokens for c in res.children if c.role == "worker")
    review = sum(c.usage.tokens for c in res.children if c.role == "reviewer")
    share = review / res.usage.tokens if res.usage.tokens else 0.0
    yield (f"tokens: planner {worker:,} + reviewer {review:,} = {res.usage.tokens:,} (${res.usage.cost_usd:.5f}, "
           f"{res.usage.llm_calls} calls); review overhead {share:.0%} of tokens")
    yield keel.models_line(res.results)


COMMANDS = [keel.Command(name="plan", build=plan, show=show)]
