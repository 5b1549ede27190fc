"""The patterns over registered agents on the command line: `keel orchestrate "input" --task AGENT=INPUT
... [--then AGENT=INPUT] [--synthesizer AGENT]`, `keel vote AGENT "input" --field F --peers K` and
`keel supervise "input" --worker AGENT [--reviewer AGENT] [--rule JSON]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from keel.orchestration import ChildTask, OrchestratorInput, OrchestratorResult, Plan, SwarmInput, SwarmResult, named
from keel.supervision import Rule, SupervisorInput, SupervisorResult
from keel.types import Budget
from starter.agents import start_orchestration, start_supervision, start_swarm
from starter.console import client_or_exit, console, err, load_settings, run_task


def _task(spec: str, after: list[str]) -> ChildTask:
    agent, sep, text = spec.partition("=")
    if not sep or not agent.strip() or not text.strip():
        raise ValueError(f"a task is AGENT=INPUT, not {spec!r}")
    return ChildTask(agent=agent.strip(), input=text.strip(), after=after)


def tasks_from(tasks: list[str], then: list[str], plan_file: Path | None) -> list[ChildTask]:
    """The plan of the command line: --task entries run together, each --then after everything before it."""
    if plan_file is not None:
        return Plan.model_validate_json(plan_file.read_text()).tasks
    out = named([_task(t, []) for t in tasks])
    for t in then:
        out = named([*out, _task(t, [p.name for p in out])])
    return out


def print_result(res: OrchestratorResult, as_json: bool) -> None:
    if as_json:
        print(res.model_dump_json())
        return
    colour = {"completed": "green", "partial": "yellow", "escalated": "yellow"}.get(res.status, "red")
    console.print(f"[bold]{res.workflow_id}[/bold]  [{colour}]{res.status}[/{colour}]  {escape(res.reason)}")
    t = Table(title=f"{len(res.children)} children · {res.usage.tokens:,} tokens · ${res.usage.cost_usd:.4f}")
    for col in ("child", "agent", "status", "attempts", "caps (tokens)", "tokens", "reason"):
        t.add_column(col)
    for c in res.children:
        t.add_row(c.name, c.model, c.status, str(c.attempts), f"{c.budget_tokens:,}" if c.budget_tokens else "-",
                  f"{c.usage.tokens:,}", escape(c.reason[:80]))
    console.print(t)
    if res.output:
        console.print(escape(res.output))


def orchestrate_cmd(
    text: Annotated[str, typer.Argument(help="The request the orchestration serves.")],
    task: Annotated[list[str] | None, typer.Option("--task", help="AGENT=INPUT; these run together.")] = None,
    then: Annotated[list[str] | None, typer.Option("--then", help="AGENT=INPUT, after every task before it.")] = None,
    plan_file: Annotated[Path | None, typer.Option("--plan", help="A JSON keel.Plan instead of --task.")] = None,
    planner: Annotated[str | None, typer.Option("--planner", help="An agent whose answer is a keel.Plan.")] = None,
    synthesizer: Annotated[str | None, typer.Option("--synthesizer", help="An agent that writes the answer.")] = None,
    name: Annotated[str, typer.Option("--name", help="The orchestration's name (ledger task type).")] = "orchestrator",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="The whole family's token budget.")] = 20_000,
    max_usd: Annotated[float, typer.Option("--max-usd", help="The whole family's dollar budget.")] = 0.10,
    key: Annotated[str, typer.Option("--key", help="Business key (workflow id <name>-<key>).")] = "",
    tenant: Annotated[str, typer.Option("--tenant", help="Chargeback tag: who it is for.")] = "default",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON (implies --wait).")] = False,
) -> None:
    """Run registered agents as children under one budget: given tasks, or a planner agent's plan."""
    settings = load_settings()
    try:
        tasks = tasks_from(task or [], then or [], plan_file)
        inp = OrchestratorInput(input=text, tasks=tasks, planner=planner, synthesizer=synthesizer, name=name,
                                budget=Budget(max_tokens=max_tokens, max_usd=max_usd), key=key, tenant=tenant)
    except (ValueError, ValidationError, OSError, json.JSONDecodeError) as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e

    async def main() -> None:
        client = await client_or_exit(settings)
        handle = await start_orchestration(client, settings, inp)
        if not (wait or as_json):
            console.print(f"started {handle.id}: `keel status {handle.id}`, `keel result {handle.id}`")
            return
        print_result(await handle.result(), as_json)

    run_task(main, f"orchestration {name}")


def print_vote(res: SwarmResult, as_json: bool) -> None:
    if as_json:
        print(res.model_dump_json())
        return
    colour = {"completed": "green", "escalated": "yellow"}.get(res.status, "red")
    console.print(f"[bold]{res.workflow_id}[/bold]  [{colour}]{res.status}[/{colour}]  {escape(res.reason)}")
    t = Table(title=f"{len(res.answers)} peers · {res.usage.tokens:,} tokens · ${res.usage.cost_usd:.4f}")
    for col in ("peer", "status", "value", "problem"):
        t.add_column(col)
    for a in res.answers:
        t.add_row(a.name, a.status, escape(json.dumps(a.value, default=str)) if not a.problem else "-",
                  escape(a.problem[:80]))
    console.print(t)


def vote_cmd(
    agent: Annotated[str, typer.Argument(help="A registered agent with a structured answer.")],
    text: Annotated[str, typer.Argument(help="The request every peer answers.")],
    field: Annotated[str, typer.Option("--field", help="The answer's field to vote on (a.b for nested).")],
    peers: Annotated[int, typer.Option("--peers", help="How many peers (2-12).")] = 3,
    quorum: Annotated[float, typer.Option("--quorum", help="The winner needs more than this share.")] = 0.5,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="The whole swarm's token budget.")] = 20_000,
    max_usd: Annotated[float, typer.Option("--max-usd", help="The whole swarm's dollar budget.")] = 0.10,
    key: Annotated[str, typer.Option("--key", help="Business key (workflow id swarm-<key>).")] = "",
    tenant: Annotated[str, typer.Option("--tenant", help="Chargeback tag: who it is for.")] = "default",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON (implies --wait).")] = False,
) -> None:
    """The swarm pattern: PEERS copies of one agent answer independently (dry runs) and vote on --field."""
    settings = load_settings()
    try:
        inp = SwarmInput(agent=agent, input=text, field=field, peers=peers, quorum=quorum, key=key, tenant=tenant,
                         budget=Budget(max_tokens=max_tokens, max_usd=max_usd))
    except ValidationError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e

    async def main() -> None:
        client = await client_or_exit(settings)
        handle = await start_swarm(client, settings, inp)
        if not (wait or as_json):
            console.print(f"started {handle.id}: `keel status {handle.id}`, `keel result {handle.id}`")
            return
        print_vote(await handle.result(), as_json)

    run_task(main, f"swarm of {agent}")


def print_supervision(res: SupervisorResult, as_json: bool) -> None:
    if as_json:
        print(res.model_dump_json())
        return
    colour = {"completed": "green", "escalated": "yellow"}.get(res.status, "red")
    console.print(f"[bold]{res.workflow_id}[/bold]  [{colour}]{res.status}[/{colour}]  {escape(res.reason)}")
    t = Table(title=f"{len(res.rounds)} rounds · {res.usage.tokens:,} tokens · ${res.usage.cost_usd:.4f}")
    for col in ("round", "worker", "violations", "review", "accepted"):
        t.add_column(col)
    for r in res.rounds:
        review = "-" if r.review is None else ("approved" if r.review.approved else "; ".join(r.review.issues))
        t.add_row(str(r.round), r.worker_status, escape("; ".join(r.violations)[:120] or "-"), escape(review[:120]),
                  "yes" if r.accepted else "no")
    console.print(t)
    if res.output:
        console.print(escape(res.output))


def supervise_cmd(
    text: Annotated[str, typer.Argument(help="The request the worker answers.")],
    worker: Annotated[str, typer.Option("--worker", help="The agent that answers.")],
    reviewer: Annotated[str | None, typer.Option("--reviewer", help="An agent whose answer is a Review.")] = None,
    rule: Annotated[list[str] | None, typer.Option("--rule", help='A rule as JSON: {"field": "severity", '
                                                                   '"op": "one_of", "value": ["minor"]}')] = None,
    rules_file: Annotated[Path | None, typer.Option("--rules", help="A JSON list of rules.")] = None,
    max_rounds: Annotated[int, typer.Option("--max-rounds", help="Rounds before a human takes it.")] = 3,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="The whole family's token budget.")] = 20_000,
    max_usd: Annotated[float, typer.Option("--max-usd", help="The whole family's dollar budget.")] = 0.10,
    key: Annotated[str, typer.Option("--key", help="Business key (workflow id supervisor-<key>).")] = "",
    tenant: Annotated[str, typer.Option("--tenant", help="Chargeback tag: who it is for.")] = "default",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON (implies --wait).")] = False,
) -> None:
    """The supervisor pattern: a worker agent's answer checked by rules (data) and a reviewer agent,
    sent back with what is wrong until it passes or --max-rounds is reached (then a human)."""
    settings = load_settings()
    try:
        rules = [Rule.model_validate_json(r) for r in rule or []]
        if rules_file is not None:
            rules += [Rule.model_validate(r) for r in json.loads(rules_file.read_text())]
        inp = SupervisorInput(input=text, worker=worker, reviewer=reviewer, rules=rules, max_rounds=max_rounds,
                              budget=Budget(max_tokens=max_tokens, max_usd=max_usd), key=key, tenant=tenant)
    except (ValueError, ValidationError, OSError) as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e

    async def main() -> None:
        client = await client_or_exit(settings)
        handle = await start_supervision(client, settings, inp)
        if not (wait or as_json):
            console.print(f"started {handle.id}: `keel status {handle.id}`, `keel result {handle.id}`")
            return
        print_supervision(await handle.result(), as_json)

    run_task(main, f"supervision of {worker}")
