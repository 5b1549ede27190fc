"""`keel run AGENT "input"`: start any registered agent; `keel worker --agents MODULES`: serve agents."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer
from rich.live import Live
from rich.markup import escape
from temporalio.client import Client

from keel.settings import KeelSettings
from keel.types import AgentInput, AgentResult, ApprovalMode, Budget, SimConfig
from starter import views
from starter.agents import WAITING_FOR_PEOPLE, agent_progress, command_models, start_agent
from starter.console import client_or_exit, console, err, load_settings, run_task
from starter.rpc import Temporal


def print_agent_result(res: AgentResult, as_json: bool) -> None:
    """The one way a KeelAgent result is printed (`keel run`, `keel result`, `keel watch`, `keel status`)."""
    if as_json:
        print(res.model_dump_json())
        return
    console.print(views.agent_result_view(res))


async def watch_agent(client: Client, workflow_id: str, agent: str | None = None) -> AgentResult | None:
    """Draw a KeelAgent task's live progress until it ends (its result) or waits for a person (None,
    after saying how to decide)."""
    handle = client.get_workflow_handle(workflow_id, result_type=AgentResult)
    done = asyncio.ensure_future(handle.result())
    try:
        p = await agent_progress(client, workflow_id)
        with Live(views.progress_panel(workflow_id, p, agent), console=console, refresh_per_second=8) as live:
            while not done.done() and p.status not in WAITING_FOR_PEOPLE:
                await asyncio.wait({done}, timeout=0.25)
                p = await agent_progress(client, workflow_id)
                live.update(views.progress_panel(workflow_id, p, agent))
        if not console.is_terminal:
            console.line()  # Live ends a terminal's last line itself, not a pipe's
        waiting = not done.done()
    finally:
        if not done.done():
            done.cancel()
    if waiting:
        console.print(f"{workflow_id} is {p.status}: `keel approvals`; `keel approve {workflow_id} --as NAME` "
                      f"or `keel reject {workflow_id} --as NAME`")
        return None
    res: AgentResult = done.result()
    return res


def sim_config(settings: KeelSettings, seed: int | None, spiral_rate: float | None, latency: str | None) -> SimConfig:
    """The sim's knobs of a task: the flags, else the settings' defaults (KEEL_SIM_SEED, KEEL_SIM_SPIRAL_RATE)."""
    lo = hi = 0
    if latency:
        a, _, b = latency.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError as e:
            raise typer.BadParameter(f"--sim-latency {latency!r}: use milliseconds, e.g. 1000-3000") from e
    return SimConfig(
        seed=settings.sim_seed if seed is None else seed,
        spiral_rate=settings.sim_spiral_rate if spiral_rate is None else spiral_rate,
        latency_ms_min=lo,
        latency_ms_max=hi,
    )


def run_cmd(
    agent: Annotated[str, typer.Argument(help="The registered agent's name.")],
    text: Annotated[str, typer.Argument(help="The request.")],
    key: Annotated[str, typer.Option("--key", help="Business key of the task (workflow id <agent>-<key>).")] = "",
    tenant: Annotated[str, typer.Option("--tenant", help="Chargeback tag: who the task is for.")] = "default",
    prompt_version: Annotated[str | None, typer.Option("--prompt-version")] = None,
    model: Annotated[str | None, typer.Option("--model", help="provider:model for every tier.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Token budget of this task.")] = None,
    approval_mode: Annotated[str, typer.Option("--approval-mode", help="wait or escalate.")] = "wait",
    sim_seed: Annotated[int | None, typer.Option("--sim-seed", help="Seed of the sim model.")] = None,
    spiral_rate: Annotated[float | None, typer.Option("--spiral-rate", help="Sim: chance of a spiral.")] = None,
    sim_latency: Annotated[str | None, typer.Option("--sim-latency", help="Sim: ms per call, e.g. 1000-3000.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Draw live progress, then the result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON (implies --wait).")] = False,
) -> None:
    """Start any registered agent. Without --wait/--watch/--json it prints the workflow id and returns."""
    settings = load_settings()
    if approval_mode not in ("wait", "escalate"):
        err.print(f"[red]--approval-mode must be wait or escalate, not {approval_mode!r}[/red]")
        raise typer.Exit(2)
    try:  # --model, else KEEL_MODEL_SMALL/LARGE as set (start_agent adds them too), else the agent's own
        models = command_models(settings, model)
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    mode: ApprovalMode = "wait" if approval_mode == "wait" else "escalate"
    inp = AgentInput(agent=agent, input=text, key=key, tenant=tenant, prompt_version=prompt_version,
                     models=models, approval_mode=mode, sim=sim_config(settings, sim_seed, spiral_rate, sim_latency),
                     budget=Budget(max_tokens=max_tokens, max_usd=None) if max_tokens else None)

    async def main() -> None:
        client = await client_or_exit(settings)
        temporal = Temporal(settings, say=lambda text: err.print(f"[yellow]{escape(text)}[/yellow]"))
        # With --key the task starts once: run again, it shows the run it has (starter.agents.start_once).
        handle = await temporal.call(f"start of agent {agent}", lambda: start_agent(client, settings, inp))
        if not (wait or watch or as_json):
            console.print(f"started {handle.id}: `keel watch {handle.id}`, `keel result {handle.id}`")
            return
        if watch:
            res = await watch_agent(client, handle.id, agent)
            if res is not None:
                print_agent_result(res, as_json)
            return
        print_agent_result(await temporal.call(f"result of {handle.id}", lambda: handle.result()), as_json)

    run_task(main, f"agent {agent}")


def worker_cmd(
    agents: Annotated[str, typer.Option("--agents", help="Comma-separated modules whose agents to serve.")] = "",
) -> None:
    """Run a worker in this terminal, serving Keel's workflows and the agents of --agents (and KEEL_AGENTS)."""
    from workers.__main__ import main

    if agents:
        os.environ["KEEL_AGENTS"] = ",".join(filter(None, [os.environ.get("KEEL_AGENTS", ""), agents]))
    asyncio.run(main())
