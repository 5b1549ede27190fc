"""The disaster-recovery planner and its reviewer, on the generic supervisor pattern.

`dr_planner` (the worker) reads the services' status and the runbook with its two read-only tools and
answers a `Plan` (structured). It declares one named check per runbook rule (agents.dr_plan.runbooks):
a supervision runs a runbook's rules as `keel.Rule(op="check", value=<rule id>)`, so a plan that breaks
one goes back to the planner with the violations. `dr_reviewer` reviews a plan that keeps every rule
and answers a `keel.Review`. `supervision()` puts them together: the input of `keel plan`.

Written only against `keel`'s public API; `keel worker --agents agents.dr_plan` serves both agents.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

import keel
from agents.dr_plan.runbooks import (
    MAX_PROMOTE_LAG_S,
    RULES,
    RULES_BY_ID,
    RUNBOOKS,
    SERVICES,
    PlanStep,
    StepRule,
    check_plan,
    normalize_topic,
    service_status,
)
from agents.dr_plan.sim import planner_sim, reviewer_sim

MAX_PLAN_STEPS = 40


class Plan(BaseModel):
    """The planner's answer."""

    summary: str = ""
    steps: list[PlanStep] = Field(min_length=1, max_length=MAX_PLAN_STEPS)


class StatusArgs(keel.Args):
    service: str | None = Field(None, max_length=80,
                                description="A service or cluster name (e.g. payments-db); none: every service")


class RunbookArgs(keel.Args):
    topic: str = Field(min_length=1, max_length=80, description="The runbook topic, e.g. database_failover")


@keel.tool
def get_service_status(ctx: keel.ToolContext, args: StatusArgs) -> dict[str, object]:
    """Current status of production services: region, role, health, replicas, lag."""
    found = service_status(args.service)
    if found is None:
        known = sorted({x.name for x in SERVICES} | {x.cluster for x in SERVICES})
        raise keel.ToolError(f"unknown service {args.service!r}; known services and clusters: {', '.join(known)}")
    return {"services": [x.model_dump(exclude_none=True) for x in found], "max_promote_lag_s": MAX_PROMOTE_LAG_S}


@keel.tool
def lookup_runbook(ctx: keel.ToolContext, args: RunbookArgs) -> dict[str, object]:
    """Read the runbook on a topic: the required order of steps and the rules a plan must follow."""
    book = RUNBOOKS.get(normalize_topic(args.topic))
    if book is None:
        raise keel.ToolError(f"no runbook on {args.topic!r}; known topics: {', '.join(sorted(RUNBOOKS))}")
    return {"topic": book.topic, "title": book.title, "summary": book.summary, "steps": book.steps,
            "rules": [{"id": r, "description": RULES_BY_ID[r].description} for r in book.rules]}


def rule_check(rule: StepRule) -> keel.OutputCheck:
    """The planner's check of one runbook rule: the plan's violations of it, one line each
    (`[rule id] step N: what is wrong`), against the services' status snapshot."""

    def check(out: keel.FinalOutput) -> list[str]:
        if not isinstance(out.structured, Plan):
            return [f"[{rule.id}] plan: the answer is not a plan"]
        return [v.line() for v in check_plan(out.structured.steps, [rule], SERVICES)]

    check.__qualname__ = f"rule_check[{rule.id}]"
    return check


dr_planner = keel.Agent(
    name="dr_planner",
    description="Drafts a disaster-recovery plan from the services' status and the runbook.",
    prompt="prompts/dr_planner.v1.md",
    tools=[get_service_status, lookup_runbook],
    models={"small": "sim:sim-small", "large": "sim:sim-large"},
    budget=keel.Budget(max_tokens=16_000, max_usd=0.08),
    max_steps=6,
    max_output_tokens=1_600,  # a plan of a dozen steps with rollbacks and verifications: ~1,000 tokens of JSON
    step_kind="plan",
    expected_tokens=8_000,
    output_type=Plan,
    checks={r.id: rule_check(r) for r in RULES},
    sim=planner_sim,
)

dr_reviewer = keel.Agent(
    name="dr_reviewer",
    description="Reviews a disaster-recovery plan that keeps the runbook's rules, as an incident commander.",
    prompt="prompts/dr_reviewer.v1.md",
    models={"small": "sim:sim-small", "large": "sim:sim-large"},
    budget=keel.Budget(max_tokens=6_000, max_usd=0.03),
    max_output_tokens=600,
    expected_tokens=3_000,
    output_type=keel.Review,
    sim=reviewer_sim,
)

AGENTS = [dr_planner, dr_reviewer]

SUPERVISION = "dr_plan"
"""The supervision's name: its ledger task type and workflow id prefix (`dr_plan-<key>`)."""
BUDGET = keel.Budget(max_tokens=40_000, max_usd=0.25)
"""The whole family's: every planner round (16,000-token caps each) and review."""


def task_text(scenario: str, topic: str) -> str:
    """The planner's request (its sim reads the runbook and the scenario back from it)."""
    return (f"Runbook: {normalize_topic(topic)}\nScenario: {scenario.strip()}\n\n"
            "Draft the recovery plan: look up the service status and the runbook first, then answer with the "
            "plan as one JSON object.")


def rules_for(topic: str) -> list[keel.Rule]:
    """A runbook's rules as supervision rules (data): the plan's size, then each rule's named check."""
    book = RUNBOOKS.get(normalize_topic(topic))
    if book is None:
        raise ValueError(f"unknown runbook {topic!r}; known: {', '.join(sorted(RUNBOOKS))}")
    return [keel.Rule(op="check", value=rule_id) for rule_id in book.rules]


def supervision(scenario: str, topic: str = "database_failover", *, max_rounds: int = 3, key: str = "",
                tenant: str = "internal", sim_seed: int = 0, budget: keel.Budget | None = None) -> keel.SupervisorInput:
    """The supervision of one plan: the planner answers, the runbook's rules check, the reviewer reviews.
    Bad input (an empty or too long scenario, an unknown runbook) is a ValueError."""
    if not scenario.strip():
        raise ValueError("the scenario is empty")
    if len(scenario) > 4_000:
        raise ValueError(f"the scenario is {len(scenario):,} characters; the limit is 4,000")
    return keel.SupervisorInput(
        input=task_text(scenario, topic), worker=dr_planner.name, reviewer=dr_reviewer.name, rules=rules_for(topic),
        max_rounds=max_rounds, name=SUPERVISION, feature="operations", budget=budget or BUDGET, key=key,
        tenant=tenant, sim=keel.SimConfig(seed=sim_seed, spiral_rate=0.0))
