"""`keel eval compare A B`: two eval runs of a suite compared case by case (paired by case id).

- Success: per case, the difference of pass rates B - A with Newcombe's hybrid score interval (95%,
  built from the two Wilson intervals: honest at 0 and 100% and for few runs); a case whose interval lies
  wholly below 0 is a regression, wholly above an improvement. Over the suite: the mean per-case
  difference with a bootstrap interval over cases, and an exact two-sided sign test over the cases that
  changed (are there more cases worse than better than chance allows?).
- Cost and latency: per case, the difference of mean cost (and latency) per run with a bootstrap interval
  over runs; over the suite, the relative change of the total cost with a bootstrap interval over cases.
- A gate for CI: fail on any regression, on a mean success drop beyond `max_drop`, or a cost increase
  beyond `max_cost_increase`.
Pure and seeded.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from keel.evals import percentile, wilson


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """95% interval of p2 - p1 (Newcombe 1998, method 10: the hybrid score interval)."""
    p1, p2 = (k1 / n1 if n1 else 0.0), (k2 / n2 if n2 else 0.0)
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p2 - p1
    low = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    high = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return max(-1.0, low), min(1.0, high)


def sign_test(better: int, worse: int) -> float:
    """Exact two-sided binomial test of `worse` among the changed cases against 1/2."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    tail: float = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _bootstrap(values_a: Sequence[float], values_b: Sequence[float], rng: random.Random,
               samples: int = 2_000) -> tuple[float, float]:
    """95% bootstrap interval of mean(b) - mean(a), each resampled on its own."""
    if not values_a or not values_b:
        return 0.0, 0.0
    diffs = sorted(statistics.fmean(rng.choices(values_b, k=len(values_b)))
                   - statistics.fmean(rng.choices(values_a, k=len(values_a))) for _ in range(samples))
    return percentile(diffs, 0.025), percentile(diffs, 0.975)


class CaseDelta(BaseModel):
    id: str
    runs_a: int
    runs_b: int
    pass_rate_a: float
    pass_rate_b: float
    delta: float
    delta_low: float
    delta_high: float
    verdict_a: str
    verdict_b: str
    change: str
    """regression | improvement | same (the interval spans 0)"""
    cost_a: float
    cost_b: float
    cost_delta_low: float
    cost_delta_high: float
    latency_a: float
    latency_b: float
    latency_delta_low: float
    latency_delta_high: float


BLOCKS = " ▁▂▃▄▅▆▇█"


def histogram(values: Sequence[float], low: float, high: float, bins: int = 20) -> str:
    """A one-line histogram of `values` over [low, high] (block characters, tallest = the fullest bin)."""
    if not values:
        return ""
    counts = [0] * bins
    span = (high - low) or 1.0
    for v in values:
        counts[min(bins - 1, max(0, int((v - low) / span * bins)))] += 1
    top = max(counts)
    return "".join(BLOCKS[round(c / top * (len(BLOCKS) - 1))] if c else BLOCKS[0] for c in counts)


class Comparison(BaseModel):
    suite: str
    a: str
    b: str
    cases: list[CaseDelta]
    only_in_a: list[str] = Field(default_factory=list)
    only_in_b: list[str] = Field(default_factory=list)
    mean_delta: float
    mean_delta_low: float
    mean_delta_high: float
    better: int
    worse: int
    sign_test_p: float
    cost_change: float
    """Relative change of the total cost per run (B over A, minus 1)."""
    cost_change_low: float
    cost_change_high: float
    costs_a: list[float] = Field(default_factory=list)
    """Every run's cost in A (for the report's distributions)."""
    costs_b: list[float] = Field(default_factory=list)
    latencies_a: list[float] = Field(default_factory=list)
    latencies_b: list[float] = Field(default_factory=list)
    regressions: list[str]
    improvements: list[str]
    gate_failures: list[str] = Field(default_factory=list)


def _runs(case: dict[str, Any]) -> list[dict[str, Any]]:
    return list(case.get("scores") or [])


def compare(a: dict[str, Any], b: dict[str, Any], *, max_drop: float = 0.05, max_cost_increase: float | None = None,
            seed: int = 0) -> Comparison:
    """Compare two stored eval reports (`keel eval run`'s documents, with every run's score)."""
    rng = random.Random(seed)
    cases_a = {c["id"]: c for c in a["cases"]}
    cases_b = {c["id"]: c for c in b["cases"]}
    shared = [cid for cid in cases_a if cid in cases_b]
    deltas: list[CaseDelta] = []
    for cid in shared:
        ca, cb = cases_a[cid], cases_b[cid]
        ra, rb = _runs(ca), _runs(cb)
        ka, kb = sum(bool(r["passed"]) for r in ra), sum(bool(r["passed"]) for r in rb)
        low, high = newcombe(ka, len(ra), kb, len(rb))
        costs_a, costs_b = [float(r["cost_usd"]) for r in ra], [float(r["cost_usd"]) for r in rb]
        lat_a, lat_b = [float(r["latency_s"]) for r in ra], [float(r["latency_s"]) for r in rb]
        c_low, c_high = _bootstrap(costs_a, costs_b, rng)
        l_low, l_high = _bootstrap(lat_a, lat_b, rng)
        change = "regression" if high < 0 else "improvement" if low > 0 else "same"
        deltas.append(CaseDelta(
            id=cid, runs_a=len(ra), runs_b=len(rb), pass_rate_a=round(ka / len(ra), 4) if ra else 0.0,
            pass_rate_b=round(kb / len(rb), 4) if rb else 0.0,
            delta=round((kb / len(rb) if rb else 0) - (ka / len(ra) if ra else 0), 4),
            delta_low=round(low, 4), delta_high=round(high, 4), verdict_a=ca["verdict"], verdict_b=cb["verdict"],
            change=change, cost_a=round(statistics.fmean(costs_a), 6) if costs_a else 0.0,
            cost_b=round(statistics.fmean(costs_b), 6) if costs_b else 0.0,
            cost_delta_low=round(c_low, 6), cost_delta_high=round(c_high, 6),
            latency_a=round(statistics.fmean(lat_a), 3) if lat_a else 0.0,
            latency_b=round(statistics.fmean(lat_b), 3) if lat_b else 0.0,
            latency_delta_low=round(l_low, 3), latency_delta_high=round(l_high, 3)))
    per_case = [d.delta for d in deltas]
    boot = sorted(statistics.fmean(rng.choices(per_case, k=len(per_case))) for _ in range(2_000)) if per_case else [0.0]
    better = sum(d.delta > 0 for d in deltas)
    worse = sum(d.delta < 0 for d in deltas)
    cost_a = [d.cost_a for d in deltas]
    cost_b = [d.cost_b for d in deltas]

    def rel(idx: Sequence[int]) -> float:
        total_a = sum(cost_a[i] for i in idx)
        return (sum(cost_b[i] for i in idx) / total_a - 1) if total_a > 0 else 0.0

    n = len(deltas)
    rels = sorted(rel(rng.choices(range(n), k=n)) for _ in range(2_000)) if n else [0.0]
    result = Comparison(
        suite=str(b.get("suite", a.get("suite", ""))), a=str(a.get("run_id", "A")), b=str(b.get("run_id", "B")),
        cases=deltas, only_in_a=[c for c in cases_a if c not in cases_b],
        only_in_b=[c for c in cases_b if c not in cases_a],
        mean_delta=round(statistics.fmean(per_case), 4) if per_case else 0.0,
        mean_delta_low=round(percentile(boot, 0.025), 4), mean_delta_high=round(percentile(boot, 0.975), 4),
        better=better, worse=worse, sign_test_p=round(sign_test(better, worse), 4),
        cost_change=round(rel(range(n)), 4) if n else 0.0, cost_change_low=round(percentile(rels, 0.025), 4),
        cost_change_high=round(percentile(rels, 0.975), 4),
        costs_a=[float(r["cost_usd"]) for cid in shared for r in _runs(cases_a[cid])],
        costs_b=[float(r["cost_usd"]) for cid in shared for r in _runs(cases_b[cid])],
        latencies_a=[float(r["latency_s"]) for cid in shared for r in _runs(cases_a[cid])],
        latencies_b=[float(r["latency_s"]) for cid in shared for r in _runs(cases_b[cid])],
        regressions=[d.id for d in deltas if d.change == "regression"],
        improvements=[d.id for d in deltas if d.change == "improvement"],
    )
    gate = [f"{cid}: success fell from {d.pass_rate_a:.0%} to {d.pass_rate_b:.0%} (95% CI of the change "
            f"{d.delta_low:+.2f} to {d.delta_high:+.2f})" for d in deltas if d.change == "regression" for cid in [d.id]]
    if result.mean_delta < -max_drop:
        gate.append(f"mean success per case fell by {-result.mean_delta:.1%}, more than the gate's {max_drop:.1%}")
    if max_cost_increase is not None and result.cost_change > max_cost_increase:
        gate.append(f"cost per run rose by {result.cost_change:.1%}, more than the gate's {max_cost_increase:.1%}")
    return result.model_copy(update={"gate_failures": gate})


def markdown(c: Comparison) -> str:
    """A report a person can read: the verdict, the suite's figures, then every case."""
    lines = [f"# {c.suite}: {c.b} against {c.a}", ""]
    lines.append("**Gate: failed**" if c.gate_failures else "**Gate: passed**")
    lines += [f"- {g}" for g in c.gate_failures]
    lines += ["", f"- success per case: {c.mean_delta:+.1%} on average (95% CI {c.mean_delta_low:+.1%} to "
              f"{c.mean_delta_high:+.1%}); {c.better} cases better, {c.worse} worse, "
              f"sign test p = {c.sign_test_p:.3f}",
              f"- cost per run: {c.cost_change:+.1%} (95% CI {c.cost_change_low:+.1%} to {c.cost_change_high:+.1%})",
              f"- regressions: {', '.join(c.regressions) or 'none'}; "
              f"improvements: {', '.join(c.improvements) or 'none'}",
              "", "| case | A | B | change (95% CI) | verdicts | cost A | cost B | latency A | latency B |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d in c.cases:
        bar = ("-" * round(-d.delta * 10)) if d.delta < 0 else ("+" * round(d.delta * 10))
        flag = f"**{d.change}**" if d.change != "same" else ""
        lines.append(f"| {d.id} | {d.pass_rate_a:.0%} ({d.runs_a}) | {d.pass_rate_b:.0%} ({d.runs_b}) | "
                     f"{d.delta:+.0%} ({d.delta_low:+.2f}, {d.delta_high:+.2f}) {bar} {flag} | "
                     f"{d.verdict_a} → {d.verdict_b} | ${d.cost_a:.5f} | ${d.cost_b:.5f} | {d.latency_a:.1f} s | "
                     f"{d.latency_b:.1f} s |")
    for what, a, b, unit in (("cost per run", c.costs_a, c.costs_b, "$"), ("latency per run", c.latencies_a,
                                                                            c.latencies_b, "s")):
        if a and b:
            low, high = min(a + b), max(a + b)
            lines += ["", f"{what.capitalize()}, distribution over [{low:g}, {high:g}] {unit} (the tail of spirals "
                      "and retries shows here, not in the means):", "", "```",
                      *(f"{name}  {histogram(v, low, high)}  p50 {percentile(sorted(v), 0.5):g}  "
                        f"p95 {percentile(sorted(v), 0.95):g}" for name, v in (("A", a), ("B", b))),
                      "```"]
    if c.only_in_a or c.only_in_b:
        lines += ["", f"Not compared: only in A {c.only_in_a or '-'}, only in B {c.only_in_b or '-'}"]
    return "\n".join(lines) + "\n"
