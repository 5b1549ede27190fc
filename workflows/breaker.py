"""CostCircuitBreakerWorkflow: one long-lived entity workflow per task type (see keel.breaker).

The decisions are plain functions of (state, input, now) that update the state in place: the
workflow only feeds them `workflow.now()` and its messages, and they can be tested without Temporal.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from keel.breaker import (
        BREAKER_ADMIT_UPDATE,
        BREAKER_RECORD_BATCH_SIGNAL,
        BREAKER_RECORD_SIGNAL,
        BREAKER_RESET_UPDATE,
        BREAKER_STATE_QUERY,
        BREAKER_WORKFLOW,
        AdmitDecision,
        AdmitRequest,
        BreakerState,
        ResetRequest,
        UsageBatch,
        UsageReport,
        WindowEntry,
    )


# -- state transitions (deterministic: no clock, no I/O; `now` is an argument) -------------------


def trim_window(state: BreakerState, now: datetime) -> None:
    """Keep only the latest `window_tasks` entries that finished within `window_seconds`."""
    horizon = now - timedelta(seconds=state.config.window_seconds)
    kept = [e for e in state.window if e.at >= horizon]
    state.window = kept[-state.config.window_tasks :]


def should_trip(state: BreakerState) -> bool:
    return len(state.window) >= state.config.min_tasks and state.window_avg_tokens > state.config.threshold_tokens


def _threshold_text(state: BreakerState) -> str:
    cfg = state.config
    return f"threshold {cfg.threshold_tokens:,.0f} ({cfg.trip_ratio:g}x expected {cfg.expected_tokens:,})"


def _open(state: BreakerState, now: datetime, reason: str) -> None:
    state.status = "open"
    state.opened_at = now
    state.half_opened_at = None
    state.trips += 1
    state.probes_admitted = 0
    state.probe_results = []
    state.reason = reason


def _close(state: BreakerState, reason: str) -> None:
    state.status = "closed"
    state.opened_at = None
    state.half_opened_at = None
    state.probes_admitted = 0
    state.probe_results = []
    state.rejected = 0
    # The spiral's entries would re-trip the breaker at once: the window starts afresh.
    state.window = []
    state.reason = reason


def half_open_if_due(state: BreakerState, now: datetime) -> bool:
    """Open -> half-open once the cooldown is over. Returns whether the status changed."""
    due = state.half_opens_at
    if due is None or now < due:
        return False
    state.status = "half_open"
    state.half_opened_at = now
    state.probes_admitted = 0
    state.probe_results = []
    state.reason = f"cooldown over: admitting {state.config.probes} probe task(s); " + state.reason
    return True


def _restart_lost_probes(state: BreakerState, now: datetime) -> None:
    # A probe whose task failed or was cancelled never reports; without this the breaker would stay
    # half-open, rejecting everything, until a manual reset.
    if state.half_opened_at is None or state.probes_admitted < state.config.probes:
        return
    if now >= state.half_opened_at + timedelta(seconds=state.config.cooldown_seconds):
        state.half_opened_at = now
        state.probes_admitted = len(state.probe_results)


def decide_admit(state: BreakerState, req: AdmitRequest, now: datetime) -> AdmitDecision:
    """May a new task of this type run the model? Counts rejections and probes in `state`."""
    if req.config != state.config:
        # The policy the caller holds is the source of truth; a changed one takes effect at once.
        state.config = req.config
    trim_window(state, now)
    half_open_if_due(state, now)
    cfg = state.config
    if state.status == "closed":
        return AdmitDecision(admitted=True, status="closed")
    if state.status == "half_open":
        _restart_lost_probes(state, now)
        if state.probes_admitted < cfg.probes:
            state.probes_admitted += 1
            return AdmitDecision(
                admitted=True,
                status="half_open",
                probe=True,
                reason=f"probe {state.probes_admitted} of {cfg.probes} while the cost circuit breaker is half-open",
            )
        state.rejected += 1
        return AdmitDecision(
            admitted=False,
            status="half_open",
            reason=(
                f"cost circuit breaker half-open for task type {cfg.task_type!r}: {cfg.probes} probe task(s) "
                f"running, {len(state.probe_results)} reported; waiting for their usage ({_threshold_text(state)})"
            ),
        )
    state.rejected += 1
    due = state.half_opens_at
    when = f"; half-opens at {due:%Y-%m-%d %H:%M:%S} UTC" if due is not None else ""
    return AdmitDecision(
        admitted=False,
        status="open",
        reason=f"cost circuit breaker open for task type {cfg.task_type!r}: {state.reason}{when}",
    )


def apply_usage(state: BreakerState, report: UsageReport, now: datetime) -> None:
    """A finished task's usage: into the window; may trip (closed) or decide the probes (half-open)."""
    if report.skipped or any(e.workflow_id == report.workflow_id for e in state.window):
        # Skipped tasks never ran the model; a second report of the same task is a reporter's retry.
        return
    half_open_if_due(state, now)
    state.window.append(WindowEntry(workflow_id=report.workflow_id, tokens=report.tokens, at=now))
    trim_window(state, now)
    cfg = state.config
    if state.status == "closed":
        if should_trip(state):
            _open(
                state,
                now,
                f"window average {state.window_avg_tokens:,.0f} tokens over the last {len(state.window)} "
                f"task(s) > {_threshold_text(state)}",
            )
        return
    if state.status == "half_open" and report.probe:
        state.probe_results.append(report.tokens)
        if len(state.probe_results) < cfg.probes:
            return
        avg = sum(state.probe_results) / len(state.probe_results)
        summary = f"{len(state.probe_results)} probe(s) averaged {avg:,.0f} tokens"
        if avg <= cfg.threshold_tokens:
            _close(state, f"closed: {summary} <= {_threshold_text(state)}")
        else:
            _open(state, now, f"re-opened: {summary} > {_threshold_text(state)}")


def apply_reset(state: BreakerState, req: ResetRequest) -> None:
    _close(state, f"reset by {req.by}" + (f": {req.reason}" if req.reason else ""))
    state.last_reset_by = req.by


def describe(state: BreakerState) -> str:
    """What the Temporal UI shows as the workflow's current details (markdown)."""
    cfg = state.config
    lines = [
        f"**{state.status}** · task type `{cfg.task_type}`",
        f"window: {len(state.window)} task(s), average {state.window_avg_tokens:,.0f} tokens; "
        + _threshold_text(state),
        f"trips: {state.trips} · rejected: {state.rejected}",
    ]
    if state.half_opens_at is not None:
        lines.append(f"half-opens at {state.half_opens_at:%Y-%m-%d %H:%M:%S} UTC")
    if state.reason:
        lines.append(state.reason)
    return "\n\n".join(lines)


# -- the entity workflow -------------------------------------------------------------------------


@workflow.defn(name=BREAKER_WORKFLOW)
class CostCircuitBreakerWorkflow:
    """Runs forever; continue-as-new hands its state to the next run."""

    @workflow.init
    def __init__(self, state: BreakerState) -> None:
        # Built here, not in run: update-with-start delivers the first admit before run starts.
        self._state = state
        self._handled = 0

    @workflow.run
    async def run(self, state: BreakerState) -> None:
        self._show()
        while not self._should_continue():
            now = workflow.now()
            if half_open_if_due(self._state, now):
                self._show()
                continue
            due = self._state.half_opens_at
            # The timer only makes the state (query, UI) say half-open on time; admits check it anyway.
            timeout = (due - now).total_seconds() if due is not None else None
            try:
                await workflow.wait_condition(
                    functools.partial(self._should_wake, due),
                    timeout=timeout,
                    timeout_summary="half-open" if timeout is not None else None,
                )
            except TimeoutError:
                pass
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(self._state)

    def _should_continue(self) -> bool:
        return (
            self._handled >= self._state.max_events_before_continue
            or workflow.info().is_continue_as_new_suggested()
        )

    def _should_wake(self, due: datetime | None) -> bool:
        # A changed due time (the breaker opened, re-opened, closed, or its cooldown changed) needs a new timer.
        return self._should_continue() or self._state.half_opens_at != due

    def _done(self) -> None:
        self._handled += 1
        self._show()

    def _show(self) -> None:
        workflow.set_current_details(describe(self._state))

    @workflow.update(name=BREAKER_ADMIT_UPDATE)
    def admit(self, req: AdmitRequest) -> AdmitDecision:
        decision = decide_admit(self._state, req, workflow.now())
        self._done()
        return decision

    @admit.validator
    def _validate_admit(self, req: AdmitRequest) -> None:
        # Rejected before it reaches the history: a request for another breaker is a caller's bug.
        mine, theirs = self._state.config, req.config
        if (theirs.task_type, theirs.scope) != (mine.task_type, mine.scope):
            raise ValueError(
                f"breaker for task type {mine.task_type!r} (scope {mine.scope!r}) got an admit for "
                f"{theirs.task_type!r} (scope {theirs.scope!r})"
            )

    @workflow.signal(name=BREAKER_RECORD_SIGNAL)
    def record(self, report: UsageReport) -> None:
        apply_usage(self._state, report, workflow.now())
        self._done()

    @workflow.signal(name=BREAKER_RECORD_BATCH_SIGNAL)
    def record_batch(self, batch: UsageBatch) -> None:
        now = workflow.now()
        for report in batch.reports:
            apply_usage(self._state, report, now)
        self._done()

    @workflow.update(name=BREAKER_RESET_UPDATE)
    def reset(self, req: ResetRequest) -> BreakerState:
        apply_reset(self._state, req)
        self._done()
        return self._state

    @workflow.query(name=BREAKER_STATE_QUERY)
    def state(self) -> BreakerState:
        return self._state
