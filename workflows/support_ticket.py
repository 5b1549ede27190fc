"""SupportTicketWorkflow: one support ticket as a durable workflow (see ticket_pipeline for the steps)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributeUpdate

with workflow.unsafe.imports_passed_through():
    from core import names
    from core.breaker import (
        BREAKER_ADMIT_ACTIVITY,
        BREAKER_RECORD_SIGNAL,
        AdmitDecision,
        AdmitRequest,
        BreakerConfig,
        UsageReport,
        breaker_workflow_id,
    )
    from core.policy import DEFAULT_POLICY, EXPECTED_TOKENS, budget_for
    from core.types import Progress, TaskContext, TicketInput, TicketResult

# Our own workflow code is imported inside the sandbox (not passed through), so it stays checked.
from workflows.agent_loop import AgentRunner, Calls, TemporalCalls
from workflows.ticket_pipeline import handle_ticket

SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_TOKENS = SearchAttributeKey.for_int(names.SA_TOKENS)
SA_COST = SearchAttributeKey.for_float(names.SA_COST_USD)
SA_BUDGET = SearchAttributeKey.for_keyword(names.SA_BUDGET)

COST_CONTROLS_PATCH = "keel-cost-controls-v1"
"""Budgets, spiral detection and the circuit breaker change the commands a ticket makes: histories
recorded before them replay on the old path."""
BATCHED_USAGE_PATCH = "keel-breaker-batched-usage-v1"
"""The worker reports an admitted task's usage to its breaker, batched, from the routing activity;
before, the workflow signalled the breaker itself at the end (one more round trip per task)."""


def make_runner(inp: TicketInput, workflow_id: str, calls: Calls, controls: bool = True) -> AgentRunner:
    policy = DEFAULT_POLICY
    task = TaskContext(
        workflow_id=workflow_id,
        customer=inp.customer_id or "unknown",
        ticket_id=inp.ticket_id,
        feature=inp.feature,
        task_type=inp.task_type,
        prompt_version=inp.prompt_version,
    )
    tiers = policy.tiers if inp.tiering else dict.fromkeys(policy.tiers, "large")
    return AgentRunner(
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


def _show_step(p: Progress) -> None:
    # The Temporal UI's "current details" (read through a query: no command, no history event).
    workflow.set_current_details(f"step {p.step}: {p.action} · {p.tokens:,} tokens · ${p.cost_usd:.4f}")


def breaker_config(task_type: str, scope: str) -> BreakerConfig:
    return BreakerConfig(task_type=task_type, scope=scope, expected_tokens=EXPECTED_TOKENS.get(task_type, 5_000))


@workflow.defn(name=names.SUPPORT_TICKET_WORKFLOW)
class SupportTicketWorkflow:
    def __init__(self) -> None:
        self._runner: AgentRunner | None = None

    @workflow.query(name=names.PROGRESS_QUERY)
    def progress(self) -> Progress:
        return self._runner.progress if self._runner else Progress()

    @workflow.run
    async def run(self, inp: TicketInput) -> TicketResult:
        controls = workflow.patched(COST_CONTROLS_PATCH)
        runner = make_runner(inp, workflow.info().workflow_id, TemporalCalls(), controls)
        self._runner = runner
        runner.on_step = _show_step
        admit: AdmitDecision | None = None
        info = workflow.info()
        if controls:
            runner.on_budget_state = lambda state: workflow.upsert_search_attributes([SA_BUDGET.value_set(state)])
            if inp.breaker and inp.text.strip():
                # A local activity: the decision is recorded in this history without a round trip
                # through the server's activity queue.
                admit = await workflow.execute_local_activity(
                    BREAKER_ADMIT_ACTIVITY,
                    AdmitRequest(config=breaker_config(inp.task_type, info.task_queue), workflow_id=info.workflow_id),
                    result_type=AdmitDecision,
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=RetryPolicy(maximum_attempts=10, maximum_interval=timedelta(seconds=10)),
                )
        skip = None if admit is None or admit.admitted else admit.reason
        if admit is not None and admit.admitted and not admit.probe and workflow.patched(BATCHED_USAGE_PATCH):
            runner.report_to = breaker_workflow_id(inp.task_type, info.task_queue)
        result = await handle_ticket(runner, inp, DEFAULT_POLICY, skip_reason=skip)

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
        if admit is not None and admit.admitted and runner.report_to is None:
            # Probes (and histories recorded before batching) report exactly once, from here.
            await workflow.get_external_workflow_handle(breaker_workflow_id(inp.task_type, info.task_queue)).signal(
                BREAKER_RECORD_SIGNAL,
                UsageReport(workflow_id=result.workflow_id, tokens=result.tokens, cost_usd=result.cost_usd,
                            probe=admit.probe),
            )
        return result
