"""The generic agent loop (plan, call a tool, observe, loop until done), run inside a workflow.

Deterministic: every model and tool call is an activity; this module only decides. It is a plain
class, not a workflow, so every pattern (agent, orchestrator, supervisor, swarm) can reuse it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ValidationError

    from keel import errors
    from keel.agent import Agent
    from keel.breaker import AdmitDecision, AdmitRequest
    from keel.errors import KeelError
    from keel.guardrails import arguments_digest
    from keel.names import (
        LLM_ACTIVITY,
        LLM_HEARTBEAT_TIMEOUT,
        LLM_START_TO_CLOSE,
        NON_RETRYABLE_ERRORS,
        TOOL_START_TO_CLOSE,
    )
    from keel.pricing import UnpricedModelError, model_label
    from keel.tokens import estimate_input_tokens
    from keel.types import (
        ApprovalDecision,
        ApprovalMode,
        BlockedAction,
        Budget,
        Decision,
        GuardrailEvent,
        LlmRequest,
        LlmResponse,
        Message,
        ModelSpec,
        PendingAction,
        Permission,
        Price,
        Progress,
        SimConfig,
        StepKind,
        TaskContext,
        TaskOutcome,
        Tier,
        ToolCall,
        ToolRequest,
        ToolResult,
        ToolSpec,
    )

from workflows.budget import BudgetGuard


class ToolLike(Protocol):
    """A tool as the loop needs it (an agent's `keel.Tool`)."""

    @property
    def name(self) -> str: ...

    @property
    def args(self) -> type[BaseModel]: ...

    @property
    def permission(self) -> Permission: ...

    def spec(self) -> ToolSpec: ...

MODEL_UNUSABLE_PATCH = "model-unusable-escalates"
"""Tasks started since: a model the worker cannot call (no API key) hands the task to a person, with the
reason, instead of failing its workflow (histories recorded before replay as they ran)."""

LLM_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=6,
    non_retryable_error_types=NON_RETRYABLE_ERRORS,
)
RATE_LIMIT_PATIENCE = timedelta(minutes=30)
"""A model call still rate limited after LLM_RETRY's attempts (a provider's 429 storm, or KEEL_RATE_LIMITS
with more calls waiting than the limit serves) is scheduled again after the delay it was told, for this
long from its first attempt; only then does the task fall back to the next model, or fail."""
RATE_LIMIT_PATCH = "keel-rate-limit-patience"
"""Histories from before the patience (a rate limit after LLM_RETRY's attempts fell back at once) replay."""
TOOL_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=5,
    non_retryable_error_types=NON_RETRYABLE_ERRORS,
)


FINISH_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=NON_RETRYABLE_ERRORS,
)
"""The outcome row of a finished task is retried until it is written (nothing is lost)."""


def show_step(p: Progress) -> None:
    """The Temporal UI's "current details" (read through a query: no command, no history event)."""
    workflow.set_current_details(f"step {p.step}: {p.action} · {p.tokens:,} tokens · ${p.cost_usd:.4f}")


class BreakerRefused(Exception):
    """The task's cost circuit breaker refused the task at its first model call (nothing was spent)."""


class TenantBudgetRefused(Exception):
    """A tenant budget (KEEL_TENANT_BUDGETS) refused a model call of the task: its period's limit is reached."""


class ModelUnusable(Exception):
    """A model call failed for good on the worker's configuration (no API key, a key the provider refuses):
    no retry or other task can succeed until an operator fixes it, so a person takes the task, with why."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"the model {model} cannot be called: {message}")


@dataclass
class LoopResult:
    final_text: str = ""
    escalation: str | None = None
    """The agent asked for a human (escalate_to_human), with this reason."""
    escalation_priority: str = "normal"
    pending_actions: list[BlockedAction] = field(default_factory=list)
    """Writes the agent proposed that policy does not let it execute alone (permission `confirm`)."""
    invalid_outputs: int = 0
    hit_step_cap: bool = False
    answered: bool = False
    """The model's last call answered without tools (`answer` is that answer, possibly empty)."""
    answer: str = ""


class Calls(Protocol):
    """How the runner reaches activities: through Temporal in a workflow, directly in the asyncio
    baseline of the benchmark. The decisions stay the same code either way."""

    async def llm(self, req: LlmRequest) -> LlmResponse: ...

    async def tool(self, name: str, req: ToolRequest) -> ToolResult: ...


class TemporalCalls:
    """Every call an activity, with timeouts and retry policies from one place.

    No activity summaries: the SDK visits every payload of a command several times, each visit a
    round trip into the workflow sandbox, and a summary is one more payload per call (measured with
    bench/throughput.py: 3 ms of worker CPU per task). The UI shows the activity type (`llm_call`,
    the tool's name), its input (step kind, model), the workflow's summary (its models, labelled) and
    its current details (step, action, tokens), set below and in AgentRunner.

    `heartbeat_timeout_s`: the task's own (AgentInput.llm_heartbeat_timeout_s, pinned by its starter from
    KEEL_LLM_HEARTBEAT_TIMEOUT_S), else names.LLM_HEARTBEAT_TIMEOUT; tool calls heartbeat too (the executor,
    activities.agent_tools), so a dead worker's tool call is retried after it, not after its 30 s limit."""

    def __init__(self, heartbeat_timeout_s: float | None = None) -> None:
        self.heartbeat_timeout = (timedelta(seconds=heartbeat_timeout_s) if heartbeat_timeout_s is not None
                                  else LLM_HEARTBEAT_TIMEOUT)

    async def llm(self, req: LlmRequest) -> LlmResponse:
        first = workflow.now()
        while True:
            try:
                return await self._llm_once(req)
            except ActivityError as e:
                cause = e.cause
                if not (isinstance(cause, ApplicationError) and cause.type == errors.PROVIDER_RATE_LIMITED
                        and workflow.now() - first < RATE_LIMIT_PATIENCE and workflow.patched(RATE_LIMIT_PATCH)):
                    raise
                # Rate limited on every attempt: slowed down, not failed (a new activity, the same step).
                await workflow.sleep(cause.next_retry_delay or LLM_RETRY.maximum_interval or timedelta(seconds=30),
                                     summary="rate limited")

    async def _llm_once(self, req: LlmRequest) -> LlmResponse:
        resp: LlmResponse = await workflow.execute_activity(
            LLM_ACTIVITY,
            req,
            result_type=LlmResponse,
            start_to_close_timeout=LLM_START_TO_CLOSE,
            heartbeat_timeout=self.heartbeat_timeout,
            retry_policy=LLM_RETRY,
        )
        return resp

    async def tool(self, name: str, req: ToolRequest) -> ToolResult:
        result: ToolResult = await workflow.execute_activity(
            name,
            req,
            result_type=ToolResult,
            start_to_close_timeout=TOOL_START_TO_CLOSE,
            heartbeat_timeout=self.heartbeat_timeout,
            retry_policy=TOOL_RETRY,
        )
        return result


class AgentRunner:
    """Makes the calls of one task and keeps its books: step numbers, usage, progress, observations."""

    def __init__(
        self,
        calls: Calls,
        task: TaskContext,
        models: dict[Tier, ModelSpec],
        tiers: dict[StepKind, Tier],
        sim: SimConfig,
        max_output_tokens: int = 800,
        budget: Budget | None = None,
        controls: bool = True,
        fallbacks: list[ModelSpec] | None = None,
    ) -> None:
        self.calls = calls
        self.task = task
        self.models = models
        self.tiers = tiers
        self.sim = sim
        self.max_output_tokens = max_output_tokens
        self.budget = BudgetGuard(budget or Budget(max_tokens=None, max_usd=None))
        self.controls = controls
        """Budgets and spiral detection on; False only replays histories recorded before they existed."""
        self.fallbacks = fallbacks or []
        self.no_tools = False
        """Set when the hard budget threshold fires: every later call is made without tools."""
        self.notices: list[Message] = []
        """System messages the next call must carry (wrap up / answer now)."""
        self.decisions: list[Decision] = []
        self.on_budget_state: Callable[[str], None] | None = None
        """Called when the budget state changes (soft, hard): the workflow upserts a search attribute."""
        self.reasoning_loops = 0
        self.repeated_calls = 0
        self.seen_calls: dict[str, tuple[int, dict[str, object]]] = {}
        self.tools_called: list[str] = []
        self.progress = Progress()
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_usd = 0.0
        self.llm_calls = 0
        self.answer_tokens = 0
        """Output tokens of the last draft call (the final answer)."""
        self.tools_executed: list[str] = []
        self.tools_blocked: list[BlockedAction] = []
        self.observations: list[str] = []
        self.models_used: list[str] = []
        self.guardrails = False
        """Layer 2 checks (keel.guardrails) before every tool call; False replays older histories."""
        self.approval_gate: Callable[[PendingAction], Awaitable[ApprovalDecision | None]] | None = None
        """Pauses the task until a human decides on a `confirm` call (None: timed out). Without a gate,
        or in approval mode "escalate", such calls are recorded and the task goes to the human queue."""
        self.approval_mode: ApprovalMode = "wait"
        self.proposals = 0
        self.validation_failures = 0
        self.guardrail_events: list[GuardrailEvent] = []
        self.admit: AdmitRequest | None = None
        """Sent with the task's first model call (the breaker answers inside that activity)."""
        self.admission: AdmitDecision | None = None
        """The breaker's answer, from the first model call's response."""
        self.breaker_id: str | None = None
        """Where an admitted (non-probe) task's usage goes, reported by the routing call (report_to)."""
        self.clock: Callable[[], datetime] | None = None
        """workflow.now in a workflow: decisions carry their time (for the trace's span events)."""
        self.on_step: Callable[[Progress], None] | None = None
        """Called as each step starts: the workflow shows it as its current details in the UI."""
        self.report_to: str | None = None
        """The cost circuit breaker the routing call reports this task's usage to (see ToolRequest)."""
        self.temperature = 0.0
        """Sampling temperature of every call (swarm peers differ by it)."""
        self.dry_run = False
        """Shadow mode: every write tool is recorded, never executed (ToolRequest.dry_run), and a
        `confirm` write is recorded as a proposal without asking anyone."""
        self.dry_run_actions: list[BlockedAction] = []
        self.prices: dict[str, Price] = {}
        """The task's pinned prices (AgentInput.prices), by "provider:model": over the process's table."""
        self.agent: Agent | None = None
        """A registered agent (the generic workflow): its tools run as `<agent>.<tool>` activities, its
        prompt and tool specs are looked up by the LLM activity, and no built-in tool is special."""
        self.validate_action: Callable[[str, dict[str, object]], str | None] | None = None
        """The agent's action validators (keel.Agent.validators), after the schema check."""
        self.results: list[tuple[str, dict[str, object], dict[str, object]]] = []
        """Executed calls of this task: (tool, arguments, content), in order."""
        self.output_schema: dict[str, object] | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    def _next_step(self, action: str) -> int:
        self.progress.step += 1
        self.progress.action = action
        if self.on_step is not None:
            self.on_step(self.progress)
        return self.progress.step

    def observe(self, text: str) -> None:
        self.observations.append(text)

    def decide(self, kind: str, reason: str) -> None:
        at = self.clock() if self.clock is not None else None
        self.decisions.append(Decision(step=self.progress.step, kind=kind, reason=reason, at=at))

    def guardrail(self, kind: str, tool: str | None, detail: str, ok: bool = False) -> None:
        ev = GuardrailEvent(step=self.progress.step, kind=kind, tool=tool, detail=detail, ok=ok)
        self.guardrail_events.append(ev)

    def take_notices(self) -> list[Message]:
        notices, self.notices = self.notices, []
        return notices

    def outcome(self, status: str, route: str, reason: str, classification: dict[str, object]) -> TaskOutcome:
        return TaskOutcome.model_validate(
            {
                "status": status,
                "route": route,
                "reason": reason,
                **classification,
                "steps": self.progress.step,
                "llm_calls": self.llm_calls,
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "cost_usd": round(self.cost_usd, 8),
                "tools": list(self.tools_executed),
                "reasoning_loops": self.reasoning_loops,
                "repeated_calls": self.repeated_calls,
                "answer_tokens": self.answer_tokens,
                "input_hash": self.task.input_hash,
                "limit_hit": self.budget.limit_hit,
            }
        )

    # -- calls -------------------------------------------------------------------------------
    async def llm(
        self,
        kind: StepKind,
        prompt: str,
        messages: list[Message],
        tools: Sequence[ToolLike] | None = None,
        json_output: bool = False,
    ) -> LlmResponse:
        """One model call, within budget, falling back along the chain when a model is unavailable."""
        tier = self.tiers.get(kind, "large")
        chain = [self.models[tier], *self.fallbacks]
        specs = [t.spec() for t in tools or []]
        for i, model in enumerate(chain):
            max_out, max_in = self.max_output_tokens, None
            if self.controls:
                try:
                    allowance = self.budget.allow_call(model, estimate_input_tokens(messages, specs),
                                                       self.max_output_tokens, self.prices)
                except UnpricedModelError as e:
                    # Raised in workflow code it would fail the workflow task, retried forever: fail the
                    # task instead, with the reason (a model nobody priced is never counted as $0).
                    raise ApplicationError(str(e), type=errors.UNPRICED_MODEL, non_retryable=True) from e
                max_out, max_in = allowance.max_output_tokens, allowance.max_input_tokens
            step = self._next_step(f"{kind} ({model.label})")
            req = LlmRequest(
                task=self.task,
                step=step,
                kind=kind,
                tier=tier,
                prompt=prompt,
                messages=messages,
                tool_names=[t.name for t in tools or []],
                max_output_tokens=max_out,
                max_input_tokens=max_in,
                json_output=json_output,
                model=model.for_task(self.sim),
                agent=self.agent.name if self.agent is not None else "",
                output_schema=self.output_schema if self.agent is not None and not tools else None,
                temperature=self.temperature,
                # Only the chain's first model: a fallback's activity would take another probe slot.
                admit=self.admit if i == 0 else None,
                price=self.prices.get(f"{model.provider}:{model.model}"),
            )
            try:
                resp = await self.calls.llm(req)
            except (ActivityError, ApplicationError) as e:
                cause = e.cause if isinstance(e, ActivityError) else e
                if isinstance(cause, ApplicationError) and cause.type == errors.BUDGET_WOULD_EXCEED:
                    raise self.budget.stop("tokens", cause.message) from e
                if isinstance(cause, ApplicationError) and cause.type == errors.BREAKER_OPEN:
                    self.admit = None
                    raise BreakerRefused(cause.message) from e
                if isinstance(cause, ApplicationError) and cause.type == errors.TENANT_BUDGET_EXCEEDED:
                    raise TenantBudgetRefused(cause.message) from e
                retryable = isinstance(cause, TimeoutError) or (
                    isinstance(cause, ApplicationError) and not cause.non_retryable
                    and cause.type in (errors.PROVIDER_RATE_LIMITED, errors.PROVIDER_UNAVAILABLE)
                )
                if (isinstance(cause, ApplicationError) and cause.type == errors.PROVIDER_AUTH_ERROR
                        and (not workflow.in_workflow() or workflow.patched(MODEL_UNUSABLE_PATCH))):
                    raise ModelUnusable(model.label, cause.message) from e
                if not retryable or i + 1 == len(chain):
                    raise
                self.decide("fallback", f"{model.label} failed after retries ({cause}); trying {chain[i + 1].label}")
                continue
            if self.admit is not None:
                self.admit = None
                self.admission = resp.admission
                if resp.admission is not None and resp.admission.admitted and not resp.admission.probe:
                    self.report_to = self.breaker_id
            self._account(model, resp)
            if resp.repaired:
                self.decide("repaired_output", resp.repaired)
            if kind == "draft":
                self.answer_tokens = resp.usage.output_tokens
            return resp
        raise AssertionError("unreachable: the chain is never empty")

    def _account(self, model: ModelSpec, resp: LlmResponse) -> None:
        self.llm_calls += 1
        self.input_tokens += resp.usage.input_tokens
        self.output_tokens += resp.usage.output_tokens
        self.cost_usd += resp.cost_usd
        label = model_label(model, self.prices)  # marked self-hosted when it is, as the sim's marks it a simulator
        if label not in self.models_used:
            self.models_used.append(label)
        self.progress.tokens = self.input_tokens + self.output_tokens
        self.progress.cost_usd = round(self.cost_usd, 8)
        self.progress.llm_calls = self.llm_calls
        if not self.controls:
            return
        self.budget.charge(resp.usage.total_tokens, resp.cost_usd)
        for threshold in self.budget.crossed(self.progress.step):
            pct = int(100 * (self.budget.budget.soft_ratio if threshold == "soft" else self.budget.budget.hard_ratio))
            if threshold == "soft":
                self.decide("wrap_up", f"{pct}% of the task budget used")
                self.notices.append(Message(role="system", content=(
                    f"Budget notice: {pct}% of this task's budget is used. Wrap up: finish with at most one "
                    "more tool call, then give your answer.")))
            else:
                self.decide("answer_now", f"{pct}% of the task budget used")
                self.no_tools = True
                self.notices.append(Message(role="system", content=(
                    f"Budget notice: {pct}% of this task's budget is used. Answer now, without tools.")))
        self.progress.budget = self.budget.report()
        if self.on_budget_state is not None and self.budget.crossed_last:
            self.on_budget_state(self.budget.state)

    async def tool(self, name: str, arguments: Mapping[str, object], outcome: TaskOutcome | None = None) -> ToolResult:
        step = self._next_step(f"tool {name}")
        call_id = f"{self.task.workflow_id}/{step}"
        if outcome is not None:  # the routing call: it counts in the outcome it writes (the finishing call)
            outcome = outcome.model_copy(update={"tools": [*outcome.tools, name], "steps": step})
        if self.agent is None:
            raise KeelError(f"tool {name!r} called outside an agent task")
        writes = self.agent.tool_map[name].writes
        dry = self.dry_run and writes
        req = ToolRequest(task=self.task, step=step, call_id=call_id, arguments=dict(arguments), outcome=outcome,
                          report_to=self.report_to if outcome is not None else None,
                          guardrails=list(self.guardrail_events) if outcome is not None else [],
                          decisions=list(self.decisions) if outcome is not None else [], dry_run=dry)
        activity = self.agent.activity_name(name)
        result = await self.calls.tool(activity, req)
        if dry:
            self.dry_run_actions.append(BlockedAction(step=step, tool=name, reason="dry run: recorded, not executed",
                                                      arguments_json=json.dumps(dict(arguments), sort_keys=True)))
        if result.ok:  # a call the tool refused (keel.ToolError) had no effect: tools_blocked has it
            self.tools_executed.append(name)
            self.progress.tools_executed = list(self.tools_executed)
        return result


def _tool_message(call: ToolCall, content: dict[str, object]) -> Message:
    return Message(role="tool", tool_call_id=call.id, name=call.name, content=json.dumps(content, default=str))


async def run_agent_loop(
    runner: AgentRunner,
    prompt: str,
    messages: list[Message],
    tools: Sequence[ToolLike],
    max_steps: int,
    max_invalid_outputs: int,
    kind: StepKind = "reason",
) -> LoopResult:
    """Loop until the model answers without tools, escalates, or a cap is hit. `messages` grows in place."""
    allowed = {t.name: t for t in tools}
    result = LoopResult()
    for _ in range(max_steps):
        messages.extend(runner.take_notices())
        resp = await runner.llm(kind, prompt, messages, [] if runner.no_tools else tools)
        messages.append(Message(role="assistant", content=resp.text, tool_calls=resp.tool_calls))
        result.final_text = resp.text or result.final_text
        if not resp.tool_calls:
            result.answered, result.answer = True, resp.text
            return result
        for call in resp.tool_calls:
            content = await _handle_call(runner, call, allowed, result)
            messages.append(_tool_message(call, content))
        if result.escalation is not None:
            return result
        if result.invalid_outputs > max_invalid_outputs:
            result.escalation = f"the model produced {result.invalid_outputs} invalid tool calls"
            return result
    result.hit_step_cap = True
    runner.decide("answer_now", f"step limit {max_steps} reached")
    messages.extend(runner.take_notices())
    messages.append(Message(role="system", content="Step limit reached: answer now, without tools."))
    resp = await runner.llm(kind, prompt, messages, [])
    messages.append(Message(role="assistant", content=resp.text))
    result.final_text = resp.text or result.final_text
    result.answered, result.answer = True, resp.text
    return result


async def _handle_call(
    runner: AgentRunner, call: ToolCall, allowed: dict[str, ToolLike], result: LoopResult
) -> dict[str, object]:
    """Validate one tool call deterministically, execute it if policy allows, and return what the
    model observes. Nothing the model says reaches a tool without passing through here."""

    if runner.controls:
        key = f"{call.name}:{_canonical(call.arguments_json)}"
        earlier = runner.seen_calls.get(key)
        if earlier is not None:
            # A spiral's signature: the same call again. Answer from the earlier observation; never pay twice.
            step, content = earlier
            runner.repeated_calls += 1
            if runner.guardrails and "error" in content:
                # A retry storm: the identical call failed before and would fail again.
                result.invalid_outputs += 1
                runner.validation_failures += 1
                reason = f"identical to the call that failed at step {step}; not retried"
                runner.decide("block", f"{call.name}: {reason}")
                runner.guardrail("blocked", call.name, reason)
                return {**content, "note": reason}
            runner.decide("repeat", f"{call.name} repeated with the same arguments as at step {step}")
            return {**content, "note": f"identical to your call at step {step}; not executed again"}
        if call.name in runner.tools_called and runner.tools_called[-1] != call.name:
            runner.reasoning_loops += 1
        runner.tools_called.append(call.name)
        content = await _handle_new_call(runner, call, allowed, result)
        runner.seen_calls[key] = (runner.progress.step, content)
        return content
    return await _handle_new_call(runner, call, allowed, result)


def _canonical(arguments_json: str) -> str:
    try:
        return json.dumps(json.loads(arguments_json or "{}"), sort_keys=True)
    except json.JSONDecodeError:
        return arguments_json


async def _handle_new_call(
    runner: AgentRunner, call: ToolCall, allowed: dict[str, ToolLike], result: LoopResult
) -> dict[str, object]:
    def refuse(reason: str) -> dict[str, object]:
        result.invalid_outputs += 1
        runner.decide("block", f"{call.name}: {reason}")
        if runner.guardrails:
            runner.guardrail("blocked", call.name, reason)
        runner.tools_blocked.append(
            BlockedAction(step=runner.progress.step, tool=call.name, arguments_json=call.arguments_json, reason=reason)
        )
        runner.observe(f"{call.name}: {reason}")
        return {"error": reason}

    tool = allowed.get(call.name)
    if tool is None:
        return refuse(f"unknown tool {call.name!r}; available tools: {sorted(allowed)}")
    try:
        raw = json.loads(call.arguments_json or "{}")
    except json.JSONDecodeError as e:
        return refuse(f"arguments are not valid JSON ({e.msg} at position {e.pos})")
    if not isinstance(raw, dict):
        return refuse("arguments must be a JSON object")
    try:
        args = tool.args.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors())
        return refuse(f"invalid arguments: {problems}")
    arguments = args.model_dump()
    if runner.validate_action is not None:
        problem = runner.validate_action(call.name, arguments)
        if problem is not None:
            runner.validation_failures += 1
            return refuse(f"refused by policy: {problem}")

    if call.name == "escalate_to_human" and runner.agent is None:
        # The workflow's routing step performs the escalation, once, with the task's outcome.
        result.escalation = str(arguments["reason"])
        result.escalation_priority = str(arguments.get("priority", "normal"))
        runner.decide("escalate", result.escalation)
        return {"status": "will be escalated to a human when this step ends"}
    if (tool.permission == "confirm" and runner.approval_gate is not None and runner.approval_mode == "wait"
            and not runner.dry_run):
        return await _await_approval(runner, call, tool, arguments, result, refuse)
    if tool.permission == "confirm":
        action = BlockedAction(
            step=runner.progress.step,
            tool=call.name,
            arguments_json=json.dumps(arguments, sort_keys=True),
            reason="requires human approval (permission: confirm)",
        )
        result.pending_actions.append(action)
        runner.tools_blocked.append(action)
        runner.decide("block", f"{call.name} needs approval (permission: confirm)")
        return {
            "status": "pending_approval",
            "detail": f"{call.name} needs a human's approval; the proposed action was recorded. Do not repeat it.",
        }
    content = await _execute(runner, call.name, arguments)
    if getattr(tool, "hands_off", False) and "error" not in content:
        _hand_off(runner, call.name, arguments, content, result)
    return content


def _hand_off(runner: AgentRunner, name: str, arguments: dict[str, object], content: dict[str, object],
              result: LoopResult) -> None:
    """A hands-off tool ran: the loop stops after this step and the task goes to a human."""
    reason = content.get("reason") or arguments.get("reason") or f"handed off by {name}"
    result.escalation = f"{name}: {reason}"
    priority = content.get("priority") or arguments.get("priority")
    if priority:
        result.escalation_priority = str(priority)
    runner.decide("escalate", result.escalation)


async def _execute(runner: AgentRunner, name: str, arguments: dict[str, object]) -> dict[str, object]:
    if runner.agent is not None:
        try:
            res = await runner.tool(name, arguments)
        except ActivityError as e:
            # An agent's tool failed on every retry: the model is told, nothing is taken as done.
            cause = e.cause if e.cause is not None else e
            error = f"{name} failed after its retries: {cause}"
            runner.observe(error)
            runner.tools_blocked.append(BlockedAction(step=runner.progress.step, tool=name, reason=error,
                                                      arguments_json=json.dumps(arguments, sort_keys=True)))
            return {"error": error}
    else:
        res = await runner.tool(name, arguments)
    if not res.ok:
        runner.observe(f"{name}: {res.error}")
        runner.tools_blocked.append(BlockedAction(step=runner.progress.step, tool=name,
                                                  reason=f"refused by the tool: {res.error or 'tool failed'}",
                                                  arguments_json=json.dumps(arguments, sort_keys=True)))
        return {"error": res.error or "tool failed"}
    runner.results.append((name, arguments, res.content))
    return res.content


async def _await_approval(
    runner: AgentRunner, call: ToolCall, tool: ToolLike, arguments: dict[str, object], result: LoopResult,
    refuse: Callable[[str], dict[str, object]],
) -> dict[str, object]:
    """Layer 1: a `confirm` write waits for a listed approver's decision on exactly this action."""
    assert runner.approval_gate is not None
    runner.proposals += 1
    action = PendingAction(
        action_id=f"{call.name}#{runner.proposals}",
        tool=call.name,
        arguments=arguments,
        arguments_digest=arguments_digest(arguments),
        reason=str(arguments.get("reason") or ""),
        step=runner.progress.step,
    )
    runner.decide("await_approval", f"{action.action_id}: {call.name} {json.dumps(arguments, sort_keys=True)}")
    decision = await runner.approval_gate(action)
    if decision is None:
        blocked = BlockedAction(step=action.step, tool=call.name, arguments_json=json.dumps(arguments, sort_keys=True),
                                reason="approval timed out")
        result.pending_actions.append(blocked)
        runner.tools_blocked.append(blocked)
        result.escalation = f"no decision on {action.action_id} ({call.name}) within the approval timeout"
        runner.decide("escalate", result.escalation)
        runner.guardrail("approval", call.name, f"{action.action_id}: timed out")
        return {"status": "approval timed out", "detail": "A human will take over this task."}
    who = f"{decision.approver}" + (f" ({decision.comment})" if decision.comment else "")
    if decision.decision == "reject":
        runner.decide("rejected", f"{action.action_id} rejected by {who}")
        runner.tools_blocked.append(BlockedAction(step=action.step, tool=call.name,
                                                  arguments_json=json.dumps(arguments, sort_keys=True),
                                                  reason=f"rejected by {decision.approver}"))
        return {"status": "rejected", "approver": decision.approver, "comment": decision.comment,
                "detail": f"A human rejected {call.name}; do not repeat it. Say what happens next."}
    if decision.decision == "edit":
        try:
            arguments = tool.args.model_validate(decision.arguments or {}).model_dump()
        except ValidationError as e:
            return refuse(f"edited arguments of {action.action_id} are invalid: {e.errors()[0]['msg']}")
        problem = None
        if runner.validate_action is not None:
            problem = runner.validate_action(call.name, arguments)
        if problem is not None:
            runner.validation_failures += 1
            return refuse(f"edited arguments of {action.action_id} refused by policy: {problem}")
    runner.decide("approved", f"{action.action_id} {decision.decision}d by {who}")
    content = await _execute(runner, call.name, arguments)
    if getattr(tool, "hands_off", False) and "error" not in content:
        _hand_off(runner, call.name, arguments, content, result)
    return {**content, "approved_by": decision.approver}

