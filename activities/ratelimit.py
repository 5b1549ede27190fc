"""The LLM activity's side of provider rate limits (keel.ratelimits): reserve the call's slot with the
model's limiter workflow (update-with-start: the first call creates it), then wait for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
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

from keel import errors
from keel.ratelimits import (
    RATE_LIMIT_ACQUIRE_UPDATE,
    RATE_LIMITER_WORKFLOW,
    AcquireRequest,
    Grant,
    LimiterState,
    RateLimit,
    limiter_workflow_id,
)

log = logging.getLogger(__name__)

RATE_LIMITER_UNAVAILABLE = "RateLimiterUnavailable"
"""Retryable: the limiter workflow could not be reached or did not answer in time."""

HORIZON_S = 30.0
"""A call waits at most this long for its slot while holding its activity slot; a later slot is not
reserved and the call is retried when it comes near (a worker's slots are not all held by sleepers)."""


class RateLimiter:
    def __init__(self, client: Client, task_queue: str, limits: dict[str, RateLimit],
                 horizon_s: float | None = None) -> None:
        self._client = client
        self._task_queue = task_queue
        """The scope of the limiters and where they run: the workers of one task queue share them."""
        self._limits = limits
        self._horizon_s = horizon_s or HORIZON_S

    def limit_for(self, provider: str, model: str) -> RateLimit | None:
        return self._limits.get(f"{provider}:{model}")

    async def acquire(self, provider: str, model: str, tokens: int) -> None:
        """Within the LLM activity, before the provider call: returns when the call may go (at once for a
        model without a limit); raises a retryable ProviderRateLimited when its slot is beyond the horizon."""
        key = f"{provider}:{model}"
        limit = self._limits.get(key)
        if limit is None:
            return
        grant = await self._ask(key, AcquireRequest(key=key, limit=limit, tokens=tokens, horizon_s=self._horizon_s))
        if not grant.granted:
            raise ApplicationError(
                f"{key}: rate limited by KEEL_RATE_LIMITS ({_describe(limit)}): next slot in about "
                f"{grant.wait_s:.0f} s",
                type=errors.PROVIDER_RATE_LIMITED,
                non_retryable=False,
                next_retry_delay=timedelta(seconds=max(grant.wait_s, 0.1)),
            )
        if grant.wait_s > 0:
            await asyncio.sleep(grant.wait_s)

    async def _ask(self, key: str, req: AcquireRequest) -> Grant:
        limiter_id = limiter_workflow_id(key, self._task_queue)
        start: WithStartWorkflowOperation[Any, None] = WithStartWorkflowOperation(
            RATE_LIMITER_WORKFLOW,
            LimiterState(),
            id=limiter_id,
            task_queue=self._task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"Provider rate limit for {key}",
        )
        info = activity.info()
        # Stable within an attempt: a retried update gets the first reservation, not a second one.
        update_id = f"acquire/{info.workflow_id}/{info.workflow_run_id}/{info.activity_id}/{info.attempt}"
        try:
            grant: Grant = await self._client.execute_update_with_start_workflow(
                RATE_LIMIT_ACQUIRE_UPDATE, req, start_workflow_operation=start, id=update_id, result_type=Grant,
                rpc_timeout=timedelta(seconds=15),
            )
        except WorkflowUpdateFailedError as e:
            raise ApplicationError(f"rate limiter {limiter_id!r} refused the request: {e.cause or e}",
                                   type=RATE_LIMITER_UNAVAILABLE) from e
        except WorkflowUpdateRPCTimeoutOrCancelledError as e:
            if activity.is_cancelled():
                raise
            await _drain(start)
            raise ApplicationError(f"rate limiter {limiter_id!r} did not answer in time (is a worker polling "
                                   f"task queue {self._task_queue!r}?)", type=RATE_LIMITER_UNAVAILABLE) from e
        except RPCError as e:
            await _drain(start)
            raise ApplicationError(f"cannot reach rate limiter {limiter_id!r}: {e.message} ({e.status.name})",
                                   type=RATE_LIMITER_UNAVAILABLE) from e
        return grant


def _describe(limit: RateLimit) -> str:
    parts = [f"{limit.rpm:g} requests/min" if limit.rpm else "", f"{limit.tpm:g} tokens/min" if limit.tpm else ""]
    return ", ".join(p for p in parts if p)


async def _drain(start: WithStartWorkflowOperation[Any, None]) -> None:
    # See activities.breaker._drain: retrieve the start's error so asyncio does not log it.
    with contextlib.suppress(RPCError, TemporalError, TimeoutError):
        await asyncio.wait_for(start.workflow_handle(), timeout=0.1)
