"""`keel vary AGENT "input" --runs N`: one input N times through the real workflow, each run sorted into
the article's four kinds of variance (keel/vary.py), the paths drawn side by side."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from keel.types import AgentInput, AgentResult
from keel.vary import classify
from starter.agents import command_models, start_agent
from starter.console import client_or_exit, console, err, load_settings, run_task
from starter.run_cli import sim_config

STYLE = {"benign": "green", "cost": "yellow", "outcome": "magenta", "catastrophic": "bold red"}


def vary_cmd(
    agent: Annotated[str | None, typer.Argument(help="The registered agent's name (or --suite and --case).")] = None,
    text: Annotated[str | None, typer.Argument(help="The input, run every time.")] = None,
    suite_file: Annotated[Path | None, typer.Option("--suite", help="An eval suite (YAML) holding the case")] = None,
    case_id: Annotated[str | None, typer.Option("--case",
                                                help="The suite's case to vary: its agent, input, tenant")] = None,
    runs: Annotated[int, typer.Option("--runs", min=2, max=500, help="How many runs")] = 10,
    tenant: Annotated[str, typer.Option("--tenant", help="Chargeback tag: who the task is for.")] = "default",
    model: Annotated[str | None, typer.Option("--model", help="provider:model for every tier.")] = None,
    prompt_version: Annotated[str | None, typer.Option("--prompt-version")] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0, max=2,
                                               help="Sampling temperature (a real model's variance)")] = 0.7,
    sim_seed: Annotated[int, typer.Option("--sim-seed", help="The sim's seed of the first run (+1 per run)")] = 0,
    spiral_rate: Annotated[float | None, typer.Option("--spiral-rate", help="Sim: chance of a spiral.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Runs at a time")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Run one input N times and sort each run: benign, cost, outcome or catastrophic variance. Writes that
    need approval go to the human queue at once (approval mode escalate): the runs never wait."""
    settings = load_settings()
    if suite_file is not None or case_id is not None:
        from starter.eval_cli import SuiteError, load_suite

        try:
            suite = load_suite(suite_file) if suite_file is not None else None
        except SuiteError as e:
            err.print(f"[red]{escape(str(e))}[/red]")
            raise typer.Exit(2) from e
        case = next((c for c in suite.cases if c.id == case_id), None) if suite is not None else None
        if suite is None or case is None:
            err.print(f"[red]--suite and --case go together; the suite's cases: "
                      f"{', '.join(c.id for c in suite.cases) if suite else '-'}[/red]")
            raise typer.Exit(2)
        agent, text, tenant = case.agent or suite.agent, case.input, case.tenant
    if not agent or not text:
        err.print("[red]give AGENT and INPUT, or --suite FILE --case ID[/red]")
        raise typer.Exit(2)
    try:
        models = command_models(settings, model)
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    batch = f"vary-{hashlib.sha256(text.encode()).hexdigest()[:8]}-{uuid.uuid4().hex[:6]}"

    async def main() -> None:
        client = await client_or_exit(settings)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> AgentResult:
            async with gate:
                inp = AgentInput(agent=agent, input=text, key=f"{batch}-{i + 1}", tenant=tenant, models=models,
                                 prompt_version=prompt_version, approval_mode="escalate", temperature=temperature,
                                 sim=sim_config(settings, sim_seed + i, spiral_rate, None))
                return await (await start_agent(client, settings, inp, shadow=False)).result()

        with console.status(f"{runs} runs of {agent}..."):
            results = await asyncio.gather(*(one(i) for i in range(runs)))
        report = classify(results)
        if as_json:
            print(json.dumps({"agent": agent, "input": text, **report.model_dump()}))
            return
        t = Table(title=f"{runs} runs of {agent}: {escape(text[:60])}")
        for c in ("run", "kind", "status", "path", "tokens", "cost $", "why"):
            t.add_column(c, justify="right" if c in ("run", "tokens", "cost $") else "left")
        for r in report.runs:
            t.add_row(str(r.run), f"[{STYLE[r.kind]}]{r.kind}[/]", r.status, escape(" > ".join(r.path) or "-"),
                      f"{r.tokens:,}", f"{r.cost_usd:.5f}", escape(r.why))
        console.print(t)
        counts = ", ".join(f"{k} {v}" for k, v in report.kinds.items())
        spread = f"; cost spread {report.cost_spread}x" if report.cost_spread else ""
        console.print(f"{counts}; {report.paths} distinct path(s){spread}; most common outcome: "
                      f"{escape(report.modal_outcome[:100])}")
        if report.kinds.get("catastrophic"):
            raise typer.Exit(1)

    run_task(main, f"vary {agent}")
