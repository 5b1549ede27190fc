"""Activities of the multi-agent patterns that are not model or tool calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from temporalio import activity

from activities.ledger import Ledger
from keel.names import TASK_USAGE_ACTIVITY
from keel.types import TaskUsage


class PatternActivities:
    def __init__(self, engine: Engine) -> None:
        self.ledger = Ledger(engine)

    @activity.defn(name=TASK_USAGE_ACTIVITY)
    def task_usage(self, workflow_id: str) -> TaskUsage:
        """What a task spent, from its ledger rows (a child that failed without saying)."""
        t = self.ledger.task_totals(workflow_id)
        return TaskUsage(llm_calls=t["llm_calls"], input_tokens=t["input_tokens"], output_tokens=t["output_tokens"],
                         cost_usd=round(float(t["cost_usd"]), 8))

    def all(self) -> list[Callable[..., Any]]:
        return [self.task_usage]
