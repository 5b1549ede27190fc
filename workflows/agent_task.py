"""AgentTaskWorkflow: one child agent of a multi-agent pattern (orchestrator, supervisor, swarm).

The same agent loop as a support ticket (workflows.agent_loop), with the prompt, narrow tool set,
model, temperature and budget its parent gives it. Its usage goes to the ledger under its own
workflow id, tagged with its parent's (`parent_workflow_id`), and comes back in its result. A child
that fails raises `AgentTaskFailed` carrying what it had spent, so the parent counts real usage even
for an attempt that produced nothing.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from keel import names
    from keel.policy import DEFAULT_TIERS
    from keel.types import (
        AgentTaskInput,
        AgentTaskResult,
        LlmRequest,
        LlmResponse,
        Message,
        Progress,
        TaskContext,
        ToolRequest,
        ToolResult,
    )

from workflows.agent_loop import AgentRunner, Calls, TemporalCalls, run_agent_loop, tool_defs
from workflows.budget import BudgetExceeded
from workflows.children import usage_of

AGENT_TASK_FAILED = "AgentTaskFailed"
"""Non-retryable failure type of a child; its first detail is the TaskUsage it had spent."""


class InjectedFault(Exception):
    pass


class _FaultyCalls:
    """Fault injection (AgentTaskInput.inject_failure): model call `at_step` of a failing attempt is
    not made; the attempt fails there, after the real calls before it."""

    def __init__(self, inner: Calls, at_step: int) -> None:
        self.inner = inner
        self.at_step = at_step

    async def llm(self, req: LlmRequest) -> LlmResponse:
        if req.step >= self.at_step:
            raise InjectedFault(f"injected failure at step {req.step} (fault injection)")
        return await self.inner.llm(req)

    async def tool(self, name: str, req: ToolRequest) -> ToolResult:
        return await self.inner.tool(name, req)


def task_messages(inp: AgentTaskInput) -> list[Message]:
    return [Message(role="user", content=f"Task: {inp.instructions}"),
            *(Message(role="user", content=f"Context: {c}") for c in inp.context)]


@workflow.defn(name=names.AGENT_TASK_WORKFLOW)
class AgentTaskWorkflow:
    def __init__(self) -> None:
        self._runner: AgentRunner | None = None

    @workflow.query(name=names.PROGRESS_QUERY)
    def progress(self) -> Progress:
        return self._runner.progress if self._runner else Progress()

    @workflow.run
    async def run(self, inp: AgentTaskInput) -> AgentTaskResult:
        info = workflow.info()
        calls: Calls = TemporalCalls()
        if inp.inject_failure is not None and inp.attempt <= inp.inject_failure.runs:
            calls = _FaultyCalls(calls, inp.inject_failure.at_step)
        task = TaskContext(
            workflow_id=info.workflow_id,
            customer=inp.customer,
            ticket_id=inp.key or f"{inp.name}",
            feature=inp.feature,
            task_type=inp.task_type,
            prompt_version=inp.prompt_version,
            parent_workflow_id=info.parent.workflow_id if info.parent is not None else "",
        )
        runner = AgentRunner(calls, task, models={"small": inp.model, "large": inp.model},
                             tiers=dict.fromkeys(DEFAULT_TIERS, inp.tier), sim=inp.sim,
                             max_output_tokens=inp.max_output_tokens, budget=inp.budget)
        runner.temperature = inp.temperature
        runner.dry_run = inp.dry_run
        runner.clock = workflow.now
        self._runner = runner
        result = AgentTaskResult(workflow_id=info.workflow_id, name=inp.name, role=inp.role, status="completed",
                                 model=inp.model.label, attempt=inp.attempt)
        messages = task_messages(inp)
        try:
            if inp.tools:
                loop = await run_agent_loop(runner, inp.prompt, messages, tool_defs(inp.tools), inp.max_steps,
                                            max_invalid_outputs=3, kind=inp.kind)
                result.output = loop.final_text
                if loop.escalation:
                    result.status, result.reason = "escalated", loop.escalation
                elif loop.hit_step_cap:
                    result.reason = f"step limit {inp.max_steps} reached; answered without tools"
            else:
                resp = await runner.llm(inp.kind, inp.prompt, messages, json_output=inp.json_output)
                result.output = resp.text
        except BudgetExceeded as e:
            runner.decide("kill", str(e))
            result.status, result.reason = "budget_exceeded", str(e)
            result.output = next((m.content for m in reversed(messages) if m.role == "assistant" and m.content), "")
        except (ActivityError, ApplicationError, InjectedFault) as e:
            cause = e.cause if isinstance(e, ActivityError) and e.cause is not None else e
            raise ApplicationError(f"{inp.name} (attempt {inp.attempt}) failed at step {runner.progress.step}: "
                                   f"{cause}", usage_of(runner), type=AGENT_TASK_FAILED, non_retryable=True) from e
        runner.progress.status = "resolved" if result.status == "completed" else "escalated"
        runner.progress.action = "done"
        return result.model_copy(update={
            "usage": usage_of(runner), "steps": runner.progress.step, "tools_executed": runner.tools_executed,
            "tools_blocked": runner.tools_blocked, "dry_run_actions": runner.dry_run_actions,
            "observations": runner.observations, "decisions": runner.decisions, "budget": runner.budget.report(),
        })
