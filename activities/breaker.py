"""The admit activity: asks a task type's cost circuit breaker whether a task may run the model.

The breaker is an entity workflow (workflows.breaker); this activity reaches it with
update-with-start, so the first task of a type creates its breaker, atomically, and every later one
finds the running breaker (or its continued-as-new successor) under the same workflow id.

Two savings keep the breaker off the per-task path while it is closed (measured in
bench/throughput.py: asking it once per task, and a usage signal per task, cost 0.13x of throughput):
- a worker answers admits from the breaker's last "closed" answer for `admit_cache_s` seconds
  (open and half-open answers are never reused: rejections and probes are counted by the breaker);
- `UsageReporter` sends the usage of the tasks that ended on this worker as one signal every
  `flush_s` seconds instead of one per task. Probe tasks still signal their own usage from the
  workflow, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from temporalio import activity
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError, TemporalError
from temporalio.service import RPCError

from keel.breaker import (
    BREAKER_ADMIT_ACTIVITY,
    BREAKER_ADMIT_UPDATE,
    BREAKER_RECORD_BATCH_SIGNAL,
    BREAKER_WORKFLOW,
    AdmitDecision,
    AdmitRequest,
    BreakerConfig,
    BreakerState,
    UsageBatch,
    UsageReport,
    breaker_workflow_id,
)

log = logging.getLogger(__name__)

BREAKER_UNAVAILABLE = "BreakerUnavailable"
"""Retryable: Temporal could not be reached or the update did not complete in time."""
BREAKER_ADMIT_FAILED = "BreakerAdmitFailed"
"""Non-retryable: the breaker refused the request itself (e.g. a config for another task type)."""


class BreakerActivities:
    def __init__(self, client: Client, task_queue: str, admit_cache_s: float = 0.0) -> None:
        self._client = client
        self._task_queue = task_queue
        """Where a breaker is started when missing: a queue whose workers register the workflow."""
        self._admit_cache_s = admit_cache_s
        """0 asks the breaker for every task (exact, slower)."""
        self._closed_until: dict[str, tuple[float, BreakerConfig]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _cached(self, breaker_id: str, config: BreakerConfig) -> AdmitDecision | None:
        until, cfg = self._closed_until.get(breaker_id, (0.0, None))
        if cfg != config or time.monotonic() >= until:
            return None
        return AdmitDecision(admitted=True, status="closed", cached=True)

    @activity.defn(name=BREAKER_ADMIT_ACTIVITY)
    async def admit(self, req: AdmitRequest) -> AdmitDecision:
        """The local activity of tasks started before admission moved into the first model call."""
        return await self.decide(req)

    async def decide(self, req: AdmitRequest) -> AdmitDecision:
        """Within any activity: the update id derives from that activity's id, so its retries get the
        breaker's first answer instead of being counted again."""
        breaker_id = breaker_workflow_id(req.config.task_type, req.config.scope)
        if self._admit_cache_s <= 0:
            return await self._ask(breaker_id, req)
        cached = self._cached(breaker_id, req.config)
        if cached is not None:
            return cached
        # One admit at a time asks the breaker; the tasks waiting behind it use its answer if "closed".
        async with self._locks.setdefault(breaker_id, asyncio.Lock()):
            cached = self._cached(breaker_id, req.config)
            if cached is not None:
                return cached
            decision = await self._ask(breaker_id, req)
            if decision.admitted and decision.status == "closed" and not decision.probe:
                self._closed_until[breaker_id] = (time.monotonic() + self._admit_cache_s, req.config)
            else:
                self._closed_until.pop(breaker_id, None)
            return decision

    async def _ask(self, breaker_id: str, req: AdmitRequest) -> AdmitDecision:
        task_type = req.config.task_type
        start: WithStartWorkflowOperation[Any, None] = WithStartWorkflowOperation(
            BREAKER_WORKFLOW,
            BreakerState(config=req.config),
            id=breaker_id,
            task_queue=self._task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"Cost circuit breaker for task type {task_type!r}",
        )
        info = activity.info()
        # A stable update id: if this activity is retried after the breaker answered, Temporal
        # returns the first answer instead of counting the task (or a probe slot) twice.
        update_id = f"admit/{req.workflow_id}/{info.workflow_run_id}/{info.activity_id}"
        # Give up a little before the attempt's own timeout, so a breaker nobody answers for fails
        # with the diagnosis below instead of a bare timeout.
        budget = info.start_to_close_timeout
        try:
            decision: AdmitDecision = await self._client.execute_update_with_start_workflow(
                BREAKER_ADMIT_UPDATE,
                req,
                start_workflow_operation=start,
                id=update_id,
                result_type=AdmitDecision,
                rpc_timeout=budget * 0.8 if budget else None,
            )
        except WorkflowUpdateFailedError as e:
            raise ApplicationError(
                f"cost circuit breaker {breaker_id!r} refused the admit of {req.workflow_id!r}: {e.cause or e}",
                type=BREAKER_ADMIT_FAILED,
                non_retryable=True,
            ) from e
        except WorkflowUpdateRPCTimeoutOrCancelledError as e:
            if activity.is_cancelled():
                raise
            await _drain(start)
            raise ApplicationError(
                f"cost circuit breaker {breaker_id!r} did not answer the admit of {req.workflow_id!r} in time "
                f"({await self._where(breaker_id)})",
                type=BREAKER_UNAVAILABLE,
            ) from e
        except RPCError as e:
            await _drain(start)
            raise ApplicationError(
                f"cannot reach cost circuit breaker {breaker_id!r} for {req.workflow_id!r}: "
                f"{e.message} ({e.status.name})",
                type=BREAKER_UNAVAILABLE,
            ) from e
        return decision

    async def _where(self, breaker_id: str) -> str:
        # A running breaker stays on the task queue it was started on: if that queue has no worker
        # (KEEL_TASK_QUEUE changed, or a test's worker is gone), no admit of that type is answered.
        try:
            queue = (await self._client.get_workflow_handle(breaker_id).describe()).task_queue
        except RPCError:
            queue = self._task_queue
        hint = f"is a worker polling task queue {queue!r}?"
        if queue != self._task_queue:
            hint += f" It runs there, not on this worker's {self._task_queue!r}"
        return hint


class UsageReporter:
    """Collects the usage of tasks that ended on this worker and signals each breaker once per
    `flush_s` seconds with the batch. The breaker ignores a second report of the same task, so a
    retried routing activity does not count twice. Reports of the last `flush_s` seconds before a
    worker crashes never reach the breaker's window (a statistical sample; the ledger, written in
    the same transaction as the task's outcome, keeps every figure); `aclose` flushes on shutdown."""

    MAX_ATTEMPTS = 5

    def __init__(self, client: Client, flush_s: float = 0.5) -> None:
        self._client = client
        self._flush_s = flush_s
        self._pending: dict[str, list[UsageReport]] = {}
        self._attempts: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, breaker_id: str, report: UsageReport) -> None:
        """Must run on the worker's event loop (an async activity)."""
        self._pending.setdefault(breaker_id, []).append(report)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="keel-usage-reporter")

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def flush(self) -> None:
        batches, self._pending = self._pending, {}
        for breaker_id, reports in batches.items():
            try:
                await self._client.get_workflow_handle(breaker_id).signal(
                    BREAKER_RECORD_BATCH_SIGNAL, UsageBatch(reports=reports)
                )
                self._attempts.pop(breaker_id, None)
            except RPCError as e:
                attempts = self._attempts.get(breaker_id, 0) + 1
                if e.status.name == "NOT_FOUND" or attempts >= self.MAX_ATTEMPTS:
                    self._attempts.pop(breaker_id, None)
                    log.warning("usage of %d task(s) not reported to cost circuit breaker %r: %s",
                                len(reports), breaker_id, e.message)
                    continue
                self._attempts[breaker_id] = attempts
                self._pending.setdefault(breaker_id, [])[:0] = reports

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pending:
            await self.flush()


async def _drain(start: WithStartWorkflowOperation[Any, None]) -> None:
    # When the start part fails, the SDK also sets the error on the operation's handle future;
    # retrieving it keeps asyncio from logging a "Future exception was never retrieved" traceback.
    with contextlib.suppress(RPCError, TemporalError, TimeoutError):
        await asyncio.wait_for(start.workflow_handle(), timeout=0.1)
