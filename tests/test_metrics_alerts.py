"""Observability: the per-task agent figures (TaskOutcome, the ledger, `keel metrics`), keel_* metrics on the
worker's Prometheus endpoint and the Temporal SDK's on the Runtime's, and behavioral alerts: the pure rules
(each fires on a positive case and not on a near miss), their store (dedup), the ledger migration, and end
to end on the dev server with the sim model, each alert raised by real tickets, one reaching a webhook.

Each end-to-end test uses a task type of its own: the ledger is shared by the whole session."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from activities.alerts import AlertEngine, AlertStore, TaskObserver, WebhookSink, list_alerts
from activities.db import init_db, make_engine, utcnow
from activities.ledger import Ledger
from activities.metrics import KeelMetrics, sdk_runtime, serve_metrics
from keel.alerts import (
    Alert,
    AlertPolicy,
    TaskFigures,
    TypeHistory,
    evaluate,
    new_tool_alerts,
    shift_alert,
    steps_alert,
    tokens_alert,
)
from keel.metrics import input_hash, percentile, summarize
from keel.settings import KeelSettings
from keel.types import TaskContext, TaskOutcome

P = AlertPolicy()


def fig(steps: int | None = 10, tokens: int = 5000, tools: list[str] | None = None, category: str | None = "billing",
        wf: str = "wf-now") -> TaskFigures:
    return TaskFigures(workflow_id=wf, task_type="tt", steps=steps, tokens=tokens,
                       tools=["get_account", "send_reply"] if tools is None else tools, category=category)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- pure rules ------------------------------------------------------------------------------------


def test_steps_over_twice_the_median_fire_and_twice_does_not() -> None:
    earlier = [8, 10, 12] * 10  # median 10
    alert = steps_alert(fig(steps=21), earlier, P)
    assert alert is not None and alert.rule == "steps" and alert.value == 21 and alert.threshold == 20
    assert steps_alert(fig(steps=20), earlier, P) is None
    assert steps_alert(fig(steps=50), earlier[: P.min_history - 1], P) is None  # a new type: no usual yet
    # The median is of the last `steps_window` tasks: long-gone slow tasks do not raise it.
    assert steps_alert(fig(steps=21), [100] * 300 + earlier, P.model_copy(update={"steps_window": 30})) is not None


def test_tokens_over_three_times_the_rolling_average_fire_and_three_times_does_not() -> None:
    earlier = [4000, 6000] * 25  # average 5,000 over the last 50
    alert = tokens_alert(fig(tokens=15_001), earlier, P)
    assert alert is not None and alert.rule == "tokens" and alert.threshold == 15_000
    assert tokens_alert(fig(tokens=15_000), earlier, P) is None
    assert tokens_alert(fig(tokens=15_001), [100_000] * 100 + earlier, P) is not None  # only the last 50 count
    assert tokens_alert(fig(tokens=99_999), earlier[:5], P) is None


def test_a_tool_never_called_for_the_type_fires_once_per_tool() -> None:
    seen = {"get_account", "lookup_policy", "send_reply"}
    alerts = new_tool_alerts(fig(tools=["get_account", "issue_refund", "issue_refund", "send_reply"]), seen, 30, P)
    assert [(a.rule, a.subject) for a in alerts] == [("new_tool", "issue_refund")]
    assert new_tool_alerts(fig(tools=["get_account", "send_reply"]), seen, 30, P) == []
    assert new_tool_alerts(fig(tools=["issue_refund"]), seen, P.min_history - 1, P) == []


def shares(recent: dict[str, int], baseline: dict[str, int]) -> list[str]:
    def expand(d: dict[str, int]) -> list[str]:
        return [c for c, n in d.items() for _ in range(n)]
    return expand(baseline) + expand(recent)


def test_a_category_at_40_percent_against_10_fires_and_25_percent_does_not() -> None:
    base = {"fraud_report": 20, "billing": 180}  # 10% of 200
    cats = shares({"billing": 30, "fraud_report": 20}, base)  # 40% of the last 50, ending with a fraud report
    alert = shift_alert(fig(category="fraud_report"), cats, P)
    assert alert is not None and alert.subject == "fraud_report" and alert.value == 0.4 and alert.threshold == 0.1
    near = shares({"billing": 38, "fraud_report": 12}, base)  # 24%: up 14 points, under the 20 asked
    assert shift_alert(fig(category="fraud_report"), near, P) is None
    # The task's own category is judged: a billing task does not raise the fraud shift.
    assert shift_alert(fig(category="billing"), [*cats, "billing"], P) is None


def test_distribution_shift_needs_the_minimum_count_and_baseline() -> None:
    policy = P.model_copy(update={"shift_recent": 10, "shift_min_count": 5})
    base = {"billing": 200}
    assert shift_alert(fig(category="fraud_report"), shares({"billing": 6, "fraud_report": 4}, base), policy) is None
    assert shift_alert(fig(category="fraud_report"), shares({"billing": 5, "fraud_report": 5}, base), policy)
    short = {"billing": P.shift_min_baseline - 1}
    assert shift_alert(fig(category="fraud_report"), shares({"billing": 25, "fraud_report": 25}, short), P) is None
    # Already common in the baseline: 50% against 30% is up 20 points but not twice the share.
    common = {"fraud_report": 60, "billing": 140}
    assert shift_alert(fig(category="fraud_report"), shares({"billing": 25, "fraud_report": 25}, common), P) is None


def test_evaluate_judges_against_tasks_that_ran_the_model() -> None:
    history = TypeHistory(tasks=[fig(wf=f"wf-{i}") for i in range(30)] + [fig(steps=2, tokens=0, wf="refused")],
                          tools_seen={"get_account", "send_reply"})
    alerts = evaluate(fig(steps=30, tokens=20_000, tools=["get_account", "transfer"]), history, P)
    assert sorted(a.rule for a in alerts) == ["new_tool", "steps", "tokens"]
    assert all(a.workflow_id == "wf-now" and a.task_type == "tt" for a in alerts)
    assert evaluate(fig(steps=30, tokens=0), history, P) == []  # refused before any model call: no behaviour
    assert evaluate(fig(), history, P) == []


# -- figures ---------------------------------------------------------------------------------------


def test_summarize_figures() -> None:
    def row(**kw: Any) -> dict[str, Any]:
        base = {"status": "resolved", "route": "reply", "category": "billing", "input_tokens": 900,
                "output_tokens": 100, "cost_usd": 0.01, "steps": 10, "tools": ["get_account", "send_reply"],
                "reasoning_loops": 0, "repeated_calls": 0, "answer_tokens": 50, "input_hash": None,
                "limit_hit": None, "reason": ""}
        return base | kw
    rows = [
        row(input_hash="a"), row(input_hash="a"),
        row(input_hash="b", category="fraud_report", route="human", status="escalated"),
        row(input_hash="b", category="card_issue", steps=30, reasoning_loops=3),
        row(status="budget_exceeded", route="human", answer_tokens=0, steps=20),
        row(status="escalated", route="human", limit_hit="breaker", input_tokens=0, output_tokens=0, steps=0,
            tools=["escalate_to_human"], answer_tokens=0),
        row(steps=None, tools=None, reasoning_loops=None, answer_tokens=None),  # a row from before the figures
    ]
    s = summarize(rows)
    assert s["tasks"] == 7
    assert s["steps"] == {"tasks": 6, "mean": pytest.approx(80 / 6), "p50": 10.0, "p95": pytest.approx(27.5)}
    assert s["tool_calls"]["total"] == 11 and s["tool_calls"]["tasks"] == 6
    assert s["tool_calls"]["by_tool"]["get_account"] == {"calls": 5, "share": 5 / 11, "tasks": 5}
    assert s["reasoning_loops"]["share_with_any"] == pytest.approx(1 / 6)
    assert s["token_efficiency"] == {"tasks": 5, "mean": pytest.approx((0.05 * 4 + 0) / 5)}
    assert s["consistency"] == {"inputs": 2, "repeated_inputs": 2, "consistent_inputs": 1, "rate": 0.5}
    assert s["abandonment_rate"] == pytest.approx(2 / 7) and s["escalation_rate"] == pytest.approx(3 / 7)
    assert percentile([], 50) is None and percentile([3.0], 95) == 3.0


def test_input_hash_groups_the_same_request() -> None:
    h = input_hash("C-1001", "My card was declined")
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == input_hash(" C-1001 ", "My card was declined")
    assert h != input_hash("C-1002", "My card was declined") != input_hash("C-1001", "My card")


# -- the ledger migration, the alert store, the observer ----------------------------------------------

NEW_COLUMNS = ("steps", "tools", "reasoning_loops", "repeated_calls", "answer_tokens", "input_hash", "limit_hit")


def test_init_db_adds_the_new_columns_to_an_older_ledger_once_even_concurrently(any_db_url: str) -> None:
    url = any_db_url
    engine = make_engine(url)
    init_db(engine)
    with engine.begin() as conn:  # back to the shape of a file made before the figures
        for c in NEW_COLUMNS:
            conn.execute(text(f"ALTER TABLE ledger DROP COLUMN {c}"))
        conn.execute(text("DROP TABLE alerts"))
    assert not set(NEW_COLUMNS) & {c["name"] for c in inspect(engine).get_columns("ledger")}

    errors: list[BaseException] = []

    def start() -> None:
        try:
            init_db(make_engine(url))
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = make_engine(url)
    assert set(NEW_COLUMNS) <= {c["name"] for c in inspect(engine).get_columns("ledger")}
    assert inspect(engine).has_table("alerts")
    init_db(engine)  # and again: nothing to do
    task = TaskContext(workflow_id="wf-old", tenant="C-1001", input_hash="abc")
    Ledger(engine).record_outcome(task, TaskOutcome(status="resolved", route="reply", steps=7, tools=["send_reply"]))
    (row,) = Ledger(engine).outcomes()
    assert row["steps"] == 7 and row["tools"] == ["send_reply"] and row["input_hash"] == "abc"


def alert(wf: str, subject: str = "") -> Alert:
    return Alert(rule="new_tool" if subject else "steps", task_type="tt", subject=subject, message=f"m {wf}",
                 value=30, threshold=20, workflow_id=wf)


def test_alert_store_counts_repeats_within_the_dedup_time(any_db_url: str) -> None:
    engine = make_engine(any_db_url)
    init_db(engine)
    store = AlertStore(engine, dedup_s=3600)
    now = utcnow()
    assert [d["workflow_id"] for d in store.save([alert("wf-1")], now)] == ["wf-1"]
    assert store.save([alert("wf-2")], now + timedelta(minutes=5)) == []  # a repeat: counted
    assert store.save([alert("wf-2")], now + timedelta(minutes=6)) == []  # the same task judged twice
    assert [d["subject"] for d in store.save([alert("wf-3", "issue_refund")], now)] == ["issue_refund"]
    (repeat,) = [r for r in list_alerts(engine) if r["rule"] == "steps"]
    assert repeat["count"] == 2 and repeat["workflow_id"] == "wf-1" and repeat["last_workflow_id"] == "wf-2"
    later = store.save([alert("wf-4")], now + timedelta(minutes=6) + timedelta(seconds=3601))
    assert [d["workflow_id"] for d in later] == ["wf-4"]  # quiet for longer than dedup_s: raised again
    assert len(list_alerts(engine, since=now + timedelta(hours=1))) == 1


def test_alert_store_raises_one_alert_from_many_workers_at_once(any_db_url: str) -> None:
    """The same alert from six tasks finishing at once on several workers: one row, counted six times."""
    engine = make_engine(any_db_url)
    init_db(engine)
    now = utcnow()
    go = threading.Barrier(6)
    new: list[list[dict[str, Any]]] = []

    def save(i: int) -> None:
        store = AlertStore(make_engine(any_db_url), dedup_s=3600)
        go.wait()
        new.append(store.save([alert(f"wf-{i}")], now))
    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(n) for n in new) == 1 and len(new) == 6
    (row,) = list_alerts(engine)
    assert row["count"] == 6


def test_the_observer_never_fails_a_task(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(AlertEngine):
        def process(self, task: TaskFigures) -> list[dict[str, Any]]:
            raise RuntimeError("ledger unreachable")

    class BrokenMetrics(KeelMetrics):
        def record(self, task: TaskContext, outcome: TaskOutcome) -> None:
            raise ValueError("bad instrument")

    engine = make_engine(f"sqlite:///{tmp_path / 'o.db'}")
    task, outcome = TaskContext(workflow_id="wf-x", tenant="C-1001"), TaskOutcome(status="resolved", route="reply")
    with caplog.at_level(logging.ERROR, logger="keel.alerts"):
        observer = TaskObserver(None, Broken(engine))
        observer.task_finished(task, outcome)
        assert observer.drain(10)
        TaskObserver(BrokenMetrics(), None).task_finished(task, outcome)
        observer.close()
        observer.task_finished(task.model_copy(update={"workflow_id": "wf-after-close"}), outcome)
    messages = [r.getMessage() for r in caplog.records]
    assert "alert evaluation of wf-x failed (the task is not affected)" in messages
    assert "metrics or alerts of wf-x failed (the task is not affected)" in messages
    assert "metrics or alerts of wf-after-close failed (the task is not affected)" in messages


def test_webhook_failures_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    sink = WebhookSink(f"http://127.0.0.1:{free_port()}/hook", timeout_s=2)
    with caplog.at_level(logging.WARNING, logger="keel.alerts"):
        sink.send({"id": 7, "rule": "steps"})
        assert sink.drain(10)
    sink.close()
    assert any("alert 7 (steps) not delivered to the webhook" in r.getMessage() for r in caplog.records)


def test_metrics_endpoint_port_zero_is_off_and_a_taken_port_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    m = KeelMetrics()
    assert serve_metrics(KeelSettings(metrics_port=0), m) is None
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with caplog.at_level(logging.WARNING):
            assert serve_metrics(KeelSettings(metrics_port=taken), m) is None
            assert sdk_runtime(KeelSettings(sdk_metrics_port=taken)) is None
    assert sdk_runtime(KeelSettings(sdk_metrics_port=0)) is None
    assert sum("not started" in r.getMessage() for r in caplog.records) == 2
    m.shutdown()


class Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("H", (Hook,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    server.shutdown()
    server.server_close()
