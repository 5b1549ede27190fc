"""ShadowWorkflow: a candidate version runs beside the primary on the same task; only the primary acts.

The task is a task of any registered agent (`ShadowInput.agent`, KeelAgent children). The two children
are started together on the same input:
- the PRIMARY under the task's normal workflow id, with parent close policy ABANDON: approvals, watch,
  trace and results work as for any task, and nothing that happens to the shadow (a failure, a
  termination) reaches it;
- the CANDIDATE as `<primary id>.shadow` with the candidate's prompt version and models, as a dry run
  (every write recorded, never executed), charged to the feature "shadow", outside the circuit
  breaker, never waiting for a person.
A candidate that fails is recorded, never raised. When both have ended, one comparison row is written
(idempotent on this workflow's id) and returned.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ApplicationError, ChildWorkflowError, FailureError

with workflow.unsafe.imports_passed_through():
    from keel import errors, names
    from keel.shadow import (
        SHADOW_RECORD_ACTIVITY,
        ShadowComparison,
        ShadowInput,
        agent_usage_of,
        candidate_workflow_id,
        compare_agent,
        failed_agent_primary,
    )
    from keel.types import (
        AgentInput,
        AgentResult,
        ChildRecord,
        ChildStatus,
        PatternProgress,
        TaskUsage,
    )

from workflows.children import TASK_USAGE_ACTIVITY

CANDIDATE_TIMEOUT = timedelta(hours=1)
"""A candidate never waits for a person; one still running after this is recorded as failed."""
RECORD_RETRY = RetryPolicy(maximum_attempts=10, maximum_interval=timedelta(seconds=10))

SA_CUSTOMER = SearchAttributeKey.for_keyword(names.SA_CUSTOMER)
SA_TASK_TYPE = SearchAttributeKey.for_keyword(names.SA_TASK_TYPE)
SA_FEATURE = SearchAttributeKey.for_keyword(names.SA_FEATURE)
SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_AWAITING = SearchAttributeKey.for_bool(names.SA_AWAITING_APPROVAL)


def _agent_search_attributes(inp: AgentInput) -> TypedSearchAttributes:
    # What starter.agents.start_agent sets on an agent task.
    return TypedSearchAttributes([
        SearchAttributePair(SA_CUSTOMER, inp.tenant),
        SearchAttributePair(SA_TASK_TYPE, inp.agent),
        SearchAttributePair(SA_FEATURE, inp.feature or inp.agent),
        SearchAttributePair(SA_STATUS, "running"),
        SearchAttributePair(SA_AWAITING, False),
    ])


def _agent_models(inp: AgentInput) -> str:
    return " / ".join(dict.fromkeys(m.label for m in (inp.models or {}).values())) or "its own models"


_AGENT_CHILD_STATUS: dict[str, ChildStatus] = {
    "completed": "completed", "escalated": "escalated", "budget_exceeded": "budget_exceeded", "rejected": "rejected",
}


def _why(e: BaseException) -> str:
    """The innermost failure's message (a child's activity error is three levels deep)."""
    while isinstance(e, FailureError) and e.cause is not None:
        e = e.cause
    kind = f"{e.type}: " if isinstance(e, ApplicationError) and e.type else ""
    return f"{kind}{e.message if isinstance(e, FailureError) else e}"


@workflow.defn(name=names.SHADOW_WORKFLOW)
class ShadowWorkflow:
    def __init__(self) -> None:
        self._progress = PatternProgress(status="running", phase="starting")

    @workflow.query(name=names.PROGRESS_QUERY)
    def progress(self) -> PatternProgress:
        return self._progress

    def _update(self, phase: str, status: str = "running") -> None:
        p = self._progress
        p.phase, p.status = phase, status
        p.tokens = sum(r.usage.tokens for r in p.children)
        p.cost_usd = round(sum(r.usage.cost_usd for r in p.children), 8)

    @workflow.run
    async def run(self, inp: ShadowInput) -> ShadowComparison:
        if inp.agent is None:
            raise ApplicationError("a shadow needs a primary: an agent task (agent)",
                                   type=errors.SHADOW_INPUT_ERROR, non_retryable=True)
        return await self._run_agent(inp, inp.agent)

    async def _run_agent(self, inp: ShadowInput, primary_inp: AgentInput) -> ShadowComparison:
        """KeelAgent children: the primary under the task's own id (ABANDON), the candidate as a dry run
        charged to `shadow` that asks no one for approval."""
        shadow_id = workflow.info().workflow_id
        primary_id, candidate_id = inp.primary_workflow_id, candidate_workflow_id(inp.primary_workflow_id)
        candidate = inp.candidate.for_agent(primary_inp.agent)
        cand_inp = candidate.apply_agent(primary_inp)
        label = candidate.label
        prim_rec = ChildRecord(name="primary", role="primary", workflow_id=primary_id,
                               model=_agent_models(primary_inp), status="running", attempts=1)
        cand_rec = ChildRecord(name="candidate", role=f"candidate {label}", workflow_id=candidate_id,
                               model=_agent_models(cand_inp), status="running", attempts=1)
        self._progress.children = [prim_rec, cand_rec]

        primary = await workflow.start_child_workflow(
            names.AGENT_WORKFLOW, primary_inp, id=primary_id, result_type=AgentResult,
            parent_close_policy=workflow.ParentClosePolicy.ABANDON,
            search_attributes=_agent_search_attributes(primary_inp),
            static_summary=f"Agent {primary_inp.agent} · tenant {primary_inp.tenant} · "
                           f"{_agent_models(primary_inp)} (shadowed)",
        )
        self._update("running")

        async def run_primary() -> tuple[AgentResult, str]:
            error = ""
            try:
                res: AgentResult = await primary
            except ChildWorkflowError as e:
                error = _why(e)
                res = failed_agent_primary(primary_id, primary_inp, error)
            prim_rec.status = "failed" if error else _AGENT_CHILD_STATUS.get(res.status, "escalated")
            prim_rec.usage, prim_rec.reason = agent_usage_of(res), res.reason
            self._update("waiting for the candidate" if cand_rec.status == "running" else "comparing")
            return res, error

        async def run_candidate() -> tuple[AgentResult | None, str]:
            res: AgentResult | None = None
            refused = candidate.problems()
            if refused:
                error = "candidate not started: " + "; ".join(refused)
            else:
                try:
                    res = await workflow.execute_child_workflow(
                        names.AGENT_WORKFLOW, cand_inp, id=candidate_id, result_type=AgentResult,
                        execution_timeout=CANDIDATE_TIMEOUT,
                        search_attributes=_agent_search_attributes(cand_inp),
                        static_summary=f"Shadow candidate {label} of {primary_id} (dry run)",
                    )
                    error = ""
                except FailureError as e:  # failed, timed out, or could not start: recorded, never raised
                    error = _why(e)
            if res is None:
                cand_rec.status, cand_rec.reason = "failed" if not refused else "not_started", error
                cand_rec.failures.append(error)
            else:
                cand_rec.status = _AGENT_CHILD_STATUS.get(res.status, "escalated")
                cand_rec.usage, cand_rec.reason = agent_usage_of(res), res.reason
            self._update("waiting for the primary" if prim_rec.status == "running" else "comparing")
            return res, error

        (prim_res, prim_error), (cand_res, error) = await asyncio.gather(run_primary(), run_candidate())
        self._update("comparing")
        spent: TaskUsage | None = None
        if cand_res is None and cand_rec.status == "failed":
            spent = await workflow.execute_activity(TASK_USAGE_ACTIVITY, candidate_id, result_type=TaskUsage,
                                                    start_to_close_timeout=timedelta(seconds=30),
                                                    retry_policy=RECORD_RETRY)
            cand_rec.usage = spent
        comparison = compare_agent(prim_res, cand_res, primary_input=primary_inp, shadow_workflow_id=shadow_id,
                                   candidate_workflow_id=candidate_id, candidate_label=label,
                                   candidate_error=error, candidate_spent=spent, primary_error=prim_error)
        comparison = comparison.model_copy(update={"created_at": workflow.now()})
        await workflow.execute_activity(SHADOW_RECORD_ACTIVITY, comparison, result_type=bool,
                                        start_to_close_timeout=timedelta(seconds=30), retry_policy=RECORD_RETRY)
        workflow.upsert_search_attributes([SA_STATUS.value_set("compared")])
        self._update("done", "completed")
        return comparison
