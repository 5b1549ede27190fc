"""bench/load.py's own arithmetic: the ideal it measures against and what it counts as lost or duplicated."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

import keel
from bench.load import ideal_makespan, lost_and_duplicated
from keel.commands import BatchItem


@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=50), st.integers(1, 60))
def test_the_ideal_is_between_the_longest_task_and_the_serial_sum(durations: list[float], slots: int) -> None:
    ideal = ideal_makespan(durations, slots)
    assert max(durations) - 1e-9 <= ideal <= sum(durations) + 1e-9
    assert ideal >= sum(durations) / slots - 1e-9
    if slots >= len(durations):
        assert abs(ideal - max(durations)) < 1e-9


def _books(outcome: dict[str, int], refunds: dict[str, int] | None = None, **dups: int) -> dict[str, Any]:
    return {"outcome": outcome, "rows": {"support_desk_refunds": refunds or {}, "support_desk_cases": {}},
            "dup_outcome": dups.get("outcome", 0), "dup_key": 0, "dup_queue": dups.get("queue", 0),
            "dup_refund": 0, "dup_case": 0}


def test_lost_counts_unsettled_tasks_missing_outcome_rows_and_missing_writes() -> None:
    inp = keel.AgentInput(agent="support_desk", input="x")
    done = keel.AgentResult(workflow_id="w1", agent="support_desk", status="completed",
                            tools_executed=["issue_refund"])
    items = [BatchItem(inp, "w1", result=done), BatchItem(inp, "w2", error="not started: boom"),
             BatchItem(inp, "w3", result=done.model_copy(update={"workflow_id": "w3"}))]
    lost, dup = lost_and_duplicated(items, _books({"w1": 1, "w3": 0}, {"w1": 1}, queue=2))
    assert lost == {"not_settled": 1, "no_outcome_row": 1, "missing_write_rows": 1}  # w3: no outcome, no refund
    assert dup["human_queue_rows"] == 2 and sum(dup.values()) == 2
