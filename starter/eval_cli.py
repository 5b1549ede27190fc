"""`keel eval run SUITE --runs N`: a suite's cases through the real workflows on the Temporal server, N
times each, concurrently, scored per run, a verdict per case (keel/evals.py); stored in the database
beside the ledger (`eval_runs`) and printed as a table or one JSON object. Exit 1 when a case fails."""

from __future__ import annotations

import asyncio
import importlib
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from keel.evals import EvalCase, EvalSuite, RunScore, Scorer, case_report, forbidden_attempts, score
from keel.types import AgentInput, AgentResult
from starter.agents import command_models, start_agent
from starter.console import client_or_exit, console, err, load_settings, run_task
from starter.run_cli import sim_config

eval_app = typer.Typer(help="Eval suites: cases run N times through the real workflows, with verdicts.",
                       no_args_is_help=True)
VERDICT_STYLE = {"pass": "green", "flaky": "yellow", "fail": "bold red"}


class SuiteError(ValueError):
    pass


def load_suite(path: Path) -> EvalSuite:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SuiteError(f"cannot read the suite {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise SuiteError(f"{path} is not valid YAML: {e}") from e
    try:
        return EvalSuite.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'suite'}: {x['msg']}" for x in e.errors()[:5])
        raise SuiteError(f"{path}: {problems}") from e


def load_scorer(spec: str) -> tuple[str, Scorer]:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SuiteError(f"custom scorer {spec!r}: {e} (write it as module:function)") from e
    if not callable(fn):
        raise SuiteError(f"custom scorer {spec!r} is not a function")
    return name, fn


@eval_app.command("run")
def run_cmd(
    suite_file: Annotated[Path, typer.Argument(help="The suite (YAML), e.g. evals/support_desk.yaml")],
    runs: Annotated[int | None, typer.Option("--runs", min=1, max=1000,
                                             help="Runs per case (default the suite's)")] = None,
    prompt_version: Annotated[str | None, typer.Option("--prompt-version",
                                                       help="Another version of the prompt")] = None,
    model: Annotated[str | None, typer.Option("--model", help="provider:model for every tier")] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0, max=2)] = 0.0,
    spiral_rate: Annotated[float | None, typer.Option("--spiral-rate", help="Sim: chance of a spiral")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Runs at a time")] = 20,
    case_ids: Annotated[list[str] | None, typer.Option("--case", help="Only these cases (repeatable)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Run every case of a suite N times and give each a pass rate, its 95% Wilson interval and a verdict."""
    settings = load_settings()
    try:
        suite = load_suite(suite_file)
        scorers = [load_scorer(s) for s in suite.scorers]
        per_case = {c.id: [load_scorer(s) for s in c.scorers] for c in suite.cases}
        models = command_models(settings, model)
    except ValueError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    cases = [c for c in suite.cases if not case_ids or c.id in case_ids]
    if not cases:
        err.print(f"[red]no case of {suite.suite} matches {case_ids}[/red]")
        raise typer.Exit(2)
    n = runs or suite.runs
    run_id = f"{suite.suite}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"

    async def main() -> None:
        client = await client_or_exit(settings)
        gate = asyncio.Semaphore(concurrency)
        scores: dict[str, list[RunScore]] = {c.id: [] for c in cases}

        async def one(case: EvalCase, i: int, progress: Progress, task: Any) -> None:
            async with gate:
                inp = AgentInput(agent=case.agent or suite.agent, input=case.input, tenant=case.tenant,
                                 key=f"eval-{run_id}-{case.id}-{i + 1}", models=models, prompt_version=prompt_version,
                                 approval_mode="escalate", temperature=temperature,
                                 sim=sim_config(settings, i, spiral_rate, None))
                started = time.perf_counter()
                res: AgentResult = await (await start_agent(client, settings, inp, shadow=False)).result()
                latency = time.perf_counter() - started
            problems = score(case, res, latency, [*scorers, *per_case[case.id]])
            scores[case.id].append(RunScore(run=i + 1, workflow_id=res.workflow_id, status=res.status,
                                            passed=not problems, problems=problems, cost_usd=res.cost_usd,
                                            tokens=res.tokens, latency_s=round(latency, 3),
                                            forbidden_attempts=forbidden_attempts(case, res)))
            progress.advance(task)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=as_json) as progress:
            task = progress.add_task(f"{suite.suite}: {len(cases)} cases x {n} runs", total=len(cases) * n)
            await asyncio.gather(*(one(c, i, progress, task) for c in cases for i in range(n)))
        reports = [case_report(c, sorted(scores[c.id], key=lambda s: s.run), suite.pass_rate) for c in cases]
        verdicts = [r.verdict for r in reports]
        all_scores = [s for r in reports for s in r.scores]
        summary = {"cases": len(reports), "pass": verdicts.count("pass"), "flaky": verdicts.count("flaky"),
                   "fail": verdicts.count("fail"), "runs": len(all_scores),
                   "pass_rate": round(sum(s.passed for s in all_scores) / len(all_scores), 4),
                   "cost_usd": round(sum(s.cost_usd for s in all_scores), 6),
                   "forbidden_attempts": sum(r.forbidden_attempts for r in reports),
                   "threshold": suite.pass_rate}
        doc = {"suite": suite.suite, "run_id": run_id, "agent": suite.agent, "runs": n,
               "prompt_version": prompt_version, "model": model,
               "cases": [r.model_dump(exclude={"scores"}) for r in reports], "summary": summary}
        save_eval(settings.db_url, run_id, suite.suite, {**doc, "cases": [r.model_dump() for r in reports]})
        if as_json:
            print(json.dumps(doc))
        else:
            print_reports(suite, reports, summary, run_id)
        if summary["fail"]:
            raise typer.Exit(1)

    run_task(main, f"eval {suite.suite}")


def print_reports(suite: EvalSuite, reports: list[Any], summary: dict[str, Any], run_id: str) -> None:
    t = Table(title=f"{suite.suite} ({suite.agent}): {summary['runs']} runs, pass rate threshold {suite.pass_rate:.0%}")
    for c in ("case", "runs", "pass rate", "95% CI", "verdict", "p50 $", "p95 $", "p95 s", "forbidden", "failing"):
        t.add_column(c, justify="left" if c in ("case", "verdict", "failing") else "right")
    for r in reports:
        failing = ", ".join(f"{k} {v}" for k, v in r.problems.items()) or "-"
        t.add_row(r.id, str(r.runs), f"{r.pass_rate:.0%}", f"{r.ci_low:.2f}-{r.ci_high:.2f}",
                  f"[{VERDICT_STYLE[r.verdict]}]{r.verdict}[/]", f"{r.p50_cost_usd:.5f}", f"{r.p95_cost_usd:.5f}",
                  f"{r.p95_latency_s:.1f}", str(r.forbidden_attempts), escape(failing))
    console.print(t)
    for r in reports:
        if r.verdict != "pass":
            first = next((s for s in r.scores if not s.passed), None)
            if first is not None:
                detail = "; ".join(p for ps in first.problems.values() for p in ps)
                console.print(f"  {r.id} run {first.run} ({first.workflow_id}): {escape(detail[:300])}")
    console.print(f"pass {summary['pass']}, flaky {summary['flaky']}, fail {summary['fail']} of {summary['cases']} "
                  f"cases; {summary['pass_rate']:.1%} of runs passed; ${summary['cost_usd']:.4f}; "
                  f"{summary['forbidden_attempts']} forbidden attempts; stored as {run_id}")


def save_eval(db_url: str, run_id: str, suite: str, doc: dict[str, Any]) -> None:
    from sqlmodel import Session

    from activities.db import EvalRunRow, init_db, make_engine

    engine = make_engine(db_url)
    init_db(engine)
    with Session(engine) as s:
        s.add(EvalRunRow(run_id=run_id, suite=suite, report=json.dumps(doc)))
        s.commit()
