"""Wiring only: which workflows and activities run on which task queue, with what limits."""

from __future__ import annotations

import concurrent.futures
import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.agent_tools import AgentToolActivities, FinishActivities
from activities.alerts import TaskObserver
from activities.breaker import BreakerActivities, UsageReporter
from activities.db import init_db, make_engine
from activities.ledger import Ledger
from activities.llm import LlmActivities
from activities.patterns import PatternActivities
from activities.providers.anthropic_provider import AnthropicProvider
from activities.providers.base import Provider
from activities.providers.openai_provider import OpenAIProvider
from activities.providers.recording import Traffic
from activities.providers.sim import SimProvider
from activities.ratelimit import RateLimiter
from activities.shadow import ShadowActivities
from activities.tenant_budgets import TenantLimiter
from activities.tracing import Tracing
from keel import registry
from keel.agent import Agent
from keel.pricing import load_prices
from keel.settings import KeelSettings
from keel.tenant_budgets import parse_tenant_budgets
from workflows.registry import WORKFLOWS

# `keel` and pydantic are pure: sharing them with the sandbox saves re-importing them per workflow run.
STRICT_SANDBOX = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules("keel", "pydantic", "pydantic_core")
)
"""Temporal's isolation for Keel's workflow modules: the sandbox imports `workflows` afresh for every
workflow run, so its restrictions (no clock, randomness, I/O or threads outside the Temporal APIs) also
cover what those modules imported. The test suite runs every workflow this way (KEEL_WORKFLOW_SANDBOX)."""

SANDBOX = SandboxedWorkflowRunner(restrictions=STRICT_SANDBOX.restrictions.with_passthrough_modules("workflows"))
"""The workers' default: `workflows` imported once per worker and shared with every run, like `keel`.
Each run still executes inside the sandbox (its own globals; imports at run time restricted), but the
modules' own references are not re-checked per run: that check is STRICT_SANDBOX's, in the tests.
Measured (bench/throughput.py, side by side): the per-run import of a workflow's module, with
code the interpreter had to warm up again each time, cost about 10% of the worker's CPU. The modules
hold no mutable state (constants only): nothing leaks from one run to the next."""


def sandbox_for(settings: KeelSettings) -> SandboxedWorkflowRunner:
    return STRICT_SANDBOX if settings.workflow_sandbox == "strict" else SANDBOX


def tune_gc(settings: KeelSettings) -> None:
    """Once the worker has loaded everything: see KeelSettings.worker_gc_threshold."""
    if settings.worker_gc_threshold:
        gc.collect()
        gc.freeze()
        gc.set_threshold(settings.worker_gc_threshold, *gc.get_threshold()[1:])


def default_providers(settings: KeelSettings) -> dict[str, Provider]:
    # The real providers read their keys lazily, at their first call: a worker for the sim model
    # needs no key, and a missing key surfaces as a clear, non-retryable auth error.
    traffic = Traffic.from_settings(settings.record, settings.replay)  # KEEL_RECORD / KEEL_REPLAY (not the sim)
    return {
        "sim": SimProvider(),
        "openai": OpenAIProvider(timeout_s=settings.llm_timeout_s, traffic=traffic),
        "anthropic": AnthropicProvider(timeout_s=settings.llm_timeout_s, traffic=traffic),
    }


def activities_for(
    engine: Engine, providers: dict[str, Provider], client: Client, task_queue: str, settings: KeelSettings,
    reporter: UsageReporter, tracing: Tracing, observer: TaskObserver | None = None,
    agents: Sequence[Agent] = (),
) -> list[Callable[..., Any]]:
    ledger = Ledger(engine)
    breakers = BreakerActivities(client, task_queue, admit_cache_s=settings.breaker_admit_cache_s)
    agent_tools = AgentToolActivities(ledger, tracing)
    limiter = RateLimiter(client, task_queue, settings.rate_limit_table) if settings.rate_limits else None
    return [
        LlmActivities(providers, ledger, breakers, tracing, limiter, tenant_limiter(engine, settings)).llm_call,
        breakers.admit,
        *PatternActivities(engine).all(),
        *ShadowActivities(engine).all(),
        FinishActivities(engine, ledger, reporter, observer, tracing).finish,
        *(act for a in agents for act in agent_tools.for_agent(a)),
    ]


def tenant_limiter(engine: Engine, settings: KeelSettings) -> TenantLimiter | None:
    """The tenant budgets' limiter when KEEL_TENANT_BUDGETS sets any (else no model call pays for it)."""
    budgets = parse_tenant_budgets(settings.tenant_budgets)
    if not budgets:
        return None
    logging.getLogger(__name__).info("tenant budgets (checked before every model call): %s", "; ".join(
        f"{t}: " + ", ".join(f"{k}={v}" for k, v in b.model_dump(exclude_none=True).items() if v != {})
        for t, b in budgets.budgets.items()))
    return TenantLimiter(engine, budgets, hold_s=settings.tenant_budget_hold_s,
                         input_margin=settings.tenant_budget_input_margin)


def agents_for(settings: KeelSettings, agents: Sequence[Agent] = ()) -> list[Agent]:
    """The agents a worker serves: those given, plus the modules named in KEEL_AGENTS, registered in
    this process (the generic workflow and the LLM activity find them there). A module that fails to
    import or defines an invalid agent stops the worker here, before it polls."""
    registry.register(*agents)
    loaded = registry.load(m for m in settings.agents.split(",") if m.strip())
    return [*agents, *(a for a in loaded if a not in agents)]


def build_worker(
    client: Client,
    settings: KeelSettings,
    *,
    task_queue: str | None = None,
    engine: Engine | None = None,
    providers: dict[str, Provider] | None = None,
    extra_activities: list[Callable[..., Any]] | None = None,
    reporter: UsageReporter | None = None,
    tracing: Tracing | None = None,
    observer: TaskObserver | None = None,
    agents: Sequence[Agent] = (),
) -> Worker:
    """`reporter`: pass one to flush it (`aclose`) when the worker stops; else one is made here.
    `tracing`: the activities' spans (the workflow spans come from the client's TracingInterceptor).
    `observer`: metrics and behavioral alerts at the end of each task; default: from settings, recording
    into the process's metrics (served by `python -m workers`)."""
    load_prices(settings.prices)  # the user's prices (KEEL_PRICES), read here, before any workflow runs
    if engine is None:
        engine = make_engine(settings.db_url)
        init_db(engine)
    queue = task_queue or settings.task_queue
    reporter = reporter or UsageReporter(client, settings.breaker_report_flush_s)
    observer = observer or TaskObserver.from_settings(engine, settings)
    acts = activities_for(engine, providers or default_providers(settings), client, queue, settings, reporter,
                          tracing or Tracing.off(), observer, agents_for(settings, agents))
    return Worker(
        client,
        task_queue=queue,
        workflows=WORKFLOWS,
        activities=[*acts, *(extra_activities or [])],
        activity_executor=concurrent.futures.ThreadPoolExecutor(max_workers=settings.max_concurrent_activities),
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        workflow_runner=sandbox_for(settings),
    )
