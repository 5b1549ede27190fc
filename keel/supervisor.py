"""The supervisor pattern's contract and decisions (SupervisedPlanWorkflow, disaster recovery).

A worker agent drafts a recovery plan as JSON; the supervisor parses it, checks every step against
the runbook's deterministic rules (keel.runbooks), then asks an LLM reviewer; it accepts, sends the plan
back with feedback (at most `max_rounds` rounds), or escalates to a human. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from keel.runbooks import RUNBOOKS, PlanStep, Violation, normalize_topic
from keel.types import (
    Budget,
    BudgetReport,
    ChildRecord,
    Decision,
    ModelSpec,
    SimConfig,
    TaskUsage,
)

TASK_TYPE = "supervised_plan"
INVALID_PLAN = "valid_plan"
"""Rule id of the violation an unreadable worker output gets: it goes back to the worker as feedback."""
MAX_PLAN_STEPS = 40
WORKER_BUDGET = Budget(max_tokens=16_000, max_usd=0.08)
"""Each round's worker child; the parent's budget (keel.policy.BUDGETS["supervised_plan"]) bounds them all."""


class SupervisedPlanInput(BaseModel):
    """Input of SupervisedPlanWorkflow."""

    scenario: str
    """What happened, in the operator's words (e.g. "payments-db primary in eu-west-1 is down")."""
    runbook: str = "database_failover"
    """Runbook topic (keel.runbooks.RUNBOOKS): its guidance goes to the worker, its rules to the checker."""
    max_rounds: int = Field(3, ge=1, le=10)
    """Drafts the worker may make; a plan not accepted by then goes to a human."""
    worker_model: ModelSpec = Field(default_factory=lambda: ModelSpec(provider="sim", model="sim-large"))
    reviewer_model: ModelSpec = Field(default_factory=lambda: ModelSpec(provider="sim", model="sim-large"))
    sim: SimConfig = Field(default_factory=SimConfig)
    prompt_version: str = "v1"
    budget: Budget | None = None
    """Override of the task type's budget (the parent's: its own review calls plus every worker round)."""
    worker_budget: Budget | None = None
    """Override of each worker child's budget (WORKER_BUDGET)."""
    customer: str = "internal"
    feature: str = "operations"
    key: str = ""
    """Business key (the sim model seeds on it); default: the workflow id."""


class Plan(BaseModel):
    summary: str = ""
    steps: list[PlanStep]


ReviewVerdictKind = Literal["accept", "revise", "escalate"]


class ReviewVerdict(BaseModel):
    verdict: ReviewVerdictKind
    feedback: list[str] = Field(default_factory=list)


RoundAction = Literal["accept", "revise", "escalate"]


class RoundRecord(BaseModel):
    """One round: the worker's draft, what the rules found, what the reviewer said, what was decided."""

    round: int
    worker_id: str = ""
    """The worker child's workflow id (its last attempt)."""
    worker_status: str = ""
    plan: Plan | None = None
    """None when the worker's output was not a valid plan (see violations)."""
    violations: list[Violation] = Field(default_factory=list)
    verdict: ReviewVerdictKind | None = None
    """The reviewer's verdict as given (None: no review happened, or its output was invalid)."""
    feedback: list[str] = Field(default_factory=list)
    """The reviewer's feedback."""
    note: str = ""
    """E.g. why a reviewer output did not count."""
    action: RoundAction | None = None
    """What the supervisor decided."""
    worker_usage: TaskUsage = Field(default_factory=TaskUsage)
    review_usage: TaskUsage = Field(default_factory=TaskUsage)


PlanStatus = Literal["accepted", "escalated", "rejected"]


class SupervisedPlanResult(BaseModel):
    workflow_id: str
    status: PlanStatus
    reason: str = ""
    runbook: str = ""
    rounds: list[RoundRecord] = Field(default_factory=list)
    plan: Plan | None = None
    """The accepted plan; on escalation, the last draft (for the human)."""
    report_id: str | None = None
    queue_item_id: str | None = None
    worker_usage: TaskUsage = Field(default_factory=TaskUsage)
    """Every worker child's usage (all rounds, all attempts)."""
    review_usage: TaskUsage = Field(default_factory=TaskUsage)
    """The supervisor's own calls (the LLM reviews): the review overhead."""
    usage: TaskUsage = Field(default_factory=TaskUsage)
    """worker_usage + review_usage: the ledger's family totals of this workflow."""
    review_overhead: float = 0.0
    """Share of all tokens spent on review (review_usage.tokens / usage.tokens)."""
    children: list[ChildRecord] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)
    budget: BudgetReport = Field(default_factory=BudgetReport)


# --- parsing ----------------------------------------------------------------------------------------


def _json_object(text: str) -> tuple[dict[str, object] | None, str]:
    """The JSON object in a model's answer (bare, or in a ```json fence, or after some chatter)."""
    raw = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", raw, re.DOTALL)
    if fence:
        raw = fence.group(1).strip()
    start = raw.find("{")
    if start < 0:
        return None, "no JSON object in the output" if raw else "the output is empty"
    try:
        value, _ = json.JSONDecoder().raw_decode(raw[start:])
    except json.JSONDecodeError as e:
        return None, f"the output is not valid JSON ({e.msg} at position {e.pos + start})"
    if not isinstance(value, dict):
        return None, "the output is not a JSON object"
    return value, ""


def parse_plan(text: str) -> tuple[Plan | None, list[Violation]]:
    """The worker's plan, or None and a violation saying what is wrong (sent back as feedback)."""
    obj, problem = _json_object(text)
    if obj is None:
        return None, [Violation(step=0, rule=INVALID_PLAN, message=f"{problem}; answer with one JSON object "
                                "{\"summary\": ..., \"steps\": [{\"action\", \"target\", \"detail\", \"rollback\", "
                                "\"verify\"}, ...]}")]
    try:
        plan = Plan.model_validate(obj)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'plan'}: {err['msg']}" for err in e.errors()[:5])
        return None, [Violation(step=0, rule=INVALID_PLAN, message=f"the plan does not match the schema: {problems}")]
    if not plan.steps:
        return None, [Violation(step=0, rule=INVALID_PLAN, message="the plan has no steps")]
    if len(plan.steps) > MAX_PLAN_STEPS:
        return None, [Violation(step=0, rule=INVALID_PLAN,
                                message=f"the plan has {len(plan.steps)} steps; at most {MAX_PLAN_STEPS}")]
    blank = [i for i, s in enumerate(plan.steps, 1) if not s.action.strip()]
    if blank:
        return None, [Violation(step=blank[0], rule=INVALID_PLAN, message="the step has no action")]
    return plan, []


def parse_verdict(text: str) -> tuple[ReviewVerdict | None, str]:
    """The reviewer's verdict, or None and why its output does not count."""
    obj, problem = _json_object(text)
    if obj is None:
        return None, f"reviewer output invalid: {problem}"
    if isinstance(obj.get("feedback"), str):
        obj = {**obj, "feedback": [obj["feedback"]]}
    if isinstance(obj.get("verdict"), str):
        obj = {**obj, "verdict": str(obj["verdict"]).strip().lower()}
    try:
        return ReviewVerdict.model_validate(obj), ""
    except ValidationError as e:
        err = e.errors()[0]
        return None, f"reviewer output invalid: {'.'.join(map(str, err['loc'])) or 'verdict'}: {err['msg']}"


# --- messages -----------------------------------------------------------------------------------------


def input_problems(inp: SupervisedPlanInput) -> list[str]:
    """Why a task cannot be planned, or []. Used by the CLI and the workflow."""
    problems = []
    if not inp.scenario.strip():
        problems.append("the scenario is empty")
    elif len(inp.scenario) > 4_000:
        problems.append(f"the scenario is {len(inp.scenario):,} characters; the limit is 4,000")
    if normalize_topic(inp.runbook) not in RUNBOOKS:
        problems.append(f"unknown runbook {inp.runbook!r}; known: {', '.join(sorted(RUNBOOKS))}")
    return problems


def worker_instructions(inp: SupervisedPlanInput) -> str:
    return (f"Runbook: {normalize_topic(inp.runbook)}\nScenario: {inp.scenario.strip()}\n\n"
            "Draft the recovery plan: look up the service status and the runbook first, then answer with the "
            "plan as one JSON object.")


def feedback_context(record: RoundRecord) -> list[str]:
    """What the next round's worker is told: its previous plan and everything to fix in it."""
    out = []
    if record.plan is not None:
        out.append(f"Your previous plan (round {record.round}): {record.plan.model_dump_json()}")
    lines = [f"- {v.line()}" for v in record.violations]
    lines += [f"- [review] {f}" for f in record.feedback]
    if record.note:
        lines.append(f"- [supervisor] {record.note}")
    out.append(f"Supervisor feedback on round {record.round}: revise the plan and fix exactly these, keeping "
               "everything else:\n" + "\n".join(lines or ["- (no details given)"]))
    return out


def rule_report(rule_ids: list[str], violations: list[Violation]) -> dict[str, object]:
    broken = {v.rule for v in violations}
    return {"rules_checked": rule_ids, "passed": [r for r in rule_ids if r not in broken],
            "violations": [v.model_dump() for v in violations]}


def review_messages_text(inp: SupervisedPlanInput, round_no: int, plan: Plan | None, raw_output: str,
                         rule_ids: list[str], violations: list[Violation]) -> list[str]:
    """The reviewer's user messages: the task, the plan (or the invalid output), the rule check."""
    plan_text = plan.model_dump_json() if plan is not None else json.dumps({"invalid_output": raw_output[:4_000]})
    return [
        f"Runbook: {normalize_topic(inp.runbook)}\nScenario: {inp.scenario.strip()}\nRound: {round_no} of "
        f"{inp.max_rounds}",
        f"Plan: {plan_text}",
        f"Rule check: {json.dumps(rule_report(rule_ids, violations))}",
    ]


# --- decisions -------------------------------------------------------------------------------------


def decide_round(round_no: int, max_rounds: int, violations: list[Violation],
                 verdict: ReviewVerdict | None) -> tuple[RoundAction, str]:
    """Accept, revise or escalate, and why. The rules are authoritative: a plan with violations is never
    accepted, whatever the reviewer says; an invalid review counts as revise."""
    if verdict is not None and verdict.verdict == "escalate":
        why = "; ".join(verdict.feedback) or "no reason given"
        return "escalate", f"the reviewer escalated in round {round_no}: {why}"
    if not violations and verdict is not None and verdict.verdict == "accept":
        return "accept", f"round {round_no}: every rule passes and the reviewer accepted"
    problems = []
    if violations:
        problems.append(f"{len(violations)} rule violation(s): " + "; ".join(v.line() for v in violations[:5]))
    if verdict is not None and verdict.verdict == "revise" and verdict.feedback:
        problems.append("reviewer: " + "; ".join(verdict.feedback[:5]))
    if verdict is None:
        problems.append("the review did not count (invalid output)")
    if verdict is not None and verdict.verdict == "accept" and violations:
        problems.append("the reviewer accepted, but the rules override")
    why = " | ".join(problems) or "the reviewer asked for a revision"
    if round_no >= max_rounds:
        return "escalate", f"no acceptable plan after {max_rounds} round(s); last round: {why}"
    return "revise", f"round {round_no}: {why}"


def plan_markdown(inp: SupervisedPlanInput, plan: Plan, rounds: int) -> str:
    lines = [f"# Recovery plan ({normalize_topic(inp.runbook)})", "", f"Scenario: {inp.scenario.strip()}", "",
             plan.summary, "", f"Accepted after {rounds} round(s) of supervision.", ""]
    for i, s in enumerate(plan.steps, 1):
        lines.append(f"{i}. **{s.action}** {s.target}: {s.detail}")
        lines.append(f"   - rollback: {s.rollback or '-'}")
        lines.append(f"   - verify: {s.verify or '-'}")
    return "\n".join(lines)
