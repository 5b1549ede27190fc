"""The cost controls on the generic agent path (KeelAgent), for the built-in agents, on the real dev server.

- A property: whatever the sim's seed and spiral rate and whatever the budget (tokens, dollars or both,
  any soft and hard ratios), a task of the support desk or the on-call agent never goes past its kill
  budget, counted from the task's ledger rows (not only from its result); the soft and hard thresholds
  fire in order, each once, at the steps the report names, and the model is told (wrap up; answer now,
  with no tool offered after it); the ledger rows of the task sum exactly to the result's usage.
- A fixed spiral where soft, hard and the kill all fire, in that order.
- Reservations: an orchestration's children (any agents) hold their caps from the parent's budget
  before they start; the family's ledger rows stay within the parent's budget, each child's within its own.
- The cost circuit breaker is per agent: when one agent's breaker trips, its new tasks go to the human
  queue without a model call, and another agent's tasks still run.

Every run is read back from its own history (the model requests the workflow sent) and its ledger rows.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import text
from temporalio.client import Client

import keel
from agents.oncall import oncall
from agents.oncall.status_service import StatusService
from agents.support_desk import store, support_desk
from agents.support_desk.data import sample_tickets
from keel import names
from keel.breaker import BREAKER_STATE_QUERY, BreakerState, breaker_workflow_id
from keel.orchestration import ChildTask
from keel.testing import AgentEnvironment, agent_environment
from keel.types import LlmRequest, LlmResponse
from tests.conftest import assert_eventually

USD_EPS = 1e-9
SAMPLES = sample_tickets(24)
ONCALL_ASKS = ["Is the api service healthy?", "The payments service is down, please fix it.",
               "search looks slow, what is its error rate?", "Which version of api is running?"]


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """One database for the ledger and the support desk's own tables, as in production."""
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    monkeypatch.setenv("KEEL_DATABASE_URL", url)
    store.reset()
    yield url
    store.reset()


# --- reading a task back ------------------------------------------------------------------------
def ledger_rows(env: AgentEnvironment, workflow_id: str) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        rows = conn.execute(text("SELECT step, kind, tool, input_tokens, output_tokens, cost_usd FROM ledger "
                                 "WHERE workflow_id = :w ORDER BY step, kind"), {"w": workflow_id})
        return [dict(r._mapping) for r in rows]


async def llm_calls(client: Client, workflow_id: str) -> list[tuple[LlmRequest, LlmResponse | None]]:
    """The model requests the workflow scheduled, in order, with their responses, from its history."""
    out: dict[int, tuple[LlmRequest, LlmResponse | None]] = {}
    async for ev in client.get_workflow_handle(workflow_id).fetch_history_events():
        if ev.HasField("activity_task_scheduled_event_attributes"):
            s = ev.activity_task_scheduled_event_attributes
            if s.activity_type.name == names.LLM_ACTIVITY:
                out[ev.event_id] = (LlmRequest.model_validate(json.loads(s.input.payloads[0].data)), None)
        elif ev.HasField("activity_task_completed_event_attributes"):
            c = ev.activity_task_completed_event_attributes
            if c.scheduled_event_id in out:
                out[c.scheduled_event_id] = (out[c.scheduled_event_id][0],
                                             LlmResponse.model_validate(json.loads(c.result.payloads[0].data)))
    return list(out.values())


def check_task(env: AgentEnvironment, budget: keel.Budget, res: keel.AgentResult,
               calls: list[tuple[LlmRequest, LlmResponse | None]]) -> None:
    reqs = [q for q, _ in calls]
    rows = ledger_rows(env, res.workflow_id)
    llm = [r for r in rows if r["kind"] == "llm"]
    spent_tokens = sum(r["input_tokens"] + r["output_tokens"] for r in llm)
    spent_usd = sum(r["cost_usd"] for r in llm)

    # Never past the kill budget, by the books.
    if budget.max_tokens is not None:
        assert spent_tokens <= budget.max_tokens, (spent_tokens, budget, res.decisions)
    if budget.max_usd is not None:
        assert spent_usd <= budget.max_usd + USD_EPS, (spent_usd, budget, res.decisions)

    # The ledger is exact: one row per model call, summing to the result, and one row per executed tool.
    assert len(llm) == res.llm_calls == len({r["step"] for r in llm})
    assert sum(r["input_tokens"] for r in llm) == res.input_tokens
    assert sum(r["output_tokens"] for r in llm) == res.output_tokens
    assert spent_tokens == res.tokens == res.input_tokens + res.output_tokens
    assert spent_usd == pytest.approx(res.cost_usd, abs=1e-7)
    assert sorted(r["tool"] for r in rows if r["kind"] == "tool") == sorted(res.tools_executed)
    assert [r["kind"] for r in rows].count("outcome") == 1
    report = res.budget
    assert report.used_tokens == res.tokens and report.used_usd == pytest.approx(res.cost_usd, abs=1e-7)
    assert (report.max_tokens, report.max_usd) == (budget.max_tokens, budget.max_usd)
    assert report.reserved_tokens == 0 and report.reserved_usd == 0

    # The thresholds: wrap up, then answer now, each once, in order, at the steps the report names.
    notices = [d for d in res.decisions if d.kind in ("wrap_up", "answer_now") and "task budget" in d.reason]
    assert [d.kind for d in notices] in ([], ["wrap_up"], ["wrap_up", "answer_now"]), res.decisions
    soft, hard = report.soft_at_step, report.hard_at_step
    assert [d.step for d in notices] == [s for s in (soft, hard) if s is not None]
    for step, word in ((soft, "Wrap up"), (hard, "Answer now")):
        later = [q for q in reqs if step is not None and q.step > step]
        if later:  # the next model call carries the notice
            assert any(word in m.content for m in later[0].messages if m.role == "system"), later[0].messages
    if hard is not None:
        assert soft is not None and soft <= hard
        assert all(not q.tool_names and not q.tools for q in reqs if q.step > hard)
    kinds = [d.kind for d in res.decisions]

    if res.status == "budget_exceeded":
        assert report.state == "killed" and report.limit_hit in ("tokens", "usd")
        limit = budget.max_tokens if report.limit_hit == "tokens" else budget.max_usd
        assert limit is not None
        assert res.reason.startswith("token budget exceeded" if report.limit_hit == "tokens"
                                     else "dollar budget exceeded"), res.reason
        assert kinds[-2:] == ["kill", "route"]
        assert all(kinds.index(n.kind) < kinds.index("kill") for n in notices)
        # The task ends with the best output it had: the model's last text (the triage is not an answer).
        texts = [r.text for q, r in calls if r is not None and q.kind != "classify" and r.text.strip()]
        assert (res.partial_output is not None) == bool(texts), (res.partial_output, texts)
    else:
        assert "kill" not in kinds
        assert report.limit_hit in (None, "steps")
        if report.limit_hit is None:
            assert report.state == ("hard" if hard is not None else "soft" if soft is not None else "ok")


# --- 1. the property ----------------------------------------------------------------------------
@st.composite
def budgets(draw: st.DrawFn) -> keel.Budget:
    tokens = draw(st.none() | st.integers(1_000, 16_000))
    usd = draw(st.floats(0.002, 0.05) if tokens is None else st.none() | st.floats(0.002, 0.05))
    soft = draw(st.floats(0.3, 0.9))
    hard = draw(st.floats(soft, 0.95))
    return keel.Budget(max_tokens=tokens, max_usd=usd, soft_ratio=soft, hard_ratio=hard)


@st.composite
def tasks(draw: st.DrawFn) -> dict[str, Any]:
    agent = draw(st.sampled_from(["support_desk", "oncall"]))
    if agent == "support_desk":
        sample = draw(st.sampled_from(SAMPLES))
        request, tenant = f"Customer: {sample.customer_id}\n\n{sample.text}", sample.customer_id
    else:
        request, tenant = draw(st.sampled_from(ONCALL_ASKS)), "team-web"
    return {"agent": agent, "input": request, "tenant": tenant, "budget": draw(budgets()),
            "sim": keel.SimConfig(seed=draw(st.integers(0, 2**16)),
                                  spiral_rate=draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 1))),
            # Nobody approves during the property: a proposed write goes to the human queue.
            "approval_mode": "escalate",
            # The breaker would start refusing after a run of spirals: tested below, on its own.
            "breaker": False}


async def test_no_agent_task_ever_crosses_its_budget(client: Client, status: StatusService, db_url: str) -> None:
    loop = asyncio.get_running_loop()
    seen: Counter[str] = Counter()
    async with agent_environment(support_desk, oncall, client=client, db_url=db_url) as env:

        async def run(task: dict[str, Any]) -> tuple[keel.AgentResult, list[tuple[LlmRequest, LlmResponse | None]]]:
            res = await env.run(key=uuid.uuid4().hex[:12], **task)
            return res, await llm_calls(client, res.workflow_id)

        # Hypothesis does not drive async tests: the property runs in a thread and hands each task to
        # this test's event loop (where the client and the worker live).
        @hypothesis.settings(max_examples=40, deadline=None, database=None, derandomize=True)
        @hypothesis.given(task=tasks())
        def prop(task: dict[str, Any]) -> None:
            res, calls = asyncio.run_coroutine_threadsafe(run(task), loop).result(timeout=60)
            check_task(env, task["budget"], res, calls)
            seen[res.status] += 1
            seen[f"limit:{res.budget.limit_hit}"] += 1

        await asyncio.to_thread(prop)
    # The examples reached the kill switch, on tokens and on dollars, not only calm tasks well within budget
    # (derandomized: the same examples every run).
    assert seen["limit:tokens"] >= 1 and seen["limit:usd"] >= 1, seen
    assert status.restarts == {}


async def test_a_spiral_meets_wrap_up_then_answer_now_then_the_kill(client: Client, db_url: str) -> None:
    """A fixed case where all three fire (the property may draw none such)."""
    budget = keel.Budget(max_tokens=6_800, max_usd=None)
    sample = SAMPLES[0]  # a refund request: triage, then the account, transactions and policy reads
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        res = await env.run("support_desk", f"Customer: {sample.customer_id}\n\n{sample.text}",
                            tenant=sample.customer_id, key=uuid.uuid4().hex[:12], budget=budget, breaker=False,
                            approval_mode="escalate", sim=keel.SimConfig(seed=2, spiral_rate=1.0))
        check_task(env, budget, res, await llm_calls(client, res.workflow_id))
        desc = await client.get_workflow_handle(res.workflow_id).describe()
    assert res.status == "budget_exceeded" and res.budget.limit_hit == "tokens", (res.status, res.decisions)
    kinds = [d.kind for d in res.decisions]
    assert kinds.index("wrap_up") < kinds.index("answer_now") < kinds.index("kill")
    sa = {p.key.name: p.value for p in desc.typed_search_attributes}
    assert sa[names.SA_BUDGET] == "limit:tokens" and sa[names.SA_STATUS] == "budget_exceeded"


# --- 2. reservations: children of any agents under one parent budget --------------------------
@st.composite
def families(draw: st.DrawFn) -> dict[str, Any]:
    parent = keel.Budget(max_tokens=draw(st.integers(2_000, 24_000)),
                         max_usd=draw(st.none() | st.floats(0.005, 0.08)))
    picks = draw(st.lists(st.sampled_from(["api", "payments", "desk", "desk-2"]), min_size=1, max_size=4,
                          unique=True))
    children = []
    for name in picks:
        cap = draw(st.none() | st.builds(keel.Budget, max_tokens=st.integers(1_000, 12_000),
                                         max_usd=st.none() | st.floats(0.003, 0.05)))
        if name.startswith("desk"):
            sample = draw(st.sampled_from(SAMPLES))
            children.append(ChildTask(agent="support_desk", name=name, budget=cap,
                                      input=f"Customer: {sample.customer_id}\n\n{sample.text}"))
        else:
            children.append(ChildTask(agent="oncall", name=name, budget=cap, input=f"Is the {name} service ok?"))
    return {"tasks": children, "budget": parent, "approval_mode": "escalate",
            "sim": keel.SimConfig(seed=draw(st.integers(0, 2**16)),
                                  spiral_rate=draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 1)))}


def family_rows(env: AgentEnvironment, parent: str) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        rows = conn.execute(text("SELECT workflow_id, input_tokens + output_tokens AS tokens, cost_usd FROM ledger "
                                 "WHERE (workflow_id = :p OR parent_workflow_id = :p) AND kind = 'llm'"),
                            {"p": parent})
        return [dict(r._mapping) for r in rows]


async def test_children_reserve_from_the_parent_and_never_cross_it(
        client: Client, status: StatusService, db_url: str) -> None:
    """An orchestration of support desk and on-call children: each child's caps are held from the
    parent's budget before it starts, so however they spiral, the family's ledger rows stay within the
    parent's budget, each child's within its own caps, and the reservations are all released."""
    loop = asyncio.get_running_loop()
    async with agent_environment(support_desk, oncall, client=client, db_url=db_url) as env:

        @hypothesis.settings(max_examples=10, deadline=None, database=None, derandomize=True)
        @hypothesis.given(fam=families())
        def prop(fam: dict[str, Any]) -> None:
            res = asyncio.run_coroutine_threadsafe(
                env.orchestrate("Check on things", key=uuid.uuid4().hex[:12], tenant="C-1001", **fam),
                loop).result(timeout=90)
            budget: keel.Budget = fam["budget"]
            rows = family_rows(env, res.workflow_id)
            tokens, usd = sum(r["tokens"] for r in rows), sum(r["cost_usd"] for r in rows)
            assert budget.max_tokens is not None and tokens <= budget.max_tokens, (tokens, res.decisions)
            if budget.max_usd is not None:
                assert usd <= budget.max_usd + USD_EPS, (usd, res.decisions)
            assert (tokens, res.usage.llm_calls) == (res.usage.tokens, len(rows))
            assert usd == pytest.approx(res.usage.cost_usd, abs=1e-7)
            assert res.budget.reserved_tokens == 0 and res.budget.reserved_usd == 0
            assert res.budget.used_tokens == res.usage.tokens
            for c in res.children:
                mine = [r for r in rows if r["workflow_id"] == c.workflow_id]
                if c.budget_tokens is not None:
                    assert sum(r["tokens"] for r in mine) <= c.budget_tokens, c
                if c.budget_usd is not None:
                    assert sum(r["cost_usd"] for r in mine) <= c.budget_usd + USD_EPS, c
                assert c.status in ("completed", "budget_exceeded", "not_started", "escalated"), c

        await asyncio.to_thread(prop)


# --- 3. the cost circuit breaker, per agent -----------------------------------------------------
class HostArgs(keel.Args):
    host: str


@keel.tool
def ping(ctx: keel.ToolContext, args: HostArgs) -> dict[str, object]:
    """Whether a host answers."""
    return {"host": args.host, "up": True}


async def breaker(client: Client, agent: keel.Agent, env: AgentEnvironment) -> BreakerState:
    handle = client.get_workflow_handle(breaker_workflow_id(agent.name, env.settings.task_queue))
    state: BreakerState = await handle.query(BREAKER_STATE_QUERY, result_type=BreakerState)
    return state


async def test_a_tripped_breaker_refuses_that_agents_tasks_only(
        client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two agents alike but for their names, both "expected" to take 40 tokens a task: ten ordinary
    # tasks of the first are far over 2x that, and trip its breaker; the second has its own.
    monkeypatch.setenv("KEEL_BREAKER_ADMIT_CACHE_S", "0")  # every task asks its breaker
    monkeypatch.setenv("KEEL_BREAKER_REPORT_FLUSH_S", "0.1")
    prompt = tmp_path / "pinger.v1.md"
    prompt.write_text("You check hosts with the ping tool, then answer in one sentence.\n")
    suffix = uuid.uuid4().hex[:8]
    hot, calm = (keel.Agent(name=f"{n}_{suffix}", prompt=prompt, tools=[ping], expected_tokens=40,
                            budget=keel.Budget(max_tokens=None, max_usd=None)) for n in ("hot", "calm"))
    calm_sim = keel.SimConfig(spiral_rate=0)  # the agents' names are drawn: no spiral drawn with them
    async with agent_environment(hot, calm, client=client, home=tmp_path) as env:
        first = await asyncio.gather(*(env.run(hot.name, f"Is db-{i} up?", key=f"{suffix}-{i}", sim=calm_sim)
                                       for i in range(10)))
        assert all(r.status == "completed" and r.llm_calls > 0 for r in first), [r.reason for r in first]
        state = await assert_eventually(lambda: breaker(client, hot, env),
                                        lambda s: s.status == "open" and len(s.window) == 10)
        assert state.window_avg_tokens > 2 * hot.expected_tokens and state.trips == 1

        refused = await env.run(hot.name, "Is db-1 up?", key=f"{suffix}-refused", sim=calm_sim)
        other = await env.run(calm.name, "Is db-1 up?", key=f"{suffix}-other", sim=calm_sim)
        hot_after, calm_after = await breaker(client, hot, env), await breaker(client, calm, env)
        refused_rows = ledger_rows(env, refused.workflow_id)

    assert refused.status == "escalated" and refused.llm_calls == 0 and refused.tokens == 0
    assert refused.budget.limit_hit == "breaker" and "cost circuit breaker open" in refused.reason
    assert [d.kind for d in refused.decisions][-2:] == ["breaker", "route"]
    assert [r["kind"] for r in refused_rows] == ["outcome"]  # nothing spent, the outcome recorded
    assert hot_after.rejected == 1 and hot_after.status == "open"
    # The other agent's tasks still run, on its own (closed) breaker.
    assert other.status == "completed" and other.llm_calls > 0 and other.budget.limit_hit is None
    assert calm_after.status == "closed" and calm_after.rejected == 0 and calm_after.trips == 0
