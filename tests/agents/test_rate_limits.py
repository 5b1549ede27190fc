"""Provider rate limits (#16 item 8): KEEL_RATE_LIMITS validated with clear errors; requests spaced at the
configured rate across the workers of a task queue (one limiter workflow per provider:model); a 429 storm
from the provider slows tasks down without failing them. On the dev server with the real workflows; the
model is the loopback OpenAI server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.runtime import Runtime, TelemetryConfig
from temporalio.service import RPCError
from temporalio.worker import Replayer

import keel
from activities.providers.openai_provider import OpenAIProvider
from keel.ratelimits import (
    RATE_LIMIT_STATE_QUERY,
    AcquireRequest,
    LimiterState,
    RateLimit,
    RateLimitsError,
    decide,
    limiter_workflow_id,
    parse_rate_limits,
)
from keel.settings import KeelSettings
from keel.testing import AgentEnvironment, agent_environment
from tests.providers.fake_servers import FakeServer, Recorded, Reply, openai_completion, openai_error
from workers.worker import STRICT_SANDBOX, build_worker
from workflows.agent_loop import LLM_RETRY
from workflows.registry import WORKFLOWS

PROMPT = Path(__file__).parent / "prompts" / "labeler.v1.md"
MODEL = "openai:gpt-4o-mini"


# --- KEEL_RATE_LIMITS: parsed, validated, clear errors -----------------------------------------------


def test_rate_limits_parse() -> None:
    limits = parse_rate_limits('{"openai:gpt-4o-mini": {"rpm": 500, "tpm": 200000}, "anthropic:claude-haiku-4-5": '
                               '{"tpm": 50000}}')
    assert limits["openai:gpt-4o-mini"] == RateLimit(rpm=500, tpm=200_000)
    assert limits["anthropic:claude-haiku-4-5"].rpm is None and limits["anthropic:claude-haiku-4-5"].tpm == 50_000
    assert parse_rate_limits(None) == {} and parse_rate_limits(" ") == {}


@pytest.mark.parametrize(("raw", "expected"), [
    ('{"openai:x": {}}', ["entry 'openai:x'", '"rpm"', '"tpm"']),
    ('{"openai:x": {"rpm": 0}}', ["entry 'openai:x'", "rpm", "greater than 0"]),
    ('{"openai:x": {"rpm": 10, "burst": 3}}', ["entry 'openai:x'", "burst", "Extra"]),
    ('{"gpt-4o": {"rpm": 10}}', ["entry 'gpt-4o'", "provider:model"]),
    ('{"openai:x": 10}', ["entry 'openai:x'"]),
    ('["openai:x"]', ['must map "provider:model"']),
    ("{not json", ["not valid JSON"]),
])
def test_bad_rate_limits_name_the_entry(raw: str, expected: list[str]) -> None:
    with pytest.raises(RateLimitsError) as bad:
        parse_rate_limits(raw)
    for part in expected:
        assert part in str(bad.value), str(bad.value)


def test_a_bad_setting_stops_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_RATE_LIMITS", '{"openai:x": {"rpm": -1}}')
    with pytest.raises(ValueError, match=r"KEEL_RATE_LIMITS entry 'openai:x': rpm"):
        KeelSettings()


# --- the limiter's decision (a pure function of state, request, now) ---------------------------------


@given(rpm=st.floats(1, 10_000), tpm=st.none() | st.floats(1_000, 1_000_000), horizon=st.floats(1, 60),
       calls=st.lists(st.tuples(st.floats(0, 5), st.integers(0, 5_000)), min_size=1, max_size=40))
def test_granted_slots_keep_the_limits_and_refusals_reserve_nothing(
    rpm: float, tpm: float | None, horizon: float, calls: list[tuple[float, int]],
) -> None:
    state, now, slots = LimiterState(), 1_000.0, []
    limit = RateLimit(rpm=rpm, tpm=tpm)
    for gap, tokens in calls:
        now += gap
        before = state.model_copy()
        grant = decide(state, AcquireRequest(key=MODEL, limit=limit, tokens=tokens, horizon_s=horizon), now)
        if not grant.granted:
            assert (state.next_request_at, state.next_token_at) == (before.next_request_at, before.next_token_at)
            assert grant.wait_s > 0
            continue
        assert 0 <= grant.wait_s <= horizon + 0.001
        slots.append((now + grant.wait_s, tokens))
    for (a, tokens), (b, _) in itertools.pairwise(slots):
        assert b - a >= 60 / rpm - 0.002  # a request every 60/rpm seconds at most
        if tpm is not None:
            assert b - a >= tokens * 60 / tpm - 0.002  # a call's tokens drain at the tokens-per-minute rate


# --- on the dev server ---------------------------------------------------------------------------------


class TimedServer(FakeServer):
    """The loopback server, noting when each request arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    def _answer(self, rec: Recorded) -> Reply:
        self.arrivals.append(time.monotonic())
        return super()._answer(rec)


@pytest.fixture
def server() -> Iterator[TimedServer]:
    with TimedServer() as s:
        yield s


@pytest.fixture
async def openai_provider(server: FakeServer) -> AsyncIterator[OpenAIProvider]:
    p = OpenAIProvider(api_key="test-key", base_url=f"{server.url}/v1", timeout_s=10)
    yield p
    await p.aclose()


def assert_spaced(arrivals: list[float], interval: float) -> None:
    """The mechanism, not a speed: the limiter spaces the calls' slots `interval` apart; a request reaches the
    server a little after its slot, so one pair may arrive close together, never three within one interval,
    and the run spans the slots."""
    assert all(c - a >= 0.8 * interval for a, c in zip(arrivals, arrivals[2:], strict=False)), arrivals
    assert arrivals[-1] - arrivals[0] >= 0.8 * interval * (len(arrivals) - 2), arrivals


async def warm_up(env: AgentEnvironment, agent: keel.Agent, server: TimedServer) -> None:
    """One task first: the worker's first model call also builds the SDK's client and connection, which
    holds back the calls behind it and would send them together. The arrivals are counted after it."""
    first = await env.run(agent.name, "Why was I charged twice?", key=uuid.uuid4().hex)
    assert first.status == "completed", first.reason
    server.arrivals.clear()


def labeler(name: str) -> keel.Agent:
    return keel.Agent(name=name, prompt=PROMPT, models=MODEL, budget=keel.Budget(max_tokens=None, max_usd=None))


async def end_limiter(client: Client, queue: str) -> None:
    with contextlib.suppress(RPCError):
        await client.get_workflow_handle(limiter_workflow_id(MODEL, queue)).terminate("test finished")


@pytest.mark.parametrize("limit", [{"rpm": 120.0}, {"tpm": 96_000.0}], ids=["rpm", "tpm"])
async def test_rate_limits_hold_across_two_workers(
    client: Client, db_url: str, monkeypatch: pytest.MonkeyPatch, server: TimedServer, openai_provider: OpenAIProvider,
    limit: dict[str, float],
) -> None:
    """120 requests/min: a request every 0.5 s. 96,000 tokens/min: a call reserving its max 800 output tokens
    and its input holds the next one back by more than 0.5 s."""
    tasks = 6
    monkeypatch.setenv("KEEL_RATE_LIMITS", json.dumps({MODEL: limit}))
    server.script(*[Reply(body=openai_completion(content="billing")) for _ in range(tasks + 1)])
    agent = labeler(f"{next(iter(limit))}_limited_labeler")
    async with agent_environment(agent, client=client, db_url=db_url, providers={"openai": openai_provider}) as env:
        await warm_up(env, agent, server)
        # A second worker on the same task queue: both reserve their calls' slots with one limiter.
        other = await Client.connect(client.service_client.config.target_host, namespace=client.namespace,
                                     data_converter=client.data_converter, runtime=Runtime(telemetry=TelemetryConfig()))
        second = build_worker(other, env.settings, engine=env.engine, providers={"openai": openai_provider},
                              agents=[agent])
        async with second:
            results = await asyncio.gather(*(env.run(agent.name, f"Why was I charged twice? ({i})",
                                                     key=uuid.uuid4().hex) for i in range(tasks)))
        state = await client.get_workflow_handle(limiter_workflow_id(MODEL, env.settings.task_queue)).query(
            RATE_LIMIT_STATE_QUERY, result_type=LimiterState)
        await end_limiter(client, env.settings.task_queue)
    assert [r.status for r in results] == ["completed"] * tasks, [r.reason for r in results]
    server.assert_script_done()
    assert state.granted == tasks + 1
    if "rpm" in limit:
        assert_spaced(server.arrivals, 60 / limit["rpm"])
    else:
        per_call = [r.body["max_completion_tokens"] if "max_completion_tokens" in r.body else r.body["max_tokens"]
                    for r in server.requests[1:]]
        assert state.tokens_reserved > sum(per_call)  # the max output tokens, and the input's estimate
        assert_spaced(server.arrivals, min(per_call) * 60 / limit["tpm"])


async def test_a_call_whose_slot_is_beyond_the_horizon_waits_as_rate_limited(
    client: Client, db_url: str, monkeypatch: pytest.MonkeyPatch, server: TimedServer, openai_provider: OpenAIProvider,
) -> None:
    """A slot further away than the horizon is not held in the activity: the call fails as rate limited, with
    the delay, and is retried then (the same path as a provider's 429)."""
    rpm, tasks = 60.0, 4
    monkeypatch.setenv("KEEL_RATE_LIMITS", json.dumps({MODEL: {"rpm": rpm}}))
    monkeypatch.setattr("activities.ratelimit.HORIZON_S", 0.5)
    server.script(*[Reply(body=openai_completion(content="billing")) for _ in range(tasks + 1)])
    agent = labeler("horizon_labeler")
    async with agent_environment(agent, client=client, db_url=db_url, providers={"openai": openai_provider}) as env:
        await warm_up(env, agent, server)
        results = await asyncio.gather(*(env.run(agent.name, f"Why was I charged twice? ({i})",
                                                 key=uuid.uuid4().hex) for i in range(tasks)))
        limiter = client.get_workflow_handle(limiter_workflow_id(MODEL, env.settings.task_queue))
        state = await limiter.query(RATE_LIMIT_STATE_QUERY, result_type=LimiterState)
        await end_limiter(client, env.settings.task_queue)
        await Replayer(workflows=WORKFLOWS, workflow_runner=STRICT_SANDBOX,
                       data_converter=client.data_converter).replay_workflow(await limiter.fetch_history())
    assert [r.status for r in results] == ["completed"] * tasks, [r.reason for r in results]
    server.assert_script_done()
    assert state.granted == tasks + 1 and state.refused > 0
    assert_spaced(server.arrivals, 60 / rpm)


async def test_a_429_storm_slows_tasks_without_failing_them(
    client: Client, db_url: str, server: TimedServer, openai_provider: OpenAIProvider,
) -> None:
    tasks = 3
    attempts = LLM_RETRY.maximum_attempts
    storm = tasks * attempts + 3  # by pigeonhole, some task meets more 429s than the retry policy's attempts
    retry_after_s = 0.2
    server.script(*[Reply(429, openai_error("Rate limit reached for gpt-4o-mini", "requests", "rate_limit_exceeded"),
                          headers={"retry-after-ms": str(int(retry_after_s * 1000))}) for _ in range(storm)],
                  *[Reply(body=openai_completion(content="billing")) for _ in range(tasks)])
    agent = labeler("stormed_labeler")
    async with agent_environment(agent, client=client, db_url=db_url, providers={"openai": openai_provider}) as env:
        handles = [await env.start(agent.name, f"Why was I charged twice? ({i})", key=uuid.uuid4().hex)
                   for i in range(tasks)]
        results = [await h.result() for h in handles]
        histories = [await h.fetch_history() for h in handles]
    assert [r.status for r in results] == ["completed"] * tasks, [r.reason for r in results]
    server.assert_script_done()
    # No retry storm: every request is the storm's or a task's one answer, nothing more.
    assert len(server.requests) == storm + tasks
    # Retry-After honoured: a task's consecutive requests were at least that far apart, so the storm took time.
    assert server.arrivals[-1] - server.arrivals[0] >= (storm // tasks - 1) * retry_after_s
    # At least one task outlived its retry policy's attempts: scheduled again after a timer, not failed.
    def rescheduled(history: Any) -> bool:
        kinds = [e.event_type for e in history.events]
        return (EventType.EVENT_TYPE_TIMER_STARTED in kinds
                and kinds.count(EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED) > kinds.count(
                    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED))
    assert any(rescheduled(h) for h in histories)
    replayer = Replayer(workflows=WORKFLOWS, workflow_runner=STRICT_SANDBOX, data_converter=client.data_converter)
    for history in histories:  # the patience is deterministic
        await replayer.replay_workflow(history)
