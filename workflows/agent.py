"""AgentWorkflow (`KeelAgent`): any registered `keel.Agent`, with every production control.

The steps: the agent's tool loop (budgets soft/hard/kill, spiral detection, schema and the agent's
action validators before any tool runs, `confirm` calls through the approval gate), an answer check
(empty or off-schema answers go back to the model, counted toward escalation), the output filter
(PII redacted; placeholders, unfounded claims and the agent's checks hold the answer back), then one
finishing activity that writes the outcome row and, for a task a human must see, its queue item.

The loop knows no domain: the agent's definition comes from the worker's registry (keel.registry),
read through the sandbox's pass-through, and a task naming an agent this worker does not have, or a
configuration that cannot run, fails the workflow with its reason (never a workflow task retried).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from keel import errors, names, registry
    from keel.agent import Agent, FinalOutput, ProposedAction, ToolOutcome
    from keel.breaker import BREAKER_RECORD_SIGNAL, AdmitRequest, BreakerConfig, UsageReport, breaker_workflow_id
    from keel.metrics import input_hash
    from keel.output import OutputReport, check_output, parse_structured
    from keel.types import (
        AgentInput,
        AgentResult,
        AgentStatus,
        ApprovalDecision,
        ApprovalPolicy,
        ApprovalRecord,
        FinishRequest,
        Message,
        PendingAction,
        Progress,
        TaskContext,
        TaskOutcome,
        TaskStatus,
    )

from workflows.agent_loop import (
    FINISH_RETRY,
    AgentRunner,
    BreakerRefused,
    Calls,
    LoopResult,
    ModelUnusable,
    TemporalCalls,
    TenantBudgetRefused,
    run_agent_loop,
    show_step,
)
from workflows.approval import ApprovalGate
from workflows.budget import BudgetExceeded

EVIDENCE_STEPS = 3
"""Model calls an agent gets to gather the evidence its answer lacked (then it must answer)."""

SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_TOKENS = SearchAttributeKey.for_int(names.SA_TOKENS)
SA_COST = SearchAttributeKey.for_float(names.SA_COST_USD)
SA_BUDGET = SearchAttributeKey.for_keyword(names.SA_BUDGET)

_OUTCOME_STATUS: dict[AgentStatus, TaskStatus] = {
    "completed": "resolved", "escalated": "escalated", "budget_exceeded": "budget_exceeded", "rejected": "rejected",
}

Finish = Callable[[AgentRunner, AgentResult, AgentStatus, str], Awaitable[AgentResult]]
"""Closes a task: (runner, result so far, status, reason) -> the final result."""


def config_error(message: str) -> ApplicationError:
    return ApplicationError(message, type=errors.AGENT_CONFIG_ERROR, non_retryable=True)


def resolve_agent(name: str) -> Agent:
    try:
        return registry.get(name)
    except errors.AgentNotRegistered as e:
        raise ApplicationError(str(e), type=errors.AGENT_NOT_REGISTERED, non_retryable=True) from None


def task_messages(inp: AgentInput) -> list[Message]:
    return [Message(role="user", content=inp.input),
            *(Message(role="user", content=f"Context: {c}") for c in inp.context)]



def _classification(triage: dict[str, Any] | None) -> dict[str, object]:
    """The outcome row's category, urgency and confidence, from a triage answer that has them (so the
    ledger's metrics and the distribution-shift alert see an agent's kinds of request)."""
    out: dict[str, object] = {}
    for name in ("category", "urgency"):
        value = (triage or {}).get(name)
        if isinstance(value, str) and value:
            out[name] = value[:64]
    confidence = (triage or {}).get("confidence")
    if isinstance(confidence, int | float) and not isinstance(confidence, bool) and 0 <= confidence <= 1:
        out["confidence"] = float(confidence)
    return out


@workflow.defn(name=names.AGENT_WORKFLOW, failure_exception_types=[errors.KeelError])
class AgentWorkflow:
    """`failure_exception_types`: a `keel.KeelError` raised in workflow code (an agent definition that
    cannot run) fails the task with its reason, where any other exception would fail the workflow task,
    retried forever. Declared on the workflow, not on the worker, so every worker and every Replayer of
    it agree (a Replayer takes no worker options of ours)."""

    def __init__(self) -> None:
        self._runner: AgentRunner | None = None
        self._gate = ApprovalGate(ApprovalPolicy())

    @workflow.query(name=names.PROGRESS_QUERY)
    def progress(self) -> Progress:
        return self._runner.progress if self._runner else Progress()

    @workflow.query(name=names.PENDING_ACTION_QUERY)
    def pending_action(self) -> PendingAction | None:
        return self._gate.pending

    @workflow.signal(name=names.APPROVAL_SIGNAL)
    def approval(self, d: ApprovalDecision) -> None:
        self._gate.signal(d)

    @workflow.update(name=names.DECIDE_UPDATE)
    def decide(self, d: ApprovalDecision) -> ApprovalRecord:
        return self._gate.record(d, None)

    @decide.validator
    def _validate_decide(self, d: ApprovalDecision) -> None:
        self._gate.validate(d)

    @workflow.run
    async def run(self, inp: AgentInput) -> AgentResult:
        agent = resolve_agent(inp.agent)
        info = workflow.info()
        runner = self.make_runner(agent, inp, info.workflow_id,
                                  info.parent.workflow_id if info.parent is not None else "",
                                  TemporalCalls(inp.llm_heartbeat_timeout_s))
        runner.clock = workflow.now
        runner.on_step = show_step
        runner.on_budget_state = _budget_upsert
        self._gate.policy = ApprovalPolicy(approvers={k: list(v) for k, v in agent.approvers.items()},
                                           timeout_s=inp.approval_timeout_s or agent.approval_timeout_s,
                                           mode=inp.approval_mode)
        runner.approval_gate, runner.approval_mode = self._gate.request, self._gate.policy.mode
        self._runner = self._gate.runner = runner
        if inp.breaker:
            runner.admit = AdmitRequest(config=BreakerConfig(task_type=agent.name, scope=info.task_queue,
                                                             expected_tokens=agent.expected_tokens),
                                        workflow_id=info.workflow_id)
            runner.breaker_id = breaker_workflow_id(agent.name, info.task_queue)
        return await self.run_task(agent, inp, runner, self._finish)

    @classmethod
    def make_runner(cls, agent: Agent, inp: AgentInput, workflow_id: str, parent_workflow_id: str,
                    calls: Calls) -> AgentRunner:
        """The runner of one task of `agent`, as every run of it sets it up (the workflow, a what-if
        replay): its task tags, models and tiers, budget, guardrails and action validators."""
        version = inp.prompt_version or agent.prompt_version
        task = TaskContext(
            workflow_id=workflow_id, tenant=inp.tenant, key=inp.key,
            feature=inp.feature or agent.task_feature, task_type=agent.name, prompt_version=version,
            input_hash=input_hash(inp.tenant, inp.input), parent_workflow_id=parent_workflow_id,
            chaos=inp.chaos,
        )
        models = {**agent.model_specs, **(inp.models or {})}
        tiers = {agent.step_kind: agent.tier}
        if agent.triage is not None:
            tiers["classify"] = agent.triage.tier
        runner = AgentRunner(calls, task, models=models, tiers=tiers, sim=inp.sim,
                             max_output_tokens=agent.max_output_tokens,
                             budget=inp.budget if inp.budget is not None else agent.budget,
                             fallbacks=agent.fallback_specs)
        runner.agent = agent
        runner.temperature = inp.temperature
        runner.dry_run = inp.dry_run
        runner.prices = dict(inp.prices)
        runner.guardrails = True
        runner.output_schema = agent.output_type.model_json_schema() if agent.output_type is not None else None
        runner.validate_action = cls._validator(agent, inp, runner)
        return runner

    @classmethod
    async def run_task(cls, agent: Agent, inp: AgentInput, runner: AgentRunner, finish: Finish) -> AgentResult:
        """The task's steps (triage, the tool loop, the answer and output checks) on a runner from
        `make_runner`; `finish` closes the task with its status and reason (the workflow: the finishing
        activity; a what-if replay: the result only)."""
        result = AgentResult(workflow_id=runner.task.workflow_id, agent=agent.name, status="completed",
                             prompt_version=runner.task.prompt_version)
        if not inp.input.strip():
            return await finish(runner, result, "rejected", "the input is empty")
        messages = task_messages(inp)
        max_steps = inp.max_steps or agent.max_steps
        loop = LoopResult()
        structured: Any = None
        problem: str | None = None
        missing = False
        try:
            if agent.triage is not None:
                verdict, why = await cls._triage(agent, runner, messages, result)
                if why is not None:
                    return await finish(runner, result, "escalated", why)
                messages.append(Message(role="user", content=f"Triage: {verdict}"))
            loop = await run_agent_loop(runner, agent.prompt_name, messages, list(agent.tool_map.values()), max_steps,
                                        agent.max_invalid_outputs, kind=agent.step_kind)
            structured, problem = cls._answer_problem(agent, loop)
            problem, missing = cls._evidence(agent, inp, runner, loop, structured, result, problem)
            while problem is not None and not loop.escalation:
                # Not a final answer: the model is told what is wrong and tries again (it counts).
                loop.invalid_outputs += 1
                runner.observe(f"{'answer without evidence' if missing else 'invalid answer'}: {problem}")
                runner.decide("missing_evidence" if missing else "invalid_output", problem)
                if loop.invalid_outputs > agent.max_invalid_outputs:
                    break
                told = (f"Your answer was not accepted: {problem}. Call the tools you need, then answer again."
                        if missing else f"Your answer was not accepted: {problem}. Answer again.")
                messages.append(Message(role="user", content=told))
                # Evidence is gathered with tools: a few steps for that; a malformed answer needs one.
                again = await run_agent_loop(runner, agent.prompt_name, messages, [] if runner.no_tools else
                                             list(agent.tool_map.values()), EVIDENCE_STEPS if missing else 1,
                                             agent.max_invalid_outputs, kind=agent.step_kind)
                loop = _merge(loop, again)
                structured, problem = cls._answer_problem(agent, loop)
                problem, missing = cls._evidence(agent, inp, runner, loop, structured, result, problem)
        except BreakerRefused as e:
            runner.budget.limit_hit, runner.budget.detail = "breaker", str(e)
            runner.decide("breaker", str(e))
            return await finish(runner, result, "escalated", str(e))
        except TenantBudgetRefused as e:
            runner.budget.limit_hit, runner.budget.detail = "tenant", str(e)
            runner.decide("tenant_budget", str(e))
            return await finish(runner, result, "escalated", str(e))
        except ModelUnusable as e:
            runner.decide("escalate", str(e))
            return await finish(runner, result, "escalated", str(e))
        except BudgetExceeded as e:
            runner.decide("kill", str(e))
            result.invalid_outputs = loop.invalid_outputs
            partial = loop.final_text or next((m.content for m in reversed(messages)
                                               if m.role == "assistant" and m.content), "")
            result.partial_output = check_output(agent, partial, None, inp.input, inp.tenant, []).text or None
            limit = {"tokens": "token", "usd": "dollar"}.get(e.limit, e.limit)
            return await finish(runner, result, "budget_exceeded", f"{limit} budget exceeded: {e}")

        result.invalid_outputs = loop.invalid_outputs
        reasons: list[str] = []
        if loop.escalation:
            reasons.append(loop.escalation)
        if problem is not None and missing:
            reasons.append(f"the answer lacks its evidence after {loop.invalid_outputs} attempt(s): {problem}")
        elif problem is not None:
            reasons.append(f"no valid answer after {loop.invalid_outputs} invalid outputs: {problem}")
        elif loop.invalid_outputs > agent.max_invalid_outputs:
            reasons.append(f"the model produced {loop.invalid_outputs} invalid outputs")
        for a in loop.pending_actions:
            reasons.append(f"{a.tool} {a.arguments_json} awaits a human ({a.reason})")
        if loop.hit_step_cap:
            runner.budget.limit_hit = "steps"
            runner.budget.detail = f"step limit {max_steps} reached"
        text = loop.answer or loop.final_text
        if loop.escalation and not text.strip():
            report = OutputReport(text="")  # handed to a human with nothing written: nothing to check
        else:
            report = check_output(agent, text, structured, inp.input, inp.tenant, _executed(runner), inp.context)
        if report.redactions:
            detail = ", ".join(f"{v} {k}" for k, v in report.redactions.items())
            runner.decide("redact", f"removed from the answer: {detail}")
            runner.guardrail("redaction", None, detail, ok=True)
            result.redactions = report.redactions
        for p in report.problems:
            runner.guardrail("output_check", None, p)
        if report.problems and problem is None:
            runner.decide("block", "answer held back: " + "; ".join(report.problems))
            reasons.append("the answer failed the output checks: " + "; ".join(report.problems))
        if reasons:
            result.partial_output = report.text or None
            return await finish(runner, result, "escalated", "; ".join(reasons))
        result.output = report.text
        result.structured = structured.model_dump(mode="json") if structured is not None else None
        return await finish(runner, result, "completed", "answered by the agent")

    @staticmethod
    async def _triage(agent: Agent, runner: AgentRunner, messages: list[Message],
                      result: AgentResult) -> tuple[str, str | None]:
        """The agent's triage call: (its answer as JSON, None), or ("", why the task goes to a human)."""
        triage = agent.triage
        assert triage is not None
        convo = list(messages)
        saved, runner.output_schema = runner.output_schema, triage.output_type.model_json_schema()
        value: Any = None
        problem: str | None = "no answer"
        try:
            for _ in range(triage.attempts):
                resp = await runner.llm("classify", triage.prompt_name, convo, json_output=True)
                value, problem = parse_structured(resp.text, triage.output_type)
                if problem is None:
                    break
                runner.observe(f"invalid triage: {problem}")
                runner.decide("invalid_output", f"triage: {problem}")
                convo = [*convo, Message(role="assistant", content=resp.text),
                         Message(role="user", content=f"Your answer was not accepted: {problem}. "
                                                      "Answer with the JSON object only.")]
        finally:
            runner.output_schema = saved
        if problem is not None:
            return "", f"the request could not be triaged: {problem}"
        dumped = value.model_dump(mode="json")
        result.triage = runner.progress.triage = dumped
        as_json = value.model_dump_json()
        runner.decide("triage", as_json)
        try:
            if triage.acknowledge is not None:
                runner.progress.acknowledgement = str(triage.acknowledge(value))
            why = triage.route(value) if triage.route is not None else None
        except Exception as e:
            raise config_error(f"agent {agent.name!r}: a triage hook raised {type(e).__name__}: {e}") from e
        if why:
            runner.decide("escalate", f"triage: {why}")
            return "", f"triage: {why}"
        return as_json, None

    @staticmethod
    def _answer_problem(agent: Agent, loop: LoopResult) -> tuple[Any, str | None]:
        if not loop.answered:
            return None, None  # stopped for another reason (escalation, invalid calls)
        if not loop.answer.strip():
            return None, "the answer is empty"
        if agent.output_type is None:
            return None, None
        return parse_structured(loop.answer, agent.output_type)

    @staticmethod
    def _evidence(agent: Agent, inp: AgentInput, runner: AgentRunner, loop: LoopResult, structured: Any,
                  result: AgentResult, problem: str | None) -> tuple[str | None, bool]:
        """(problem, whether it is missing evidence): a valid answer is checked against the agent's
        evidence hooks; the first thing it lacks is the problem."""
        if problem is not None or not agent.evidence or not loop.answered or loop.escalation:
            return problem, False
        triage = None
        if agent.triage is not None and result.triage is not None:
            triage = agent.triage.output_type.model_validate(result.triage)
        final = FinalOutput(text=loop.answer, structured=structured, input=inp.input, tenant=inp.tenant,
                            executed=tuple(_executed(runner)), context=tuple(inp.context), triage=triage)
        for check in agent.evidence:
            try:
                lacking = check(final)
            except Exception as e:
                hook = getattr(check, "__qualname__", None) or repr(check)
                raise config_error(f"agent {agent.name!r}: evidence check {hook} raised {type(e).__name__}: {e}") from e
            if lacking is not None and not isinstance(lacking, str):
                hook = getattr(check, "__qualname__", None) or repr(check)
                raise config_error(f"agent {agent.name!r}: evidence check {hook} returned {type(lacking).__name__}, "
                                   "not what is missing (str) or None")
            if lacking:
                return f"missing evidence: {lacking}", True
        return None, False

    @staticmethod
    def _validator(agent: Agent, inp: AgentInput, runner: AgentRunner) -> Any:
        if not agent.validators:
            return None

        def validate(tool: str, arguments: dict[str, object]) -> str | None:
            action = ProposedAction(tool=tool, arguments=arguments, permission=agent.tool_map[tool].permission,
                                    input=inp.input, tenant=inp.tenant, executed=tuple(_executed(runner)),
                                    context=tuple(inp.context))
            for v in agent.validators:
                try:
                    problem = v(action)
                except Exception as e:
                    # A bug in the agent's hook, met in workflow code: fail the task with it (retrying
                    # the workflow task would only raise it again, forever).
                    hook = getattr(v, "__qualname__", None) or repr(v)
                    raise config_error(f"agent {agent.name!r}: action validator {hook} raised "
                                       f"{type(e).__name__}: {e} (checking a call of {tool})") from e
                if problem:
                    return str(problem)
            return None

        return validate

    async def _finish(self, runner: AgentRunner, result: AgentResult, status: AgentStatus, reason: str) -> AgentResult:
        human = status != "completed"
        outcome = close_task(runner, status, reason, result.triage)
        step = runner.progress.step + 1
        admission = runner.admission
        await workflow.execute_activity(
            names.FINISH_ACTIVITY,
            FinishRequest(task=runner.task, step=step, outcome=outcome, guardrails=runner.guardrail_events,
                          # A dry run (a shadow candidate) records its outcome but puts nothing in
                          # the human queue: no one is to act on a task whose writes never ran.
                          decisions=runner.decisions, human_reason=reason if human and not runner.dry_run else None,
                          report_to=runner.report_to),
            result_type=str, start_to_close_timeout=names.TOOL_START_TO_CLOSE, retry_policy=FINISH_RETRY,
        )
        if admission is not None and admission.admitted and runner.report_to is None:
            await workflow.get_external_workflow_handle(runner.breaker_id or "").signal(
                BREAKER_RECORD_SIGNAL, UsageReport(workflow_id=runner.task.workflow_id, tokens=outcome.input_tokens
                                                   + outcome.output_tokens, cost_usd=outcome.cost_usd, probe=True))
        final = final_result(runner, result, status, reason, self._gate.records)
        budget = final.budget
        updates: list[SearchAttributeUpdate[Any]] = [
            SA_STATUS.value_set(status), SA_TOKENS.value_set(final.tokens), SA_COST.value_set(final.cost_usd),
            SA_BUDGET.value_set(budget.state if not budget.limit_hit else f"limit:{budget.limit_hit}"),
        ]
        workflow.upsert_search_attributes(updates)
        return final


def close_task(runner: AgentRunner, status: AgentStatus, reason: str,
               triage: dict[str, Any] | None = None) -> TaskOutcome:
    """The task's route decision, and its outcome (the finishing activity's row)."""
    route = "human" if status != "completed" else "reply"
    runner.progress.budget = runner.budget.report()
    runner.decide("route", f"{route}: {reason}")
    return runner.outcome(_OUTCOME_STATUS[status], route, reason, _classification(triage))


def final_result(runner: AgentRunner, result: AgentResult, status: AgentStatus, reason: str,
                 approvals: list[ApprovalRecord]) -> AgentResult:
    """The task's result from its runner's books, once it is closed."""
    runner.progress.status = _OUTCOME_STATUS[status]
    runner.progress.action = "done"
    budget = runner.budget.report()
    return result.model_copy(update={
        "status": status, "reason": reason, "tools_executed": runner.tools_executed,
        "tools_blocked": runner.tools_blocked, "dry_run_actions": runner.dry_run_actions,
        "observations": runner.observations, "decisions": runner.decisions, "approvals": approvals,
        "guardrails": runner.guardrail_events, "steps": runner.progress.step, "llm_calls": runner.llm_calls,
        "tokens": runner.input_tokens + runner.output_tokens, "input_tokens": runner.input_tokens,
        "output_tokens": runner.output_tokens, "cost_usd": round(runner.cost_usd, 8),
        "models": runner.models_used, "budget": budget, "validation_failures": runner.validation_failures,
    })


def _budget_upsert(state: str) -> None:
    # Mid-task only when the hard limit fires (the agent is made to answer now); the soft state
    # comes with the final figures: each upsert is a visibility write on the server.
    if state == "hard":
        workflow.upsert_search_attributes([SA_BUDGET.value_set(state)])


def _executed(runner: AgentRunner) -> list[ToolOutcome]:
    return [ToolOutcome(tool=t, arguments=a, content=c) for t, a, c in runner.results if not c.get("dry_run")]


def _merge(first: LoopResult, again: LoopResult) -> LoopResult:
    again.invalid_outputs += first.invalid_outputs
    again.pending_actions = [*first.pending_actions, *again.pending_actions]
    again.escalation = again.escalation or first.escalation
    again.hit_step_cap = again.hit_step_cap or first.hit_step_cap
    again.final_text = again.final_text or first.final_text
    return again

