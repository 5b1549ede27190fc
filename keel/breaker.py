"""The cost circuit breaker's contract: one long-lived entity workflow per task type.

It is fed every finished task's usage; when the rolling window's average tokens per task exceeds
`trip_ratio` x the expected tokens of the type, it opens: new tasks of that type skip the model and
go to the human queue. After a cooldown it half-opens and admits a few probe tasks; their usage
decides whether it closes again or re-opens. A manual reset closes it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field

BreakerStatus = Literal["closed", "open", "half_open"]

BREAKER_WORKFLOW = "CostCircuitBreaker"
BREAKER_ADMIT_ACTIVITY = "breaker_admit"
BREAKER_ADMIT_UPDATE = "admit"
BREAKER_RECORD_SIGNAL = "record"
BREAKER_RECORD_BATCH_SIGNAL = "record_batch"
BREAKER_RESET_UPDATE = "reset"
BREAKER_STATE_QUERY = "state"


def breaker_workflow_id(task_type: str, scope: str = "") -> str:
    """One breaker per task type and scope (the task queue: tasks on separate queues, e.g. separate
    deployments or tests, do not share a breaker that their workers cannot reach)."""
    return f"keel-breaker-{task_type}" + (f"@{scope}" if scope else "")


class BreakerConfig(BaseModel):
    task_type: str
    scope: str = ""
    """See breaker_workflow_id."""
    expected_tokens: int = Field(gt=0)
    """Tokens a task of this type is expected to use; the trip threshold is a multiple of it."""
    trip_ratio: float = Field(2.0, gt=1)
    window_tasks: int = Field(50, ge=1)
    """The rolling window holds at most this many of the latest tasks..."""
    window_seconds: float = Field(900, gt=0)
    """...and only those that finished within this many seconds."""
    min_tasks: int = Field(10, ge=1)
    """Fewer tasks than this in the window never trip the breaker."""
    cooldown_seconds: float = Field(300, gt=0)
    """How long the breaker stays open before admitting probes (half-open)."""
    probes: int = Field(3, ge=1)
    """Probe tasks admitted while half-open; the breaker closes if their average is under the threshold."""

    @property
    def threshold_tokens(self) -> float:
        return self.expected_tokens * self.trip_ratio


class AdmitRequest(BaseModel):
    config: BreakerConfig
    workflow_id: str
    """The task asking to run."""


class AdmitDecision(BaseModel):
    admitted: bool
    status: BreakerStatus
    probe: bool = False
    """Admitted as a half-open probe: its usage decides whether the breaker closes."""
    reason: str = ""
    cached: bool = False
    """Answered by the worker from the breaker's last "closed" answer, without asking it again (see
    activities.breaker: a worker re-asks at least every `breaker_admit_cache_s` seconds)."""


class UsageReport(BaseModel):
    workflow_id: str
    tokens: int
    cost_usd: float = 0.0
    probe: bool = False
    skipped: bool = False
    """The task did not run the model (breaker open): not part of the window."""


class UsageBatch(BaseModel):
    """Usage reports a worker collected from the tasks that ended on it, sent as one signal."""

    reports: list[UsageReport]


class ResetRequest(BaseModel):
    by: str = "operator"
    reason: str = ""


class WindowEntry(BaseModel):
    workflow_id: str
    tokens: int
    at: datetime


class BreakerState(BaseModel):
    config: BreakerConfig
    status: BreakerStatus = "closed"
    window: list[WindowEntry] = Field(default_factory=list)
    opened_at: datetime | None = None
    reason: str = ""
    trips: int = 0
    probes_admitted: int = 0
    probe_results: list[int] = Field(default_factory=list)
    rejected: int = 0
    """Tasks sent to the human queue while open, since the last close."""
    last_reset_by: str | None = None
    half_opened_at: datetime | None = None
    """When the current half-open period began; probes not reported within a cooldown of it are
    presumed lost (their tasks failed or were cancelled), and a new probe period begins."""
    max_events_before_continue: int = Field(500, ge=1)
    """The workflow continues as new after handling this many admits, records and resets (or sooner,
    when the server suggests it), which keeps its history bounded."""

    @property
    def window_avg_tokens(self) -> float:
        return sum(e.tokens for e in self.window) / len(self.window) if self.window else 0.0

    @property
    def half_opens_at(self) -> datetime | None:
        """When an open breaker starts admitting probes; None unless open."""
        if self.status != "open" or self.opened_at is None:
            return None
        return self.opened_at + timedelta(seconds=self.config.cooldown_seconds)
