"""`keel shadow start|stop|status|report --agent NAME`: run a candidate version beside the primary on a
share of a registered agent's new tasks, its writes dry-run, and compare them.

The configuration lives in the ledger database (KEEL_DATABASE_URL or the stack's), where
`shadow_agent_task` reads an agent's before its task starts (`keel run`, any agent package's verb); the
comparisons are written there by the workers.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode

from keel import names
from keel.settings import KeelSettings
from keel.shadow import (
    SHADOW_FEATURE,
    SPEC_EXAMPLES,
    CandidateSpec,
    CandidateSpecError,
    ShadowComparison,
    ShadowConfig,
    ShadowInput,
    ShadowSummary,
    is_shadowed,
    shadow_workflow_id,
)
from keel.types import AgentInput, AgentResult
from starter.agents import agent_workflow_id
from starter.console import console, err, ledger_engine
from starter.views import parse_since

shadow_app = typer.Typer(help="Shadow mode: run a candidate version beside the primary.", no_args_is_help=True)



def parse_candidate(spec: str, agent: str | None = None) -> CandidateSpec:
    """A candidate that can run: a well-formed spec, priced models, a complete prompt version. With
    `agent` (or `agent=` in the spec) it shadows that agent's tasks; its prompt version is checked
    against the agent's files when this process has the agent registered (the worker checks it too:
    a candidate on a missing version fails and is reported as a candidate failure)."""
    candidate = CandidateSpec.parse(spec)
    if agent is not None:
        if candidate.agent not in (None, agent):
            raise CandidateSpecError(f"candidate spec {spec!r} names agent {candidate.agent!r}, not {agent!r}")
        candidate = candidate.for_agent(agent)
        if problems := candidate.problems():
            raise CandidateSpecError(f"candidate spec {spec!r}: " + "; ".join(problems))
    if candidate.agent is not None:
        if candidate.prompt_version is not None:
            from keel import registry

            known = {a.name: a for a in registry.registered()}.get(candidate.agent)
            if known is not None and candidate.prompt_version not in known.prompt_versions():
                raise CandidateSpecError(f"candidate spec {spec!r}: agent {candidate.agent!r} has no prompt "
                                         f"version {candidate.prompt_version!r} (it has "
                                         f"{', '.join(known.prompt_versions()) or 'none'})")
        return candidate
    raise CandidateSpecError(f"candidate spec {spec!r} names no agent: shadow an agent's tasks (--agent NAME)")


def _target(agent: str | None) -> str:
    return f"new {agent} tasks"


def _describe(c: ShadowConfig) -> str:
    started = c.started_at.isoformat(timespec="seconds") if c.started_at else "-"
    return (f"candidate [bold]{escape(c.candidate.label)}[/bold] on {c.fraction:.0%} of "
            f"{escape(_target(c.candidate.agent))}, since {started}")


def forget_shadow_configs() -> None:
    """Drop every cached configuration (after `keel shadow start/stop`)."""
    _agent_configs.clear()


# --- any agent: its tasks' shadow -------------------------------------------------------------
SHADOW_CONFIG_CACHE_S = 2.0
"""A process reuses its read of the shadow configurations this long: a batch reads them once or twice,
and `keel shadow start/stop` reaches running starters within this time."""
SHADOW_START_TIMEOUT_S = 60.0


class ShadowStartError(TimeoutError):
    """A shadowed task whose primary workflow did not appear in time (is a worker running?)."""


_agent_configs: dict[str, tuple[float, dict[str, ShadowConfig]]] = {}

SA_CUSTOMER = SearchAttributeKey.for_keyword(names.SA_CUSTOMER)
SA_TASK_TYPE = SearchAttributeKey.for_keyword(names.SA_TASK_TYPE)
SA_FEATURE = SearchAttributeKey.for_keyword(names.SA_FEATURE)
SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)


def agent_shadow_config(settings: KeelSettings, agent: str) -> ShadowConfig | None:
    """The active shadow configuration of `agent`'s tasks in the ledger of `settings`, or None. One
    read of every agent's, cached per process for SHADOW_CONFIG_CACHE_S; no ledger file, no
    shadow (and no file is created for asking)."""
    url, now = settings.db_url, time.monotonic()
    hit = _agent_configs.get(url)
    if hit is None or now - hit[0] >= SHADOW_CONFIG_CACHE_S:
        u = make_url(url)
        if u.get_backend_name() == "sqlite" and (not u.database or not Path(u.database).expanduser().is_file()):
            configs: dict[str, ShadowConfig] = {}
        else:
            from activities.db import make_engine
            from activities.shadow import active_agent_shadows

            try:
                engine = make_engine(url)
                try:
                    configs = active_agent_shadows(engine)
                finally:
                    engine.dispose()
            except (SQLAlchemyError, ImportError) as e:
                # A starter needs no database to start a task: shadowing is what is skipped, and said.
                err.print(f"[yellow]shadow configuration not read ({type(e).__name__}: {str(e)[:200]}); "
                          "starting without a shadow[/yellow]")
                configs = {}
        hit = _agent_configs[url] = (now, configs)
    return hit[1].get(agent)


async def start_agent_shadowed(
    client: Client, settings: KeelSettings, inp: AgentInput, candidate: CandidateSpec,
    workflow_id: str | None = None, timeout_s: float = SHADOW_START_TIMEOUT_S,
) -> WorkflowHandle[Any, AgentResult]:
    """Start an agent task as a ShadowWorkflow (`shadow-<task id>`) whose primary child is the task
    under its normal workflow id (`KeelAgent`), and return a handle to that PRIMARY once it exists:
    results, progress and approvals work on it as on any task. The candidate (`<task id>.shadow`)
    is a dry run charged to feature `shadow`."""
    primary_id = workflow_id or agent_workflow_id(inp)
    candidate = candidate.for_agent(inp.agent)
    await client.start_workflow(
        names.SHADOW_WORKFLOW,
        ShadowInput(agent=inp, candidate=candidate, primary_workflow_id=primary_id),
        id=shadow_workflow_id(primary_id),
        task_queue=settings.task_queue,
        result_type=ShadowComparison,
        static_summary=f"Shadow of agent {inp.agent} task {primary_id} · candidate {candidate.label}",
        search_attributes=TypedSearchAttributes([
            SearchAttributePair(SA_CUSTOMER, inp.tenant),
            SearchAttributePair(SA_TASK_TYPE, inp.agent),
            SearchAttributePair(SA_FEATURE, SHADOW_FEATURE),
            SearchAttributePair(SA_STATUS, "running"),
        ]),
    )
    handle: WorkflowHandle[Any, AgentResult] = client.get_workflow_handle(primary_id, result_type=AgentResult)
    deadline, pause = time.monotonic() + timeout_s, 0.02
    while True:
        try:
            desc = await handle.describe()  # the run's handle (starter.agents.is_existing: one it started)
            return client.get_workflow_handle(primary_id, run_id=desc.run_id, result_type=AgentResult)
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise
        if time.monotonic() > deadline:
            raise ShadowStartError(
                f"shadow workflow {shadow_workflow_id(primary_id)} has not started task {primary_id} within "
                f"{timeout_s:.0f}s: is a worker polling task queue {settings.task_queue!r}? It starts when one is.")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.25)


async def shadow_agent_task(
    client: Client, settings: KeelSettings, inp: AgentInput, workflow_id: str | None = None,
) -> WorkflowHandle[Any, AgentResult] | None:
    """The hook of an agent task's start: when `inp.agent` has an active shadow and this task falls in
    its fraction (by its key, else its workflow id), start it shadowed and return the primary's handle;
    else None (start it as usual). A dry run is never shadowed."""
    if inp.dry_run:
        return None
    config = agent_shadow_config(settings, inp.agent)
    if config is None:
        return None
    wid = workflow_id or agent_workflow_id(inp)
    if not is_shadowed(inp.key or wid, config.fraction):
        return None
    if inp.key:  # a keyed task that exists is not started again (starter.agents.start_once), shadowed or not
        existing: WorkflowHandle[Any, AgentResult] = client.get_workflow_handle(wid, result_type=AgentResult)
        try:
            await existing.describe()
            return existing
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise
    return await start_agent_shadowed(client, settings, inp, config.candidate, workflow_id=wid)


AgentOption = Annotated[str, typer.Option("--agent", help="A registered agent: its tasks are shadowed")]


@shadow_app.command("start")
def start(
    candidate: Annotated[str, typer.Option("--candidate", help=f"What the candidate changes, e.g. {SPEC_EXAMPLES}")],
    fraction: Annotated[float, typer.Option("--fraction", min=0.0, max=1.0,
                                            help="Share of new tasks shadowed, by a hash of the task's key")] = 1.0,
    *,
    agent: AgentOption,
) -> None:
    """Shadow a share of an agent's new tasks with a candidate (replaces that agent's active shadow)."""
    try:
        spec = parse_candidate(candidate, agent)
    except CandidateSpecError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    from activities.shadow import start_shadow

    config = start_shadow(ledger_engine(), spec, fraction)
    forget_shadow_configs()
    console.print(f"shadow mode on: {_describe(config)}")
    console.print("Its writes are dry-run (recorded, never executed); its spend is charged to feature 'shadow'. "
                  "`keel shadow report` compares, `keel shadow stop` ends it.")


@shadow_app.command("stop")
def stop(agent: AgentOption) -> None:
    """Stop shadowing an agent's new tasks (shadows already running finish and are reported)."""
    from activities.shadow import stop_shadow

    config = stop_shadow(ledger_engine(), agent)
    forget_shadow_configs()
    if config is None:
        console.print("shadow mode was not on" + (f" for agent {escape(agent)}" if agent else ""))
        return
    console.print(f"shadow mode off (was {_describe(config)})")


@shadow_app.command("status")
def status(agent: AgentOption, as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
           ) -> None:
    """The active shadow configuration of an agent's tasks and how many tasks it has compared."""
    from activities.shadow import comparisons, last_shadow

    engine = ledger_engine()
    last = last_shadow(engine, agent)
    if last is None:
        doc: dict[str, object] = {"active": False, "agent": agent}
    else:
        config, stopped_at, active = last
        done = comparisons(engine, since=config.started_at, candidate=config.candidate.label)
        doc = {"active": active, "agent": agent, "candidate": config.candidate.label, "fraction": config.fraction,
               "started_at": config.started_at, "stopped_at": stopped_at, "compared": len(done),
               "candidate_failures": sum(c.candidate_failed for c in done)}
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
        return
    if last is None:
        flag = f" --agent {agent}" if agent else ""
        console.print(f"shadow mode is off{' for agent ' + escape(agent) if agent else ''} (never started here); "
                      f"`keel shadow start{escape(flag)} --candidate SPEC`")
        return
    state = "on" if doc["active"] else f"off since {str(doc['stopped_at'])[:19]} (last run below)"
    console.print(f"shadow mode {state}: {_describe(last[0])}")
    console.print(f"{doc['compared']} tasks compared since it started, "
                  f"{doc['candidate_failures']} candidate failures; `keel shadow report` for the comparison")


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _table(s: ShadowSummary) -> Table:
    what = f"{s.agent} tasks"
    t = Table(title=f"candidate {escape(s.candidate)}: {s.tasks} shadowed {escape(what)}", show_header=False,
              title_justify="left")
    t.add_row("compared", f"{s.compared} ({s.candidate_failures} candidate failures)")
    t.add_row("same outcome", f"{_num(s.same_outcome_rate, '.1%')} (route and status)")
    for change, n in s.outcome_changes.items():
        t.add_row("  changed", f"{n} × {escape(change)}")
    t.add_row("same actions", f"{_num(s.classification_agreement_rate, '.1%')} (tools executed or proposed)")
    t.add_row("cost (compared)", f"primary ${s.primary_cost_usd:.4f}, candidate ${s.candidate_cost_usd:.4f}")
    t.add_row("cost delta", f"total ${s.total_cost_delta_usd:+.4f}, mean ${_num(s.mean_cost_delta_usd, '+.5f')} "
                            "per task")
    t.add_row("step delta", f"mean {_num(s.mean_step_delta, '+.2f')} per task")
    t.add_row("token delta", f"mean {_num(s.mean_token_delta, '+.0f')} per task")
    by_tool = ", ".join(f"{k} {v}" for k, v in s.dry_run_by_tool.items())
    t.add_row("dry-run writes", f"{s.dry_run_writes}" + (f" ({escape(by_tool)})" if by_tool else "")
              + " recorded, none executed")
    if s.proposed_writes:
        t.add_row("proposed writes", f"{s.proposed_writes} (`confirm` writes; a candidate asks no one)")
    if s.candidate_failures:
        t.add_row("failed candidates", f"{s.candidate_failures}, spent ${s.failed_candidate_cost_usd:.4f} first")
    for why, n in s.failure_reasons.items():
        t.add_row("  failed", f"{n} × {escape(why)}")
    return t


@shadow_app.command("report")
def report(
    since: Annotated[str | None, typer.Option("--since", help="Only comparisons since: 1h, 7d, or an ISO date (UTC)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list, one object per candidate")] = False,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's candidates")] = None,
) -> None:
    """Compare each candidate with the primary over the shadowed agent tasks: outcomes, the actions, cost,
    steps and tokens, the dry-run writes, the candidate's failures."""
    from activities.shadow import shadow_report

    try:
        start = parse_since(since) if since else None
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    summaries = shadow_report(ledger_engine(), start, agent)
    if as_json:
        print(json.dumps([s.model_dump(mode="json") for s in summaries], indent=2))
        return
    if not summaries:
        what = f"{agent} tasks" if agent else "tasks"
        console.print(f"no shadowed {escape(what)}" + (f" since {since}" if since else "") +
                      f"; `keel shadow start --agent {escape(agent or 'NAME')} --candidate SPEC` then start its tasks")
        return
    for s in summaries:
        console.print(_table(s))
