"""The orchestrator pattern over any registered agents: its input, its plan and its result.

An orchestration runs child agents by name, each a `KeelAgent` child workflow with every control of
its own, under one parent budget: a child's caps are reserved from what is left of the parent's before
it starts (shrunk to its share when its own caps do not fit), and what it really spent is charged when
it ends. The plan is given (`tasks`) or made by a planner agent whose structured answer is a `Plan`;
tasks run in stages (a task runs once the tasks it names in `after` have ended, with their answers as
context); an optional synthesizer agent writes the final answer from the children's answers.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from keel.types import (
    AgentResult,
    ApprovalMode,
    Budget,
    BudgetReport,
    ChildRecord,
    Decision,
    ModelSpec,
    Price,
    SimConfig,
    TaskUsage,
    Tier,
)

TASK_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,47}$")

MIN_CHILD_TOKENS = 500
"""Below this share of the parent's tokens left, a child is not started (it could not do anything)."""


class ChildTask(BaseModel):
    """One child agent of an orchestration."""

    agent: str = Field(description="The registered agent's name")
    input: str = Field(min_length=1, max_length=4000, description="The child's request")
    name: str = Field("", description="Unique within the plan (default: the agent's name)")
    after: list[str] = Field(default_factory=list,
                             description="Tasks that must end first; their answers are this task's context")
    budget: Budget | None = Field(None, description="The child's caps (default: its agent's budget)")


class Plan(BaseModel):
    """A planner agent's structured answer (its `output_type`): the tasks to run."""

    tasks: list[ChildTask] = Field(min_length=1, max_length=12)


def named(tasks: list[ChildTask]) -> list[ChildTask]:
    """The tasks with their default names filled in (`agent`, then `agent-2`, ...). A name given
    twice is left as it is, for plan_problems to report."""
    taken = {t.name for t in tasks if t.name}
    out: list[ChildTask] = []
    for t in tasks:
        if not t.name:
            name, n = t.agent, 1
            while name in taken:
                n += 1
                name = f"{t.agent}-{n}"
            taken.add(name)
            t = t.model_copy(update={"name": name})
        out.append(t)
    return out


def plan_problems(tasks: list[ChildTask], known: set[str]) -> list[str]:
    """Why a plan cannot run: unknown agents, bad or duplicate names, unknown or circular `after`."""
    problems: list[str] = []
    names = [t.name for t in tasks]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"task name {n!r} is used twice")
    for t in tasks:
        if not TASK_NAME.match(t.name):
            problems.append(f"task name {t.name!r} must be lowercase letters, digits, '-' or '_'")
        if t.agent not in known:
            problems.append(f"task {t.name!r}: no agent {t.agent!r} is registered on this worker")
        for a in t.after:
            if a not in names:
                problems.append(f"task {t.name!r} waits for {a!r}, which is not in the plan")
    if not problems and stages(tasks) is None:
        problems.append("the tasks' `after` lists form a cycle")
    return problems


def stages(tasks: list[ChildTask]) -> list[list[ChildTask]] | None:
    """The tasks in stages: each stage's tasks wait only for earlier stages'. None for a cycle."""
    done: set[str] = set()
    left = list(tasks)
    out: list[list[ChildTask]] = []
    while left:
        ready = [t for t in left if all(a in done for a in t.after)]
        if not ready:
            return None
        out.append(ready)
        done.update(t.name for t in ready)
        left = [t for t in left if t.name not in done]
    return out


class OrchestratorInput(BaseModel):
    """Input of the orchestrator workflow (`keel orchestrate`)."""

    input: str = Field(description="The request the whole orchestration serves")
    tasks: list[ChildTask] = Field(default_factory=list)
    """The plan, when it is given; else `planner` makes it."""
    planner: str | None = None
    """An agent whose structured answer is a `Plan` (its `output_type` is keel.Plan)."""
    synthesizer: str | None = None
    """An agent that writes the final answer from the children's answers (as context)."""
    name: str = "orchestrator"
    """The orchestration's name: its task type in the ledger and the prefix of its workflow id."""
    budget: Budget = Field(default_factory=lambda: Budget(max_tokens=20_000, max_usd=0.10))
    """The whole family's budget: the planner's, every child's and the synthesizer's caps come out of it."""
    child_budgets: dict[str, Budget] = Field(default_factory=dict)
    """Caps of children by task name (`planner` and `synthesizer` included), over the plan's and the
    agent's own; a limit left None keeps theirs (a child is always capped when its agent is)."""
    key: str = ""
    tenant: str = "default"
    feature: str = ""
    approval_mode: ApprovalMode = "wait"
    max_child_attempts: int = Field(2, ge=1, le=5)
    """A child that fails (its workflow errors) is retried alone, as a new workflow, up to this often."""
    sim: SimConfig = Field(default_factory=SimConfig)
    models: dict[Tier, ModelSpec] | None = None
    """Models by tier for every child agent, over each agent's own (KEEL_MODEL_SMALL/LARGE at its start)."""
    prices: dict[str, Price] = Field(default_factory=dict)
    """The user's prices pinned by the starter, passed to every child (AgentInput.prices)."""
    llm_heartbeat_timeout_s: float | None = Field(None, gt=0)
    """KEEL_LLM_HEARTBEAT_TIMEOUT_S pinned by the starter: the model calls' of this task and of every child."""

    @model_validator(mode="after")
    def _has_a_plan(self) -> OrchestratorInput:
        if not self.tasks and not self.planner:
            raise ValueError("an orchestration needs `tasks` or a `planner` agent")
        if self.tasks and self.planner:
            raise ValueError("give `tasks` or a `planner`, not both")
        return self


def child_caps(inp: OrchestratorInput, name: str, own: Budget) -> Budget:
    """The caps of child `name`: `own` (the plan's or its agent's), overridden by `inp.child_budgets`."""
    override = inp.child_budgets.get(name)
    if override is None:
        return own
    return own.model_copy(update={
        "max_tokens": own.max_tokens if override.max_tokens is None else override.max_tokens,
        "max_usd": own.max_usd if override.max_usd is None else override.max_usd,
    })


OrchestratorStatus = Literal["completed", "partial", "escalated", "budget_exceeded", "rejected"]


class OrchestratorResult(BaseModel):
    workflow_id: str
    status: OrchestratorStatus
    output: str = ""
    """The synthesizer's answer, or every completed child's answer under its name."""
    structured: dict[str, object] | None = None
    """The synthesizer's structured answer, when its agent declares one."""
    reason: str = ""
    plan: list[ChildTask] = Field(default_factory=list)
    plan_source: Literal["given", "planner", "none"] = "none"
    children: list[ChildRecord] = Field(default_factory=list)
    """Planner, tasks and synthesizer, in the order they started, with their usage over all attempts."""
    results: dict[str, AgentResult] = Field(default_factory=dict)
    """Each child's last result, by its task name."""
    missing: list[str] = Field(default_factory=list)
    """The tasks that did not complete, each with why."""
    usage: TaskUsage = Field(default_factory=TaskUsage)
    """The whole family's usage (every child, every attempt)."""
    budget: BudgetReport = Field(default_factory=BudgetReport)
    decisions: list[Decision] = Field(default_factory=list)


# --- swarm: K peers of one agent, a vote on one field of their structured answers ----------------


class SwarmInput(BaseModel):
    """Input of the swarm workflow (`keel vote`, `keel swarm`): `peers` copies of one agent answer the same
    input independently (each its own seed and temperature); the value of `field` in their structured
    answers is put to a vote. Peers never act: their writes are recorded as dry runs, not executed."""

    agent: str
    input: str = Field(min_length=1)
    field: str = Field(min_length=1, description="A field of the agent's structured answer, e.g. category or a.b")
    peers: int = Field(3, ge=2, le=12)
    quorum: float = Field(0.5, gt=0, le=1)
    """The winning value needs more than this share of the peers (all of them, answered or not)."""
    temperatures: list[Annotated[float, Field(ge=0, le=2)]] = Field(default_factory=lambda: [0.0, 0.4, 0.8],
                                                                   min_length=1, max_length=12)
    """Peer i's temperature: temperatures[i % len]."""
    models: list[ModelSpec] = Field(default_factory=list, max_length=12)
    """Peer i's model (for every tier): models[i % len]; empty: the agent's own models."""
    name: str = "swarm"
    budget: Budget = Field(default_factory=lambda: Budget(max_tokens=20_000, max_usd=0.10))
    key: str = ""
    tenant: str = "default"
    feature: str = ""
    sim: SimConfig = Field(default_factory=SimConfig)
    tier_models: dict[Tier, ModelSpec] | None = None
    """Every peer's models by tier when `models` is empty, over the agent's own (KEEL_MODEL_SMALL/LARGE)."""
    prices: dict[str, Price] = Field(default_factory=dict)
    """The user's prices pinned by the starter, passed to every peer (AgentInput.prices)."""
    llm_heartbeat_timeout_s: float | None = Field(None, gt=0)
    """KEEL_LLM_HEARTBEAT_TIMEOUT_S pinned by the starter: the model calls' of this task and of every child."""

    @field_validator("input")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the input is blank")
        return v


class PeerAnswer(BaseModel):
    name: str
    status: str
    value: object = None
    """The field's value in the peer's answer; None when it gave none."""
    problem: str = ""
    answer: dict[str, Any] | None = None
    """The peer's whole structured answer (its other fields: a confidence, a second label...)."""
    model: str = ""
    """The model it ran on ("" when the agent's own)."""
    temperature: float = 0.0


SwarmStatus = Literal["completed", "escalated", "budget_exceeded", "rejected"]


class SwarmResult(BaseModel):
    workflow_id: str
    status: SwarmStatus
    value: object = None
    """The value more than `quorum` of the peers gave (None when none did)."""
    votes: dict[str, int] = Field(default_factory=dict)
    """Each value given (as JSON) and how many peers gave it."""
    agreement: float = 0.0
    """The winning value's share of all peers."""
    answers: list[PeerAnswer] = Field(default_factory=list)
    reason: str = ""
    children: list[ChildRecord] = Field(default_factory=list)
    usage: TaskUsage = Field(default_factory=TaskUsage)
    budget: BudgetReport = Field(default_factory=BudgetReport)
    decisions: list[Decision] = Field(default_factory=list)


def tally(answers: list[PeerAnswer], peers: int, quorum: float) -> tuple[object, dict[str, int], float, str]:
    """The vote: (winning value or None, votes by JSON value, the winner's share of all peers, why there
    is no winner or ""). Ties and shares at or below the quorum have no winner."""
    votes: dict[str, int] = {}
    values: dict[str, object] = {}
    for a in answers:
        if a.problem:
            continue
        k = json.dumps(a.value, sort_keys=True, default=str)
        votes[k] = votes.get(k, 0) + 1
        values[k] = a.value
    if not votes:
        return None, votes, 0.0, "no peer gave a value"
    ranked = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))
    top, count = ranked[0]
    share = count / peers
    if len(ranked) > 1 and ranked[1][1] == count:
        return None, votes, share, f"a tie: {count} peers each for {top} and {ranked[1][0]}"
    if share <= quorum:
        return None, votes, share, f"{count} of {peers} peers agree on {top}: not more than the quorum {quorum:.0%}"
    return values[top], votes, share, ""
