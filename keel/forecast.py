"""`keel forecast`: what the agents will cost per day and per month, from the cost of the tasks they ran.

The article's advice is to budget for 3x the expected cost: a few tasks spiral, and a day's spend is a
sum of skewed task costs. Given the per-task costs the ledger holds (or any sample), a bootstrap draws
`tasks_per_day` tasks with replacement for each simulated day (and 30 such days for a month) and reports
the median and the 95th percentile of the totals, set against 3x the expected (mean) spend. Pure and
seeded: the same sample and seed give the same figures.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

from pydantic import BaseModel

DAYS_PER_MONTH = 30


class Forecast(BaseModel):
    tasks: int
    """Tasks in the sample the forecast draws from."""
    tasks_per_day: int
    cost_per_task_mean: float
    cost_per_task_p50: float
    cost_per_task_p95: float
    cost_per_task_max: float
    daily_expected: float
    """tasks_per_day x the mean cost of a task."""
    daily_p50: float
    daily_p95: float
    monthly_expected: float
    monthly_p50: float
    monthly_p95: float
    budget_3x_daily: float
    """The article's rule: budget 3x the expected spend."""
    budget_3x_monthly: float
    p95_within_3x: bool
    """Whether the bootstrap's p95 day fits in 3x the expected day."""
    samples: int
    seed: int


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation (`statistics.quantiles`' inclusive method)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def forecast(costs: Sequence[float], tasks_per_day: int, samples: int = 2_000, seed: int = 0) -> Forecast:
    """Daily and monthly spend for `tasks_per_day` tasks like those in `costs` (USD per task)."""
    if not costs:
        raise ValueError("no task costs to forecast from: run some tasks first (or widen --since / --agent)")
    if tasks_per_day < 1 or samples < 1:
        raise ValueError("tasks per day and samples must be at least 1")
    rng = random.Random(seed)
    pool = list(costs)
    days = sorted(sum(rng.choices(pool, k=tasks_per_day)) for _ in range(samples))
    # A month is DAYS_PER_MONTH independent days: its total drawn from the simulated days.
    months = sorted(sum(rng.choices(days, k=DAYS_PER_MONTH)) for _ in range(samples))
    ordered = sorted(pool)
    mean = statistics.fmean(pool)
    daily = mean * tasks_per_day
    return Forecast(
        tasks=len(pool), tasks_per_day=tasks_per_day,
        cost_per_task_mean=round(mean, 6), cost_per_task_p50=round(_quantile(ordered, 0.5), 6),
        cost_per_task_p95=round(_quantile(ordered, 0.95), 6), cost_per_task_max=round(ordered[-1], 6),
        daily_expected=round(daily, 4), daily_p50=round(_quantile(days, 0.5), 4),
        daily_p95=round(_quantile(days, 0.95), 4),
        monthly_expected=round(daily * DAYS_PER_MONTH, 2), monthly_p50=round(_quantile(months, 0.5), 2),
        monthly_p95=round(_quantile(months, 0.95), 2),
        budget_3x_daily=round(3 * daily, 4), budget_3x_monthly=round(3 * daily * DAYS_PER_MONTH, 2),
        p95_within_3x=_quantile(days, 0.95) <= 3 * daily, samples=samples, seed=seed,
    )
