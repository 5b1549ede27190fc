"""`keel swarm "TEXT"`: K peers of one agent answer the same request independently (dry runs, each its
own model, temperature and seed) and a field of their structured answers is put to a vote; without a
quorum a human decides. The generic swarm pattern (KeelSwarm, started by starter.agents.start_swarm)
with the defaults of the built-in classifier (agent `triage`, field `category`, five peers spread over
two models and temperatures 0 to 1). Prints the workflow id and its Temporal UI link, then every peer's
answer, the votes, the decision and the costs. Pure presentation: it knows no agent's fields but the one
it is told to vote on (`keel vote` is the same pattern with the generic defaults)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table
from temporalio.client import Client

from keel.orchestration import SwarmInput, SwarmResult
from keel.types import Budget, ModelSpec, SimConfig
from starter import patterns, views
from starter.agents import start_swarm
from starter.console import client_or_exit, console, err, load_settings, run_task

MAX_PEERS = 12


def spread(peers: int) -> list[float]:
    """Temperatures evenly from 0.0 to 1.0 over the peers: a greedy one, then hotter and hotter."""
    return [round(i / (peers - 1), 4) for i in range(peers)] if peers > 1 else [0.0]


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return v if isinstance(v, str) else json.dumps(v, default=str)


def result_table(r: SwarmResult) -> Table:
    """One row per peer: its model, temperature, every field of its structured answer, its tokens."""
    fields = list(dict.fromkeys(k for a in r.answers for k in (a.answer or {})))
    usage = {c.name: c.usage for c in r.children}
    t = Table(title="peers", title_justify="left")
    for col in ("peer", "model", "T", *fields, "tokens", "note"):
        t.add_column(col, justify="right" if col in ("T", "tokens") else "left")
    winner = json.dumps(r.value, sort_keys=True, default=str) if r.value is not None else None
    for a in r.answers:
        voted = not a.problem and json.dumps(a.value, sort_keys=True, default=str) == winner
        cells = []
        for f in fields:
            text = escape(_show((a.answer or {}).get(f, "")))
            cells.append(f"[bold]{text}[/bold]" if voted and a.value == (a.answer or {}).get(f) else text)
        if a.answer is None:
            cells = ["[red]abstained[/red]", *[""] * (len(fields) - 1)] if fields else []
        u = usage.get(a.name)
        t.add_row(escape(a.name), escape(a.model or "(agent's)"), f"{a.temperature:g}", *cells,
                  f"{u.tokens:,}" if u else "0", escape(a.problem[:80]))
    return t


def print_result(r: SwarmResult, as_json: bool = False) -> None:
    if as_json:
        print(r.model_dump_json())
        return
    if r.status == "rejected":
        err.print(f"[red]swarm refused:[/red] {escape(r.reason)}")
        if "is registered" in r.reason:
            err.print("serve the agent: `keel worker --agents MODULE` (or KEEL_AGENTS=MODULE keel up); the "
                      "built-in classifier is agents.triage")
        return
    console.print()
    console.print(result_table(r))
    abstained = sum(1 for a in r.answers if a.problem)
    ranked = sorted(r.votes.items(), key=lambda kv: (-kv[1], kv[0]))
    votes = ", ".join(f"{escape(_vote_label(v))} {n}" for v, n in ranked) or "none"
    console.print(f"votes: {votes}; abstained: {abstained} of {len(r.answers)}")
    console.print(f"agreement {r.agreement:.2f}")
    if r.status == "completed":
        console.print(f"[green]agreed[/green]: {escape(r.reason)}; no human needed")
    else:
        console.print(f"[yellow]{r.status}: a human decides[/yellow] (the human queue has it): {escape(r.reason)}")
    console.print(f"usage: {r.usage.llm_calls} LLM calls, {r.usage.tokens:,} tokens, ${r.usage.cost_usd:.5f} "
                  f"(all peers; budget {views.budget_text(r.budget)})"
                  + views.self_hosted_note([a.model for a in r.answers]))


def _vote_label(v: str) -> str:
    """A vote's key is the value as JSON: a text is shown without its quotes."""
    try:
        value = json.loads(v)
    except json.JSONDecodeError:
        return v
    return value if isinstance(value, str) else v


def swarm_cmd(
    text: Annotated[str, typer.Argument(help="The request every peer answers (for triage: the message to classify)")],
    agent: Annotated[str, typer.Option("--agent", help="A registered agent with a structured answer")] = "triage",
    field: Annotated[str, typer.Option("--field", help="The answer's field to vote on (a.b for nested)")] = "category",
    peers: Annotated[int, typer.Option("--peers", "-k", min=2, max=MAX_PEERS, help="Number of peers K")] = 5,
    quorum: Annotated[float, typer.Option(
        "--quorum", min=0.01, max=1.0, help="The winner needs MORE than this share of all K peers "
                                            "(0.6 of 5: four must agree)")] = 0.6,
    models: Annotated[str, typer.Option(help="Comma-separated model specs the peers alternate over "
                                             "('' : the agent's own)")] = "sim:sim-small,sim:sim-large",
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Chargeback tag: who it is for")] = "default",
    key: Annotated[str, typer.Option("--key", help="Business key: the workflow id is swarm-<key> and the sim "
                                                   "peers seed on it (default: generated)")] = "",
    sim_seed: Annotated[int, typer.Option(help="The sim's seed (every peer also seeds on its own key)")] = 0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="The whole swarm's token budget")] = 20_000,
    max_usd: Annotated[float, typer.Option("--max-usd", help="The whole swarm's dollar budget")] = 0.10,
    watch: Annotated[bool, typer.Option("--watch", help="Draw the swarm's and its peers' progress")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Put a request to a swarm of K peers of one agent and vote on a field of their answers; without a
    quorum a human decides. Default: the triage classifier voting on the category."""
    settings = load_settings()
    if not text.strip():
        err.print("[red]swarm refused:[/red] the text is empty")
        raise typer.Exit(2)
    try:
        specs = [ModelSpec.parse(m.strip()) for m in models.split(",") if m.strip()]
        inp = SwarmInput(agent=agent, input=text, field=field, peers=peers, quorum=quorum, temperatures=spread(peers),
                         models=specs, key=key, tenant=tenant, budget=Budget(max_tokens=max_tokens, max_usd=max_usd),
                         sim=SimConfig(seed=sim_seed))
    except (ValueError, ValidationError) as e:
        err.print(f"[red]swarm refused:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e

    async def run() -> None:
        client: Client = await client_or_exit(settings)
        handle = await start_swarm(client, settings, inp)
        if not as_json:
            console.print(f"started [bold]{handle.id}[/bold]  {peers} peers of {escape(agent)}, vote on "
                          f"{escape(field)}  ({escape(models or 'its own models')})")
            console.print(f"  {views.workflow_url(settings, handle.id)}")
        res: SwarmResult = await (patterns.watch(client, console, handle) if watch and not as_json
                                  else handle.result())
        print_result(res, as_json)
        if res.status == "rejected":
            raise typer.Exit(2)

    run_task(run, "swarm")
