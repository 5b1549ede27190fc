"""The support-ticket pipeline: classify -> agent loop with tools -> draft -> route (reply or human).

Pure decisions over an `AgentRunner`: the workflow runs it with Temporal activities, the benchmark's
asyncio baseline with direct calls.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from keel.policy import CATEGORIES, SupportPolicy, acknowledgement, ticket_problems
    from keel.redaction import CustomerIdentity, filter_reply, redact
    from keel.tools import AGENT_TOOLS
    from keel.types import Classification, Message, Route, TaskStatus, TicketInput, TicketResult

from workflows.agent_loop import AgentRunner, BreakerRefused, LoopResult, run_agent_loop, tool_defs
from workflows.budget import BudgetExceeded

CLASSIFY_PROMPT = "support/classify"
AGENT_PROMPT = "support/agent"
DRAFT_PROMPT = "support/draft"


def ticket_message(inp: TicketInput) -> Message:
    return Message(role="user", content=f"Customer: {inp.customer_id}\nTicket: {inp.ticket_id}\n\n{inp.text}")


async def handle_ticket(
    runner: AgentRunner, inp: TicketInput, policy: SupportPolicy, skip_reason: str | None = None
) -> TicketResult:
    """`skip_reason`: the model must not run (the cost circuit breaker is open); route to a human."""
    result = TicketResult(workflow_id=runner.task.workflow_id, ticket_id=inp.ticket_id,
                          customer_id=inp.customer_id, status="running", route="human")
    problems = ticket_problems(inp.customer_id, inp.text)
    if problems:
        # Nothing is lost: the ticket goes to the human queue with the reason, and is recorded.
        return await _finish(runner, result, "rejected", "human", "invalid ticket: " + "; ".join(problems), None)
    if skip_reason is not None:
        return await _breaker_refused(runner, result, skip_reason)

    messages = [ticket_message(inp)]
    cls: Classification | None = None
    loop = LoopResult()
    try:
        cls = await _classify(runner, messages, policy.classify_attempts)
        if cls is not None:
            runner.progress.category = cls.category
            runner.progress.acknowledgement = acknowledgement(cls.category, cls.urgency)
            messages.append(Message(role="user", content="Classification: " + cls.model_dump_json()))
        loop = await run_agent_loop(
            runner,
            AGENT_PROMPT,
            messages,
            tool_defs(AGENT_TOOLS),
            max_steps=inp.max_steps or policy.max_steps,
            max_invalid_outputs=policy.max_invalid_outputs,
            # Histories recorded before cost controls ran the loop as "reason" on the large tier.
            kind=policy.loop_kind if runner.controls else "reason",
        )
        messages.extend(runner.take_notices())
        draft = await runner.llm(
            "draft", DRAFT_PROMPT, [*messages, Message(role="user", content="Write the reply to the customer now.")]
        )
    except BreakerRefused as e:
        return await _breaker_refused(runner, result, str(e))
    except BudgetExceeded as e:
        # The kill switch: no call that would cross the budget was made. The task ends here with the
        # best output it has, in the human queue, and counts as abandoned.
        runner.decide("kill", str(e))
        partial = loop.final_text or _last_assistant_text(messages) or None
        result.partial_output = redact(partial, _identity(runner)).text if partial and runner.guardrails else partial
        limit = {"tokens": "token", "usd": "dollar"}.get(e.limit, e.limit)
        return await _finish(runner, result, "budget_exceeded", "human", f"{limit} budget exceeded: {e}", cls)
    result.reply = draft.text.strip() or None
    output_problems = _filter_output(runner, result, loop) if runner.guardrails else []
    if loop.hit_step_cap:
        runner.budget.limit_hit = "steps"
        runner.budget.detail = f"step limit {inp.max_steps or policy.max_steps} reached"

    reasons = _human_reasons(policy, cls, loop, result.reply, runner)
    if output_problems:
        reasons.append("the reply failed the output checks: " + "; ".join(output_problems))
    if reasons:
        priority = loop.escalation_priority if loop.escalation else None
        return await _finish(runner, result, "escalated", "human", "; ".join(reasons), cls, priority)
    return await _finish(runner, result, "resolved", "reply", "answered by the agent", cls)


async def _breaker_refused(runner: AgentRunner, result: TicketResult, reason: str) -> TicketResult:
    runner.budget.limit_hit = "breaker"
    runner.budget.detail = reason
    runner.decide("breaker", reason)
    return await _finish(runner, result, "escalated", "human", reason, None)


def _identity(runner: AgentRunner) -> CustomerIdentity | None:
    f = runner.facts
    if f is None:
        return None
    return CustomerIdentity(customer_id=f.customer_id, email=f.email, phone=f.phone, account_ids=f.account_ids,
                            ibans=f.ibans)


def _filter_output(runner: AgentRunner, result: TicketResult, loop: LoopResult) -> list[str]:
    """Layer 3: nothing leaves with another person's PII, a card number, a promise of a refund that
    was not made, or an internal note. Returns the problems that send the task to a human."""
    refunds = len(runner.facts.refunded) if runner.facts is not None else 0
    report, problems = filter_reply(result.reply or "", _identity(runner), refunds_executed=refunds,
                                    refunds_pending=len(loop.pending_actions))
    if report.total:
        counts = {k: v for k, v in report.counts.items() if v}
        result.redactions = counts
        detail = ", ".join(f"{v} {k}" for k, v in counts.items())
        runner.decide("redact", f"removed from the reply: {detail}")
        runner.guardrail("redaction", "send_reply", detail, ok=True)
    result.reply = report.text.strip() or None if result.reply else None
    for p in problems:
        runner.guardrail("output_check", "send_reply", p)
    if problems:
        runner.decide("block", "reply held back: " + "; ".join(problems))
    return problems


def _last_assistant_text(messages: list[Message]) -> str:
    return next((m.content for m in reversed(messages) if m.role == "assistant" and m.content), "")


async def _classify(runner: AgentRunner, messages: list[Message], attempts: int) -> Classification | None:
    convo = list(messages)
    for _ in range(attempts):
        resp = await runner.llm("classify", CLASSIFY_PROMPT, convo, json_output=True)
        try:
            cls = Classification.model_validate_json(resp.text)
        except ValidationError as e:
            problem = f"classification output invalid: {e.errors()[0]['msg']}"
        else:
            if cls.category in CATEGORIES:
                return cls
            problem = f"classification output has unknown category {cls.category!r}"
        runner.observe(problem)
        retry = f"{problem}. Answer with the JSON object only, category one of {CATEGORIES}."
        convo = [*convo, Message(role="assistant", content=resp.text), Message(role="user", content=retry)]
    return None


def _human_reasons(
    policy: SupportPolicy, cls: Classification | None, loop: LoopResult, reply: str | None, runner: AgentRunner
) -> list[str]:
    reasons = []
    if cls is None:
        reasons.append("could not classify the ticket")
    else:
        if cls.category in policy.human_categories:
            reasons.append(f"category {cls.category} is always handled by a human")
        if cls.confidence < policy.min_confidence:
            reasons.append(f"classification confidence {cls.confidence:.2f} < {policy.min_confidence}")
    if loop.escalation:
        reasons.append(f"agent escalated: {loop.escalation}")
    for a in loop.pending_actions:
        reasons.append(f"{a.tool} {a.arguments_json} awaits human approval")
    if loop.hit_step_cap:
        reasons.append(runner.budget.detail or "step limit reached")
    if any(o.startswith("get_account:") and "not found" in o for o in runner.observations):
        reasons.append("unknown customer")
    if not reply:
        reasons.append("no reply drafted")
    return reasons


async def _finish(
    runner: AgentRunner,
    result: TicketResult,
    status: TaskStatus,
    route: Route,
    reason: str,
    cls: Classification | None,
    priority: str | None = None,
) -> TicketResult:
    """Route the ticket with one tool call that also writes the task's outcome row."""
    cls_fields = cls.model_dump() if cls else {}
    if runner.controls:
        runner.progress.budget = runner.budget.report()
    runner.decide("route", f"{route}: {reason}")
    outcome = runner.outcome(status, route, reason, cls_fields)
    if route == "human":
        args = {"reason": reason[:1000], "priority": priority or (cls.urgency if cls else "normal")}
        res = await runner.tool("escalate_to_human", args, outcome=outcome)
    else:
        res = await runner.tool("send_reply", {"customer_id": result.customer_id, "body": result.reply or ""},
                                outcome=outcome)
    if not res.ok:
        runner.observe(f"routing failed: {res.error}")
    runner.progress.status = status
    runner.progress.action = "done"
    return result.model_copy(
        update={
            "status": status,
            "route": route,
            "reason": reason,
            **{k: cls_fields.get(k) for k in ("category", "urgency", "confidence")},
            "tools_executed": runner.tools_executed,
            "tools_blocked": runner.tools_blocked,
            "observations": runner.observations,
            "steps": runner.progress.step,
            "llm_calls": runner.llm_calls,
            "tokens": runner.input_tokens + runner.output_tokens,
            "input_tokens": runner.input_tokens,
            "output_tokens": runner.output_tokens,
            "cost_usd": round(runner.cost_usd, 8),
            "models": runner.models_used,
            "budget": runner.budget.report(),
            "reasoning_loops": runner.reasoning_loops,
            "repeated_calls": runner.repeated_calls,
            "decisions": runner.decisions,
            "validation_failures": runner.validation_failures,
            "acknowledgement": runner.progress.acknowledgement,
            "dry_run_actions": runner.dry_run_actions,
        }
    )
