"""`keel ticket submit|batch`: support tickets as tasks of the support desk agent, a verb group of this package.

A ticket is a task of the `support_desk` agent on the generic agent workflow: the customer is its tenant
(the ledger's chargeback tag, the customer the guardrails hold every call to), its text the request as
the desk reads it (`Customer: C-1001` then the text), its id the task's key, so the workflow id is
`support_desk-<ticket id>` and a ticket submitted again shows the run it already has (nothing runs
twice). `keel ticket batch` starts many, at most --concurrency at a time, and prints one table; a ticket
whose refund waits for a support lead's approval counts as done for the batch (`keel approvals`).
The worker must serve the agent (`KEEL_AGENTS=agents.support_desk`).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table

import keel
from agents.support_desk.agent import support_desk
from agents.support_desk.data import sample_tickets

AGENT = support_desk.name
MAX_TEXT_CHARS = 20_000
APPROVER = "support-lead"
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_FILE_FIELDS = {"customer_id", "text", "ticket_id", "feature"}


def request_text(customer: str, text: str) -> str:
    """The request as the support desk reads it: the customer's id line, then the ticket's text."""
    return f"Customer: {customer}\n\n{text}"


def ticket_problems(customer: str, text: str, ticket_id: str = "", feature: str = "") -> list[str]:
    problems = []
    if not customer.strip():
        problems.append("customer id is empty")
    elif not _TAG.match(customer.strip()):
        problems.append(f"customer id {customer!r} must be 1-64 letters, digits or _.:- (it tags the ledger)")
    if not text.strip():
        problems.append("ticket text is empty")
    elif len(text) > MAX_TEXT_CHARS:
        problems.append(f"ticket text is {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,}")
    for name, tag in (("ticket id", ticket_id), ("feature", feature)):
        if tag and not _TAG.match(tag):
            problems.append(f"{name} {tag!r} must be 1-64 letters, digits or _.:-")
    return problems


def parse_latency(spec: str | None) -> tuple[int, int]:
    """`--sim-latency A-B` (or `A`): milliseconds per model call, A <= B."""
    if not spec:
        return 0, 0
    low, _, high = spec.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        lo, hi = -1, -1
    if lo < 0 or hi < lo:
        raise ValueError(f"--sim-latency {spec!r}: use milliseconds, MIN-MAX with MIN <= MAX, e.g. 1000-3000")
    return lo, hi


def sim_config(seed: int, spiral_rate: float | None, latency: str | None) -> keel.SimConfig:
    lo, hi = parse_latency(latency)
    spiral = {} if spiral_rate is None else {"spiral_rate": spiral_rate}
    return keel.SimConfig(seed=seed, latency_ms_min=lo, latency_ms_max=hi, **spiral)


def check_prompt_version(version: str | None) -> None:
    if version is not None and version not in support_desk.prompt_versions():
        known = ", ".join(support_desk.prompt_versions())
        raise ValueError(f"prompt version {version!r}: the support desk has {known}")


def ticket_input(customer: str, text: str, ticket_id: str | None = None, sim: keel.SimConfig | None = None,
                 prompt_version: str | None = None, feature: str = "") -> keel.AgentInput:
    """A validated ticket as a task of the support desk (its id a new one when not given)."""
    problems = ticket_problems(customer, text, ticket_id or "", feature)
    if problems:
        raise ValueError("; ".join(problems))
    return keel.AgentInput(agent=AGENT, input=request_text(customer.strip(), text), key=ticket_id or new_ticket_id(),
                           tenant=customer.strip(), feature=feature, prompt_version=prompt_version,
                           sim=sim or keel.SimConfig())


def new_ticket_id() -> str:
    return f"TK-{uuid.uuid4().hex[:10]}"


def content_ticket_id(customer: str, text: str, occurrence: int = 1) -> str:
    """The id of a ticket a batch file gives without one: from its customer and text (and which copy of
    them in the file it is), so the same file run again finds its tickets' runs instead of answering the
    customers a second time."""
    digest = hashlib.sha256(f"{customer.strip()}\n{text}\n{occurrence}".encode()).hexdigest()[:12]
    return f"TK-{digest}"


def load_batch_file(path: Path, sim: keel.SimConfig | None = None, prompt_version: str | None = None
                    ) -> list[keel.AgentInput]:
    """A JSON list or JSON Lines of {"customer_id", "text", optional "ticket_id", "feature"}; a ticket without
    an id gets one from its customer and text (content_ticket_id: the same file runs once). Every problem
    in the file is reported (with its line or item) and nothing is started if there is any."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from e
    entries: list[tuple[str, Any]] = []
    if raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        entries = [(f"item {i}", it) for i, it in enumerate(items)]
    else:
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    entries.append((f"line {n}", e))
    if not entries:
        raise ValueError(f"{path}: no tickets in the file")
    problems: list[str] = []
    inputs: list[keel.AgentInput] = []
    seen: dict[tuple[str, str], int] = {}
    for where, item in entries:
        if isinstance(item, json.JSONDecodeError):
            problems.append(f"{where}: not valid JSON ({item.msg})")
        elif not isinstance(item, dict):
            problems.append(f"{where}: expected an object with customer_id and text, got {type(item).__name__}")
        elif unknown := set(item) - _FILE_FIELDS:
            problems.append(f"{where}: unknown fields {sorted(unknown)}")
        else:
            customer, body = str(item.get("customer_id", "")), str(item.get("text", ""))
            ticket_id = item.get("ticket_id") and str(item["ticket_id"])
            if not ticket_id:
                seen[customer, body] = seen.get((customer, body), 0) + 1
                ticket_id = content_ticket_id(customer, body, seen[customer, body])
            try:
                inputs.append(ticket_input(customer, body, ticket_id, sim, prompt_version,
                                           str(item.get("feature", ""))))
            except ValueError as e:
                problems.append(f"{where}: {e}")
    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(f"{path}: {len(problems)} bad ticket(s), nothing was started:\n  {listing}")
    return inputs


SimSeed = Annotated[int, typer.Option("--sim-seed", help="Seed of the sim model (and of the sample tickets)")]
SpiralRate = Annotated[float | None, typer.Option("--spiral-rate", min=0.0, max=1.0,
                                                  help="Sim: share of tickets that spiral (default 0.15)")]
SimLatency = Annotated[str | None, typer.Option("--sim-latency", help="Sim: ms per model call, e.g. 1000-3000")]
PromptVersion = Annotated[str | None, typer.Option("--prompt-version",
                                                   help="The desk's prompt version (default v1)")]


def submit(
    customer: Annotated[str, typer.Option("--customer", "-c", help="Customer id, e.g. C-1001 (the task's tenant)")],
    text: Annotated[str, typer.Option("--text", "-t", help="The ticket's text")],
    ticket_id: Annotated[str | None, typer.Option("--ticket-id", help="Your ticket id (default: a new one); "
                                                                       "workflow id support_desk-<ticket id>")] = None,
    sim_seed: SimSeed = 0,
    spiral_rate: SpiralRate = None,
    sim_latency: SimLatency = None,
    prompt_version: PromptVersion = None,
) -> keel.AgentInput:
    """Submit one support ticket to the support desk agent and show its outcome (a ticket id submitted
    again shows the run it has)."""
    check_prompt_version(prompt_version)
    return ticket_input(customer, text, ticket_id, sim_config(sim_seed, spiral_rate, sim_latency), prompt_version)


def batch(
    file: Annotated[Path | None, typer.Argument(help="JSON list or JSON Lines of {customer_id, text[, ticket_id]}",
                                                show_default=False)] = None,
    file_option: Annotated[Path | None, typer.Option("--file", "-f", help="The same, as an option")] = None,
    sample: Annotated[int | None, typer.Option("--sample", min=1, help="Run N sample tickets instead")] = None,
    sim_seed: SimSeed = 0,
    spiral_rate: SpiralRate = None,
    sim_latency: SimLatency = None,
    prompt_version: PromptVersion = None,
) -> list[keel.AgentInput]:
    """Run many support tickets on the support desk agent and print one table (refunds that wait for an
    approval are listed as such)."""
    if file is not None and file_option is not None:
        raise ValueError("give the file once: FILE or --file")
    path = file or file_option
    if (path is None) == (sample is None):
        raise ValueError("give a FILE (or --file) or --sample N, one of them")
    check_prompt_version(prompt_version)
    sim = sim_config(sim_seed, spiral_rate, sim_latency)
    if path is not None:
        return load_batch_file(path, sim, prompt_version)
    return [ticket_input(t.customer_id, t.text, t.ticket_id, sim, prompt_version)
            for t in sample_tickets(sample or 0, seed=sim_seed)]


# --- what is printed -----------------------------------------------------------------------------------

STATUS = {"completed": "resolved"}
"""A task answered by the desk is a resolved ticket."""


def _sim_note(models: list[str]) -> str:
    """What the costs are: simulated (the sim), the declared estimate of a self-hosted model."""
    notes = ["sim: simulated tokens and costs"] if any("[sim" in m for m in models) else []
    if any("[self-hosted]" in m for m in models):
        notes.append("self-hosted: costs are your declared estimate (KEEL_PRICES)")
    return f"  [dim]({'; '.join(notes)})[/dim]" if notes else ""


def _triage(item: keel.BatchItem) -> dict[str, Any]:
    if item.result is not None:
        return dict(item.result.triage or {})
    return dict(getattr(item.progress, "triage", None) or {})


def show(r: keel.AgentResult) -> Iterator[Any]:
    """The ticket's outcome: status, triage, the reply (or why it went to a person), tools, usage."""
    t = Table.grid(padding=(0, 2))
    colour = {"completed": "green", "escalated": "yellow"}.get(r.status, "red")
    t.add_row("status", f"[{colour}]{STATUS.get(r.status, r.status)}[/{colour}]  {escape(r.reason)}")
    tri = r.triage or {}
    if tri:
        t.add_row("triage", f"{tri.get('category')} ({tri.get('urgency')}, confidence {tri.get('confidence')})")
    t.add_row("tools", escape(", ".join(r.tools_executed) or "-"))
    for b in r.tools_blocked:
        t.add_row("blocked", escape(f"{b.tool}: {b.reason}"))
    for a in r.approvals:
        t.add_row("approval", escape(f"{a.action_id} {a.decision} by {a.approver}"))
    t.add_row("usage", f"{r.llm_calls} model calls, {r.tokens:,} tokens, ${r.cost_usd:.5f}" + _sim_note(r.models))
    t.add_row("models", escape(", ".join(r.models) or "-"))
    if r.output:
        t.add_row("reply", escape(r.output))
    elif r.partial_output:
        t.add_row("held back", escape(r.partial_output))
    yield t


def show_batch(items: list[keel.BatchItem]) -> Iterator[Any]:
    """One row per ticket, the totals, and what waits for an approval."""
    t = Table(title=f"{len(items)} support tickets", box=box.SIMPLE_HEAD)
    for col in ("ticket", "customer", "category", "conf", "status", "tools", "tokens", "cost $"):
        t.add_column(col, justify="right" if col in ("conf", "tools", "tokens", "cost $") else "left")
    tokens, cost, models = 0, 0.0, set()
    for item in items:
        inp = item.input
        assert isinstance(inp, keel.AgentInput)
        got = item.result if item.result is not None else item.progress
        n_tok, usd = (got.tokens, got.cost_usd) if got is not None else (0, 0.0)
        tools = len(getattr(got, "tools_executed", []) or [])
        tokens, cost = tokens + n_tok, cost + usd
        if item.result is not None:
            models.update(item.result.models)
        tri = _triage(item)
        conf = tri.get("confidence")
        t.add_row(escape(inp.key), escape(inp.tenant), escape(str(tri.get("category") or "-")),
                  f"{conf:.2f}" if isinstance(conf, int | float) else "-",
                  STATUS.get(item.status, item.status) + (" (existing)" if item.existing else ""),
                  str(tools), f"{n_tok:,}", f"{usd:.5f}")
    n = len(items) or 1
    counts: dict[str, int] = {}
    for item in items:
        counts[STATUS.get(item.status, item.status)] = counts.get(STATUS.get(item.status, item.status), 0) + 1
    tally = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    yield t
    yield (f"{tally}; {tokens:,} tokens, ${cost:.4f} in all, ${cost / n:.5f} per ticket; "
           f"models: {escape(', '.join(sorted(models)) or '-')}" + _sim_note(sorted(models)))
    waiting = [i for i in items if i.pending_action is not None]
    if waiting:
        first = waiting[0]
        yield Group(
            f"{len(waiting)} ticket(s) wait for a support lead's approval of a refund: `keel approvals` lists them;",
            f"  e.g. `keel approve {escape(first.workflow_id)} --as {APPROVER}` "
            f"or `keel reject {escape(first.workflow_id)} --as {APPROVER}`")


COMMANDS = [keel.CommandGroup("ticket", [
    keel.Command("submit", submit, show, idempotent=True),
    keel.Command("batch", batch, show_batch=show_batch, idempotent=True),
], help="Support tickets on the support desk agent: submit one, or a batch.")]
