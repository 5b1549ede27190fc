"""SupportTicketWorkflow: one support ticket as a durable workflow (see ticket_pipeline for the steps)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributeUpdate

with workflow.unsafe.imports_passed_through():
    from keel import names
    from keel.breaker import (
        BREAKER_ADMIT_ACTIVITY,
        BREAKER_RECORD_SIGNAL,
        AdmitDecision,
        AdmitRequest,
        BreakerConfig,
        UsageReport,
        breaker_workflow_id,
    )
    from keel.metrics import ticket_input_hash
    from keel.policy import APPROVALS, DEFAULT_POLICY, EXPECTED_TOKENS, budget_for
    from keel.types import (
        ApprovalDecision,
        ApprovalPolicy,
        ApprovalRecord,
        HumanResolution,
        PendingAction,
        Progress,
        TaskContext,
        TicketInput,
        TicketResult,
    )

from workflows.agent_loop import AgentRunner, Calls, TemporalCalls, show_step
from workflows.approval import ApprovalGate
from workflows.ticket_pipeline import handle_ticket

SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_TOKENS = SearchAttributeKey.for_int(names.SA_TOKENS)
SA_COST = SearchAttributeKey.for_float(names.SA_COST_USD)
SA_BUDGET = SearchAttributeKey.for_keyword(names.SA_BUDGET)

COST_CONTROLS_PATCH = "keel-cost-controls-v1"
"""Budgets, spiral detection and the circuit breaker change the commands a ticket makes: histories
recorded before them replay on the old path."""
GUARDRAILS_PATCH = "keel-guardrails-v1"
"""Layer 2 checks, approvals that pause the task, the output filter and the human hold (they change
which tool calls run and add timers), and usage reported to the breaker by the worker, batched, from
the routing activity (before, the workflow signalled the breaker itself: one more round trip per
task). One patch for both: every patch costs each task a marker and a search-attribute upsert."""


def make_runner(inp: TicketInput, workflow_id: str, calls: Calls, controls: bool = True,
                parent_workflow_id: str = "") -> AgentRunner:
    policy = DEFAULT_POLICY
    task = TaskContext(
        workflow_id=workflow_id,
        customer=inp.customer_id or "unknown",
        ticket_id=inp.ticket_id,
        feature=inp.feature,
        task_type=inp.task_type,
        prompt_version=inp.prompt_version,
        input_hash=ticket_input_hash(inp.customer_id, inp.text),
        parent_workflow_id=parent_workflow_id,
    )
    tiers = policy.tiers if inp.tiering else dict.fromkeys(policy.tiers, "large")
    runner = AgentRunner(
        calls,
        task,
        models={"small": inp.small_model, "large": inp.large_model},
        tiers=tiers,  # type: ignore[arg-type]
        sim=inp.sim,
        max_output_tokens=policy.max_output_tokens,
        budget=(inp.budget or budget_for(inp.task_type)) if controls else None,
        controls=controls,
        fallbacks=inp.fallbacks,
    )
    runner.dry_run = inp.dry_run
    return runner


def approval_policy_of(inp: TicketInput) -> ApprovalPolicy:
    """A task submitted without an approval policy (an older client, a hand-made input) names no one
    to wait for: its proposals go to the human queue, as before approvals existed."""
    return inp.approval or APPROVALS.model_copy(update={"mode": "escalate"})


def _budget_upsert(pinned: bool) -> Callable[[str], None]:
    """Mid-task KeelBudget updates. Pinned tasks (pipeline 3) write it only when the hard limit fires
    (the task is made to answer now): the soft state, which most tickets reach, is written with the
    task's final figures, each upsert being a visibility write on the server. Older histories wrote
    every change."""

    def upsert(state: str) -> None:
        if not pinned or state == "hard":
            workflow.upsert_search_attributes([SA_BUDGET.value_set(state)])

    return upsert


def breaker_config(task_type: str, scope: str) -> BreakerConfig:
    return BreakerConfig(task_type=task_type, scope=scope, expected_tokens=EXPECTED_TOKENS.get(task_type, 5_000))


@workflow.defn(name=names.SUPPORT_TICKET_WORKFLOW)
class SupportTicketWorkflow:
    def __init__(self) -> None:
        self._runner: AgentRunner | None = None
        self._gate = ApprovalGate(APPROVALS)
        self._holding = False
        self._resolution: HumanResolution | None = None

    @workflow.query(name=names.PROGRESS_QUERY)
    def progress(self) -> Progress:
        return self._runner.progress if self._runner else Progress()

    @workflow.query(name=names.PENDING_ACTION_QUERY)
    def pending_action(self) -> PendingAction | None:
        return self._gate.pending

    # -- approvals (layer 1): workflows.approval ---------------------------------------------
    @workflow.signal(name=names.APPROVAL_SIGNAL)
    def approval(self, d: ApprovalDecision) -> None:
        self._gate.signal(d)

    @workflow.update(name=names.DECIDE_UPDATE)
    def decide(self, d: ApprovalDecision) -> ApprovalRecord:
        return self._gate.record(d, None)

    @decide.validator
    def _validate_decide(self, d: ApprovalDecision) -> None:
        self._gate.validate(d)

    # -- the human hold (layer 4) ----------------------------------------------------------
    @workflow.signal(name=names.RESOLVE_SIGNAL)
    def resolve(self, r: HumanResolution) -> None:
        if self._holding and self._resolution is None:
            self._resolution = r

    @workflow.run
    async def run(self, inp: TicketInput) -> TicketResult:
        # Every patch is asked for here, before the first await: a patch marker recorded after a
        # local activity can land in a later workflow task than the activity's own marker (when the
        # activity outlasts the task's heartbeat), and on replay `patched` would then be asked before
        # the marker is known (found by the guardrails property test, which replays every example).
        # The newest patch implies the older ones and is the only one a new task records: each patch
        # costs a marker and a search-attribute upsert (TemporalChangeVersion) per task.
        pinned = inp.pipeline_version >= names.PIPELINE_VERSION
        if pinned:
            # The input pins the pipeline: no patch marker and no TemporalChangeVersion upsert, two
            # events and a visibility write per task that bench/throughput.py measured on the server.
            guardrails = controls = True
        else:
            guardrails = workflow.patched(GUARDRAILS_PATCH)
            controls = guardrails or workflow.patched(COST_CONTROLS_PATCH)
        parent = workflow.info().parent
        runner = make_runner(inp, workflow.info().workflow_id, TemporalCalls(), controls,
                             parent.workflow_id if parent is not None else "")
        self._runner = self._gate.runner = runner
        runner.on_step = show_step
        admit: AdmitDecision | None = None
        info = workflow.info()
        breaker_id = breaker_workflow_id(inp.task_type, info.task_queue)
        wants_breaker = controls and inp.breaker and bool(inp.text.strip())
        if controls:
            runner.on_budget_state = _budget_upsert(pinned)
        if guardrails:
            runner.clock = workflow.now
            self._gate.policy = approval_policy_of(inp)
            runner.arm_guardrails(DEFAULT_POLICY.max_refund, self._gate.request, self._gate.policy.mode)
            if wants_breaker:
                # The breaker answers inside the task's first model call (no activity of its own); a
                # refusal ends the task before any model is called (BreakerRefused).
                runner.admit = AdmitRequest(config=breaker_config(inp.task_type, info.task_queue),
                                            workflow_id=info.workflow_id)
                runner.breaker_id = breaker_id
        elif wants_breaker:
            # Before guardrails: a local activity asked the breaker before the pipeline started.
            admit = await workflow.execute_local_activity(
                BREAKER_ADMIT_ACTIVITY,
                AdmitRequest(config=breaker_config(inp.task_type, info.task_queue), workflow_id=info.workflow_id),
                result_type=AdmitDecision,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=10, maximum_interval=timedelta(seconds=10)),
            )
        skip = None if admit is None or admit.admitted else admit.reason
        result = await handle_ticket(runner, inp, DEFAULT_POLICY, skip_reason=skip)
        if guardrails:
            result.approvals = self._gate.records
            if inp.hold_for_human and result.route == "human":
                result = await self._hold(result)

        updates: list[SearchAttributeUpdate[Any]] = [
            SA_STATUS.value_set(result.status),
            SA_TOKENS.value_set(result.tokens),
            SA_COST.value_set(result.cost_usd),
        ]
        if controls:
            updates.append(SA_BUDGET.value_set(result.budget.state if not result.budget.limit_hit
                                               else f"limit:{result.budget.limit_hit}"))
        # Search attributes change when something a user filters on changes (customer, task type,
        # feature and "running" are set by the client at start).
        workflow.upsert_search_attributes(updates)
        admit = runner.admission if guardrails else admit
        if admit is not None and admit.admitted and runner.report_to is None:
            # Probes (and histories recorded before batching) report exactly once, from here.
            await workflow.get_external_workflow_handle(breaker_id).signal(
                BREAKER_RECORD_SIGNAL,
                UsageReport(workflow_id=result.workflow_id, tokens=result.tokens, cost_usd=result.cost_usd,
                            probe=admit.probe),
            )
        return result

    async def _hold(self, result: TicketResult) -> TicketResult:
        """Escalated: in the human queue; the task completes when a human resolves it (no timeout)."""
        runner = self._runner
        assert runner is not None
        self._holding = True
        runner.progress.status = "awaiting_human"
        workflow.upsert_search_attributes([SA_STATUS.value_set("awaiting_human")])
        await workflow.wait_condition(lambda: self._resolution is not None)
        r = self._resolution
        assert r is not None
        runner.decide("resolved", f"by {r.resolver}: {r.resolution}")
        runner.progress.status = "resolved_by_human"
        return result.model_copy(update={"status": "resolved_by_human", "resolution": r,
                                         "reason": f"{result.reason}; resolved by {r.resolver}: {r.resolution}",
                                         "decisions": runner.decisions})
