"""Shadow mode, the pure part: what a candidate is, which tasks are shadowed, how a primary and its
candidate are compared, and the report over many comparisons.

A candidate (a prompt version and/or models) runs beside the primary on the same task, its writes
dry-run (recorded, never executed); only the primary's output acts. Each shadowed task leaves one
comparison row; `keel shadow report` summarizes them per candidate.

The primary is a task of any registered agent (AgentInput, a configuration per agent:
`CandidateSpec.agent`); a candidate label starts with `agent=<name>,`, so one agent's comparisons and
reports never mix with another's.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from statistics import fmean

from pydantic import BaseModel, Field

from keel.pricing import UnpricedModelError, price_for
from keel.types import (
    AgentInput,
    AgentResult,
    BlockedAction,
    ModelSpec,
    Route,
    TaskUsage,
    Tier,
)

SHADOW_FEATURE = "shadow"
"""Chargeback feature of every candidate run: shadow spend is reported apart from the product's."""
SHADOW_RECORD_ACTIVITY = "shadow_record"
"""Writes a comparison row (idempotent on the shadow workflow id)."""

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
"""A prompt version's name (its files are checked by the starter and the worker: keel does no I/O)."""
_AGENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEYS = ("agent", "prompt", "model", "small", "large")
SPEC_EXAMPLES = "prompt=v2, model=sim:sim-small, large=openai:gpt-4o,prompt=v2, agent=oncall,prompt=v2"
AGENT_LABEL_PREFIX = "agent="
"""How an agent candidate's label starts (`agent=oncall,prompt=v2`)."""


class CandidateSpecError(ValueError):
    """A candidate spec that cannot be used; the message says why."""


class CandidateSpec(BaseModel):
    """What the candidate changes from the primary: its prompt version and/or its models. Anything
    left None is the primary's. `agent`: the registered agent whose tasks it shadows (set by `for_agent`)."""

    prompt_version: str | None = None
    small_model: ModelSpec | None = None
    large_model: ModelSpec | None = None
    agent: str | None = None

    @property
    def label(self) -> str:
        """The canonical spec string, e.g. `prompt=v2,large=openai:gpt-4o` (what reports group by);
        an agent's starts with `agent=<name>,`."""
        parts = [f"{AGENT_LABEL_PREFIX}{self.agent}"] if self.agent else []
        parts += [f"prompt={self.prompt_version}"] if self.prompt_version else []
        small, large = self.small_model, self.large_model
        if small is not None and small == large:
            parts.append(f"model={small.provider}:{small.model}")
        else:
            parts += [f"{tier}={m.provider}:{m.model}" for tier, m in (("small", small), ("large", large)) if m]
        return ",".join(parts)

    @classmethod
    def parse(cls, spec: str, check_prices: bool = True) -> CandidateSpec:
        """`key=value` pairs separated by commas: `prompt=VERSION`, `model=provider:model` (both tiers),
        `small=provider:model`, `large=provider:model`, and `agent=NAME` for a registered agent's tasks
        (without it, `for_agent` names the agent). Raises CandidateSpecError, saying why."""
        text = spec.strip()
        if not text:
            raise CandidateSpecError(f"empty candidate spec; examples: {SPEC_EXAMPLES}")
        seen: dict[str, str] = {}
        for part in (p.strip() for p in text.split(",")):
            key, sep, value = part.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not part:
                raise CandidateSpecError(f"candidate spec {spec!r} has an empty part (a stray comma?)")
            if not sep or not value:
                raise CandidateSpecError(f"{part!r} in candidate spec {spec!r} must look like key=value; "
                                         f"examples: {SPEC_EXAMPLES}")
            if key not in _KEYS:
                raise CandidateSpecError(f"unknown key {key!r} in candidate spec {spec!r}: use {', '.join(_KEYS)}")
            if key in seen:
                raise CandidateSpecError(f"{key!r} is given twice in candidate spec {spec!r}")
            seen[key] = value
        if "model" in seen and ("small" in seen or "large" in seen):
            raise CandidateSpecError(f"candidate spec {spec!r}: `model` sets both tiers; do not combine it with "
                                     "`small` or `large`")
        models: dict[str, ModelSpec] = {}
        for key in ("model", "small", "large"):
            if key in seen:
                try:
                    models[key] = ModelSpec.parse(seen[key])
                except ValueError as e:
                    raise CandidateSpecError(f"{key}= in candidate spec {spec!r}: {e}") from None
        both = models.get("model")
        candidate = cls(prompt_version=seen.get("prompt"), small_model=both or models.get("small"),
                        large_model=both or models.get("large"), agent=seen.get("agent"))
        problems = candidate.problems(check_prices)
        if problems:
            raise CandidateSpecError(f"candidate spec {spec!r}: " + "; ".join(problems))
        return candidate

    def problems(self, check_prices: bool = True) -> list[str]:
        """Why this candidate cannot run (a malformed prompt version, an unpriced model), or []. The
        prompt files themselves are checked by the starter against the agent's."""
        problems = []
        if self.prompt_version is None and self.small_model is None and self.large_model is None:
            problems.append("it changes nothing: give prompt=, model=, small= or large=")
        if self.agent is not None and not _AGENT.match(self.agent):
            problems.append(f"agent name {self.agent!r} must be 1-64 letters, digits or _.-")
        if self.prompt_version is not None and not _VERSION.match(self.prompt_version):
            problems.append(f"prompt version {self.prompt_version!r} must be 1-32 letters, digits or _.- (e.g. v2)")
        if check_prices:
            specs = {(m.provider, m.model) for m in (self.small_model, self.large_model) if m is not None}
            for provider, model in sorted(specs):
                try:
                    price_for(provider, model)
                except UnpricedModelError as e:
                    problems.append(str(e))
        return problems

    def for_agent(self, agent: str) -> CandidateSpec:
        """This candidate, shadowing the tasks of `agent`."""
        return self.model_copy(update={"agent": agent})

    def apply_agent(self, primary: AgentInput) -> AgentInput:
        """The candidate's input for an agent task: the primary's task with this prompt version and
        models, as a dry run (every write recorded, never executed; a `confirm` write is recorded as a
        proposal and nobody is asked), charged to the shadow feature, outside the circuit breaker."""
        models: dict[Tier, ModelSpec] = dict(primary.models or {})
        if self.small_model is not None:
            models["small"] = self.small_model
        if self.large_model is not None:
            models["large"] = self.large_model
        return primary.model_copy(update={
            "prompt_version": self.prompt_version or primary.prompt_version,
            "models": models or None,
            "dry_run": True,
            "feature": SHADOW_FEATURE,
            "breaker": False,
            "approval_mode": "escalate",
        })


class ShadowConfig(BaseModel):
    """The active shadow configuration: this share of the candidate's agent's new tasks runs the
    candidate beside them."""

    candidate: CandidateSpec
    fraction: float = Field(ge=0, le=1)
    started_at: datetime | None = None


def shadow_point(key: str) -> int:
    """Where a task falls in [0, 2^64): the first 8 bytes of sha256 of its id. Stable across runs,
    processes and machines (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def is_shadowed(key: str, fraction: float) -> bool:
    """Whether this task is in the shadowed `fraction` (0: none, 1: all). Deterministic per task key."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction {fraction!r} must be between 0 and 1")
    if fraction >= 1:
        return True
    return shadow_point(key) < int(fraction * 2**64)


def candidate_workflow_id(primary_workflow_id: str) -> str:
    return f"{primary_workflow_id}.shadow"


def shadow_workflow_id(primary_workflow_id: str) -> str:
    return f"shadow-{primary_workflow_id}"


def agent_label_prefix(agent: str) -> str:
    """What the labels of `agent`'s candidates start with."""
    return f"{AGENT_LABEL_PREFIX}{agent},"


def agent_of_label(label: str) -> str | None:
    """The agent a candidate label shadows; None when it names none."""
    if not label.startswith(AGENT_LABEL_PREFIX):
        return None
    return label[len(AGENT_LABEL_PREFIX):].split(",", 1)[0]


class ShadowInput(BaseModel):
    """Input of ShadowWorkflow: one task of a registered agent, run by the primary and by the candidate."""

    candidate: CandidateSpec
    primary_workflow_id: str
    """The task's normal workflow id: approvals, watch and trace on it work unchanged."""
    agent: AgentInput | None = None
    """The primary task of a registered agent (`KeelAgent`)."""


class ShadowComparison(BaseModel):
    """One shadowed task: the primary against the candidate (deltas are candidate minus primary)."""

    shadow_workflow_id: str
    primary_workflow_id: str
    candidate_workflow_id: str
    task_key: str = ""
    tenant: str = ""
    candidate: str
    """The candidate's label (CandidateSpec.label)."""
    primary_status: str
    candidate_status: str | None = None
    primary_route: str
    candidate_route: str | None = None
    primary_category: str | None = None
    candidate_category: str | None = None
    same_outcome: bool = False
    """Same route and same final status (a primary resolved by a human counts as escalated)."""
    classification_agrees: bool | None = None
    """Same category; None when the candidate produced no result."""
    primary_cost_usd: float = 0.0
    candidate_cost_usd: float | None = None
    cost_delta_usd: float | None = None
    primary_steps: int = 0
    candidate_steps: int | None = None
    step_delta: int | None = None
    primary_tokens: int = 0
    candidate_tokens: int | None = None
    token_delta: int | None = None
    dry_run_writes: int = 0
    dry_run_actions: list[BlockedAction] = Field(default_factory=list)
    """The candidate's writes: validated and recorded, never executed."""
    proposed_writes: list[BlockedAction] = Field(default_factory=list)
    """`confirm` writes the candidate proposed (it never asks anyone for approval)."""
    candidate_failed: bool = False
    candidate_error: str = ""
    created_at: datetime | None = None
    primary_answer: str | None = None
    """An agent task's answer (agents only; in the workflow's result, not in the comparison row)."""
    candidate_answer: str | None = None
    answer_agrees: bool | None = None
    """Agents only: the same answer, whitespace and case aside (None when the candidate failed)."""


NOT_STORED = frozenset({"primary_answer", "candidate_answer", "answer_agrees"})
"""ShadowComparison fields the comparison row does not have (they are in the shadow workflow's result)."""


def final_status(status: str) -> str:
    """The agent's outcome: a task a human resolved after its escalation was escalated by the agent."""
    return "escalated" if status == "resolved_by_human" else status


def agent_route(status: str) -> Route:
    """The route an agent task took (as its outcome row says): only a completed task answered."""
    return "reply" if status == "completed" else "human"


def _proposal(b: BlockedAction) -> bool:
    return b.reason.startswith("requires human approval")


def agent_actions(r: AgentResult) -> str:
    """What a task acted on, as a canonical string: the tools it executed (a dry run's recorded writes
    included) and the `confirm` writes it proposed, sorted. A production task whose restart a human
    approved and a candidate that proposed the same restart acted on the same things."""
    return ",".join(sorted([*r.tools_executed, *(b.tool for b in r.tools_blocked if _proposal(b))]))


def _same_answer(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def compare_agent(
    primary: AgentResult,
    candidate: AgentResult | None,
    *,
    primary_input: AgentInput,
    shadow_workflow_id: str,
    candidate_workflow_id: str,
    candidate_label: str,
    candidate_error: str = "",
    candidate_spent: TaskUsage | None = None,
    primary_error: str = "",
) -> ShadowComparison:
    """The comparison row of one shadowed agent task: `task_key` is the task's key (or its workflow
    id), `tenant` its tenant, the route `reply`/`human` as the agent's outcome
    row, and the `category` columns hold what each acted on (agent_actions), so `classification_agrees`
    reads "same actions". The answers are compared too (`answer_agrees`, in the result only).
    `primary_error`: the primary failed (`primary` is then failed_agent_primary's stand-in)."""
    c = ShadowComparison(
        shadow_workflow_id=shadow_workflow_id, primary_workflow_id=primary.workflow_id,
        candidate_workflow_id=candidate_workflow_id, task_key=primary_input.key or primary.workflow_id,
        tenant=primary_input.tenant, candidate=candidate_label, primary_status=primary.status,
        primary_route=agent_route(primary.status), primary_category=agent_actions(primary),
        primary_cost_usd=primary.cost_usd, primary_steps=primary.steps, primary_tokens=primary.tokens,
        primary_answer=primary.output,
    )
    if primary_error:
        c.primary_status = "failed"
    if candidate is None:
        spent = {"candidate_cost_usd": candidate_spent.cost_usd, "candidate_tokens": candidate_spent.tokens
                 } if candidate_spent is not None else {}
        return c.model_copy(update={"candidate_failed": True, "candidate_error": candidate_error or "failed", **spent})
    route = agent_route(candidate.status)
    actions = agent_actions(candidate)
    return c.model_copy(update={
        "candidate_status": candidate.status,
        "candidate_route": route,
        "candidate_category": actions,
        "same_outcome": route == c.primary_route and candidate.status == c.primary_status,
        "classification_agrees": actions == c.primary_category,
        "candidate_cost_usd": candidate.cost_usd,
        "cost_delta_usd": round(candidate.cost_usd - primary.cost_usd, 8),
        "candidate_steps": candidate.steps,
        "step_delta": candidate.steps - primary.steps,
        "candidate_tokens": candidate.tokens,
        "token_delta": candidate.tokens - primary.tokens,
        "dry_run_writes": len(candidate.dry_run_actions),
        "dry_run_actions": candidate.dry_run_actions,
        "proposed_writes": [b for b in candidate.tools_blocked if _proposal(b)],
        "candidate_answer": candidate.output,
        "answer_agrees": _same_answer(primary.output, candidate.output),
    })


def failed_agent_primary(workflow_id: str, inp: AgentInput, reason: str) -> AgentResult:
    """A stand-in result for an agent's primary task that failed (it has none); compare_agent records
    it as `failed` when given `primary_error`."""
    return AgentResult(workflow_id=workflow_id, agent=inp.agent, status="escalated", reason=reason)


def agent_usage_of(r: AgentResult) -> TaskUsage:
    return TaskUsage(llm_calls=r.llm_calls, input_tokens=r.input_tokens, output_tokens=r.output_tokens,
                     cost_usd=r.cost_usd)


# --- the report -------------------------------------------------------------------------------


class ShadowSummary(BaseModel):
    """`keel shadow report` for one candidate. Rates, costs and means are over the tasks the candidate
    finished (a failed candidate has no outcome to compare); failures are counted apart."""

    candidate: str
    agent: str | None = None
    """The agent whose tasks the candidate shadows."""
    tasks: int = 0
    compared: int = 0
    same_outcome: int = 0
    same_outcome_rate: float | None = None
    classification_agreement_rate: float | None = None
    """The same actions (tools executed or proposed)."""
    primary_cost_usd: float = 0.0
    candidate_cost_usd: float = 0.0
    total_cost_delta_usd: float = 0.0
    mean_cost_delta_usd: float | None = None
    mean_step_delta: float | None = None
    mean_token_delta: float | None = None
    dry_run_writes: int = 0
    dry_run_by_tool: dict[str, int] = Field(default_factory=dict)
    proposed_writes: int = 0
    candidate_failures: int = 0
    failed_candidate_cost_usd: float = 0.0
    """What the failed candidates spent before they failed (not in the deltas)."""
    failure_reasons: dict[str, int] = Field(default_factory=dict)
    """Why candidates failed (first line of the error, truncated), with counts."""
    outcome_changes: dict[str, int] = Field(default_factory=dict)
    """`primary status/route -> candidate status/route` for tasks whose outcome differs."""
    first_at: datetime | None = None
    last_at: datetime | None = None


def summarize(comparisons: list[ShadowComparison]) -> list[ShadowSummary]:
    """One summary per candidate, in order of first appearance."""
    groups: dict[str, list[ShadowComparison]] = {}
    for c in comparisons:
        groups.setdefault(c.candidate, []).append(c)
    return [_summary(label, rows) for label, rows in groups.items()]


def _summary(label: str, rows: list[ShadowComparison]) -> ShadowSummary:
    done = [r for r in rows if not r.candidate_failed]
    s = ShadowSummary(candidate=label, agent=agent_of_label(label), tasks=len(rows), compared=len(done),
                      candidate_failures=len(rows) - len(done))
    s.same_outcome = sum(r.same_outcome for r in done)
    if done:
        s.same_outcome_rate = s.same_outcome / len(done)
        s.classification_agreement_rate = sum(bool(r.classification_agrees) for r in done) / len(done)
        s.mean_cost_delta_usd = round(fmean(r.cost_delta_usd or 0.0 for r in done), 8)
        s.mean_step_delta = fmean(r.step_delta or 0 for r in done)
        s.mean_token_delta = fmean(r.token_delta or 0 for r in done)
    s.primary_cost_usd = round(sum(r.primary_cost_usd for r in done), 8)
    s.candidate_cost_usd = round(sum(r.candidate_cost_usd or 0.0 for r in done), 8)
    s.total_cost_delta_usd = round(sum(r.cost_delta_usd or 0.0 for r in done), 8)
    for r in rows:
        s.dry_run_writes += r.dry_run_writes
        s.proposed_writes += len(r.proposed_writes)
        for a in r.dry_run_actions:
            s.dry_run_by_tool[a.tool] = s.dry_run_by_tool.get(a.tool, 0) + 1
        if r.candidate_failed:
            s.failed_candidate_cost_usd = round(s.failed_candidate_cost_usd + (r.candidate_cost_usd or 0.0), 8)
            why = (r.candidate_error.splitlines() or ["failed"])[0][:120]
            s.failure_reasons[why] = s.failure_reasons.get(why, 0) + 1
        elif not r.same_outcome:
            change = f"{r.primary_status}/{r.primary_route} -> {r.candidate_status}/{r.candidate_route}"
            s.outcome_changes[change] = s.outcome_changes.get(change, 0) + 1
    stamps = [r.created_at for r in rows if r.created_at is not None]
    s.first_at, s.last_at = (min(stamps), max(stamps)) if stamps else (None, None)
    return s
