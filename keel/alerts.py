"""Behavioral alerts: pure rules over a finished task and the earlier tasks of its type. No I/O.

The worker (activities/alerts.py) evaluates them after every task, right after its outcome row is
written, stores what fires in the `alerts` table (deduplicated) and sends it to the log and a webhook.

- steps: the task took more than `steps_factor` x the median steps of its type;
- tokens: the task used more than `tokens_factor` x the average tokens of its type's last tasks;
- new_tool: the task executed a tool no earlier task of its type ever executed;
- distribution_shift: the task's category has a much larger share of the type's recent tasks than
  of the tasks before them (e.g. fraud reports at 40% of the last 50 tasks against 10% of the 200 before).
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

AlertRule = Literal["steps", "tokens", "new_tool", "distribution_shift"]


class AlertPolicy(BaseModel):
    steps_factor: float = Field(2.0, gt=1)
    """Steps over this multiple of the type's median steps fire `steps`."""
    steps_window: int = Field(200, gt=0)
    """The median is taken over the type's last this many tasks."""
    tokens_factor: float = Field(3.0, gt=1)
    """Tokens over this multiple of the type's rolling average fire `tokens`."""
    tokens_window: int = Field(50, gt=0)
    """The rolling average is taken over the type's last this many tasks."""
    min_history: int = Field(20, ge=1)
    """Earlier tasks of the type (that ran the model) needed before steps, tokens and new_tool judge: a
    new task type has no usual behaviour yet."""
    shift_recent: int = Field(50, gt=0)
    """The recent window of distribution_shift: the type's last this many categorized tasks."""
    shift_baseline: int = Field(200, gt=0)
    """The baseline window: up to this many categorized tasks before the recent window."""
    shift_min_baseline: int = Field(100, gt=0)
    """No distribution_shift judgment before the baseline holds this many tasks."""
    shift_min_count: int = Field(10, ge=1)
    """The category must appear at least this often in the recent window."""
    shift_min_delta: float = Field(0.2, gt=0, le=1)
    """...and its share must be at least this much higher than in the baseline (0.2 = 20 points)..."""
    shift_ratio: float = Field(2.0, ge=1)
    """...and at least this multiple of its baseline share."""
    dedup_s: float = Field(3600, ge=0)
    """A repeat of an alert (same rule, task type and tool or category) within this time of the last
    one is counted on it (count, last_seen_at) instead of being raised again."""


DEFAULT_ALERT_POLICY = AlertPolicy()


class Alert(BaseModel):
    rule: AlertRule
    task_type: str
    subject: str = ""
    """The tool (new_tool) or category (distribution_shift); empty for the per-task figures."""
    message: str
    value: float
    """The figure that fired: steps, tokens, 1 (a new tool), the recent share."""
    threshold: float
    """What it was compared with: the limit it crossed (for distribution_shift, the baseline share)."""
    workflow_id: str = ""
    """The task that raised it."""
    feature: str = ""

    @property
    def dedup_key(self) -> str:
        return f"{self.rule}:{self.task_type}:{self.subject}"


@dataclass
class TaskFigures:
    """What the rules look at in a finished task (from its TaskOutcome)."""

    workflow_id: str
    task_type: str
    steps: int | None
    """None for ledger rows written before steps were recorded."""
    tokens: int
    tools: list[str] = field(default_factory=list)
    category: str | None = None
    feature: str = ""

    @property
    def ran_model(self) -> bool:
        """A task refused before any model call (bad input, an open breaker) says nothing of behaviour."""
        return self.tokens > 0


@dataclass
class TypeHistory:
    """The earlier tasks of a type, oldest first (the task being judged not included)."""

    tasks: list[TaskFigures] = field(default_factory=list)
    tools_seen: set[str] = field(default_factory=set)
    """Every tool an earlier task of the type executed (also before the window)."""


def steps_alert(task: TaskFigures, earlier_steps: Sequence[int], policy: AlertPolicy) -> Alert | None:
    window = list(earlier_steps)[-policy.steps_window:]
    if task.steps is None or len(window) < policy.min_history:
        return None
    median = statistics.median(window)
    limit = policy.steps_factor * median
    if task.steps <= limit:
        return None
    return Alert(rule="steps", task_type=task.task_type, feature=task.feature, workflow_id=task.workflow_id,
                 value=task.steps, threshold=limit,
                 message=f"{task.workflow_id} took {task.steps} steps, over {policy.steps_factor:g}x the median "
                         f"{median:g} of task type {task.task_type!r} ({len(window)} tasks)")


def tokens_alert(task: TaskFigures, earlier_tokens: Sequence[int], policy: AlertPolicy) -> Alert | None:
    window = list(earlier_tokens)[-policy.tokens_window:]
    if len(window) < policy.min_history:
        return None
    avg = sum(window) / len(window)
    limit = policy.tokens_factor * avg
    if task.tokens <= limit:
        return None
    return Alert(rule="tokens", task_type=task.task_type, feature=task.feature, workflow_id=task.workflow_id,
                 value=task.tokens, threshold=round(limit, 1),
                 message=f"{task.workflow_id} used {task.tokens:,} tokens, over {policy.tokens_factor:g}x the "
                         f"rolling average {avg:,.0f} of task type {task.task_type!r} (last {len(window)} tasks)")


def new_tool_alerts(task: TaskFigures, tools_seen: Collection[str], earlier_tasks: int,
                    policy: AlertPolicy) -> list[Alert]:
    if earlier_tasks < policy.min_history:
        return []
    new = [t for t in dict.fromkeys(task.tools) if t not in tools_seen]
    return [Alert(rule="new_tool", task_type=task.task_type, subject=t, feature=task.feature,
                  workflow_id=task.workflow_id, value=1, threshold=0,
                  message=f"{task.workflow_id} called {t!r}, a tool no earlier task of type {task.task_type!r} "
                          f"called ({earlier_tasks} tasks)")
            for t in new]


def shift_alert(task: TaskFigures, categories: Sequence[str], policy: AlertPolicy) -> Alert | None:
    """`categories`: the type's categorized tasks, oldest first, ending with this task's category."""
    if task.category is None:
        return None
    recent = list(categories)[-policy.shift_recent:]
    baseline = list(categories)[-policy.shift_recent - policy.shift_baseline:-policy.shift_recent]
    if len(recent) < policy.shift_recent or len(baseline) < policy.shift_min_baseline:
        return None
    count = recent.count(task.category)
    share = count / len(recent)
    base = baseline.count(task.category) / len(baseline)
    if count < policy.shift_min_count or share - base < policy.shift_min_delta or share < policy.shift_ratio * base:
        return None
    return Alert(rule="distribution_shift", task_type=task.task_type, subject=task.category, feature=task.feature,
                 workflow_id=task.workflow_id, value=round(share, 4), threshold=round(base, 4),
                 message=f"category {task.category!r} is {share:.0%} of the last {len(recent)} tasks of type "
                         f"{task.task_type!r}, against {base:.0%} of the {len(baseline)} before")


def evaluate(task: TaskFigures, history: TypeHistory, policy: AlertPolicy = DEFAULT_ALERT_POLICY) -> list[Alert]:
    """Which alerts the finished `task` fires against its type's `history`."""
    if not task.ran_model:
        return []
    ran = [t for t in history.tasks if t.ran_model]
    alerts = [a for a in (steps_alert(task, [t.steps for t in ran if t.steps is not None], policy),
                          tokens_alert(task, [t.tokens for t in ran], policy)) if a is not None]
    alerts += new_tool_alerts(task, history.tools_seen, len(ran), policy)
    categories = [t.category for t in ran if t.category is not None]
    shift = shift_alert(task, [*categories, task.category] if task.category is not None else categories, policy)
    if shift is not None:
        alerts.append(shift)
    return alerts
