"""`keel orchestrate "input" --task AGENT=INPUT ... [--then AGENT=INPUT] [--synthesizer AGENT]`: the
orchestrator pattern over registered agents, from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from keel.orchestration import ChildTask, OrchestratorInput, OrchestratorResult, Plan, named
from keel.types import Budget
from starter.agents import start_orchestration
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
