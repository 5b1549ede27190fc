"""`keel swarm TEXT`: K peer agents classify a ticket; agreement is the confidence, disagreement goes to
a human. Prints the workflow id and its Temporal UI link, then every peer's answer, the votes and the
decision."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from temporalio.client import Client

from keel import names
from keel import swarm as sw
from keel.policy import budget_for
from keel.types import ModelSpec, SimConfig
from starter import patterns, views
from starter.console import client_or_exit, console, err, load_settings, run_task


def result_table(r: sw.SwarmResult) -> Table:
    t = Table(title="peers", title_justify="left")
    for col in ("peer", "model", "T", "seed", "answer", "urgency", "conf.", "tokens", "note"):
        t.add_column(col, justify="right" if col in ("T", "seed", "conf.", "tokens") else "left")
    for a in r.peers:
        answer = f"[bold]{a.label}[/bold]" if a.valid and a.label == r.answer else (a.label or "[red]abstained[/red]")
        t.add_row(escape(a.peer), escape(a.model), f"{a.temperature:g}", str(a.seed), answer, a.urgency or "",
                  f"{a.confidence:.2f}" if a.confidence is not None else "", f"{a.usage.tokens:,}",
                  escape(a.error[:60]))
    return t


def print_result(r: sw.SwarmResult) -> None:
    if r.status == "rejected":
        err.print(f"[red]swarm refused:[/red] {escape(r.reason)}")
        return
    console.print()
    console.print(result_table(r))
    votes = ", ".join(f"{lb} {n}" for lb, n in r.votes.items()) or "none"
    console.print(f"votes: {votes}; abstained: {r.abstentions} of {len(r.peers)}")
    peer_conf = f" (mean peer confidence {r.mean_peer_confidence:.2f})" if r.mean_peer_confidence is not None else ""
    console.print(f"agreement {r.agreement:.2f} = confidence {r.confidence:.2f}{peer_conf}; "
                  f"threshold {r.threshold:.2f}")
    if r.status == "accepted":
        console.print(f"[green]accepted[/green]: [bold]{r.answer}[/bold] ({r.urgency}) published as "
                      f"{r.report_id or 'a report'}")
    else:
        console.print(f"[yellow]escalated[/yellow] to the human queue ({r.queue_item_id}): {escape(r.reason)}")
    console.print(f"usage: {r.usage.llm_calls} LLM calls, {r.usage.tokens:,} tokens, ${r.usage.cost_usd:.5f} "
                  f"(all peers; the swarm itself made {r.own_usage.llm_calls} calls)")


def swarm_cmd(
    text: Annotated[str, typer.Argument(help="The ticket text to classify")],
    customer: Annotated[str, typer.Option("--customer", "-c", help="Customer id, e.g. C-1001")] = "",
    ticket_id: Annotated[str | None, typer.Option(help="Your ticket id (default: generated)")] = None,
    peers: Annotated[int, typer.Option("--peers", "-k", min=1, max=sw.MAX_PEERS, help="Number of peers K")] = (
        sw.SWARM_POLICY.peers),
    threshold: Annotated[float | None, typer.Option(
        "--threshold", min=0.01, max=1.0, help=f"Agreement needed (default {sw.SWARM_POLICY.threshold})")] = None,
    models: Annotated[str, typer.Option(help="Comma-separated model specs the peers alternate over")] = (
        "sim:sim-small,sim:sim-large"),
    sim_seed: Annotated[int, typer.Option(help="Added to every peer's seed (peers use seeds 1..K)")] = 0,
    watch: Annotated[bool, typer.Option("--watch", help="Draw the swarm's and its peers' progress")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
    prompt_version: Annotated[str, typer.Option(help="Prompt version (prompts/swarm/classify.<version>.md)")] = "v1",
) -> None:
    """Classify a ticket with a swarm of K peer agents; below the agreement threshold a human decides."""
    settings = load_settings()
    try:
        specs = [ModelSpec.parse(m.strip()) for m in models.split(",") if m.strip()]
    except ValueError as e:
        err.print(f"[red]--models: {escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    wid = patterns.new_id("swarm")
    peer_specs = [p.model_copy(update={"seed": p.seed + sim_seed}) for p in sw.default_peers(peers, specs)]
    inp = sw.SwarmInput(text=text, customer_id=customer, ticket_id=ticket_id or wid, peers=peers,
                        peer_specs=peer_specs, models=specs, threshold=threshold, prompt_version=prompt_version,
                        sim=SimConfig(seed=sim_seed, spiral_rate=0.0),
                        # Pinned in the input (and so in the history): a later policy change must not
                        # alter a running task or its replay.
                        budget=budget_for("swarm"), peer_budget=sw.SWARM_POLICY.peer_budget)
    problems = sw.problems(inp)
    if problems:
        err.print(f"[red]swarm refused:[/red] {'; '.join(problems)}")
        raise typer.Exit(2)

    async def run() -> None:
        client: Client = await client_or_exit(settings)
        handle = await patterns.start_pattern(
            client, settings, names.SWARM_WORKFLOW, inp, wid, summary=f"swarm of {peers}: {text[:60]}",
            task_type=sw.TASK_TYPE, feature=inp.feature, customer=customer or "internal",
            result_type=sw.SwarmResult)
        if not as_json:
            console.print(f"started [bold]{handle.id}[/bold]  {peers} peers  ({escape(models)})")
            console.print(f"  {views.workflow_url(settings, handle.id)}")
        res: sw.SwarmResult = await (patterns.watch(client, console, handle) if watch and not as_json
                                     else handle.result())
        if as_json:
            print(json.dumps(res.model_dump(mode="json"), indent=2))
        else:
            print_result(res)
        if res.status == "rejected":
            raise typer.Exit(2)

    run_task(run, "swarm")
