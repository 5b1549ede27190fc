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

from keel.chaos import Chaos
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
    tags: Annotated[list[str] | None, typer.Option("--tag", help="Only the cases with this tag (repeatable)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the full report (every run) as JSON")] = None,
) -> None:
    """Run every case of a suite N times and give each a pass rate, its 95% Wilson interval and a verdict."""
    settings = load_settings()
    try:
        suite = load_suite(suite_file)
        for spec in [*suite.scorers, *(x for c in suite.cases for x in c.scorers)]:
            load_scorer(spec)  # a bad custom scorer is refused before anything runs
        models = command_models(settings, model)
    except ValueError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    cases = [c for c in suite.cases if (not case_ids or c.id in case_ids) and (not tags or set(tags) & set(c.tags))]
    if not cases:
        err.print(f"[red]no case of {suite.suite} matches {case_ids or ''} {tags or ''}[/red]")
        raise typer.Exit(2)
    n = runs or suite.runs
    run_id = f"{suite.suite}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"

    async def main() -> None:
        client = await client_or_exit(settings)
        runner = SuiteRunner(client, settings, suite, models=models, prompt_version=prompt_version,
                             temperature=temperature, spiral_rate=spiral_rate, concurrency=concurrency)
        scores, _ = await runner.run(cases, n, f"eval-{run_id}", quiet=as_json)
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
        full = {**doc, "cases": [r.model_dump() for r in reports]}
        save_eval(settings.db_url, run_id, suite.suite, full)
        if out is not None:
            out.write_text(json.dumps(full, indent=1))
        if as_json:
            print(json.dumps(doc))
        else:
            print_reports(suite, reports, summary, run_id)
        if summary["fail"]:
            raise typer.Exit(1)

    run_task(main, f"eval {suite.suite}")


class SuiteRunner:
    """Runs a suite's cases through the real workflows (every run an agent task on the server)."""

    def __init__(self, client: Any, settings: Any, suite: EvalSuite, *, models: Any, prompt_version: str | None,
                 temperature: float, spiral_rate: float | None, concurrency: int) -> None:
        self.client, self.settings, self.suite = client, settings, suite
        self.models, self.prompt_version, self.temperature = models, prompt_version, temperature
        self.spiral_rate, self.concurrency = spiral_rate, concurrency
        self.scorers = [load_scorer(x) for x in suite.scorers]
        self.per_case = {c.id: [load_scorer(x) for x in c.scorers] for c in suite.cases}

    async def run(self, cases: list[EvalCase], n: int, prefix: str, quiet: bool = False,
                  chaos: Chaos | None = None) -> tuple[dict[str, list[RunScore]], dict[str, list[AgentResult | str]]]:
        """(scores by case, results by case: an AgentResult, or why the task was lost)."""
        gate = asyncio.Semaphore(self.concurrency)
        scores: dict[str, list[RunScore]] = {c.id: [] for c in cases}
        results: dict[str, list[AgentResult | str]] = {c.id: [] for c in cases}

        async def one(case: EvalCase, i: int, progress: Progress, task: Any) -> None:
            async with gate:
                inp = AgentInput(agent=case.agent or self.suite.agent, input=case.input, tenant=case.tenant,
                                 key=f"{prefix}-{case.id}-{i + 1}", models=self.models,
                                 prompt_version=self.prompt_version, approval_mode="escalate",
                                 temperature=self.temperature, chaos=chaos,
                                 sim=sim_config(self.settings, i, self.spiral_rate, None))
                started = time.perf_counter()
                try:
                    res: AgentResult = await (await start_agent(self.client, self.settings, inp,
                                                                shadow=False)).result()
                except Exception as e:  # a task that failed instead of ending: lost
                    results[case.id].append(f"{type(e).__name__}: {e}")
                    progress.advance(task)
                    return
                latency = time.perf_counter() - started
            results[case.id].append(res)
            problems = score(case, res, latency, [*self.scorers, *self.per_case[case.id]])
            scores[case.id].append(RunScore(run=i + 1, workflow_id=res.workflow_id, status=res.status,
                                            passed=not problems, problems=problems, cost_usd=res.cost_usd,
                                            tokens=res.tokens, latency_s=round(latency, 3),
                                            forbidden_attempts=forbidden_attempts(case, res)))
            progress.advance(task)

        label = f"{self.suite.suite}{' (chaos)' if chaos else ''}: {len(cases)} cases x {n} runs"
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=quiet) as progress:
            task = progress.add_task(label, total=len(cases) * n)
            await asyncio.gather(*(one(c, i, progress, task) for c in cases for i in range(n)))
        return scores, results


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


def load_eval(db_url: str, ref: str) -> dict[str, Any]:
    """A stored eval run by its id (or a unique prefix, or `latest:SUITE` / `previous:SUITE`), or a JSON
    file `keel eval run --json --out` wrote."""
    from sqlmodel import Session, col, select

    from activities.db import EvalRunRow, init_db, make_engine

    if ref.endswith(".json") and Path(ref).is_file():
        doc: dict[str, Any] = json.loads(Path(ref).read_text())
        return doc
    engine = make_engine(db_url)
    init_db(engine)
    with Session(engine) as s:
        if ref.startswith(("latest:", "previous:")):
            which, _, suite = ref.partition(":")
            rows = s.exec(select(EvalRunRow).where(EvalRunRow.suite == suite)
                          .order_by(col(EvalRunRow.created_at).desc())).all()
            pick = 0 if which == "latest" else 1
            if len(rows) <= pick:
                raise SuiteError(f"no {which} eval run of suite {suite!r}")
            return dict(json.loads(rows[pick].report))
        found = s.exec(select(EvalRunRow).where(col(EvalRunRow.run_id).startswith(ref))).all()
    if len(found) != 1:
        raise SuiteError(f"eval run {ref!r}: {'no such run' if not found else f'{len(found)} runs match'} "
                         "(`keel eval runs` lists them)")
    return dict(json.loads(found[0].report))


@eval_app.command("compare")
def compare_cmd(
    a: Annotated[str, typer.Argument(help="The baseline run: its id (or prefix), latest:SUITE, previous:SUITE")],
    b: Annotated[str, typer.Argument(help="The candidate run, as A")],
    gate: Annotated[bool, typer.Option("--gate", help="Exit 1 when the gate fails (for CI)")] = False,
    max_drop: Annotated[float, typer.Option("--max-drop", min=0, max=1,
                                            help="Gate: largest mean success drop per case")] = 0.05,
    max_cost_increase: Annotated[float | None, typer.Option("--max-cost-increase", min=0,
                                                            help="Gate: largest relative cost increase")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the comparison as Markdown here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Two eval runs of a suite, case by case: success with intervals and a paired sign test, cost and
    latency deltas with bootstrap intervals, regressions named; --gate for CI."""
    from keel.compare import compare, markdown

    settings = load_settings()
    try:
        c = compare(load_eval(settings.db_url, a), load_eval(settings.db_url, b), max_drop=max_drop,
                    max_cost_increase=max_cost_increase)
    except (ValueError, KeyError) as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    text = markdown(c)
    if report is not None:
        report.write_text(text)
    if as_json:
        print(c.model_dump_json())
    else:
        t = Table(title=f"{c.suite}: {c.b} against {c.a}")
        for col_name in ("case", "A", "B", "change (95% CI)", "verdicts", "cost A", "cost B"):
            t.add_column(col_name, justify="left" if col_name in ("case", "verdicts") else "right")
        style = {"regression": "bold red", "improvement": "green", "same": "dim"}
        for d in c.cases:
            t.add_row(d.id, f"{d.pass_rate_a:.0%}", f"{d.pass_rate_b:.0%}",
                      f"[{style[d.change]}]{d.delta:+.0%} ({d.delta_low:+.2f}, {d.delta_high:+.2f})[/]",
                      f"{d.verdict_a} > {d.verdict_b}", f"{d.cost_a:.5f}", f"{d.cost_b:.5f}")
        console.print(t)
        console.print(f"success per case {c.mean_delta:+.1%} (95% CI {c.mean_delta_low:+.1%} to "
                      f"{c.mean_delta_high:+.1%}); "
                      f"{c.better} better, {c.worse} worse, sign test p = {c.sign_test_p:.3f}; cost per run "
                      f"{c.cost_change:+.1%} ({c.cost_change_low:+.1%} to {c.cost_change_high:+.1%}); regressions: "
                      f"{', '.join(c.regressions) or 'none'}")
        console.print("[red]gate failed:[/red] " + "; ".join(c.gate_failures) if c.gate_failures
                      else "[green]gate passed[/green]")
    if gate and c.gate_failures:
        raise typer.Exit(1)


@eval_app.command("runs")
def runs_cmd(suite: Annotated[str | None, typer.Argument(help="Only this suite's runs")] = None) -> None:
    """The stored eval runs, newest first."""
    from sqlmodel import Session, col, select

    from activities.db import EvalRunRow, init_db, make_engine

    settings = load_settings()
    engine = make_engine(settings.db_url)
    init_db(engine)
    with Session(engine) as s:
        stmt = select(EvalRunRow).order_by(col(EvalRunRow.created_at).desc())
        rows = s.exec(stmt.where(EvalRunRow.suite == suite) if suite else stmt).all()
    t = Table(title="eval runs")
    for c in ("run id", "suite", "when", "cases", "pass", "flaky", "fail", "runs"):
        t.add_column(c)
    for r in rows:
        summary = json.loads(r.report).get("summary", {})
        t.add_row(r.run_id, r.suite, f"{r.created_at:%Y-%m-%d %H:%M}", str(summary.get("cases", "")),
                  str(summary.get("pass", "")), str(summary.get("flaky", "")), str(summary.get("fail", "")),
                  str(summary.get("runs", "")))
    console.print(t)
