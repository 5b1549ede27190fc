"""What the cost controls buy on a built-in agent: the same tasks uncontrolled, then with budgets and the breaker.

    python bench/cost.py [--agent support_desk|oncall] [--tasks 300] [--concurrency 40] [--spiral-rate 0.15]
                         [--budget-tokens N] [--budget-usd X] [--soft-ratio R] [--hard-ratio R] [--json]

N tasks of a built-in agent (`--agent`, default support_desk: the support desk's sample tickets of
agents/support_desk/data.py, the customer as tenant and the request's first line; oncall: questions
about the demo services of agents/oncall/status_service.py, served by this process) on the `sim` model
(zero latency, seed 0), through the generic agent workflow (KeelAgent), in one invocation on one local
dev server with one Keel worker subprocess, two ways, one after the other:

- `uncontrolled`: no budget, no circuit breaker;
- `controlled`:   the agent's own budget (or the override), its cost circuit breaker on.

Both see the same tasks and the same spirals: the sim draws them from the seed and each task's input
(`--spiral-rate`, default 15%). Each mode has a task queue of its own (the worker serves both), so the
controlled mode's breaker (its id is scoped by task queue) starts fresh.

Per mode: tokens and dollars per task (p50, p95, p99, max), total dollars, tasks over the kill budget
from the results AND from the ledger rows of each task (with the count of tasks whose ledger rows do not
sum to their result; for `uncontrolled`, what would have crossed it), the thresholds hit, how the
spiralling tasks ended (by themselves, after the wrap-up notice, after the answer-now notice, killed,
step cap, breaker) and breaker rejections.

`--budget-tokens`, `--budget-usd`, `--soft-ratio`, `--hard-ratio` override the agent's budget in
`controlled` (also the kill budget the over-budget counts are against), to try a tuning of the agent's
budget without editing it. `--tickets` is another name for `--tasks`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import uuid
from collections.abc import Sequence
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
from agents.support_desk.data import SampleTicket, sample_tickets
from bench.throughput import (
    SEARCH_ATTRIBUTE_KEYS,
    SPIRAL_RATE,
    BenchError,
    agent_inputs,
    child_env,
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
    worker_process,
)
from keel import registry
from keel.agent import Agent
from keel.breaker import BREAKER_STATE_QUERY, BreakerState, breaker_workflow_id
from keel.settings import KeelSettings
from keel.types import AgentInput, AgentResult, Budget
from starter.agents import start_agent

DEFAULT_AGENT = "support_desk"
READY_LINE = "keel cost worker on task queues"
MODES = ("uncontrolled", "controlled")
UNCONTROLLED = Budget(max_tokens=None, max_usd=None)
ONCALL_ASKS = ("Is the {s} service healthy?", "{s} looks slow to users, what is its error rate?",
               "Which version of {s} is running, and is it ok?", "The {s} service is down, please fix it.")
USD_EPS = 1e-9


# --- figures --------------------------------------------------------------------------------


def _pcts(values: Sequence[float], digits: int, unit: str) -> dict[str, float]:
    return {
        f"p50_{unit}": round(percentile(values, 50), digits),
        f"p95_{unit}": round(percentile(values, 95), digits),
        f"p99_{unit}": round(percentile(values, 99), digits),
        f"max_{unit}": round(max(values), digits),
        f"mean_{unit}": round(sum(values) / len(values), digits),
    }


def observation_kinds(results: Sequence[AgentResult], top: int = 5) -> dict[str, int]:
    """The commonest problems the agents ran into (tool errors, invalid outputs), by their first words:
    on the sim with no failure rates set there should be none."""
    counts: dict[str, int] = {}
    for r in results:
        for o in r.observations:
            kind = o.split(":", 1)[0][:60]
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


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


# --- the tasks --------------------------------------------------------------------------------


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
        "problems_top": observation_kinds(results),
        "statuses": status_counts(results),
        "elapsed_s": round(elapsed_s, 2),
        "tasks_per_s": round(n / elapsed_s, 2) if elapsed_s else float("nan"),
        "by_spiral": by_spiral,
    }


# --- the run --------------------------------------------------------------------------------


async def breaker_state(client: Client, task_queue: str, task_type: str) -> BreakerState | None:
    """The mode's breaker at the end of its run; None if it never started (breaker off)."""
    handle = client.get_workflow_handle(breaker_workflow_id(task_type, task_queue))
    try:
        state: BreakerState = await handle.query(BREAKER_STATE_QUERY, result_type=BreakerState)
    except Exception:  # not found: no task asked this breaker
        return None
    return state


async def run(agent_name: str, n: int, concurrency: int, override: Budget | None,
              spiral_rate: float = SPIRAL_RATE) -> dict[str, Any]:
    agent = load_agent(agent_name)
    temporal = temporal_binary()
    tickets = sample_tickets(n, seed=0)
    kill = override or agent.budget
    run_id = uuid.uuid4().hex[:8]
    budgets: dict[str, Budget | None] = {"uncontrolled": UNCONTROLLED, "controlled": override}
    queues = {m: f"bench-cost-{agent_name}-{m}-{run_id}" for m in MODES}
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
            log(f"dev server on {address}; agent {agent_name}: {n} tasks x {len(MODES)} modes, concurrency "
                f"{concurrency}, {sum(spirals)} spiralling tasks")
            argv = [sys.executable, "-m", "bench.cost", "--serve", ",".join(queues.values())]
            wenv = child_env(tmp, {"TEMPORAL_ADDRESS": address, "KEEL_HOME": str(home), **extra})
            first = queues[MODES[0]]
            async with worker_process("keel", argv, wenv, tmp / "keel-worker.log", client, first, READY_LINE) as w:
                for q in list(queues.values())[1:]:
                    await w.wait_ready(client, q, READY_LINE)
                for mode in MODES:
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
    parser.add_argument("--agent", default=DEFAULT_AGENT, metavar="NAME",
                        help="the built-in agent (agents/NAME) whose tasks run on KeelAgent: support_desk (the "
                             f"sample tickets) or oncall (default {DEFAULT_AGENT})")
    parser.add_argument("--tasks", "--tickets", dest="tasks", type=int, default=300,
                        help="tasks per mode (default 300)")
    parser.add_argument("--concurrency", type=int, default=40, help="tasks in flight (default 40)")
    parser.add_argument("--spiral-rate", type=float, default=SPIRAL_RATE,
                        help=f"share of tasks the sim makes spiral (default {SPIRAL_RATE})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--budget-tokens", type=int, default=None,
                        help="override max_tokens of the controlled mode (default: the agent's)")
    parser.add_argument("--budget-usd", type=float, default=None,
                        help="override max_usd of the controlled mode (default: the agent's)")
    parser.add_argument("--soft-ratio", type=float, default=None,
                        help="override soft_ratio (wrap up) of the controlled mode (default: the agent's)")
    parser.add_argument("--hard-ratio", type=float, default=None,
                        help="override hard_ratio (answer now) of the controlled mode (default: the agent's)")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        asyncio.run(serve([q for q in args.serve.split(",") if q]))
        return 0
    if args.tasks < 1 or args.concurrency < 1:
        parser.error("--tasks and --concurrency must be at least 1")
    if not 0 <= args.spiral_rate <= 1:
        parser.error("--spiral-rate must be between 0 and 1")
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

    return run_benchmark(lambda: run(args.agent, args.tasks, args.concurrency, override, args.spiral_rate),
                         args.json, report)


if __name__ == "__main__":
    hard_exit(main())
