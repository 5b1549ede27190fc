"""The orchestrator pattern (ResearchReportWorkflow): its input and result, the plan the parent's model
writes and how it is checked, the policy of each child role (prompt, narrow tool set, model tier,
budget), and the decisions over the children's results (status, what is missing, a report when the
parent cannot synthesize). Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from keel.tools import ANALYSIS_TOOLS, RETRIEVAL_TOOLS
from keel.types import (
    AgentTaskInput,
    Budget,
    BudgetReport,
    ChildRecord,
    Decision,
    InjectedFailure,
    ModelSpec,
    SimConfig,
    StepKind,
    TaskStatus,
    TaskUsage,
    Tier,
)

TASK_TYPE = "research_report"
FEATURE = "research"
MAX_QUESTION_CHARS = 2_000

ResearchRole = Literal["retrieval", "analysis", "writing"]
ResearchStatus = Literal["completed", "partial", "budget_exceeded", "failed", "rejected"]
"""completed: every sub-task delivered. partial: a report was made, but some sub-task delivered nothing
(failed, not started, or stopped by its budget), and the report says so. budget_exceeded: the parent's own
budget stopped it; it published what it had. failed: no sub-task delivered. rejected: invalid question."""

MAX_SUBTASKS = 5
MAX_PER_ROLE: dict[str, int] = {"retrieval": 2, "analysis": 2, "writing": 1}
"""Retrieval and analysis sub-tasks run in parallel; the one writing sub-task gets their outputs."""


# --- the plan ------------------------------------------------------------------------------
class Subtask(BaseModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    """Unique within the plan; part of the child's workflow id (`<parent>/<name>`)."""
    role: ResearchRole
    instructions: str = Field(min_length=1, max_length=2_000)


class ResearchPlan(BaseModel):
    title: str = Field("", max_length=200)
    subtasks: list[Subtask] = Field(min_length=1)

    def of_role(self, *roles: str) -> list[Subtask]:
        return [s for s in self.subtasks if s.role in roles]


def plan_problems(plan: ResearchPlan) -> list[str]:
    """What makes a well-formed plan unusable by the workflow, or []."""
    problems = []
    names = [s.name for s in plan.subtasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"sub-task names must be unique: {dupes}")
    if len(plan.subtasks) > MAX_SUBTASKS:
        problems.append(f"{len(plan.subtasks)} sub-tasks; at most {MAX_SUBTASKS}")
    for role, most in MAX_PER_ROLE.items():
        n = len(plan.of_role(role))
        if n > most:
            problems.append(f"{n} {role} sub-tasks; at most {most}")
    if len(plan.of_role("writing")) != 1:
        problems.append("exactly one writing sub-task is needed")
    if not plan.of_role("retrieval", "analysis"):
        problems.append("at least one retrieval or analysis sub-task is needed")
    return problems


def parse_plan(text: str) -> tuple[ResearchPlan | None, str]:
    """The plan in a model's answer, or None and why it is unusable."""
    raw = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", raw, flags=re.DOTALL)
    if fenced:
        raw = fenced.group(1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"the plan is not valid JSON ({e.msg} at position {e.pos})"
    try:
        plan = ResearchPlan.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "plan"
        return None, f"the plan does not fit the schema ({e.error_count()} problems; {where}: {first['msg']})"
    problems = plan_problems(plan)
    if problems:
        return None, "the plan is unusable: " + "; ".join(problems)
    return plan, ""


def default_plan(question: str) -> ResearchPlan:
    """The plan used when the model's is unusable: one sub-task per role."""
    return ResearchPlan(title=default_title(question), subtasks=[
        Subtask(name="retrieval", role="retrieval", instructions=(
            "Search the internal documents for what bears on the research question, read the one or two most "
            "relevant, and summarize the facts and figures they give, citing each document id.")),
        Subtask(name="analysis", role="analysis", instructions=(
            "Compute the figures that bear on the research question from the aggregate transaction statistics "
            "and, if it is about cost or the AI agents, the LLM cost ledger. Report each figure with its scope.")),
        Subtask(name="writing", role="writing", instructions=(
            "Write the findings section of the report that answers the research question from the findings "
            "given as context. Use only those facts, keep the document ids, and say what is missing.")),
    ])


def choose_plan(text: str, question: str) -> tuple[ResearchPlan, str]:
    """The model's plan, or the default plan and why the model's was not used."""
    plan, problem = parse_plan(text)
    if plan is None:
        return default_plan(question), problem
    if not plan.title:
        plan = plan.model_copy(update={"title": default_title(question)})
    return plan, ""


def default_title(question: str) -> str:
    q = " ".join(question.split()).rstrip("?.! ")
    return ("Research: " + q)[:120] if q else "Research report"


# --- policy of the children ----------------------------------------------------------------
class RolePolicy(BaseModel):
    """What a child of one role gets: its prompt, narrow tool set, model tier and budget."""

    prompt: str
    tools: list[str] = Field(default_factory=list)
    tier: Tier
    kind: StepKind
    budget: Budget
    max_steps: int = 6
    max_output_tokens: int = 700


ROLE_POLICIES: dict[str, RolePolicy] = {
    # Searching and reading is lookup work: the small tier does it at about 6% of the large's price.
    "retrieval": RolePolicy(prompt="research/retrieval", tools=list(RETRIEVAL_TOOLS), tier="small", kind="reason",
                            budget=Budget(max_tokens=12_000, max_usd=0.01), max_steps=6),
    "analysis": RolePolicy(prompt="research/analysis", tools=list(ANALYSIS_TOOLS), tier="large", kind="reason",
                           budget=Budget(max_tokens=10_000, max_usd=0.05), max_steps=5),
    "writing": RolePolicy(prompt="research/writing", tier="large", kind="draft",
                          budget=Budget(max_tokens=6_000, max_usd=0.04), max_output_tokens=900),
}

RESEARCH_PROMPTS = ("research/plan", "research/synthesize", *(p.prompt for p in ROLE_POLICIES.values()))
"""Every prompt the pattern uses: a prompt version must have all of them."""
PARENT_TIER: Tier = "large"
"""Planning and synthesis decide what the report says: the large tier."""
PARENT_MAX_OUTPUT_TOKENS = 1_200


class ResearchInput(BaseModel):
    """Input of ResearchReportWorkflow."""

    question: str
    customer: str = "internal"
    """Chargeback tag of every call (parent and children)."""
    feature: str = FEATURE
    small_model: ModelSpec = Field(default_factory=lambda: ModelSpec(provider="sim", model="sim-small"))
    large_model: ModelSpec = Field(default_factory=lambda: ModelSpec(provider="sim", model="sim-large"))
    sim: SimConfig = Field(default_factory=SimConfig)
    prompt_version: str = "v1"
    budget: Budget | None = None
    """Override of the parent's budget (keel.policy.BUDGETS["research_report"]): it bounds the whole family."""
    child_budgets: dict[str, Budget] = Field(default_factory=dict)
    """Per sub-task name: override of its role's budget. A limit left None keeps the role's: a child is
    always capped (an uncapped child could not be reserved against its parent's budget)."""
    child_failures: dict[str, InjectedFailure] = Field(default_factory=dict)
    """Per sub-task name: fault injection (its first attempts fail at a model call)."""
    max_child_attempts: int = Field(3, ge=1, le=5)
    roles: dict[str, RolePolicy] | None = None
    """The role policies (prompt, tools, tier, budget), pinned at submit by the CLI so a later change of
    ROLE_POLICIES never alters a running task or its replay; None: ROLE_POLICIES as they are."""

    def role(self, name: str) -> RolePolicy:
        return (self.roles or ROLE_POLICIES).get(name) or ROLE_POLICIES[name]


class ResearchResult(BaseModel):
    workflow_id: str
    question: str = ""
    status: ResearchStatus
    reason: str = ""
    title: str = ""
    report: str = ""
    report_id: str | None = None
    """The published report (`reports` table, tool publish_report)."""
    plan: ResearchPlan | None = None
    plan_source: Literal["model", "default", "none"] = "none"
    children: list[ChildRecord] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    """Sub-tasks that delivered nothing, each with why."""
    usage: TaskUsage = Field(default_factory=TaskUsage)
    """The whole family: the parent's own calls plus every child's, failed attempts included."""
    own_usage: TaskUsage = Field(default_factory=TaskUsage)
    """The parent's own calls (plan, synthesize)."""
    budget: BudgetReport = Field(default_factory=BudgetReport)
    decisions: list[Decision] = Field(default_factory=list)

    @property
    def children_usage(self) -> TaskUsage:
        return self.usage.minus(self.own_usage)


def question_problems(question: str) -> list[str]:
    if not question.strip():
        return ["the question is empty"]
    if len(question) > MAX_QUESTION_CHARS:
        return [f"the question is {len(question):,} characters; the limit is {MAX_QUESTION_CHARS:,}"]
    return []


def child_budget(sub: Subtask, inp: ResearchInput) -> Budget:
    base = inp.role(sub.role).budget
    override = inp.child_budgets.get(sub.name)
    if override is None:
        return base
    return override.model_copy(update={
        "max_tokens": base.max_tokens if override.max_tokens is None else override.max_tokens,
        "max_usd": base.max_usd if override.max_usd is None else override.max_usd,
    })


def child_input(sub: Subtask, inp: ResearchInput, parent_id: str, context: list[str]) -> AgentTaskInput:
    """The child agent of one sub-task: its role's prompt, tools, tier and budget, the research question
    and `context` (earlier children's outputs) as its context."""
    role = inp.role(sub.role)
    return AgentTaskInput(
        name=sub.name,
        role=sub.role,
        prompt=role.prompt,
        prompt_version=inp.prompt_version,
        instructions=sub.instructions,
        context=[f"Research question: {inp.question}", *context],
        tools=list(role.tools),
        kind=role.kind,
        model=inp.small_model if role.tier == "small" else inp.large_model,
        tier=role.tier,
        sim=inp.sim,
        budget=child_budget(sub, inp),
        max_steps=role.max_steps,
        max_output_tokens=role.max_output_tokens,
        customer=inp.customer,
        feature=inp.feature,
        task_type=f"research_{sub.role}",
        key=f"{parent_id}/{sub.name}",
        inject_failure=inp.child_failures.get(sub.name),
    )


# --- after the children --------------------------------------------------------------------
def delivered(rec: ChildRecord, output: str) -> bool:
    """A child delivered when it completed with an answer; a budget-stopped child's partial text is
    used as context, but the sub-task still counts as missing."""
    return rec.status == "completed" and bool(output.strip())


def missing_reason(rec: ChildRecord, output: str) -> str:
    if rec.status == "not_started":
        why = f"not started: {rec.reason}"
    elif rec.status == "budget_exceeded":
        why = "stopped by its budget" + (" (partial findings used)" if output.strip() else "")
    elif rec.status == "failed":
        why = f"failed after {rec.attempts} attempt{'s' if rec.attempts != 1 else ''}: {rec.reason}"
    elif rec.status == "completed":
        why = "answered with nothing"
    else:
        why = f"{rec.status}: {rec.reason}"
    return f"{rec.name} ({rec.role}): {why}"[:400]


def findings_context(sub: Subtask, output: str, rec: ChildRecord) -> str:
    """How one child's output reaches the writer and the synthesis: labelled, or a note of what is missing."""
    if delivered(rec, output):
        return f"Findings of {sub.name} ({sub.role}):\n{output.strip()}"
    if output.strip():
        return f"Partial findings of {sub.name} ({sub.role}), {missing_reason(rec, output)}:\n{output.strip()}"
    return f"Missing: {missing_reason(rec, output)}"


def research_status(delivered_count: int, missing: list[str], parent_stopped: bool) -> ResearchStatus:
    if parent_stopped:
        return "budget_exceeded"
    if delivered_count == 0:
        return "failed"
    return "partial" if missing else "completed"


OUTCOME_STATUS: dict[str, TaskStatus] = {
    "completed": "resolved",
    "partial": "resolved",
    "budget_exceeded": "budget_exceeded",
    "failed": "failed",
    "rejected": "rejected",
}
"""The ledger outcome row's status of each research status (a partial report is still a product)."""


def fallback_report(question: str, title: str, sections: list[str], missing: list[str], why: str) -> str:
    """The report when the parent's synthesis could not run: the children's findings as they are."""
    lines = [f"# {title}", "", f"Question: {question}", "", f"Not synthesized: {why}.", ""]
    for s in sections:
        lines += [s, ""]
    if not sections:
        lines += ["No sub-task delivered findings.", ""]
    if missing:
        lines += ["## Missing", *(f"- {m}" for m in missing)]
    return "\n".join(lines).strip()
