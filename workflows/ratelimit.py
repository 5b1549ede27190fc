"""ProviderRateLimiterWorkflow: one entity workflow per provider:model with a KEEL_RATE_LIMITS entry
(see keel.ratelimits). Every worker's LLM activity reserves its call's slot here, so the limit holds
across workers; the state (the next free slot) survives crashes and continue-as-new."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from keel.ratelimits import (
        RATE_LIMIT_ACQUIRE_UPDATE,
        RATE_LIMIT_STATE_QUERY,
        RATE_LIMITER_WORKFLOW,
        AcquireRequest,
        Grant,
        LimiterState,
        decide,
    )


@workflow.defn(name=RATE_LIMITER_WORKFLOW)
class ProviderRateLimiterWorkflow:
    """Runs forever; continue-as-new hands its state to the next run."""

    @workflow.init
    def __init__(self, state: LimiterState) -> None:
        # Built here, not in run: update-with-start delivers the first acquire before run starts.
        self._state = state
        self._handled = 0

    @workflow.run
    async def run(self, state: LimiterState) -> None:
        await workflow.wait_condition(self._should_continue)
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(self._state)

    def _should_continue(self) -> bool:
        return (self._handled >= self._state.max_events_before_continue
                or workflow.info().is_continue_as_new_suggested())

    @workflow.update(name=RATE_LIMIT_ACQUIRE_UPDATE)
    def acquire(self, req: AcquireRequest) -> Grant:
        grant = decide(self._state, req, workflow.now().timestamp())
        self._handled += 1
        workflow.set_current_details(f"{req.key}: {self._state.granted:,} calls granted, "
                                     f"{self._state.refused:,} told to wait (this run and before)")
        return grant

    @workflow.query(name=RATE_LIMIT_STATE_QUERY)
    def state(self) -> LimiterState:
        return self._state
