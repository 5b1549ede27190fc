"""`keel shadow start|stop|status|report`: run a candidate version beside the primary on a share of new
tickets, its writes dry-run, and compare them.

The configuration lives in the ledger database (KEEL_DATABASE_URL or the stack's), where every
`keel ticket submit/batch` (starter.tickets.start_ticket) reads it; the comparisons are written there
by the workers.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from keel.shadow import SPEC_EXAMPLES, CandidateSpec, CandidateSpecError, ShadowConfig, ShadowSummary
from starter import tickets
from starter.console import console, err, ledger_engine
from starter.views import parse_since

shadow_app = typer.Typer(help="Shadow mode: run a candidate version beside the primary.", no_args_is_help=True)



def parse_candidate(spec: str) -> CandidateSpec:
    """A candidate that can run: a well-formed spec, priced models, a complete prompt version."""
    candidate = CandidateSpec.parse(spec)
    if candidate.prompt_version is not None:
        problems = tickets.prompt_version_problems(candidate.prompt_version)
        if problems:
            raise CandidateSpecError(f"candidate spec {spec!r}: " + "; ".join(problems))
    return candidate


def _describe(c: ShadowConfig) -> str:
    started = c.started_at.isoformat(timespec="seconds") if c.started_at else "-"
    return f"candidate [bold]{escape(c.candidate.label)}[/bold] on {c.fraction:.0%} of new tickets, since {started}"


@shadow_app.command("start")
def start(
    candidate: Annotated[str, typer.Option("--candidate", help=f"What the candidate changes, e.g. {SPEC_EXAMPLES}")],
    fraction: Annotated[float, typer.Option("--fraction", min=0.0, max=1.0,
                                            help="Share of new tickets shadowed (by a hash of the ticket id)")] = 1.0,
) -> None:
    """Shadow a share of new tickets with a candidate (replaces an active shadow)."""
    try:
        spec = parse_candidate(candidate)
    except CandidateSpecError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    from activities.shadow import start_shadow

    config = start_shadow(ledger_engine(), spec, fraction)
    tickets.forget_shadow_config()
    console.print(f"shadow mode on: {_describe(config)}")
    console.print("Its writes are dry-run (recorded, never executed); its spend is charged to feature 'shadow'. "
                  "`keel shadow report` compares, `keel shadow stop` ends it.")


@shadow_app.command("stop")
def stop() -> None:
    """Stop shadowing new tickets (shadows already running finish and are reported)."""
    from activities.shadow import stop_shadow

    config = stop_shadow(ledger_engine())
    tickets.forget_shadow_config()
    if config is None:
        console.print("shadow mode was not on")
        return
    console.print(f"shadow mode off (was {_describe(config)})")


@shadow_app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False) -> None:
    """The active shadow configuration and how many tickets it has compared."""
    from activities.shadow import comparisons, last_shadow

    engine = ledger_engine()
    last = last_shadow(engine)
    if last is None:
        doc: dict[str, object] = {"active": False}
    else:
        config, stopped_at, active = last
        done = comparisons(engine, since=config.started_at, candidate=config.candidate.label)
        doc = {"active": active, "candidate": config.candidate.label, "fraction": config.fraction,
               "started_at": config.started_at, "stopped_at": stopped_at, "compared": len(done),
               "candidate_failures": sum(c.candidate_failed for c in done)}
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
        return
    if last is None:
        console.print("shadow mode is off (never started here); `keel shadow start --candidate SPEC`")
        return
    state = "on" if doc["active"] else f"off since {str(doc['stopped_at'])[:19]} (last run below)"
    console.print(f"shadow mode {state}: {_describe(last[0])}")
    console.print(f"{doc['compared']} tickets compared since it started, {doc['candidate_failures']} candidate "
                  "failures; `keel shadow report` for the comparison")


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _table(s: ShadowSummary) -> Table:
    t = Table(title=f"candidate {escape(s.candidate)}: {s.tasks} shadowed tickets", show_header=False,
              title_justify="left")
    t.add_row("compared", f"{s.compared} ({s.candidate_failures} candidate failures)")
    t.add_row("same outcome", f"{_num(s.same_outcome_rate, '.1%')} (route and status)")
    for change, n in s.outcome_changes.items():
        t.add_row("  changed", f"{n} × {escape(change)}")
    t.add_row("classification agreement", _num(s.classification_agreement_rate, ".1%"))
    t.add_row("cost (compared)", f"primary ${s.primary_cost_usd:.4f}, candidate ${s.candidate_cost_usd:.4f}")
    t.add_row("cost delta", f"total ${s.total_cost_delta_usd:+.4f}, mean ${_num(s.mean_cost_delta_usd, '+.5f')} "
                            "per ticket")
    t.add_row("step delta", f"mean {_num(s.mean_step_delta, '+.2f')} per ticket")
    t.add_row("token delta", f"mean {_num(s.mean_token_delta, '+.0f')} per ticket")
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
) -> None:
    """Compare each candidate with the primary over the shadowed tickets: outcomes, classification,
    cost, steps and tokens, the dry-run writes, the candidate's failures."""
    from activities.shadow import shadow_report

    try:
        start = parse_since(since) if since else None
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    summaries = shadow_report(ledger_engine(), start)
    if as_json:
        print(json.dumps([s.model_dump(mode="json") for s in summaries], indent=2))
        return
    if not summaries:
        console.print("no shadowed tickets" + (f" since {since}" if since else "") +
                      "; `keel shadow start --candidate SPEC` then submit tickets")
        return
    for s in summaries:
        console.print(_table(s))
