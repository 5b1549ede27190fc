"""SupportTicketWorkflow: one support ticket as a durable workflow (see ticket_pipeline for the steps)."""

from __future__ import annotations

from temporalio import workflow
from temporalio.common import SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from core import names
    from core.policy import DEFAULT_POLICY
    from core.types import Progress, TaskContext, TicketInput, TicketResult

# Our own workflow code is imported inside the sandbox (not passed through), so it stays checked.
from workflows.agent_loop import AgentRunner, Calls, TemporalCalls
from workflows.ticket_pipeline import handle_ticket

SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_TOKENS = SearchAttributeKey.for_int(names.SA_TOKENS)
SA_COST = SearchAttributeKey.for_float(names.SA_COST_USD)


def make_runner(inp: TicketInput, workflow_id: str, calls: Calls) -> AgentRunner:
    policy = DEFAULT_POLICY
    task = TaskContext(
        workflow_id=workflow_id,
        customer=inp.customer_id or "unknown",
        ticket_id=inp.ticket_id,
        feature=inp.feature,
        task_type=inp.task_type,
        prompt_version=inp.prompt_version,
    )
    return AgentRunner(
        calls,
        task,
        models={"small": inp.small_model, "large": inp.large_model},
        tiers=policy.tiers,
        sim=inp.sim,
        max_output_tokens=policy.max_output_tokens,
    )


@workflow.defn(name=names.SUPPORT_TICKET_WORKFLOW)
class SupportTicketWorkflow:
    def __init__(self) -> None:
        self._runner: AgentRunner | None = None

    @workflow.query(name=names.PROGRESS_QUERY)
    def progress(self) -> Progress:
        return self._runner.progress if self._runner else Progress()

    @workflow.run
    async def run(self, inp: TicketInput) -> TicketResult:
        self._runner = make_runner(inp, workflow.info().workflow_id, TemporalCalls())
        result = await handle_ticket(self._runner, inp, DEFAULT_POLICY)
        # Search attributes change when something a user filters on changes: here, once, at the end
        # (customer, task type, feature and "running" are set by the client at start).
        workflow.upsert_search_attributes(
            [
                SA_STATUS.value_set(result.status),
                SA_TOKENS.value_set(result.tokens),
                SA_COST.value_set(result.cost_usd),
            ]
        )
        return result
