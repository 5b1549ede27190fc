"""Behavioral alerts in the worker, and the hook that runs at the end of every task.

`TaskObserver.task_finished` is called by ToolActivities right after a task's outcome row commits (the
routing call). It records the task's metrics at once (microseconds) and hands the alert evaluation to
one background thread, so the activity never waits for it and never fails because of it: an error is
logged. The evaluation judges the task against the earlier tasks of its type (keel.alerts): their
figures are kept in memory per task type, loaded from the ledger at the type's first task and again
every `refresh_s` (so tasks finished by other workers count too). An alert that fires is written to
the `alerts` table; a repeat of the same rule, type and tool or category within the policy's
`dedup_s` is counted on the existing row instead. New alerts go to the log and, with a webhook URL,
are POSTed as JSON from another background thread with a short timeout (failures are logged).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select, text
from sqlmodel import Session, col

from activities.db import AlertRow, LedgerRow, utcnow
from activities.metrics import KeelMetrics
from keel.alerts import DEFAULT_ALERT_POLICY, Alert, AlertPolicy, TaskFigures, TypeHistory, evaluate
from keel.settings import KeelSettings
from keel.shadow import SHADOW_FEATURE
from keel.types import TaskContext, TaskOutcome

log = logging.getLogger("keel.alerts")
_ALERTS_LOCK_ID = 0x6B616C74  # "kalt": the PostgreSQL advisory lock of AlertStore.save


def figures_of(task: TaskContext, outcome: TaskOutcome) -> TaskFigures:
    return TaskFigures(workflow_id=task.workflow_id, task_type=task.task_type, feature=task.feature,
                       steps=outcome.steps, tokens=outcome.input_tokens + outcome.output_tokens,
                       tools=list(outcome.tools), category=outcome.category)


def alert_doc(row: AlertRow) -> dict[str, Any]:
    return {
        "id": row.id, "rule": row.rule, "task_type": row.task_type, "feature": row.feature, "subject": row.subject,
        "message": row.message, "value": row.value, "threshold": row.threshold, "count": row.count,
        "workflow_id": row.workflow_id, "last_workflow_id": row.last_workflow_id,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "last_seen_at": row.last_seen_at.isoformat() if row.last_seen_at else None,
    }


def list_alerts(engine: Engine, since: datetime | None = None, task_type: str | None = None) -> list[dict[str, Any]]:
    """Alerts seen (raised or repeated) since `since`, the most recently seen first."""
    stmt = select(AlertRow)
    if since is not None:
        stmt = stmt.where(col(AlertRow.last_seen_at) >= (since if since.tzinfo else since.replace(tzinfo=UTC)))
    if task_type is not None:
        stmt = stmt.where(col(AlertRow.task_type) == task_type)
    stmt = stmt.order_by(col(AlertRow.last_seen_at).desc(), col(AlertRow.id).desc())
    with Session(engine) as s:
        return [alert_doc(r) for r in s.scalars(stmt)]


class AlertStore:
    """The `alerts` table, deduplicated (see the module docstring)."""

    def __init__(self, engine: Engine, dedup_s: float) -> None:
        self.engine = engine
        self.dedup_s = dedup_s

    def save(self, alerts: list[Alert], now: datetime | None = None) -> list[dict[str, Any]]:
        """Writes `alerts`; returns the new ones (not repeats), as documents."""
        now = now or utcnow()
        fresh: list[AlertRow] = []
        # One transaction holding the write lock (SQLite) or an advisory lock (PostgreSQL): two workers
        # cannot both raise one alert.
        with Session(self.engine, expire_on_commit=False) as s:
            if self.engine.dialect.name == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ALERTS_LOCK_ID})
            for a in alerts:
                last = s.scalars(select(AlertRow).where(col(AlertRow.dedup_key) == a.dedup_key)
                                 .order_by(col(AlertRow.id).desc()).limit(1)).first()
                if last is not None and a.workflow_id in (last.workflow_id, last.last_workflow_id):
                    continue  # this task was judged before (its routing call ran twice)
                if last is not None and last.last_seen_at >= now - timedelta(seconds=self.dedup_s):
                    last.count += 1
                    last.last_seen_at = now
                    last.last_workflow_id = a.workflow_id
                    s.add(last)
                    continue
                row = AlertRow(dedup_key=a.dedup_key, rule=a.rule, task_type=a.task_type, feature=a.feature,
                               subject=a.subject, message=a.message, value=a.value, threshold=a.threshold,
                               workflow_id=a.workflow_id, last_workflow_id=a.workflow_id, created_at=now,
                               last_seen_at=now)
                s.add(row)
                fresh.append(row)
            s.commit()
        return [alert_doc(r) for r in fresh]


class WebhookSink:
    """POSTs each new alert as JSON to `url`, from a background thread, with a short timeout."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="keel-alert-webhook")
        self._pending: set[Future[None]] = set()
        self._lock = threading.Lock()

    def send(self, doc: dict[str, Any]) -> None:
        fut = self._executor.submit(self._post, doc)
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        with self._lock:
            self._pending.discard(fut)

    def _post(self, doc: dict[str, Any]) -> None:
        body = json.dumps({"source": "keel", "alert": doc}, default=str).encode()
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "keel-alerts"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
        except Exception as e:
            log.warning("alert %s (%s) not delivered to the webhook %s: %s", doc.get("id"), doc.get("rule"),
                        self.url, e)

    def drain(self, timeout: float) -> bool:
        with self._lock:
            pending = set(self._pending)
        return not wait(pending, timeout=timeout).not_done if pending else True

    def close(self) -> None:
        self._executor.shutdown(wait=False)


@dataclass
class _TypeWindow:
    tasks: deque[TaskFigures]
    tools_seen: set[str] = field(default_factory=set)
    loaded_at: float = 0.0


class AlertEngine:
    """Judges finished tasks against the earlier tasks of their type. Called from one thread only."""

    def __init__(self, engine: Engine, policy: AlertPolicy = DEFAULT_ALERT_POLICY,
                 webhook: WebhookSink | None = None, refresh_s: float = 300.0) -> None:
        self.engine = engine
        self.policy = policy
        self.store = AlertStore(engine, policy.dedup_s)
        self.webhook = webhook
        self.refresh_s = refresh_s
        self._windows: dict[str, _TypeWindow] = {}
        self._size = max(policy.steps_window, policy.tokens_window, policy.shift_recent + policy.shift_baseline)

    def process(self, task: TaskFigures) -> list[dict[str, Any]]:
        """Evaluate `task`, store what fires, send the new alerts; returns them."""
        w = self._window(task)
        alerts = evaluate(task, TypeHistory(tasks=list(w.tasks), tools_seen=w.tools_seen), self.policy)
        w.tasks.append(task)
        w.tools_seen.update(task.tools)
        fresh = self.store.save(alerts) if alerts else []
        for doc in fresh:
            log.warning("keel alert #%s [%s] %s", doc["id"], doc["rule"], doc["message"])
            if self.webhook is not None:
                self.webhook.send(doc)
        return fresh

    def _window(self, task: TaskFigures) -> _TypeWindow:
        w = self._windows.get(task.task_type)
        if w is None or time.monotonic() - w.loaded_at > self.refresh_s:
            w = self._windows[task.task_type] = self._load(task.task_type, task.workflow_id)
        return w

    def _load(self, task_type: str, exclude: str) -> _TypeWindow:
        """The type's last tasks and every tool it executed, from the ledger (`exclude`: the task judged)."""
        # Shadow candidates' dry runs are not the type's behaviour (they are compared in `keel shadow report`).
        outcome = select(LedgerRow).where(col(LedgerRow.kind) == "outcome", col(LedgerRow.task_type) == task_type,
                                          col(LedgerRow.workflow_id) != exclude,
                                          col(LedgerRow.feature) != SHADOW_FEATURE)
        latest = outcome.order_by(col(LedgerRow.created_at).desc(), col(LedgerRow.key).desc()).limit(self._size)
        tools = select(col(LedgerRow.tool)).distinct().where(
            col(LedgerRow.kind) == "tool", col(LedgerRow.task_type) == task_type,
            col(LedgerRow.workflow_id) != exclude, col(LedgerRow.tool).is_not(None),
            col(LedgerRow.feature) != SHADOW_FEATURE)
        with Session(self.engine) as s:
            rows = list(s.scalars(latest))
            seen = {str(t) for t in s.scalars(tools)}
        tasks: deque[TaskFigures] = deque(maxlen=self._size)
        for r in reversed(rows):
            used = json.loads(r.tools) if r.tools else []
            seen.update(used)
            tasks.append(TaskFigures(workflow_id=r.workflow_id, task_type=task_type, feature=r.feature,
                                     steps=r.steps, tokens=r.input_tokens + r.output_tokens, tools=used,
                                     category=r.category))
        return _TypeWindow(tasks=tasks, tools_seen=seen, loaded_at=time.monotonic())


class TaskObserver:
    """The worker's hook at the end of every task (see the module docstring). Never raises."""

    SEEN = 10_000
    """Workflow ids remembered so that a routing call run twice on this worker counts once."""

    def __init__(self, metrics: KeelMetrics | None = None, alerts: AlertEngine | None = None) -> None:
        self.metrics = metrics
        self.alerts = alerts
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-alerts") if alerts else None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, engine: Engine, settings: KeelSettings, metrics: KeelMetrics | None = None,
                      policy: AlertPolicy = DEFAULT_ALERT_POLICY) -> TaskObserver:
        alerts = None
        if settings.alerts:
            webhook = WebhookSink(settings.alert_webhook_url) if settings.alert_webhook_url else None
            alerts = AlertEngine(engine, policy, webhook)
        return cls(metrics or KeelMetrics.shared(), alerts)

    def task_finished(self, task: TaskContext, outcome: TaskOutcome) -> None:
        try:
            with self._lock:
                if task.workflow_id in self._seen:
                    return
                self._seen[task.workflow_id] = None
                if len(self._seen) > self.SEEN:
                    self._seen.popitem(last=False)
            if self.metrics is not None:
                self.metrics.record(task, outcome)
            if self._executor is not None:
                self._executor.submit(self._evaluate, figures_of(task, outcome))
        except Exception:
            log.exception("metrics or alerts of %s failed (the task is not affected)", task.workflow_id)

    def _evaluate(self, task: TaskFigures) -> None:
        assert self.alerts is not None
        try:
            self.alerts.process(task)
        except Exception:
            log.exception("alert evaluation of %s failed (the task is not affected)", task.workflow_id)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until the tasks handed over so far are evaluated and their webhooks sent (tests, shutdown)."""
        if self._executor is None or self.alerts is None:
            return True
        deadline = time.monotonic() + timeout
        try:
            self._executor.submit(lambda: None).result(timeout=timeout)
        except Exception:
            return False
        webhook = self.alerts.webhook
        return webhook.drain(max(0.0, deadline - time.monotonic())) if webhook is not None else True

    def close(self, timeout: float = 5.0) -> None:
        self.drain(timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        if self.alerts is not None and self.alerts.webhook is not None:
            self.alerts.webhook.close()
