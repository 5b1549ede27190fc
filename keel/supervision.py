"""The supervisor pattern over any registered agents: rules as data plus a reviewer agent.

A worker agent answers the request as a child (`KeelAgent`); its answer is checked first against the
`rules` (pure code, here: a field of the structured answer or the text, an operator, a value; or a
deterministic check the worker agent declares, named by the rule: `op="check"`), then, when
it keeps every rule, by an optional reviewer agent (a child whose structured answer is a `Review`, given
the worker's answer as context). An answer that breaks a rule or is not approved goes back to the worker
as a new child, with the violations and the review's issues as context, up to `max_rounds`; then the
supervision is escalated to the human queue with the reasons. Every child's caps come out of the
parent's budget (reserved before it starts, charged with what it really spent).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from keel.types import (
    AgentResult,
    AgentStatus,
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

RuleOp = Literal["max", "min", "equals", "not_equals", "one_of", "matches", "not_matches", "check"]
"""max / min: a number, or the length of a text, list or object, is at most / at least `value`.
equals / not_equals / one_of: the value is (not) `value` / one of the list `value`.
matches / not_matches: the regular expression `value` is (not) found in the text (re.search).
check: the worker agent's check named `value` (`keel.Agent(checks={name: fn})`, a pure function of
the whole answer) finds no problem; each problem it returns is one violation."""

CheckFn = Callable[[str, "dict[str, Any] | None"], "str | Sequence[str] | None"]
"""A named check as the rules run it: (the answer's text, its structured answer) -> its problems."""

FIELD_PATH = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_-]*|[0-9]+)(?:\.(?:[A-Za-z_][A-Za-z0-9_-]*|[0-9]+))*$")


class Rule(BaseModel):
    """One deterministic rule the worker's answer must keep (data, checked in the workflow)."""

    field: str = Field("", description="'' (default): the answer's text; else a dotted path into the "
                                       "structured answer, list items by index (`actions.0.service`)")
    op: RuleOp
    value: Any = None
    message: str = Field("", max_length=500, description="What the worker is told when the rule is broken")

    @model_validator(mode="after")
    def _value_fits_the_operator(self) -> Rule:
        if self.field and not FIELD_PATH.match(self.field):
            raise ValueError(f"field {self.field!r} must be '' (the text) or a dotted path like `a.b.0`")
        if self.op == "check" and not (isinstance(self.value, str) and self.value.strip() and not self.field):
            raise ValueError(f"rule 'check' needs the name of a check of the worker agent as its value and no "
                             f"field, not value={self.value!r}, field={self.field!r}")
        if self.op in ("max", "min") and not _is_number(self.value):
            raise ValueError(f"rule {self.op!r} needs a number as its value, not {self.value!r}")
        if self.op == "one_of" and not (isinstance(self.value, list) and self.value):
            raise ValueError(f"rule 'one_of' needs a non-empty list as its value, not {self.value!r}")
        if self.op in ("matches", "not_matches"):
            if not isinstance(self.value, str):
                raise ValueError(f"rule {self.op!r} needs a regular expression (a string), not {self.value!r}")
            try:
                re.compile(self.value)
            except re.error as e:
                raise ValueError(f"rule {self.op!r}: {self.value!r} is not a regular expression ({e})") from None
        return self

    @property
    def label(self) -> str:
        if self.op == "check":
            return f"check {self.value!r}"
        return self.field or "the answer's text"


class Review(BaseModel):
    """A reviewer agent's structured answer (its `output_type`): is the worker's answer approved."""

    approved: bool
    issues: list[str] = Field(default_factory=list, max_length=20,
                              description="What must change before it is approved (empty when approved)")


MISSING = object()


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def field_value(path: str, text: str, structured: dict[str, Any] | None) -> Any:
    """The value a rule reads: the text for '', else the structured answer at the dotted path
    (`MISSING` when it is not there)."""
    if not path:
        return text
    value: Any = structured if structured is not None else MISSING
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
    return value


def _show(v: Any) -> str:
    """A value in a violation: a text quoted, anything else as JSON; cut at 80 characters."""
    if isinstance(v, str):
        return repr(v[:80] + "…") if len(v) > 80 else repr(v)
    s = json.dumps(v, sort_keys=True, default=str)
    return s[:80] + "…" if len(s) > 80 else s


def _same(a: Any, b: Any) -> bool:
    """JSON equality: True is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if _is_number(a) or _is_number(b):
        return _is_number(a) and _is_number(b) and bool(a == b)
    return type(a) is type(b) and bool(a == b)


def _problem(rule: Rule, value: Any) -> str | None:
    """Why `value` breaks `rule`, or None."""
    what = rule.label
    if value is MISSING:
        return f"{what} is missing from the answer"
    op, limit = rule.op, rule.value
    if op in ("max", "min"):
        if _is_number(value):
            measured, kind = value, "is"
        elif isinstance(value, str | list | dict):
            measured, kind = len(value), "has length"
        else:
            return f"{what} is {_show(value)}, not a number or something with a length"
        if op == "max" and measured > limit:
            return f"{what} {kind} {measured}, above the maximum {limit}"
        if op == "min" and measured < limit:
            return f"{what} {kind} {measured}, below the minimum {limit}"
        return None
    if op == "equals":
        return None if _same(value, limit) else f"{what} is {_show(value)}, not {_show(limit)}"
    if op == "not_equals":
        return f"{what} must not be {_show(limit)}" if _same(value, limit) else None
    if op == "one_of":
        return None if any(_same(value, v) for v in limit) else \
            f"{what} is {_show(value)}, not one of {', '.join(_show(v) for v in limit)}"
    subject = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    found = re.search(limit, subject)
    if op == "matches" and found is None:
        return f"{what} does not match {limit!r}"
    if op == "not_matches" and found is not None:
        return f"{what} contains {found.group(0)[:80]!r} (must not match {limit!r})"
    return None


def check_rule(rule: Rule, text: str, structured: dict[str, Any] | None) -> str | None:
    """The violation of one data rule by an answer (its message first, then what was found), or None.
    A `check` rule is run by `violations`, which is given the checks."""
    if rule.op == "check":
        raise ValueError(f"rule {rule.label} runs a check: use violations(..., checks=...)")
    problem = _problem(rule, field_value(rule.field, text, structured))
    if problem is None:
        return None
    return f"{rule.message} ({problem})" if rule.message else problem


def _check_problems(rule: Rule, fn: CheckFn, text: str, structured: dict[str, Any] | None) -> list[str]:
    found = fn(text, structured)
    if found is None:
        return []
    problems = [found] if isinstance(found, str) else list(found)
    if not all(isinstance(p, str) for p in problems):
        raise TypeError(f"{rule.label} returned {found!r}, not a text or a list of texts")
    return [f"{rule.message} ({p})" if rule.message else p for p in problems if p]


def violations(rules: list[Rule], text: str, structured: dict[str, Any] | None,
               checks: Mapping[str, CheckFn] | None = None) -> list[str]:
    """Every rule the answer breaks, in the rules' order (a check's problems in its own order). Pure
    and deterministic (runs in the workflow): `checks` are the worker agent's named checks."""
    out: list[str] = []
    for r in rules:
        if r.op == "check":
            fn = (checks or {}).get(str(r.value))
            if fn is None:
                raise KeyError(f"the worker agent declares no check {r.value!r}")
            out += _check_problems(r, fn, text, structured)
        else:
            v = check_rule(r, text, structured)
            if v is not None:
                out.append(v)
    return out


def check_names(rules: list[Rule]) -> list[str]:
    """The worker agent's checks the rules name, in order."""
    return list(dict.fromkeys(str(r.value) for r in rules if r.op == "check"))


class SupervisorInput(BaseModel):
    """Input of the supervisor workflow (`KeelSupervisor`)."""

    input: str = Field(min_length=1, description="The request the worker answers")
    worker: str
    """The registered agent that answers."""
    reviewer: str | None = None
    """A registered agent whose structured answer is a `Review` (its `output_type` is keel.supervision.Review)."""
    rules: list[Rule] = Field(default_factory=list, max_length=50)
    max_rounds: int = Field(3, ge=1, le=10)
    """Worker answers at most (the first and every one sent back)."""
    name: str = "supervisor"
    """The supervision's name: its task type in the ledger and the prefix of its workflow id."""
    budget: Budget = Field(default_factory=lambda: Budget(max_tokens=20_000, max_usd=0.10))
    """The whole family's budget: every worker round's and review's caps come out of it."""
    key: str = ""
    tenant: str = "default"
    feature: str = ""
    approval_mode: ApprovalMode = "wait"
    max_child_attempts: int = Field(2, ge=1, le=5)
    """A child whose workflow fails is retried alone, as a new workflow, up to this often."""
    sim: SimConfig = Field(default_factory=SimConfig)
    models: dict[Tier, ModelSpec] | None = None
    """Models by tier for every child agent, over each agent's own (KEEL_MODEL_SMALL/LARGE at its start)."""
    prices: dict[str, Price] = Field(default_factory=dict)
    """The user's prices pinned by the starter, passed to every child (AgentInput.prices)."""
    llm_heartbeat_timeout_s: float | None = Field(None, gt=0)
    """KEEL_LLM_HEARTBEAT_TIMEOUT_S pinned by the starter: the model calls' of this task and of every child."""

    @model_validator(mode="after")
    def _supervises_something(self) -> SupervisorInput:
        if not self.rules and not self.reviewer:
            raise ValueError("a supervision needs `rules` or a `reviewer` agent")
        return self


class SupervisionRound(BaseModel):
    """One worker answer and what the supervisor made of it."""

    round: int
    worker: str = ""
    """The worker child's name (`worker-<round>`)."""
    worker_status: AgentStatus | Literal["not_run"] = "not_run"
    answer: str = ""
    structured: dict[str, Any] | None = None
    violations: list[str] = Field(default_factory=list)
    """The rules the answer broke (the reviewer is not asked about an answer that breaks one)."""
    review: Review | None = None
    reviewer: str = ""
    """The reviewer child's name (`reviewer-<round>`), when it was asked."""
    accepted: bool = False

    @property
    def reasons(self) -> list[str]:
        """Why the answer was sent back: its violations, then the review's issues."""
        out = list(self.violations)
        if self.review is not None and not self.review.approved:
            out += self.review.issues or ["the reviewer did not approve it (no issues given)"]
        return out


SupervisorStatus = Literal["completed", "escalated", "budget_exceeded", "rejected"]


class SupervisorResult(BaseModel):
    workflow_id: str
    status: SupervisorStatus
    output: str = ""
    """The accepted answer (empty unless completed; every round's answer is in `rounds`)."""
    structured: dict[str, Any] | None = None
    reason: str = ""
    rounds: list[SupervisionRound] = Field(default_factory=list)
    children: list[ChildRecord] = Field(default_factory=list)
    """Every worker round and review, in the order they started, with their usage over all attempts."""
    results: dict[str, AgentResult] = Field(default_factory=dict)
    """Each child's last result, by its name (`worker-1`, `reviewer-1`, ...)."""
    usage: TaskUsage = Field(default_factory=TaskUsage)
    """The whole family's usage (every child, every attempt)."""
    budget: BudgetReport = Field(default_factory=BudgetReport)
    decisions: list[Decision] = Field(default_factory=list)
