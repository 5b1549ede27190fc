"""The cost circuit breaker: its pure transitions (examples and hypothesis properties), the entity
workflow on the time-skipping server (trip, open, half-open probes, reset, ageing, continue-as-new),
the admit activity's update-with-start, and `keel breaker` against the dev server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Replayer, Worker
from typer.testing import CliRunner

from activities.breaker import BREAKER_UNAVAILABLE, BreakerActivities, UsageReporter
from keel.breaker import (
    BREAKER_RECORD_SIGNAL,
    BREAKER_RESET_UPDATE,
    BREAKER_STATE_QUERY,
    AdmitDecision,
    AdmitRequest,
    BreakerConfig,
    BreakerState,
    ResetRequest,
    UsageReport,
    breaker_workflow_id,
)
from starter.breaker_cli import BreakerNotFound, breaker_app, breaker_states, reset_breaker, running_breaker_ids
from tests.conftest import assert_eventually
from workers.worker import STRICT_SANDBOX
from workflows.breaker import (
    CostCircuitBreakerWorkflow,
    apply_reset,
    apply_usage,
    decide_admit,
    trim_window,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def config(**kw: Any) -> BreakerConfig:
    """Threshold 2,000 tokens; trips on 4 tasks; 2 probes after 300 s."""
    base: dict[str, Any] = {"task_type": f"bt-{uuid.uuid4().hex[:10]}", "expected_tokens": 1000, "min_tasks": 4,
                            "probes": 2, "cooldown_seconds": 300, "window_seconds": 900}
    return BreakerConfig(**{**base, **kw})


def report(tokens: int, probe: bool = False, skipped: bool = False) -> UsageReport:
    return UsageReport(workflow_id=f"task-{uuid.uuid4().hex[:10]}", tokens=tokens, probe=probe, skipped=skipped)


def admit_req(cfg: BreakerConfig) -> AdmitRequest:
    return AdmitRequest(config=cfg, workflow_id=f"task-{uuid.uuid4().hex[:10]}")


def activity_env(start_to_close_s: float = 30) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, start_to_close_timeout=timedelta(seconds=start_to_close_s))
    return env


# -- pure transitions: examples ------------------------------------------------------------------


def test_trips_only_with_min_tasks_and_above_threshold() -> None:
    s = BreakerState(config=config())
    for i in range(3):
        apply_usage(s, report(10_000), T0 + timedelta(seconds=i))
    assert s.trips == 0, "3 tasks < min_tasks never trip"
    apply_usage(s, report(10_000, skipped=True), T0)
    assert len(s.window) == 3, "a skipped task is not part of the window"
    apply_usage(s, report(10_000), T0 + timedelta(seconds=5))
    assert s.status == "open" and s.trips == 1 and s.opened_at == T0 + timedelta(seconds=5)
    assert "window average 10,000" in s.reason and "threshold 2,000" in s.reason


def test_average_at_threshold_does_not_trip() -> None:
    s = BreakerState(config=config())
    for _ in range(10):
        apply_usage(s, report(2000), T0)
    assert s.status == "closed"


def test_repeated_report_of_one_task_counts_once() -> None:
    s = BreakerState(config=config())
    r = report(500)
    apply_usage(s, r, T0)
    apply_usage(s, r, T0)
    assert len(s.window) == 1


def test_admit_replaces_a_changed_config_and_trims_the_window() -> None:
    cfg = config()
    s = BreakerState(config=cfg)
    for i in range(5):
        apply_usage(s, report(100), T0 + timedelta(seconds=i))
    smaller = cfg.model_copy(update={"window_tasks": 2, "expected_tokens": 50})
    assert decide_admit(s, AdmitRequest(config=smaller, workflow_id="w"), T0 + timedelta(seconds=6)).admitted
    assert s.config == smaller and len(s.window) == 2


def test_lost_probes_are_replaced_after_a_cooldown() -> None:
    s = BreakerState(config=config())
    for _ in range(4):
        apply_usage(s, report(9000), T0)
    half = T0 + timedelta(seconds=300)
    assert [decide_admit(s, admit_req(s.config), half).probe for _ in range(3)] == [True, True, False]
    apply_usage(s, report(100, probe=True), half + timedelta(seconds=1))
    # One probe never reports (its task was cancelled): a cooldown later its slot is given again.
    assert not decide_admit(s, admit_req(s.config), half + timedelta(seconds=299)).admitted
    later = half + timedelta(seconds=301)
    assert [decide_admit(s, admit_req(s.config), later).probe for _ in range(2)] == [True, False]
    apply_usage(s, report(100, probe=True), later)
    assert s.status == "closed" and s.window == [] and s.rejected == 0


# -- pure transitions: properties ----------------------------------------------------------------

configs = st.builds(
    BreakerConfig,
    task_type=st.just("prop"),
    expected_tokens=st.integers(100, 1000),
    trip_ratio=st.sampled_from([1.5, 2.0, 3.0]),
    window_tasks=st.integers(1, 8),
    window_seconds=st.integers(10, 600).map(float),
    min_tasks=st.integers(1, 6),
    cooldown_seconds=st.integers(10, 400).map(float),
    probes=st.integers(1, 3),
)
ops = st.one_of(
    st.tuples(st.just("advance"), st.integers(0, 500)),
    st.tuples(st.just("admit"), st.just(0)),
    st.tuples(st.just("record"), st.integers(0, 5000)),
    st.tuples(st.just("probe"), st.integers(0, 5000)),
    st.tuples(st.just("skipped"), st.integers(0, 5000)),
    st.tuples(st.just("reset"), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(cfg=configs, steps=st.lists(ops, max_size=80))
def test_breaker_invariants(cfg: BreakerConfig, steps: list[tuple[str, int]]) -> None:
    s = BreakerState(config=cfg)
    now = T0
    probes_per_period: dict[datetime | None, int] = {}
    for i, (op, n) in enumerate(steps):
        before = s.model_copy(deep=True)
        if op == "advance":
            now += timedelta(seconds=n)
            continue
        if op == "admit":
            d = decide_admit(s, AdmitRequest(config=cfg, workflow_id=f"a{i}"), now)
            assert d.status == s.status
            assert d.admitted == (d.status == "closed" or d.probe), d
            if d.probe:
                probes_per_period[s.half_opened_at] = probes_per_period.get(s.half_opened_at, 0) + 1
                assert probes_per_period[s.half_opened_at] <= cfg.probes, "more probes than allowed in one period"
            if not d.admitted:
                assert d.reason and s.rejected == before.rejected + 1
        elif op == "reset":
            apply_reset(s, ResetRequest(by="prop"))
            assert s.status == "closed" and s.window == []
        else:
            apply_usage(s, UsageReport(workflow_id=f"r{i}", tokens=n, probe=op == "probe", skipped=op == "skipped"),
                        now)
            if before.status == "closed" and s.status == "open":
                assert len(s.window) >= cfg.min_tasks, "tripped with fewer than min_tasks"
                assert s.window_avg_tokens > cfg.threshold_tokens
        assert len(s.window) <= cfg.window_tasks
        assert s.trips >= before.trips
        assert (s.status == "closed") == (s.opened_at is None)
        assert len(s.probe_results) < cfg.probes or s.status != "half_open"


@given(
    window_tasks=st.integers(1, 20),
    window_seconds=st.integers(1, 100),
    ages=st.lists(st.integers(0, 200), max_size=40),
)
def test_trim_window_keeps_the_latest_recent_entries(window_tasks: int, window_seconds: int, ages: list[int]) -> None:
    s = BreakerState(config=config(window_tasks=window_tasks, window_seconds=window_seconds))
    now = T0 + timedelta(seconds=1000)
    for i, age in enumerate(sorted(ages, reverse=True)):
        apply_usage(s, UsageReport(workflow_id=f"w{i}", tokens=1), now - timedelta(seconds=age))
    trim_window(s, now)
    expected = [a for a in sorted(ages, reverse=True) if a <= window_seconds][-window_tasks:]
    assert [int((now - e.at).total_seconds()) for e in s.window] == expected


# -- the workflow on the time-skipping server ----------------------------------------------------


@dataclass
class Harness:
    env: WorkflowEnvironment
    acts: BreakerActivities
    task_queue: str
    breakers: set[str] = field(default_factory=set)

    @property
    def client(self) -> Client:
        return self.env.client

    def config(self, **kw: Any) -> BreakerConfig:
        """Scoped to this test's task queue, as the ticket workflow scopes its breakers."""
        return config(scope=self.task_queue, **kw)

    async def admit(self, cfg: BreakerConfig) -> AdmitDecision:
        self.breakers.add(breaker_workflow_id(cfg.task_type, cfg.scope))
        d: AdmitDecision = await activity_env().run(self.acts.admit, admit_req(cfg))
        return d

    async def terminate_breakers(self) -> None:
        # Breakers run forever, on this test's task queue: left behind, an open one's cooldown timer
        # would fire with no worker to take the task, and the time-skipping server would stop skipping.
        for wf_id in self.breakers:
            try:
                await self.client.get_workflow_handle(wf_id).terminate("test over")
            except RPCError as e:
                if e.status != RPCStatusCode.NOT_FOUND:
                    raise

    async def record(self, cfg: BreakerConfig, *reports: UsageReport) -> None:
        handle = self.client.get_workflow_handle(breaker_workflow_id(cfg.task_type, cfg.scope))
        for r in reports:
            await handle.signal(BREAKER_RECORD_SIGNAL, r)

    async def state(self, cfg: BreakerConfig) -> BreakerState:
        handle = self.client.get_workflow_handle(breaker_workflow_id(cfg.task_type, cfg.scope))
        s: BreakerState = await handle.query(BREAKER_STATE_QUERY, result_type=BreakerState)
        return s

    async def _state_or_none(self, cfg: BreakerConfig) -> BreakerState | None:
        handle = self.client.get_workflow_handle(breaker_workflow_id(cfg.task_type, cfg.scope))
        try:
            s: BreakerState = await handle.query(BREAKER_STATE_QUERY, result_type=BreakerState,
                                                 rpc_timeout=timedelta(seconds=2))
        except RPCError as e:
            # The time-skipping server drops a query that arrives while the breaker continues as new:
            # the server's deadline or our shorter rpc_timeout ("Timeout expired", CANCELLED) ends it.
            if e.status not in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
                raise
            return None
        return s

    async def wait(self, cfg: BreakerConfig, check: Callable[[BreakerState], bool]) -> BreakerState:
        s = await assert_eventually(lambda: self._state_or_none(cfg), lambda s: s is not None and check(s))
        assert s is not None
        return s

    async def trip(self, cfg: BreakerConfig) -> BreakerState:
        assert (await self.admit(cfg)).admitted
        await self.record(cfg, *(report(5000) for _ in range(cfg.min_tasks)))
        return await self.wait(cfg, lambda s: s.status == "open")


async def _harness(env: WorkflowEnvironment) -> AsyncIterator[Harness]:
    tq = f"breaker-{uuid.uuid4().hex[:12]}"
    acts = BreakerActivities(env.client, tq)
    async with Worker(env.client, task_queue=tq, workflows=[CostCircuitBreakerWorkflow], activities=[acts.admit],
                      workflow_runner=STRICT_SANDBOX):
        harness = Harness(env, acts, tq)
        try:
            yield harness
        finally:
            await harness.terminate_breakers()


@pytest.fixture
async def ts(ts_env: WorkflowEnvironment) -> AsyncIterator[Harness]:
    async for h in _harness(ts_env):
        yield h


async def test_admit_activity_creates_the_breaker_once(ts: Harness) -> None:
    cfg = ts.config()
    handle = ts.client.get_workflow_handle(breaker_workflow_id(cfg.task_type, cfg.scope))
    with pytest.raises(RPCError) as missing:
        await handle.describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND

    assert await ts.admit(cfg) == AdmitDecision(admitted=True, status="closed")
    first = await handle.describe()
    # The second admit finds the running breaker; its changed config replaces the stored one.
    changed = cfg.model_copy(update={"expected_tokens": 1500})
    assert (await ts.admit(changed)).admitted
    assert (await handle.describe()).run_id == first.run_id
    assert (await ts.state(cfg)).config == changed


async def test_trips_after_min_tasks_then_rejects_with_a_reason(ts: Harness) -> None:
    cfg = ts.config()
    assert (await ts.admit(cfg)).admitted
    await ts.record(cfg, *(report(5000) for _ in range(cfg.min_tasks - 1)), report(90_000, skipped=True))
    s = await ts.wait(cfg, lambda s: len(s.window) == cfg.min_tasks - 1)
    assert s.status == "closed", "fewer than min_tasks never trip"
    assert (await ts.admit(cfg)).admitted

    await ts.record(cfg, report(5000))
    s = await ts.wait(cfg, lambda s: s.status == "open")
    assert s.trips == 1 and s.window_avg_tokens == 5000
    d = await ts.admit(cfg)
    assert not d.admitted and d.status == "open"
    assert "window average 5,000" in d.reason and "threshold 2,000" in d.reason and "half-opens at" in d.reason
    assert s.half_opens_at is not None and f"{s.half_opens_at:%H:%M:%S}" in d.reason
    assert (await ts.state(cfg)).rejected == 1


async def test_half_open_admits_exactly_the_probes_and_good_probes_close_it(ts: Harness) -> None:
    cfg = ts.config(probes=2)
    await ts.trip(cfg)
    await ts.env.sleep(timedelta(seconds=cfg.cooldown_seconds + 1))
    # The cooldown timer moves the state to half-open even before any admit.
    await ts.wait(cfg, lambda s: s.status == "half_open")
    decisions = [await ts.admit(cfg) for _ in range(4)]
    assert [(d.admitted, d.probe, d.status) for d in decisions] == [
        (True, True, "half_open"), (True, True, "half_open"), (False, False, "half_open"), (False, False, "half_open")
    ]
    assert "probe" in decisions[2].reason

    await ts.record(cfg, report(1200, probe=True))
    s = await ts.wait(cfg, lambda s: s.probe_results == [1200])
    assert s.status == "half_open", "one probe of two decides nothing"
    await ts.record(cfg, report(1800, probe=True))
    s = await ts.wait(cfg, lambda s: s.status == "closed")
    assert s.window == [] and s.trips == 1 and s.rejected == 0 and "probe(s) averaged 1,500" in s.reason
    assert await ts.admit(cfg) == AdmitDecision(admitted=True, status="closed")


async def test_bad_probes_reopen_it(ts: Harness) -> None:
    cfg = ts.config(probes=2)
    first = await ts.trip(cfg)
    await ts.env.sleep(timedelta(seconds=cfg.cooldown_seconds + 1))
    assert [(await ts.admit(cfg)).probe for _ in range(2)] == [True, True]
    await ts.record(cfg, report(3000, probe=True), report(4000, probe=True))
    s = await ts.wait(cfg, lambda s: s.trips == 2)
    assert s.status == "open" and s.opened_at is not None and first.opened_at is not None
    assert s.opened_at > first.opened_at
    d = await ts.admit(cfg)
    assert not d.admitted and "re-opened: 2 probe(s) averaged 3,500" in d.reason
    # The history so far (updates, signals, the cooldown timer) replays against the code.
    history = await ts.client.get_workflow_handle(breaker_workflow_id(cfg.task_type, cfg.scope)).fetch_history()
    replayer = Replayer(workflows=[CostCircuitBreakerWorkflow], data_converter=pydantic_data_converter,
                        workflow_runner=STRICT_SANDBOX)
    await replayer.replay_workflow(history)


async def test_reset_closes_it(ts: Harness) -> None:
    cfg = ts.config()
    await ts.trip(cfg)
    assert not (await ts.admit(cfg)).admitted
    handle = ts.client.get_workflow_handle(breaker_workflow_id(cfg.task_type, cfg.scope))
    s = await handle.execute_update(BREAKER_RESET_UPDATE, ResetRequest(by="alice", reason="prompt fixed"),
                                    result_type=BreakerState)
    assert s.status == "closed" and s.window == [] and s.last_reset_by == "alice"
    assert s.reason == "reset by alice: prompt fixed" and s.trips == 1
    assert (await ts.admit(cfg)).admitted


async def test_old_entries_age_out_of_the_window(ts: Harness) -> None:
    cfg = ts.config(min_tasks=3, window_seconds=600)
    assert (await ts.admit(cfg)).admitted
    await ts.record(cfg, report(9000), report(9000))
    await ts.wait(cfg, lambda s: len(s.window) == 2)
    await ts.env.sleep(timedelta(seconds=cfg.window_seconds + 1))
    await ts.record(cfg, report(9000))
    s = await ts.wait(cfg, lambda s: any(e.tokens == 9000 for e in s.window) and len(s.window) == 1)
    assert s.status == "closed", "the two old spiral tasks left the window; one task alone does not trip"


async def test_continue_as_new_keeps_the_state(ts: Harness) -> None:
    cfg = ts.config()
    ts.breakers.add(breaker_workflow_id(cfg.task_type, cfg.scope))
    handle = await ts.client.start_workflow(
        CostCircuitBreakerWorkflow.run,
        BreakerState(config=cfg, max_events_before_continue=3),
        id=breaker_workflow_id(cfg.task_type, cfg.scope),
        task_queue=ts.task_queue,
    )
    first_run = handle.result_run_id
    await ts.record(cfg, *(report(5000) for _ in range(cfg.min_tasks + 1)))
    latest = ts.client.get_workflow_handle(handle.id)
    s = await ts.wait(cfg, lambda s: s.status == "open" and len(s.window) == cfg.min_tasks + 1)
    assert s.trips == 1 and s.max_events_before_continue == 3
    desc = await latest.describe()
    assert desc.run_id != first_run
    # The admit finds the continued run under the same id and sees the carried-over state.
    d = await ts.admit(cfg)
    assert not d.admitted and "window average 5,000" in d.reason
    await ts.wait(cfg, lambda s: s.rejected == 1)
    # History stays bounded: the latest run holds only its few events.
    events = [e async for e in ts.client.get_workflow_handle(handle.id).fetch_history_events()]
    assert len(events) < 40


# -- `keel breaker` against the dev server (visibility lists the breakers) -------------------------


@pytest.fixture
async def dev(dev_env: WorkflowEnvironment) -> AsyncIterator[Harness]:
    async for h in _harness(dev_env):
        yield h


async def test_status_lists_and_reset_closes(dev: Harness) -> None:
    calm, spiral = dev.config(), dev.config()
    assert (await dev.admit(calm)).admitted
    await dev.trip(spiral)
    ids = {breaker_workflow_id(calm.task_type, calm.scope), breaker_workflow_id(spiral.task_type, spiral.scope)}
    await assert_eventually(lambda: running_breaker_ids(dev.client), lambda found: ids <= set(found))
    states = {s.config.task_type: s for s in (await breaker_states(dev.client)).states}
    assert states[calm.task_type].status == "closed" and states[spiral.task_type].status == "open"

    with pytest.raises(BreakerNotFound):
        await breaker_states(dev.client, "no-such-type", dev.task_queue)
    with pytest.raises(BreakerNotFound):
        await reset_breaker(dev.client, spiral.task_type, ResetRequest(), scope="another-queue")
    s = await reset_breaker(dev.client, spiral.task_type, ResetRequest(by="bob"), scope=dev.task_queue)
    assert s.status == "closed" and s.last_reset_by == "bob"


async def test_cli_status_and_reset(dev: Harness) -> None:
    cfg = dev.config()
    await dev.trip(cfg)
    env = {"TEMPORAL_ADDRESS": dev.env.client.service_client.config.target_host, "KEEL_TASK_QUEUE": dev.task_queue,
           "COLUMNS": "200"}
    runner = CliRunner()

    def keel(*args: str) -> Any:
        return runner.invoke(breaker_app, list(args), env=env)

    # The commands run their own event loop: in a thread, while this loop keeps the worker going.
    out = await asyncio.to_thread(keel, "status", cfg.task_type, "--json")
    assert out.exit_code == 0, out.output
    [doc] = json.loads(out.output)
    assert doc["status"] == "open" and doc["window_avg_tokens"] == 5000 and doc["threshold_tokens"] == 2000
    assert doc["half_opens_at"] is not None

    out = await asyncio.to_thread(keel, "status", cfg.task_type)
    assert out.exit_code == 0 and "open" in out.output and cfg.task_type in out.output and "5,000" in out.output

    out = await asyncio.to_thread(keel, "reset", cfg.task_type, "--as", "carol", "--reason", "fixed")
    assert out.exit_code == 0, out.output
    assert "closed" in out.output and "reset by carol: fixed" in out.output

    out = await asyncio.to_thread(keel, "status", "no-such-type")
    assert out.exit_code == 1 and "no cost circuit breaker" in out.output


async def test_admit_names_the_queue_of_a_breaker_nobody_serves(dev: Harness) -> None:
    # On the dev server: on the time-skipping one, a workflow task nobody takes stops time skipping for good.
    cfg = dev.config()
    orphan_queue = f"gone-{uuid.uuid4().hex[:8]}"
    dev.breakers.add(breaker_workflow_id(cfg.task_type, cfg.scope))
    await dev.client.start_workflow(CostCircuitBreakerWorkflow.run, BreakerState(config=cfg),
                                   id=breaker_workflow_id(cfg.task_type, cfg.scope), task_queue=orphan_queue)
    with pytest.raises(ApplicationError) as e:
        await activity_env(start_to_close_s=1.5).run(dev.acts.admit, admit_req(cfg))
    assert e.value.type == BREAKER_UNAVAILABLE and not e.value.non_retryable
    assert f"is a worker polling task queue {orphan_queue!r}?" in e.value.message
    assert dev.task_queue in e.value.message
    # `keel breaker status` lists it as unreachable instead of failing on it.
    listing = await assert_eventually(lambda: breaker_states(dev.client),
                                      lambda found: breaker_workflow_id(cfg.task_type, cfg.scope) in found.unreachable)
    assert cfg.task_type not in {s.config.task_type for s in listing.states}


# -- the worker side: cached admits and batched usage reports (dev server) -----------------------


async def _events(client: Client, wf_id: str) -> list[str]:
    return [EventType.Name(e.event_type) async for e in client.get_workflow_handle(wf_id).fetch_history_events()]


async def test_cached_admits_skip_the_breaker_only_while_closed(dev: Harness) -> None:
    cfg = dev.config()
    wf_id = breaker_workflow_id(cfg.task_type, cfg.scope)
    dev.breakers.add(wf_id)
    cached = BreakerActivities(dev.client, dev.task_queue, admit_cache_s=0.5)
    first = await activity_env().run(cached.admit, admit_req(cfg))
    assert first == AdmitDecision(admitted=True, status="closed")
    later = await asyncio.gather(*(activity_env().run(cached.admit, admit_req(cfg)) for _ in range(20)))
    assert all(d.admitted and d.cached for d in later)
    assert (await _events(dev.client, wf_id)).count("EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED") == 1

    # A changed config is never answered from the cache.
    changed = cfg.model_copy(update={"expected_tokens": 900})
    assert not (await activity_env().run(cached.admit, admit_req(changed))).cached

    await dev.trip(changed)
    await asyncio.sleep(0.5)
    # Past the cache time every admit asks the open breaker, and each rejection is counted there.
    for _ in range(2):
        d = await activity_env().run(cached.admit, admit_req(changed))
        assert not d.admitted and d.status == "open" and not d.cached
    assert (await dev.state(changed)).rejected == 2


async def test_usage_reporter_sends_one_batch_and_never_counts_a_task_twice(dev: Harness) -> None:
    cfg = dev.config()
    wf_id = breaker_workflow_id(cfg.task_type, cfg.scope)
    assert (await dev.admit(cfg)).admitted
    reporter = UsageReporter(dev.client, flush_s=0.2)
    reports = [report(5000) for _ in range(cfg.min_tasks)]
    for r in [*reports, reports[0]]:
        reporter.add(wf_id, r)
    reporter.add("keel-breaker-no-such-breaker", report(100))  # logged and dropped, not retried forever
    s = await dev.wait(cfg, lambda s: s.status == "open")
    assert sorted(e.workflow_id for e in s.window) == sorted(r.workflow_id for r in reports)
    signals = (await _events(dev.client, wf_id)).count("EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED")
    assert signals == 1
    await reporter.aclose()
    assert not reporter._pending
