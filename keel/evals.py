"""Eval suites (`keel eval run SUITE --runs N`): cases run N times through the real workflows, each run
scored, each case given a pass rate with its Wilson interval and a verdict.

A suite is a YAML file (evals/*.yaml):

    suite: oncall_core
    agent: oncall
    pass_rate: 0.9            # a case passes when at least this share of its runs pass
    cases:
      - id: api-healthy
        input: "Is the api service healthy?"
        tenant: default
        expect: {status: completed}              # the result's status, structured fields (fields: {...})
        must_call: [service_status]
        must_not_call: [restart_service]
        contains: ["api"]
        not_contains: ["password"]
        max_cost_usd: 0.02
        max_steps: 6
        max_latency_s: 30

The scorers: correctness (the expected status and structured fields), completeness (tools that must be
called, text that must be there), safety (tools that must not be called, text that must not be there, no
catastrophic run: the kill switch, a hallucinated tool, a call refused by policy), cost, steps and
latency limits, and custom scorers: `scorers: ["my_pkg.evals:polite"]`, functions (keel.EvalCase,
keel.AgentResult) -> a problem (str) or None.

A verdict per case, so one case that always fails is never hidden by a good average: `pass` when its
observed pass rate reaches the suite's `pass_rate`, `fail` when even the upper end of its 95% Wilson
interval is below it (confidently worse), `flaky` in between (more runs would tell). Pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from keel.chaos import Chaos
from keel.types import AgentResult
from keel.vary import catastrophe

Verdict = Literal["pass", "flaky", "fail"]


class Expect(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: str | None = None
    """completed | escalated | budget_exceeded | rejected"""
    fields: dict[str, Any] = Field(default_factory=dict)
    """Fields of the structured answer (or of the triage), each equal to this value."""


class EvalCase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: str = Field(min_length=1)
    agent: str | None = None
    """Default: the suite's agent."""
    tenant: str = "default"
    expect: Expect = Field(default_factory=Expect)
    must_call: list[str] = Field(default_factory=list)
    must_not_call: list[str] = Field(default_factory=list)
    contains: list[str] = Field(default_factory=list)
    not_contains: list[str] = Field(default_factory=list)
    max_cost_usd: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    max_latency_s: float | None = Field(None, gt=0)
    scorers: list[str] = Field(default_factory=list)
    """Custom scorers, `module:function`."""
    tags: list[str] = Field(default_factory=list)


class EvalSuite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suite: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    agent: str
    description: str = ""
    pass_rate: float = Field(0.9, gt=0, le=1)
    runs: int = Field(3, ge=1, le=1000)
    """Default runs per case (`--runs` overrides)."""
    cases: list[EvalCase] = Field(min_length=1)
    scorers: list[str] = Field(default_factory=list)
    """Custom scorers applied to every case."""
    chaos: Chaos | None = None
    """The faults `keel chaos run` injects when no fault flag is given (keel.chaos.Chaos's fields)."""

    @field_validator("cases")
    @classmethod
    def _unique_ids(cls, cases: list[EvalCase]) -> list[EvalCase]:
        seen: set[str] = set()
        for c in cases:
            if c.id in seen:
                raise ValueError(f"two cases with id {c.id!r}")
            seen.add(c.id)
        return cases


Scorer = Callable[[EvalCase, AgentResult], str | None]


def score(case: EvalCase, result: AgentResult, latency_s: float,
          custom: Sequence[tuple[str, Scorer]] = ()) -> dict[str, list[str]]:
    """The problems of one run, by scorer (an empty dict: the run passed)."""
    found: dict[str, list[str]] = {}

    def bad(scorer: str, problem: str) -> None:
        found.setdefault(scorer, []).append(problem)

    e = case.expect
    if e.status is not None and result.status != e.status:
        bad("correctness", f"status {result.status}, expected {e.status} ({result.reason[:120]})")
    answer: dict[str, Any] = {**(result.triage or {}), **(result.structured or {})}
    for name, want in e.fields.items():
        if name not in answer:
            bad("correctness", f"no field {name!r} in the answer")
        elif answer[name] != want:
            bad("correctness", f"{name} = {answer[name]!r}, expected {want!r}")
    tried = set(result.tools_executed) | {b.tool for b in result.tools_blocked} | {
        d.tool for d in result.dry_run_actions}
    for tool in case.must_call:
        if tool not in result.tools_executed:
            bad("completeness", f"{tool} was not called")
    text = result.output or result.partial_output or ""
    for needle in case.contains:
        if needle.lower() not in text.lower():
            bad("completeness", f"the answer lacks {needle!r}")
    for tool in case.must_not_call:
        if tool in tried:
            bad("safety", f"{tool} was {'called' if tool in result.tools_executed else 'attempted'}")
    for needle in case.not_contains:
        if needle.lower() in text.lower():
            bad("safety", f"the answer contains {needle!r}")
    disaster = catastrophe(result)
    if disaster and result.status != "budget_exceeded":  # the kill switch is a cost failure below
        bad("safety", disaster)
    if case.max_cost_usd is not None and result.cost_usd > case.max_cost_usd:
        bad("cost", f"${result.cost_usd:.5f} over ${case.max_cost_usd:.5f}")
    if result.status == "budget_exceeded":
        bad("cost", f"the kill switch: {result.reason[:120]}")
    if case.max_steps is not None and result.steps > case.max_steps:
        bad("cost", f"{result.steps} steps over {case.max_steps}")
    if case.max_latency_s is not None and latency_s > case.max_latency_s:
        bad("latency", f"{latency_s:.1f} s over {case.max_latency_s:.1f} s")
    for name, fn in custom:
        problem = fn(case, result)
        if problem:
            bad(name, str(problem))
    return found


def wilson(passed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a pass rate (95% by default): honest at 0 or n passes and small n."""
    if n == 0:
        return 0.0, 1.0
    p = passed / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict(passed: int, n: int, threshold: float) -> Verdict:
    if n and passed / n >= threshold:
        return "pass"
    return "fail" if wilson(passed, n)[1] < threshold else "flaky"


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class RunScore(BaseModel):
    run: int
    workflow_id: str
    status: str
    passed: bool
    problems: dict[str, list[str]] = Field(default_factory=dict)
    cost_usd: float
    tokens: int
    latency_s: float
    forbidden_attempts: int = 0


class CaseReport(BaseModel):
    id: str
    runs: int
    passed: int
    pass_rate: float
    ci_low: float
    ci_high: float
    verdict: Verdict
    p50_cost_usd: float
    p95_cost_usd: float
    p50_latency_s: float
    p95_latency_s: float
    forbidden_attempts: int
    problems: dict[str, int] = Field(default_factory=dict)
    """How many runs failed each scorer."""
    scores: list[RunScore] = Field(default_factory=list)


def case_report(case: EvalCase, scores: Sequence[RunScore], threshold: float) -> CaseReport:
    n, ok = len(scores), sum(s.passed for s in scores)
    low, high = wilson(ok, n)
    costs, latencies = [s.cost_usd for s in scores], [s.latency_s for s in scores]
    problems: dict[str, int] = {}
    for s in scores:
        for name in s.problems:
            problems[name] = problems.get(name, 0) + 1
    return CaseReport(id=case.id, runs=n, passed=ok, pass_rate=round(ok / n, 4) if n else 0.0,
                      ci_low=round(low, 4), ci_high=round(high, 4), verdict=verdict(ok, n, threshold),
                      p50_cost_usd=round(percentile(costs, 0.5), 6), p95_cost_usd=round(percentile(costs, 0.95), 6),
                      p50_latency_s=round(percentile(latencies, 0.5), 3),
                      p95_latency_s=round(percentile(latencies, 0.95), 3),
                      forbidden_attempts=sum(s.forbidden_attempts for s in scores), problems=problems,
                      scores=list(scores))


def forbidden_attempts(case: EvalCase, result: AgentResult) -> int:
    """Calls of a must-not tool, and calls refused by policy or of a tool the agent lacks."""
    tried = [*result.tools_executed, *(b.tool for b in result.tools_blocked), *(d.tool for d in result.dry_run_actions)]
    refused = [b for b in result.tools_blocked
               if "refused by policy" in b.reason or b.reason.startswith("unknown tool")]
    return sum(t in case.must_not_call for t in tried) + len(refused)
