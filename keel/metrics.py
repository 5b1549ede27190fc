"""Per-task agent figures summarized over many tasks (`keel metrics`): pure functions, no I/O.

The rows are the ledger's outcome rows (activities.ledger.Ledger.outcomes): one per task, with its
status, route, category, tokens, and the agent figures (steps, tools, reasoning loops, answer tokens,
input hash). Rows written before a figure existed hold None for it and are left out of that figure.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def input_hash(tenant: str, text: str) -> str:
    """sha256 of the tenant and the task's input, 16 hex: the same request submitted again hashes the
    same, so its runs can be compared (outcome consistency). No text is kept, only the digest."""
    return hashlib.sha256(f"{tenant.strip()}\n{text}".encode()).hexdigest()[:16]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the closest ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _share(n: int, total: int) -> float | None:
    return n / total if total else None


def total_tokens(row: Mapping[str, Any]) -> int:
    return int(row.get("input_tokens") or 0) + int(row.get("output_tokens") or 0)


def token_efficiency(answer_tokens: int | None, tokens: int) -> float | None:
    """Share of the task's tokens that went into the final answer (the draft's output)."""
    if answer_tokens is None or tokens <= 0:
        return None
    return answer_tokens / tokens


def is_abandoned(row: Mapping[str, Any]) -> bool:
    """Stopped by the budget's kill switch, or refused by the task type's cost circuit breaker or a tenant budget."""
    if row.get("status") == "budget_exceeded":
        return True
    if row.get("limit_hit") in ("breaker", "tenant"):  # refused by the breaker or a tenant budget
        return True
    # Rows written before limit_hit was recorded: the breaker's reason names it.
    return row.get("limit_hit") is None and str(row.get("reason") or "").startswith("cost circuit breaker")


def consistency(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Runs grouped by input (input_hash): the share of inputs run more than once whose runs all got
    the same category."""
    groups: dict[str, list[str | None]] = {}
    for r in rows:
        h = r.get("input_hash")
        if h:
            groups.setdefault(str(h), []).append(r.get("category"))
    repeated = [cats for cats in groups.values() if len(cats) > 1]
    same = sum(len(set(cats)) == 1 for cats in repeated)
    return {"inputs": len(groups), "repeated_inputs": len(repeated), "consistent_inputs": same,
            "rate": _share(same, len(repeated))}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The agent figures of a set of outcome rows (see the module docstring)."""
    n = len(rows)
    steps = [float(r["steps"]) for r in rows if r.get("steps") is not None]
    with_tools = [r for r in rows if r.get("tools") is not None]
    calls: Counter[str] = Counter()
    tasks_using: Counter[str] = Counter()
    for r in with_tools:
        calls.update(r["tools"])
        tasks_using.update(set(r["tools"]))
    total_calls = sum(calls.values())
    loops = [int(r["reasoning_loops"]) for r in rows if r.get("reasoning_loops") is not None]
    repeats = [int(r["repeated_calls"]) for r in rows if r.get("repeated_calls") is not None]
    eff = [e for r in rows if (e := token_efficiency(r.get("answer_tokens"), total_tokens(r))) is not None]
    statuses = Counter(str(r.get("status")) for r in rows)
    return {
        "tasks": n,
        "steps": {"tasks": len(steps), "mean": mean(steps), "p50": percentile(steps, 50),
                  "p95": percentile(steps, 95)},
        "tool_calls": {
            "tasks": len(with_tools),
            "total": total_calls,
            "per_task": _share(total_calls, len(with_tools)),
            "by_tool": {tool: {"calls": c, "share": c / total_calls, "tasks": tasks_using[tool]}
                        for tool, c in calls.most_common()},
        },
        "reasoning_loops": {"tasks": len(loops), "mean": mean(loops),
                            "share_with_any": _share(sum(x > 0 for x in loops), len(loops))},
        "repeated_calls": {"tasks": len(repeats), "mean": mean(repeats)},
        "token_efficiency": {"tasks": len(eff), "mean": mean(eff)},
        "consistency": consistency(rows),
        "abandonment_rate": _share(sum(is_abandoned(r) for r in rows), n),
        "escalation_rate": _share(sum(r.get("route") == "human" for r in rows), n),
        "by_status": dict(statuses.most_common()),
        "tokens": sum(total_tokens(r) for r in rows),
        "cost_usd": round(sum(float(r.get("cost_usd") or 0.0) for r in rows), 8),
    }
