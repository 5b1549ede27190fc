"""The admit activity: asks a task type's cost circuit breaker whether a task may run the model.

The breaker is an entity workflow (workflows.breaker); this activity reaches it with
update-with-start, so the first task of a type creates its breaker, atomically, and every later one
finds the running breaker (or its continued-as-new successor) under the same workflow id.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from core.breaker import (
    BREAKER_ADMIT_ACTIVITY,
    BREAKER_ADMIT_UPDATE,
    BREAKER_WORKFLOW,
    AdmitDecision,
    AdmitRequest,
    BreakerState,
    breaker_workflow_id,
)

BREAKER_UNAVAILABLE = "BreakerUnavailable"
"""Retryable: Temporal could not be reached or the update did not complete in time."""
BREAKER_ADMIT_FAILED = "BreakerAdmitFailed"
"""Non-retryable: the breaker refused the request itself (e.g. a config for another task type)."""


class BreakerActivities:
    def __init__(self, client: Client, task_queue: str) -> None:
        self._client = client
        self._task_queue = task_queue
        """Where a breaker is started when missing: a queue whose workers register the workflow."""

    @activity.defn(name=BREAKER_ADMIT_ACTIVITY)
    async def admit(self, req: AdmitRequest) -> AdmitDecision:
        task_type = req.config.task_type
        breaker_id = breaker_workflow_id(task_type, req.config.scope)
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


async def _drain(start: WithStartWorkflowOperation[Any, None]) -> None:
    # When the start part fails, the SDK also sets the error on the operation's handle future;
    # retrieving it keeps asyncio from logging a "Future exception was never retrieved" traceback.
    with contextlib.suppress(RPCError, TemporalError, TimeoutError):
        await asyncio.wait_for(start.workflow_handle(), timeout=0.1)
