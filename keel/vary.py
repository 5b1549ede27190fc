"""`keel vary`: one input run N times, each run sorted into the article's four kinds of variance.

- catastrophic: the kill switch fired (a budget limit), a tool the agent lacks was called (hallucinated),
  a call was refused by policy (a forbidden attempt: the agent's validators), or the task looped (the
  same failing call again, or the step cap);
- outcome: another result than the most common one (status, and the structured answer when there is one);
- cost: the most common result, at more than 3x the cheapest run with that result;
- benign: the most common result within that spread (by another path of tool calls, or the same).
Pure: the runs are the tasks' results.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from keel.types import AgentResult

VaryKind = Literal["benign", "cost", "outcome", "catastrophic"]
KINDS: tuple[VaryKind, ...] = ("benign", "cost", "outcome", "catastrophic")
COST_SPREAD = 3.0


class VaryRun(BaseModel):
    run: int
    workflow_id: str
    status: str
    outcome: str
    path: list[str]
    """The tools executed, in order."""
    tokens: int
    cost_usd: float
    kind: VaryKind
    why: str


class VaryReport(BaseModel):
    runs: list[VaryRun]
    kinds: dict[str, int] = Field(default_factory=dict)
    modal_outcome: str = ""
    paths: int = 0
    """Distinct tool paths among the runs."""
    cost_spread: float | None = None
    """Most expensive over cheapest run with the modal outcome."""


def outcome_of(r: AgentResult) -> str:
    """What the requester got: the status, and the structured answer's fields when there is one."""
    if r.structured:
        return f"{r.status} {json.dumps(r.structured, sort_keys=True, default=str)}"
    return r.status


def catastrophe(r: AgentResult) -> str | None:
    if r.status == "budget_exceeded":
        return f"kill switch: {r.reason}"
    for b in r.tools_blocked:
        if b.reason.startswith("unknown tool"):
            return f"hallucinated tool {b.tool}"
    for b in r.tools_blocked:
        if "refused by policy" in b.reason:
            return f"forbidden call attempted: {b.tool}: {b.reason}"
    if any(b.reason.startswith("identical to the call") for b in r.tools_blocked):
        return "a loop: the same failing call again"
    if r.budget.limit_hit == "steps":
        return "a loop: the step cap"
    return None


def classify(results: Sequence[AgentResult]) -> VaryReport:
    bad = {i: catastrophe(r) for i, r in enumerate(results)}
    outcomes = [outcome_of(r) for r in results]
    counted = Counter(o for i, o in enumerate(outcomes) if not bad[i]) or Counter(outcomes)
    modal = counted.most_common(1)[0][0] if counted else ""
    same = [r.cost_usd for i, r in enumerate(results) if outcomes[i] == modal and not bad[i]]
    cheapest = min(same) if same else 0.0
    modal_paths = Counter(tuple(r.tools_executed) for i, r in enumerate(results) if outcomes[i] == modal)
    usual_path = list(modal_paths.most_common(1)[0][0]) if modal_paths else []
    runs: list[VaryRun] = []
    for i, r in enumerate(results):
        kind: VaryKind
        if bad[i]:
            kind, why = "catastrophic", str(bad[i])
        elif outcomes[i] != modal:
            kind, why = "outcome", f"{outcomes[i][:80]} instead of {modal[:80]}"
        elif cheapest > 0 and r.cost_usd > COST_SPREAD * cheapest:
            kind, why = "cost", f"{r.cost_usd / cheapest:.1f}x the cheapest run with this outcome"
        else:
            kind = "benign"
            why = "the usual path" if list(r.tools_executed) == usual_path else "another path, same outcome"
        runs.append(VaryRun(run=i + 1, workflow_id=r.workflow_id, status=r.status, outcome=outcomes[i],
                            path=list(r.tools_executed), tokens=r.tokens, cost_usd=r.cost_usd, kind=kind, why=why))
    spread = (max(same) / cheapest) if same and cheapest > 0 else None
    return VaryReport(runs=runs, kinds={k: sum(x.kind == k for x in runs) for k in KINDS}, modal_outcome=modal,
                      paths=len({tuple(x.path) for x in runs}), cost_spread=round(spread, 2) if spread else None)
