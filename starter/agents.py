"""Starting any registered agent (`keel run AGENT "input"`): the generic agent workflow, by name.

The client needs neither the agent's code nor a database: the worker that registered the agent
checks the task, and a task naming an agent no worker has fails with that reason.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, TypeVar

from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from keel import names
from keel.orchestration import OrchestratorInput, OrchestratorResult, SwarmInput, SwarmResult
from keel.pricing import price_for, user_prices
from keel.settings import KeelSettings
from keel.supervision import SupervisorInput, SupervisorResult
from keel.types import AgentInput, AgentResult, ModelSpec, Progress, Tier

SA_CUSTOMER = SearchAttributeKey.for_keyword(names.SA_CUSTOMER)
SA_TASK_TYPE = SearchAttributeKey.for_keyword(names.SA_TASK_TYPE)
SA_FEATURE = SearchAttributeKey.for_keyword(names.SA_FEATURE)
SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_AWAITING = SearchAttributeKey.for_bool(names.SA_AWAITING_APPROVAL)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]+")


def command_models(settings: KeelSettings, model: str | None = None) -> dict[Tier, ModelSpec] | None:
    """The one place a command's models come from: its `--model` (every tier), else KEEL_MODEL_SMALL /
    KEEL_MODEL_LARGE, only those the user set (their defaults force nothing), else None: every agent runs
    on its own models. An unpriced model is refused here (UnpricedModelError), before any task starts."""
    if model:
        spec = ModelSpec.parse(model)
        price_for(spec.provider, spec.model)
        return {"small": spec, "large": spec}
    chosen: dict[Tier, ModelSpec] = {}
    if "model_small" in settings.model_fields_set:
        chosen["small"] = ModelSpec.parse(settings.model_small)
    if "model_large" in settings.model_fields_set:
        chosen["large"] = ModelSpec.parse(settings.model_large)
    for spec in chosen.values():
        price_for(spec.provider, spec.model)
    return chosen or None


Startable = TypeVar("Startable", AgentInput, OrchestratorInput, SupervisorInput, SwarmInput)


def as_configured(settings: KeelSettings, inp: Startable) -> Startable:
    """A task as this process starts it (every start_* below): the models of KEEL_MODEL_SMALL/LARGE for
    the tiers the input does not set itself (a pattern: for every child), and the user's prices
    (KEEL_PRICES) pinned in it, so its workflow (and its replay) prices with what it started with, and its
    model calls' heartbeat timeout (KEEL_LLM_HEARTBEAT_TIMEOUT_S) unless it sets one (a pattern: for every child)."""
    tiers = command_models(settings) or {}
    pinned = {**user_prices(), **inp.prices}
    heartbeat = inp.llm_heartbeat_timeout_s or settings.llm_heartbeat_timeout_s  # KEEL_LLM_HEARTBEAT_TIMEOUT_S
    if isinstance(inp, SwarmInput):  # `models`: one model per peer for every tier, when given
        models = {**tiers, **(inp.tier_models or {})} or None
        return inp.model_copy(update={"tier_models": models, "prices": pinned, "llm_heartbeat_timeout_s": heartbeat})
    models = {**tiers, **(inp.models or {})} or None
    return inp.model_copy(update={"models": models, "prices": pinned, "llm_heartbeat_timeout_s": heartbeat})


async def start_once(client: Client, workflow: str, arg: Any, *, key: str, id: str, result_type: type[Any],
                     **options: Any) -> WorkflowHandle[Any, Any]:
    """Start a workflow; with an idempotency key (`key`: a business key, `keel run --key`) exactly once: when a
    run of that id exists, running (the id conflicts) or closed (REJECT_DUPLICATE: whatever its end, it is
    not run again), nothing starts and the existing run's handle is returned (see `is_existing`), so a
    re-submitted input never acts twice. (Not USE_EXISTING: its answer does not say whether it started.)"""
    if not key:
        return await client.start_workflow(workflow, arg, id=id, result_type=result_type, **options)
    try:
        return await client.start_workflow(workflow, arg, id=id, result_type=result_type,
                                           id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                                           id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE, **options)
    except WorkflowAlreadyStartedError:  # it runs or ran already: its result is the answer
        return client.get_workflow_handle(id, result_type=result_type)


def is_existing(handle: WorkflowHandle[Any, Any]) -> bool:
    """Whether a start_* handle is of a run that existed (start_once found it) rather than one it started
    (a started run's handle carries the run id of its result)."""
    return handle.result_run_id is None


def agent_workflow_id(inp: AgentInput) -> str:
    """`<agent>-<key>` when the task has a business key, else `<agent>-<random>`."""
    key = _UNSAFE.sub("-", inp.key).strip("-") if inp.key else uuid.uuid4().hex[:12]
    return f"{inp.agent}-{key}"


async def start_agent(client: Client, settings: KeelSettings, inp: AgentInput,
                      workflow_id: str | None = None, shadow: bool = True) -> WorkflowHandle[Any, AgentResult]:
    """Start a task of a registered agent. When the agent has an active shadow (`keel shadow start
    --agent NAME`) and this task falls in its fraction, it starts shadowed: the handle is still the
    production task's."""
    inp = as_configured(settings, inp)
    if shadow:
        from starter.shadow_cli import shadow_agent_task  # shadow_cli imports this module

        shadowed = await shadow_agent_task(client, settings, inp, workflow_id)
        if shadowed is not None:
            return shadowed
    models = " / ".join(dict.fromkeys(m.label for m in (inp.models or {}).values())) or "its own models"
    return await start_once(
        client,
        names.AGENT_WORKFLOW,
        inp,
        key=inp.key,
        id=workflow_id or agent_workflow_id(inp),
        task_queue=settings.task_queue,
        result_type=AgentResult,
        static_summary=f"Agent {inp.agent} · tenant {inp.tenant} · {models}",
        search_attributes=TypedSearchAttributes([
            SearchAttributePair(SA_CUSTOMER, inp.tenant),
            SearchAttributePair(SA_TASK_TYPE, inp.agent),
            SearchAttributePair(SA_FEATURE, inp.feature or inp.agent),
            SearchAttributePair(SA_STATUS, "running"),
            SearchAttributePair(SA_AWAITING, False),
        ]),
    )


async def run_agent(client: Client, settings: KeelSettings, inp: AgentInput) -> AgentResult:
    handle = await start_agent(client, settings, inp)
    return await handle.result()


def orchestration_id(inp: OrchestratorInput) -> str:
    key = _UNSAFE.sub("-", inp.key).strip("-") if inp.key else uuid.uuid4().hex[:12]
    return f"{inp.name}-{key}"


async def start_orchestration(client: Client, settings: KeelSettings, inp: OrchestratorInput,
                              workflow_id: str | None = None) -> WorkflowHandle[Any, OrchestratorResult]:
    """Start the orchestrator pattern over registered agents (`keel orchestrate`)."""
    inp = as_configured(settings, inp)
    plan = f"planner {inp.planner}" if inp.planner else ", ".join(dict.fromkeys(t.agent for t in inp.tasks))
    return await start_once(
        client,
        names.ORCHESTRATOR_WORKFLOW,
        inp,
        key=inp.key,
        id=workflow_id or orchestration_id(inp),
        task_queue=settings.task_queue,
        result_type=OrchestratorResult,
        static_summary=f"Orchestration {inp.name} · {plan}" + (f" → {inp.synthesizer}" if inp.synthesizer else ""),
        search_attributes=TypedSearchAttributes([
            SearchAttributePair(SA_CUSTOMER, inp.tenant),
            SearchAttributePair(SA_TASK_TYPE, inp.name),
            SearchAttributePair(SA_FEATURE, inp.feature or inp.name),
            SearchAttributePair(SA_STATUS, "running"),
        ]),
    )


def swarm_id(inp: SwarmInput) -> str:
    key = _UNSAFE.sub("-", inp.key).strip("-") if inp.key else uuid.uuid4().hex[:12]
    return f"{inp.name}-{key}"


async def start_swarm(client: Client, settings: KeelSettings, inp: SwarmInput,
                      workflow_id: str | None = None) -> WorkflowHandle[Any, SwarmResult]:
    """Start the swarm pattern: `inp.peers` copies of one agent and a vote on a field (`keel vote`)."""
    inp = as_configured(settings, inp)
    return await start_once(
        client,
        names.SWARM_AGENTS_WORKFLOW,
        inp,
        key=inp.key,
        id=workflow_id or swarm_id(inp),
        task_queue=settings.task_queue,
        result_type=SwarmResult,
        static_summary=f"Swarm {inp.name} · {inp.peers} x {inp.agent} · vote on {inp.field}",
        search_attributes=TypedSearchAttributes([
            SearchAttributePair(SA_CUSTOMER, inp.tenant),
            SearchAttributePair(SA_TASK_TYPE, inp.name),
            SearchAttributePair(SA_FEATURE, inp.feature or inp.name),
            SearchAttributePair(SA_STATUS, "running"),
        ]),
    )


def supervision_id(inp: SupervisorInput) -> str:
    key = _UNSAFE.sub("-", inp.key).strip("-") if inp.key else uuid.uuid4().hex[:12]
    return f"{inp.name}-{key}"


async def start_supervision(client: Client, settings: KeelSettings, inp: SupervisorInput,
                            workflow_id: str | None = None) -> WorkflowHandle[Any, SupervisorResult]:
    """Start the supervisor pattern: a worker agent's answer checked by rules and a reviewer agent."""
    inp = as_configured(settings, inp)
    checks = f"{len(inp.rules)} rules" + (f" + reviewer {inp.reviewer}" if inp.reviewer else "")
    return await start_once(
        client,
        names.SUPERVISOR_WORKFLOW,
        inp,
        key=inp.key,
        id=workflow_id or supervision_id(inp),
        task_queue=settings.task_queue,
        result_type=SupervisorResult,
        static_summary=f"Supervision {inp.name} · worker {inp.worker} · {checks} · up to {inp.max_rounds} rounds",
        search_attributes=TypedSearchAttributes([
            SearchAttributePair(SA_CUSTOMER, inp.tenant),
            SearchAttributePair(SA_TASK_TYPE, inp.name),
            SearchAttributePair(SA_FEATURE, inp.feature or inp.name),
            SearchAttributePair(SA_STATUS, "running"),
        ]),
    )


WAITING_FOR_PEOPLE = ("awaiting_approval", "awaiting_human")
"""Progress statuses of a task that waits for a person (an approval, a human's resolution)."""


async def agent_progress(client: Client, workflow_id: str) -> Progress:
    """A running task's progress query."""
    p: Progress = await client.get_workflow_handle(workflow_id).query(names.PROGRESS_QUERY, result_type=Progress)
    return p
