"""What the cost controls buy: the same tickets uncontrolled, with budgets and the breaker, and tiered.

    python bench/cost.py [--tickets 1000] [--concurrency 40] [--json]
                         [--budget-tokens N] [--budget-usd X] [--soft-ratio R] [--hard-ratio R]
    python bench/cost.py --agent support_desk [--tasks 300] [--spiral-rate 0.15] [--json] [...]

The scenario of "Token Cost Management": N sample tickets on the `sim` model (zero latency, spiral
rate 15%, seed 0), run in one invocation on one local dev server with one Keel worker subprocess, three
ways, one after the other:

- `uncontrolled`: no budget (`UNLIMITED`), no circuit breaker, every step on the large model;
- `controlled`:   the task type's default budget (soft 70% / hard 90% / kill 100%), the breaker on,
                  every step on the large model;
- `tiered`:       controlled, plus model tiering (classify / route / extract on the small model).

All three see the same tickets and the same spiral draws: the sim seeds its per-task randomness on the
ticket id, which is the same in every mode. Each mode has a task queue of its own (the worker serves
all three), so each has its own circuit breaker (its id is scoped by task queue): one mode's breaker
state cannot leak into another's.

Per mode: per-ticket tokens and dollars (p50, p95, p99, max), total dollars, tickets over the kill
budget (counted for `uncontrolled` too: what would have crossed it), escalation, success (the sample's
known category and route; a ticket killed by the budget or skipped by the breaker is a failure),
abandonment (status budget_exceeded), breaker rejections, mean LLM calls, p99/p50 cost. The sim does not
model quality differences between the models: the tiered success rate reflects routing and budget
effects only.

`--budget-tokens`, `--budget-usd`, `--soft-ratio`, `--hard-ratio` override the budget of `controlled`
and `tiered` (passed as TicketInput.budget; also the kill budget `over_budget` counts against), to try a
tuning of keel/policy.py without editing it.

With `--agent NAME` (a built-in agent: support_desk, the sample tickets' texts as its inputs with the
customer as tenant; or oncall, questions about the demo services of agents/oncall/status_service.py,
served by this process) the same experiment runs on the generic agent workflow (KeelAgent), two ways:

- `uncontrolled`: no budget, no circuit breaker;
- `controlled`:   the agent's own budget (or the override), its cost circuit breaker on.

Spirals are drawn by the sim from the seed and each task's input (`--spiral-rate`, default 15%), the same
in both modes. Per mode: tokens and dollars per task (p50, p95, p99, max), total dollars, tasks over the
kill budget from the results AND from the ledger rows of each task (with the count of tasks whose ledger
rows do not sum to their result), the thresholds hit, how the spiralling tasks ended (by themselves,
after the wrap-up notice, after the answer-now notice, killed, step cap, breaker) and breaker rejections.
`--tasks` is another name for `--tickets`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

# `bench` is not an installed package: `python bench/cost.py` finds it only from the root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import ValidationError
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.db import make_engine
from activities.ledger import Ledger
from activities.providers.sim import task_traits
from agents.oncall.status_service import DEFAULT_SERVICES, StatusService
from bench.throughput import (
    SEARCH_ATTRIBUTE_KEYS,
    SPIRAL_RATE,
    BenchError,
    agent_inputs,
    child_env,
    find_server_pid,
    hard_exit,
    inherited_output_to,
    keel_settings,
    log,
    machine_info,
    percentile,
    run_benchmark,
    run_concurrent,
    status_counts,
    temporal_binary,
    ticket_inputs,
    worker_process,
)
from keel import registry
from keel.agent import Agent
from keel.breaker import BREAKER_STATE_QUERY, BreakerState, breaker_workflow_id
from keel.dataset import SampleTicket, sample_tickets
from keel.policy import BUDGETS, EXPECTED_TOKENS, UNLIMITED
from keel.settings import KeelSettings
from keel.types import AgentInput, AgentResult, Budget, SimConfig, TicketInput, TicketResult
from starter.agents import start_agent
from starter.tickets import run_batch

TASK_TYPE = "support_ticket"
DEFAULT_BUDGET = BUDGETS[TASK_TYPE]
READY_LINE = "keel cost worker on task queues"
TARGET_OVER_BUDGET = 0
TARGET_P99_P50 = 2.0
TARGET_TIERING_SAVINGS = 0.60
TARGET_SUCCESS_DELTA_PTS = 2.0
QUALITY_NOTE = ("the sim does not model quality differences between models: the tiered success rate reflects "
                "routing and budget effects only")


@dataclass(frozen=True)
class Mode:
    name: str
    budget: Budget | None
    """None: the task type's default budget (what a ticket gets unless it overrides it)."""
    breaker: bool
    tiering: bool

    def apply(self, inp: TicketInput) -> TicketInput:
        return inp.model_copy(update={"budget": self.budget, "breaker": self.breaker, "tiering": self.tiering})


def modes(override: Budget | None) -> list[Mode]:
    return [
        Mode("uncontrolled", UNLIMITED, breaker=False, tiering=False),
        Mode("controlled", override, breaker=True, tiering=False),
        Mode("tiered", override, breaker=True, tiering=True),
    ]


# --- figures --------------------------------------------------------------------------------


def _pcts(values: Sequence[float], digits: int, unit: str) -> dict[str, float]:
    return {
        f"p50_{unit}": round(percentile(values, 50), digits),
        f"p95_{unit}": round(percentile(values, 95), digits),
        f"p99_{unit}": round(percentile(values, 99), digits),
        f"max_{unit}": round(max(values), digits),
        f"mean_{unit}": round(sum(values) / len(values), digits),
    }


def over_budget(r: TicketResult, kill: Budget) -> bool:
    return (kill.max_tokens is not None and r.tokens > kill.max_tokens) or (
        kill.max_usd is not None and r.cost_usd > kill.max_usd
    )


def succeeded(r: TicketResult, t: SampleTicket) -> bool:
    if r.status == "budget_exceeded" or r.budget.limit_hit == "breaker":
        return False
    return r.category == t.category and r.route == t.expected_route


def _share(n: int, total: int) -> float:
    return round(n / total, 4) if total else float("nan")


def group_figures(results: Sequence[TicketResult], tickets: Sequence[SampleTicket], kill: Budget) -> dict[str, Any]:
    """The figures an investigation needs per group (a category, spiralling or not)."""
    n = len(results)
    usd = [r.cost_usd for r in results]
    tokens = [float(r.tokens) for r in results]
    return {
        "tickets": n,
        "mean_tokens": round(sum(tokens) / n, 1),
        "p50_tokens": round(percentile(tokens, 50)),
        "max_tokens": round(max(tokens)),
        "mean_usd": round(sum(usd) / n, 6),
        "p50_usd": round(percentile(usd, 50), 6),
        "max_usd": round(max(usd), 6),
        "total_usd": round(sum(usd), 4),
        "over_budget": sum(over_budget(r, kill) for r in results),
        "budget_exceeded": sum(r.status == "budget_exceeded" for r in results),
        "soft_hit": sum(r.budget.soft_at_step is not None for r in results),
        "hard_hit": sum(r.budget.hard_at_step is not None for r in results),
        "success_rate": _share(sum(succeeded(r, t) for r, t in zip(results, tickets, strict=True)), n),
        "mean_llm_calls": round(sum(r.llm_calls for r in results) / n, 2),
    }


def observation_kinds(results: Sequence[TicketResult], top: int = 5) -> dict[str, int]:
    """The commonest problems the agents ran into (tool errors, invalid outputs), by their first words:
    on the sim with no failure rates set there should be none."""
    counts: dict[str, int] = {}
    for r in results:
        for o in r.observations:
            kind = o.split(":", 1)[0][:60]
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def mode_figures(
    mode: Mode, results: Sequence[TicketResult], tickets: Sequence[SampleTicket], kill: Budget, spirals: Sequence[bool],
    elapsed_s: float, breaker: BreakerState | None,
) -> dict[str, Any]:
    n = len(results)
    usd = [r.cost_usd for r in results]
    tokens = [float(r.tokens) for r in results]
    p50, p99 = percentile(usd, 50), percentile(usd, 99)
    tp50, tp99 = percentile(tokens, 50), percentile(tokens, 99)
    limits: dict[str, int] = {}
    for r in results:
        if r.budget.limit_hit:
            limits[r.budget.limit_hit] = limits.get(r.budget.limit_hit, 0) + 1
    by_category: dict[str, dict[str, Any]] = {}
    for cat in sorted({t.category for t in tickets}):
        idx = [i for i, t in enumerate(tickets) if t.category == cat]
        by_category[cat] = group_figures([results[i] for i in idx], [tickets[i] for i in idx], kill)
    by_spiral: dict[str, dict[str, Any]] = {}
    for label, want in (("spiral", True), ("no_spiral", False)):
        idx = [i for i, s in enumerate(spirals) if s == want]
        if idx:
            by_spiral[label] = group_figures([results[i] for i in idx], [tickets[i] for i in idx], kill)
    return {
        "budget": {"max_tokens": (mode.budget or DEFAULT_BUDGET).max_tokens,
                   "max_usd": (mode.budget or DEFAULT_BUDGET).max_usd},
        "breaker_on": mode.breaker,
        "tiering": mode.tiering,
        "tickets": n,
        **_pcts(tokens, 0, "tokens"),
        **_pcts(usd, 6, "usd"),
        "total_usd": round(sum(usd), 4),
        "p99_p50_usd": round(p99 / p50, 3) if p50 else float("nan"),
        "p99_p50_tokens": round(tp99 / tp50, 3) if tp50 else float("nan"),
        "over_budget": sum(over_budget(r, kill) for r in results),
        "escalation_rate": _share(sum(r.route == "human" for r in results), n),
        "success_rate": _share(sum(succeeded(r, t) for r, t in zip(results, tickets, strict=True)), n),
        "abandonment_rate": _share(sum(r.status == "budget_exceeded" for r in results), n),
        "breaker_rejections": sum(r.budget.limit_hit == "breaker" for r in results),
        "breaker_trips": breaker.trips if breaker else 0,
        "breaker_status": breaker.status if breaker else None,
        "mean_llm_calls": round(sum(r.llm_calls for r in results) / n, 2),
        "soft_hit": sum(r.budget.soft_at_step is not None for r in results),
        "hard_hit": sum(r.budget.hard_at_step is not None for r in results),
        "limits_hit": dict(sorted(limits.items())),
        "repeated_calls_answered": sum(r.repeated_calls for r in results),
        "tickets_with_problems": sum(bool(r.observations) for r in results),
        "problems_top": observation_kinds(results),
        "statuses": status_counts(results),
        "elapsed_s": round(elapsed_s, 2),
        "tickets_per_s": round(n / elapsed_s, 2) if elapsed_s else float("nan"),
        "by_category": by_category,
        "by_spiral": by_spiral,
    }


def targets(m: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ctl, tier = m["controlled"], m["tiered"]
    savings = 1 - tier["total_usd"] / ctl["total_usd"] if ctl["total_usd"] else float("nan")
    delta_pts = 100 * (tier["success_rate"] - ctl["success_rate"])
    return {
        "zero_over_budget": {
            "target": "0 tickets over the kill budget in controlled and tiered",
            "value": {"controlled": ctl["over_budget"], "tiered": tier["over_budget"]},
            "met": ctl["over_budget"] == TARGET_OVER_BUDGET and tier["over_budget"] == TARGET_OVER_BUDGET,
        },
        "p99_p50_usd": {
            "target": f"<= {TARGET_P99_P50:g} in controlled and tiered",
            "value": {"controlled": ctl["p99_p50_usd"], "tiered": tier["p99_p50_usd"]},
            "met": ctl["p99_p50_usd"] <= TARGET_P99_P50 and tier["p99_p50_usd"] <= TARGET_P99_P50,
        },
        "tiering_savings": {
            "target": f">= {TARGET_TIERING_SAVINGS:.0%} less total dollars, tiered vs controlled",
            "value": round(savings, 4),
            "met": savings >= TARGET_TIERING_SAVINGS,
        },
        "tiering_success_delta_pts": {
            "target": f"tiered success rate within {TARGET_SUCCESS_DELTA_PTS:g} points of controlled",
            "value": round(delta_pts, 2),
            "met": abs(delta_pts) <= TARGET_SUCCESS_DELTA_PTS,
        },
    }


# --- the worker: one process, one Keel worker per mode's task queue ------------------------


async def serve(queues: list[str]) -> None:
    """`python -m bench.cost --serve Q1,Q2,...`: the production worker wiring (workers.worker.build_worker),
    one Worker per task queue in this one process, sharing the ledger, until SIGTERM/SIGINT."""
    from activities.db import init_db, make_engine
    from keel.settings import KeelSettings
    from starter.client import connect
    from workers.worker import build_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = KeelSettings()
    client = await connect(settings)
    engine = make_engine(settings.db_url)
    init_db(engine)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        for q in queues:
            await stack.enter_async_context(build_worker(client, settings, task_queue=q, engine=engine))
        logging.info("%s %s at %s", READY_LINE, ", ".join(queues), settings.temporal_address)
        await stop.wait()
    engine.dispose()
    logging.info("keel cost worker stopped")


# --- the run --------------------------------------------------------------------------------


async def breaker_state(client: Client, task_queue: str, task_type: str = TASK_TYPE) -> BreakerState | None:
    """The mode's breaker at the end of its run; None if it never started (breaker off)."""
    handle = client.get_workflow_handle(breaker_workflow_id(task_type, task_queue))
    try:
        state: BreakerState = await handle.query(BREAKER_STATE_QUERY, result_type=BreakerState)
    except Exception:  # not found: no ticket asked this breaker
        return None
    return state


async def run(n: int, concurrency: int, override: Budget | None, spiral_rate: float = SPIRAL_RATE) -> dict[str, Any]:
    temporal = temporal_binary()
    tickets = sample_tickets(n, seed=0)
    kill = override or DEFAULT_BUDGET
    run_id = uuid.uuid4().hex[:8]
    all_modes = modes(override)
    queues = {m.name: f"bench-cost-{m.name}-{run_id}" for m in all_modes}
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="keel-cost-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "keel-home"
        base = [inp.model_copy(update={"sim": inp.sim.model_copy(update={"spiral_rate": spiral_rate})})
                for inp in ticket_inputs(keel_settings("unused", home), tickets)]
        sim: SimConfig = base[0].sim
        spirals = [task_traits(sim, inp.ticket_id).spiral for inp in base]
        log(f"starting the dev server from {temporal} (its output: {tmp / 'server.log'})")
        with inherited_output_to(tmp / "server.log"):
            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=temporal,
                data_converter=pydantic_data_converter,
                search_attributes=cast("Sequence[SearchAttributeKey[Any]]", SEARCH_ATTRIBUTE_KEYS),
            )
        try:
            client = env.client
            address = client.service_client.config.target_host
            log(f"dev server on {address} (pid {find_server_pid(int(address.rsplit(':', 1)[1]))}); "
                f"{n} tickets x {len(all_modes)} modes, concurrency {concurrency}, "
                f"{sum(spirals)} spiralling tickets")
            argv = [sys.executable, "-m", "bench.cost", "--serve", ",".join(queues.values())]
            wenv = child_env(tmp, {"TEMPORAL_ADDRESS": address, "KEEL_HOME": str(home)})
            first = queues[all_modes[0].name]
            async with worker_process("keel", argv, wenv, tmp / "keel-worker.log", client, first, READY_LINE) as w:
                for q in list(queues.values())[1:]:
                    await w.wait_ready(client, q, READY_LINE)
                for mode in all_modes:
                    settings = keel_settings(queues[mode.name], home)
                    inputs = [mode.apply(inp) for inp in base]
                    log(f"{mode.name}: {n} tickets on {settings.task_queue!r}")
                    started = time.perf_counter()
                    results = await run_batch(client, settings, inputs, concurrency)
                    elapsed = time.perf_counter() - started
                    w.cpu_s()  # raises if the worker died
                    breaker = await breaker_state(client, settings.task_queue) if mode.breaker else None
                    figures[mode.name] = mode_figures(mode, results, tickets, kill, spirals, elapsed, breaker)
                    f = figures[mode.name]
                    log(f"{mode.name}: {elapsed:.1f}s, total ${f['total_usd']:.4f}, p50 ${f['p50_usd']:.5f}, "
                        f"p99 ${f['p99_usd']:.5f}, over budget {f['over_budget']}, statuses {f['statuses']}")
        finally:
            await env.shutdown()

    machine = machine_info(temporal)
    return {
        "tickets": n,
        "concurrency": concurrency,
        "spiral_rate": spiral_rate,
        "sim_seed": sim.seed,
        "spiralling_tickets": sum(spirals),
        "kill_budget": {"max_tokens": kill.max_tokens, "max_usd": kill.max_usd, "soft_ratio": kill.soft_ratio,
                        "hard_ratio": kill.hard_ratio, "override": override is not None},
        "expected_tokens": EXPECTED_TOKENS.get(TASK_TYPE),
        "modes": figures,
        "targets": targets(figures),
        "note": QUALITY_NOTE,
        "machine": machine,
        "command": machine["command"],
    }


# --- the report -----------------------------------------------------------------------------


def _fmt(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ",".join(f"{k}:{x}" for k, x in v.items()) or "-"
    if isinstance(v, int | float) and not isinstance(v, bool):
        return format(v, fmt)
    return str(v)


def report(r: dict[str, Any]) -> str:
    m, t, modes_ = r["machine"], r["targets"], r["modes"]
    names = list(modes_)
    kill = r["kill_budget"]
    kill_text = (f"{kill['max_tokens']:,} tokens / ${kill['max_usd']:g}"
                 f" ({'override' if kill['override'] else 'default of ' + TASK_TYPE})")

    def row(label: str, key: str, fmt: str, scale: float = 1.0) -> str:
        vals = [modes_[n][key] for n in names]
        cells = [_fmt(v * scale if scale != 1 and isinstance(v, int | float) else v, fmt) for v in vals]
        return f"  {label:28}" + "".join(f"{c:>16}" for c in cells)

    def met(key: str) -> str:
        return "met" if t[key]["met"] else "NOT met"

    lines = [
        "Keel cost benchmark (the 'Token Cost Management' scenario)",
        f"  command:   {r['command']}",
        f"  machine:   {m['cpu_model']}, {m['cores']} cores; {m['platform']}",
        f"  versions:  Python {m['python']}, temporalio {m['temporalio']}, {m['temporal_cli']}",
        f"  workload:  {r['tickets']} sample tickets per mode, concurrency {r['concurrency']}, sim model at zero "
        f"latency, spiral rate {r['spiral_rate']:.0%} (seed {r['sim_seed']}: {r['spiralling_tickets']} spiralling "
        "tickets, the same in every mode)",
        f"  kill budget: {kill_text}; soft {kill['soft_ratio']:.0%}, hard {kill['hard_ratio']:.0%}; "
        f"breaker trips at 2 x {r['expected_tokens']:,} expected tokens",
        "  one dev server, one worker process serving one task queue (and breaker) per mode; modes run in turn",
        "",
        f"  {'':28}" + "".join(f"{n:>16}" for n in names),
        row("tokens p50", "p50_tokens", ",.0f"),
        row("tokens p95", "p95_tokens", ",.0f"),
        row("tokens p99", "p99_tokens", ",.0f"),
        row("tokens max", "max_tokens", ",.0f"),
        row("$ per ticket p50", "p50_usd", ".5f"),
        row("$ per ticket p95", "p95_usd", ".5f"),
        row("$ per ticket p99", "p99_usd", ".5f"),
        row("$ per ticket max", "max_usd", ".5f"),
        row("$ per ticket mean", "mean_usd", ".5f"),
        row("$ total", "total_usd", ".4f"),
        row("p99/p50 cost", "p99_p50_usd", ".2f"),
        row("over the kill budget", "over_budget", "d"),
        row("success rate %", "success_rate", ".1f", 100),
        row("escalation rate %", "escalation_rate", ".1f", 100),
        row("abandonment % (killed)", "abandonment_rate", ".1f", 100),
        row("breaker rejections", "breaker_rejections", "d"),
        row("breaker trips", "breaker_trips", "d"),
        row("soft / hard thresholds hit", "soft_hit", "d"),
        row("  (hard)", "hard_hit", "d"),
        row("mean LLM calls", "mean_llm_calls", ".2f"),
        row("repeat calls not re-run", "repeated_calls_answered", "d"),
        row("tickets with problems", "tickets_with_problems", "d"),
        row("tickets/s", "tickets_per_s", ".1f"),
        "",
        "  by mode and category: mean $ / max tokens / killed / success %",
    ]
    cats = list(modes_[names[0]]["by_category"])
    for cat in cats:
        cells = []
        for n in names:
            g = modes_[n]["by_category"][cat]
            cells.append(f"{g['mean_usd']:.4f}/{g['max_tokens']:,}/{g['budget_exceeded']}/"
                         f"{100 * g['success_rate']:.0f}")
        lines.append(f"  {cat:28}" + "".join(f"{c:>24}" for c in cells))
    for label in ("spiral", "no_spiral"):
        if label in modes_[names[0]]["by_spiral"]:
            cells = []
            for n in names:
                g = modes_[n]["by_spiral"][label]
                cells.append(f"{g['mean_usd']:.4f}/{g['max_tokens']:,}/{g['budget_exceeded']}/"
                             f"{100 * g['success_rate']:.0f}")
            lines.append(f"  {label + ' (' + str(modes_[names[0]]['by_spiral'][label]['tickets']) + ')':28}"
                         + "".join(f"{c:>24}" for c in cells))
    lines += [f"  problems in {n}: {modes_[n]['problems_top']}" for n in names if modes_[n]["problems_top"]]
    lines += [
        "",
        "  targets:",
        f"    over the kill budget, controlled / tiered: {t['zero_over_budget']['value']['controlled']} / "
        f"{t['zero_over_budget']['value']['tiered']}  (target 0: {met('zero_over_budget')})",
        f"    p99/p50 cost, controlled / tiered: {t['p99_p50_usd']['value']['controlled']:.2f} / "
        f"{t['p99_p50_usd']['value']['tiered']:.2f}  (target <= {TARGET_P99_P50:g}: {met('p99_p50_usd')})",
        f"    tiering cuts total $ by {100 * t['tiering_savings']['value']:.1f}% vs controlled"
        f"  (target >= {TARGET_TIERING_SAVINGS:.0%}: {met('tiering_savings')})",
        f"    tiered success rate {t['tiering_success_delta_pts']['value']:+.1f} points vs controlled"
        f"  (target within {TARGET_SUCCESS_DELTA_PTS:g}: {met('tiering_success_delta_pts')})",
        "",
        f"  note: {QUALITY_NOTE}.",
        "  over the kill budget counts tokens > max_tokens or $ > max_usd; for uncontrolled, what would have "
        "crossed it.",
        "  success: the sample's known category and route; killed or breaker-skipped tickets are failures.",
    ]
    return "\n".join(lines)


# --- the same experiment on a built-in agent, through the generic agent workflow (KeelAgent) --------

AGENT_MODES = ("uncontrolled", "controlled")
ONCALL_ASKS = ("Is the {s} service healthy?", "{s} looks slow to users, what is its error rate?",
               "Which version of {s} is running, and is it ok?", "The {s} service is down, please fix it.")
USD_EPS = 1e-9


def load_agent(name: str) -> Agent:
    """The built-in agent `name` (agents/NAME), registered in this process as a worker would."""
    found = [a for a in registry.load([f"agents.{name}"]) if a.name == name]
    if not found:
        raise BenchError(f"agents.{name} defines no agent named {name!r}")
    return found[0]


def agent_task_inputs(agent: str, settings: KeelSettings, tickets: Sequence[SampleTicket],
                      spiral_rate: float) -> list[AgentInput]:
    """support_desk: the sample tickets (the customer is the tenant and the request's first line);
    oncall: questions about the demo services, one per ticket slot; any other agent: the tickets' texts."""
    base = agent_inputs(agent, settings, tickets)
    if agent == "oncall":
        services = sorted(DEFAULT_SERVICES)
        svc = [services[i // len(ONCALL_ASKS) % len(services)] for i in range(len(base))]
        base = [inp.model_copy(update={
            "input": f"OPS-{i + 1:05d}: " + ONCALL_ASKS[i % len(ONCALL_ASKS)].format(s=svc[i]),
            "tenant": f"team-{svc[i]}"}) for i, inp in enumerate(base)]
    elif agent != "support_desk":
        base = [inp.model_copy(update={"input": t.text, "tenant": "bench"}) for inp, t in zip(base, tickets,
                                                                                              strict=True)]
    return [inp.model_copy(update={"sim": inp.sim.model_copy(update={"spiral_rate": spiral_rate})}) for inp in base]


def spiral_ending(r: AgentResult) -> str:
    """How a task ended: killed by its budget, refused by the breaker, or answered; for an answered task,
    after which budget notice (wrap_up, answer_now) and whether the step cap stopped it (step_cap)."""
    if r.budget.limit_hit == "breaker":
        return "breaker"
    if r.status == "budget_exceeded":
        return "kill"
    parts = ["answer_now" if r.budget.hard_at_step is not None else "wrap_up" if r.budget.soft_at_step is not None
             else ""]
    if r.budget.limit_hit == "steps":
        parts.append("step_cap")
    return "+".join(p for p in parts if p) or "by_itself"


def ledger_totals(db_url: str, workflow_ids: Sequence[str]) -> list[dict[str, Any]]:
    engine = make_engine(db_url)
    try:
        ledger = Ledger(engine)
        return [ledger.task_totals(w) for w in workflow_ids]
    finally:
        engine.dispose()


def agent_over_budget(tokens: float, usd: float, kill: Budget) -> bool:
    return (kill.max_tokens is not None and tokens > kill.max_tokens) or (
        kill.max_usd is not None and usd > kill.max_usd + USD_EPS)


def agent_mode_figures(results: Sequence[AgentResult], books: Sequence[dict[str, Any]], kill: Budget,
                       spirals: Sequence[bool], elapsed_s: float, breaker_on: bool, breaker: BreakerState | None,
                       budget: Budget | None) -> dict[str, Any]:
    n = len(results)
    usd = [r.cost_usd for r in results]
    tokens = [float(r.tokens) for r in results]
    p50, p99 = percentile(usd, 50), percentile(usd, 99)
    limits: dict[str, int] = {}
    for r in results:
        if r.budget.limit_hit:
            limits[r.budget.limit_hit] = limits.get(r.budget.limit_hit, 0) + 1
    endings: dict[str, dict[str, int]] = {"spiral": {}, "no_spiral": {}}
    for r, s in zip(results, spirals, strict=True):
        group = endings["spiral" if s else "no_spiral"]
        group[spiral_ending(r)] = group.get(spiral_ending(r), 0) + 1
    by_spiral = {}
    for label, want in (("spiral", True), ("no_spiral", False)):
        idx = [i for i, s in enumerate(spirals) if s == want]
        if idx:
            t = [tokens[i] for i in idx]
            by_spiral[label] = {"tasks": len(idx), "mean_tokens": round(sum(t) / len(t), 1),
                                "max_tokens": round(max(t)), "mean_usd": round(sum(usd[i] for i in idx) / len(idx), 6),
                                "total_usd": round(sum(usd[i] for i in idx), 4),
                                "mean_llm_calls": round(sum(results[i].llm_calls for i in idx) / len(idx), 2)}
    mismatched = sum(
        b["llm_calls"] != r.llm_calls or b["tokens"] != r.tokens or abs(b["cost_usd"] - r.cost_usd) > 1e-6
        for r, b in zip(results, books, strict=True))
    return {
        "budget": None if budget is None else {"max_tokens": budget.max_tokens, "max_usd": budget.max_usd},
        "breaker_on": breaker_on,
        "tasks": n,
        **_pcts(tokens, 0, "tokens"),
        **_pcts(usd, 6, "usd"),
        "total_usd": round(sum(usd), 4),
        "ledger_total_usd": round(sum(b["cost_usd"] for b in books), 4),
        "p99_p50_usd": round(p99 / p50, 3) if p50 else float("nan"),
        "over_budget": sum(agent_over_budget(r.tokens, r.cost_usd, kill) for r in results),
        "over_budget_ledger": sum(agent_over_budget(b["tokens"], b["cost_usd"], kill) for b in books),
        "ledger_mismatches": mismatched,
        "budget_exceeded": sum(r.status == "budget_exceeded" for r in results),
        "soft_hit": sum(r.budget.soft_at_step is not None for r in results),
        "hard_hit": sum(r.budget.hard_at_step is not None for r in results),
        "limits_hit": dict(sorted(limits.items())),
        "spiral_endings": {k: dict(sorted(v.items())) for k, v in endings.items()},
        "breaker_rejections": sum(r.budget.limit_hit == "breaker" for r in results),
        "breaker_trips": breaker.trips if breaker else 0,
        "breaker_status": breaker.status if breaker else None,
        "mean_llm_calls": round(sum(r.llm_calls for r in results) / n, 2),
        "tasks_with_problems": sum(bool(r.observations) for r in results),
        "problems_top": observation_kinds(cast("Sequence[TicketResult]", results)),
        "statuses": status_counts(cast("Sequence[TicketResult]", results)),
        "elapsed_s": round(elapsed_s, 2),
        "tasks_per_s": round(n / elapsed_s, 2) if elapsed_s else float("nan"),
        "by_spiral": by_spiral,
    }


async def run_agent(agent_name: str, n: int, concurrency: int, override: Budget | None,
                    spiral_rate: float) -> dict[str, Any]:
    agent = load_agent(agent_name)
    temporal = temporal_binary()
    tickets = sample_tickets(n, seed=0)
    kill = override or agent.budget
    run_id = uuid.uuid4().hex[:8]
    budgets: dict[str, Budget | None] = {"uncontrolled": UNLIMITED, "controlled": override}
    queues = {m: f"bench-cost-{agent_name}-{m}-{run_id}" for m in AGENT_MODES}
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="keel-cost-") as tmp_name, contextlib.ExitStack() as services:
        tmp = Path(tmp_name)
        home = tmp / "keel-home"
        extra = {"KEEL_AGENTS": f"agents.{agent_name}"}
        if agent_name == "oncall":
            extra["ONCALL_STATUS_URL"] = services.enter_context(StatusService()).url
        base = agent_task_inputs(agent_name, keel_settings("unused", home), tickets, spiral_rate)
        spirals = [task_traits(inp.sim, f"{agent_name}:{inp.input}").spiral for inp in base]
        log(f"starting the dev server from {temporal} (its output: {tmp / 'server.log'})")
        with inherited_output_to(tmp / "server.log"):
            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=temporal,
                data_converter=pydantic_data_converter,
                search_attributes=cast("Sequence[SearchAttributeKey[Any]]", SEARCH_ATTRIBUTE_KEYS),
            )
        try:
            client = env.client
            address = client.service_client.config.target_host
            log(f"dev server on {address}; agent {agent_name}: {n} tasks x {len(AGENT_MODES)} modes, concurrency "
                f"{concurrency}, {sum(spirals)} spiralling tasks")
            argv = [sys.executable, "-m", "bench.cost", "--serve", ",".join(queues.values())]
            wenv = child_env(tmp, {"TEMPORAL_ADDRESS": address, "KEEL_HOME": str(home), **extra})
            first = queues[AGENT_MODES[0]]
            async with worker_process("keel", argv, wenv, tmp / "keel-worker.log", client, first, READY_LINE) as w:
                for q in list(queues.values())[1:]:
                    await w.wait_ready(client, q, READY_LINE)
                for mode in AGENT_MODES:
                    settings = keel_settings(queues[mode], home)
                    controlled = mode == "controlled"
                    inputs = [inp.model_copy(update={"key": f"{inp.key}-{mode}", "budget": budgets[mode],
                                                     "breaker": controlled}) for inp in base]
                    ids: list[str] = []

                    async def one(inp: AgentInput, settings: KeelSettings = settings,
                                  ids: list[str] = ids) -> AgentResult:
                        handle = await start_agent(client, settings, inp)
                        ids.append(handle.id)
                        res: AgentResult = await handle.result()
                        return res

                    log(f"{mode}: {n} tasks of {agent_name} on {settings.task_queue!r}")
                    _, results, elapsed = await run_concurrent(inputs, concurrency, one)
                    w.cpu_s()  # raises if the worker died
                    breaker = await breaker_state(client, settings.task_queue, agent_name) if controlled else None
                    books = await asyncio.to_thread(ledger_totals, settings.db_url,
                                                    [r.workflow_id for r in results])
                    figures[mode] = agent_mode_figures(results, books, kill, spirals, elapsed, controlled, breaker,
                                                       (override or agent.budget) if controlled else None)
                    f = figures[mode]
                    log(f"{mode}: {elapsed:.1f}s, total ${f['total_usd']:.4f}, p95 {f['p95_tokens']:,.0f} tokens, "
                        f"over budget {f['over_budget']} (ledger {f['over_budget_ledger']}), statuses {f['statuses']}")
        finally:
            await env.shutdown()

    machine = machine_info(temporal)
    unc, ctl = figures["uncontrolled"]["total_usd"], figures["controlled"]["total_usd"]
    return {
        "agent": agent_name,
        "tasks": n,
        "concurrency": concurrency,
        "spiral_rate": spiral_rate,
        "sim_seed": base[0].sim.seed,
        "spiralling_tasks": sum(spirals),
        "kill_budget": {"max_tokens": kill.max_tokens, "max_usd": kill.max_usd, "soft_ratio": kill.soft_ratio,
                        "hard_ratio": kill.hard_ratio, "override": override is not None},
        "expected_tokens": agent.expected_tokens,
        "modes": figures,
        "savings": round(1 - ctl / unc, 4) if unc else float("nan"),
        "targets": {"zero_over_budget": {
            "target": "0 controlled tasks over the kill budget, by their results and by their ledger rows",
            "value": {"results": figures["controlled"]["over_budget"],
                      "ledger": figures["controlled"]["over_budget_ledger"]},
            "met": figures["controlled"]["over_budget"] == 0 and figures["controlled"]["over_budget_ledger"] == 0}},
        "machine": machine,
        "command": machine["command"],
    }


def agent_report(r: dict[str, Any]) -> str:
    m, modes_ = r["machine"], r["modes"]
    names_ = list(modes_)
    kill = r["kill_budget"]
    kill_text = (f"{_fmt(kill['max_tokens'], ',')} tokens / ${_fmt(kill['max_usd'], 'g')}"
                 f" ({'override' if kill['override'] else 'the agent' + chr(39) + 's own'})")

    def row(label: str, key: str, fmt: str, scale: float = 1.0) -> str:
        vals = [modes_[n][key] for n in names_]
        cells = [_fmt(v * scale if scale != 1 and isinstance(v, int | float) else v, fmt) for v in vals]
        return f"  {label:30}" + "".join(f"{c:>16}" for c in cells)

    t = r["targets"]["zero_over_budget"]
    lines = [
        f"Keel cost benchmark on an agent: {r['agent']} on the generic agent workflow (KeelAgent)",
        f"  command:   {r['command']}",
        f"  machine:   {m['cpu_model']}, {m['cores']} cores; {m['platform']}",
        f"  versions:  Python {m['python']}, temporalio {m['temporalio']}, {m['temporal_cli']}",
        f"  workload:  {r['tasks']} tasks per mode, concurrency {r['concurrency']}, sim model at zero latency, "
        f"spiral rate {r['spiral_rate']:.0%} (seed {r['sim_seed']}: {r['spiralling_tasks']} spiralling tasks, the "
        "same in both modes)",
        f"  kill budget: {kill_text}; soft {kill['soft_ratio']:.0%}, hard {kill['hard_ratio']:.0%}; "
        f"breaker trips at 2 x {r['expected_tokens']:,} expected tokens",
        "  uncontrolled: no budget, no breaker; controlled: the budget above and the agent's cost breaker",
        "",
        f"  {'':30}" + "".join(f"{n:>16}" for n in names_),
        row("tokens p50", "p50_tokens", ",.0f"),
        row("tokens p95", "p95_tokens", ",.0f"),
        row("tokens p99", "p99_tokens", ",.0f"),
        row("tokens max", "max_tokens", ",.0f"),
        row("$ per task p50", "p50_usd", ".5f"),
        row("$ per task p95", "p95_usd", ".5f"),
        row("$ per task max", "max_usd", ".5f"),
        row("$ total", "total_usd", ".4f"),
        row("$ total, ledger rows", "ledger_total_usd", ".4f"),
        row("p99/p50 cost", "p99_p50_usd", ".2f"),
        row("over the kill budget", "over_budget", "d"),
        row("  by the ledger rows", "over_budget_ledger", "d"),
        row("ledger != result", "ledger_mismatches", "d"),
        row("killed (budget_exceeded)", "budget_exceeded", "d"),
        row("soft threshold hit", "soft_hit", "d"),
        row("hard threshold hit", "hard_hit", "d"),
        row("breaker rejections", "breaker_rejections", "d"),
        row("breaker trips", "breaker_trips", "d"),
        row("mean LLM calls", "mean_llm_calls", ".2f"),
        row("tasks/s", "tasks_per_s", ".1f"),
        "",
        "  by group: mean tokens / max tokens / mean $ / mean LLM calls",
        *(f"  {label + ' (' + str(modes_[names_[0]]['by_spiral'][label]['tasks']) + ')':30}" + "".join(
            f"{g['mean_tokens']:,.0f}/{g['max_tokens']:,}/{g['mean_usd']:.4f}/{g['mean_llm_calls']:.1f}".rjust(32)
            for g in (modes_[n]["by_spiral"][label] for n in names_))
          for label in ("spiral", "no_spiral") if label in modes_[names_[0]]["by_spiral"]),
        "",
        "  how tasks ended: kill, breaker, or answered by_itself / after the wrap_up or answer_now notice"
        " (+step_cap: at the step cap):",
        *(f"    {n:14} {label:10} {_fmt(modes_[n]['spiral_endings'][label], '')}"
          for n in names_ for label in ("spiral", "no_spiral")),
        "  statuses:",
        *(f"    {n:14} {_fmt(modes_[n]['statuses'], '')}" for n in names_),
        "",
        f"  budgets cut total $ by {100 * r['savings']:.1f}% (controlled vs uncontrolled)",
        f"  over the kill budget, controlled: {t['value']['results']} by results, {t['value']['ledger']} by the "
        f"ledger (target 0: {'met' if t['met'] else 'NOT met'})",
        "  over the kill budget counts tokens > max_tokens or $ > max_usd; for uncontrolled, what would have "
        "crossed it.",
    ]
    lines += [f"  problems in {n}: {modes_[n]['problems_top']}" for n in names_ if modes_[n]["problems_top"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tickets", "--tasks", dest="tickets", type=int, default=None,
                        help="sample tickets (tasks) per mode (default 1000; with --agent 300)")
    parser.add_argument("--concurrency", type=int, default=40, help="tickets in flight (default 40)")
    parser.add_argument("--agent", default=None, metavar="NAME",
                        help="run the experiment as tasks of this built-in agent (agents/NAME) on KeelAgent: "
                             "support_desk (the sample tickets) or oncall")
    parser.add_argument("--spiral-rate", type=float, default=SPIRAL_RATE,
                        help=f"share of tasks the sim makes spiral (default {SPIRAL_RATE})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--budget-tokens", type=int, default=None,
                        help=f"override max_tokens of the budgeted modes (default {DEFAULT_BUDGET.max_tokens}; with "
                             "--agent the agent's)")
    parser.add_argument("--budget-usd", type=float, default=None,
                        help=f"override max_usd of the budgeted modes (default {DEFAULT_BUDGET.max_usd}; with "
                             "--agent the agent's)")
    parser.add_argument("--soft-ratio", type=float, default=None,
                        help=f"override soft_ratio (wrap up) of the budgeted modes (default "
                        f"{DEFAULT_BUDGET.soft_ratio})")
    parser.add_argument("--hard-ratio", type=float, default=None,
                        help=f"override hard_ratio (answer now) of the budgeted modes (default "
                        f"{DEFAULT_BUDGET.hard_ratio})")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        asyncio.run(serve([q for q in args.serve.split(",") if q]))
        return 0
    if args.tickets is None:
        args.tickets = 300 if args.agent else 1000
    if args.tickets < 1 or args.concurrency < 1:
        parser.error("--tickets and --concurrency must be at least 1")
    if not 0 <= args.spiral_rate <= 1:
        parser.error("--spiral-rate must be between 0 and 1")
    base = DEFAULT_BUDGET
    if args.agent is not None:
        try:
            base = load_agent(args.agent).budget
        except Exception as e:  # no such package, or its agent does not load
            parser.error(f"--agent {args.agent}: {e}")
    updates = {k: v for k, v in (("max_tokens", args.budget_tokens), ("max_usd", args.budget_usd),
                                 ("soft_ratio", args.soft_ratio), ("hard_ratio", args.hard_ratio)) if v is not None}
    override = None
    if updates:
        try:
            override = Budget.model_validate({**base.model_dump(), **updates})
        except ValidationError as e:
            parser.error(f"invalid budget override: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}")

    if args.agent is not None:
        return run_benchmark(lambda: run_agent(args.agent, args.tickets, args.concurrency, override, args.spiral_rate),
                             args.json, agent_report)
    return run_benchmark(lambda: run(args.tickets, args.concurrency, override, args.spiral_rate), args.json, report)


if __name__ == "__main__":
    hard_exit(main())
