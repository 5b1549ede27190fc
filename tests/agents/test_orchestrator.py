"""The orchestrator pattern over any registered agents: the on-call agent and a second one (a
structured incident note) under one parent budget, a planner agent's plan, plans that cannot run, a
child waiting for `keel approve`, and the family's ledger rows."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from temporalio.client import Client
from typer.testing import CliRunner

import keel
from agents.oncall.agent import incident_note, oncall
from agents.oncall.status_service import StatusService
from keel.orchestration import ChildTask, OrchestratorInput, OrchestratorResult, Plan, named, plan_problems, stages
from keel.testing import AgentEnvironment, ScriptedModel, agent_environment, answer
from starter.agents import start_orchestration
from starter.cli import app
from tests.agents.test_oncall import cli_env, keel_cli
from tests.conftest import assert_eventually

PLANNER_PROMPT = Path(__file__).parent / "prompts"


@pytest.fixture
def status(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatusService]:
    with StatusService() as svc:
        monkeypatch.setenv("ONCALL_STATUS_URL", svc.url)
        yield svc


PLANNER = keel.Agent(name="oncall_planner", prompt=str(PLANNER_PROMPT / "planner.v1.md"), models="scripted:scripted",
                     budget=keel.Budget(max_tokens=2_000, max_usd=0.01), output_type=Plan)


@contextlib.asynccontextmanager
async def env_for(client: Client, model: ScriptedModel | None = None, home: Path | None = None,
                  extra: tuple[keel.Agent, ...] = ()) -> AsyncIterator[AgentEnvironment]:
    async with agent_environment(oncall, incident_note, *extra, model=model, client=client, home=home) as env:
        yield env


def family(env: AgentEnvironment, parent: str) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        rows = conn.execute(text("SELECT workflow_id, parent_workflow_id, kind, status, task_type, "
                                 "input_tokens + output_tokens AS tokens, cost_usd FROM ledger "
                                 "WHERE workflow_id = :p OR parent_workflow_id = :p ORDER BY workflow_id, step"),
                            {"p": parent})
        return [dict(r._mapping) for r in rows]


CHECKS = [ChildTask(agent="oncall", name="api", input="Is the api service healthy?"),
          ChildTask(agent="oncall", name="search", input="How is the search service doing?"),
          ChildTask(agent="incident_note", name="note", input="Write the incident note.", after=["api", "search"])]


async def test_two_agents_under_one_budget(client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client, home=tmp_path) as env:
        res = await env.orchestrate("Morning check of api and search", tasks=CHECKS, tenant="team-web",
                                    budget=keel.Budget(max_tokens=9_000, max_usd=0.05), key=uuid.uuid4().hex)
    assert res.status == "completed", res.reason
    assert [c.name for c in res.children] == ["api", "search", "note"]
    # The note ran after both checks, with their answers as its context, and answered to its schema.
    note = res.results["note"]
    assert note.structured is not None and note.structured["severity"] in ("none", "minor", "major")
    assert "2.14.1" in note.structured["summary"]  # the api's version, read by the api child
    # No synthesizer: the answer is every completed task's, under its name.
    assert res.output.startswith("api (oncall): ") and "note (incident_note): " in res.output
    # The parent's budget bounds the family: every child's caps fit in it, and its usage is theirs.
    assert sum(c.budget_tokens or 0 for c in res.children[:2]) <= 9_000
    assert res.usage.tokens == sum(r.tokens for r in res.results.values()) <= 9_000
    assert res.budget.used_tokens == res.usage.tokens
    rows = family(env, res.workflow_id)
    llm = [r for r in rows if r["kind"] == "llm"]
    assert sum(r["tokens"] for r in llm) == res.usage.tokens
    assert {r["workflow_id"] for r in llm} == {c.workflow_id for c in res.children}
    parent = [r for r in rows if r["workflow_id"] == res.workflow_id and r["kind"] == "outcome"]
    assert len(parent) == 1 and parent[0]["status"] == "resolved" and parent[0]["task_type"] == "orchestrator"
    assert parent[0]["tokens"] == res.usage.tokens


async def test_children_are_shrunk_to_what_is_left_and_skipped_below_the_floor(
        client: Client, status: StatusService, tmp_path: Path) -> None:
    # 6,000 + 6,000 on-call caps and a 3,000 note do not fit 7,000: the first check gets its share
    # (3,500), the second what is left; the note waits for them and gets the rest, or is skipped.
    async with env_for(client, home=tmp_path) as env:
        res = await env.orchestrate("Check api and search", tasks=CHECKS,
                                    budget=keel.Budget(max_tokens=7_000, max_usd=None), key=uuid.uuid4().hex)
    caps = {c.name: c.budget_tokens for c in res.children}
    assert caps["api"] == 3_500 and caps["search"] == 3_500
    assert any(d.kind == "shrink_child" for d in res.decisions)
    assert res.usage.tokens <= 7_000
    assert res.budget.used_tokens <= 7_000 and res.budget.reserved_tokens == 0
    # Whatever happened to each child is in the result, never silently dropped.
    for c in res.children:
        assert c.status in ("completed", "budget_exceeded", "not_started", "escalated"), c
    assert res.status in ("completed", "partial")
    if res.status == "partial":
        assert res.missing


async def test_a_planner_agent_makes_the_plan(client: Client, status: StatusService, tmp_path: Path) -> None:
    plan = {"tasks": [{"agent": "oncall", "input": "Is the api service healthy?"},
                      {"agent": "incident_note", "input": "Write the note.", "after": ["oncall"]}]}
    model = ScriptedModel([answer(json.dumps(plan))])
    async with env_for(client, model=model, home=tmp_path, extra=(PLANNER,)) as env:
        res = await env.orchestrate("Check the api and write it up", planner="oncall_planner",
                                    budget=keel.Budget(max_tokens=12_000, max_usd=0.05), key=uuid.uuid4().hex)
    model.assert_all_used()
    assert res.status == "completed", res.reason
    assert res.plan_source == "planner"
    assert [t.name for t in res.plan] == ["oncall", "incident_note"]
    assert [c.name for c in res.children] == ["planner", "oncall", "incident_note"]
    assert res.usage.tokens == sum(r.tokens for r in res.results.values())


async def test_a_plan_naming_an_unknown_agent_runs_nothing(client: Client, status: StatusService,
                                                           tmp_path: Path) -> None:
    plan = {"tasks": [{"agent": "oncall", "input": "api?"}, {"agent": "dba", "input": "vacuum the db"}]}
    model = ScriptedModel([answer(json.dumps(plan))])
    async with env_for(client, model=model, home=tmp_path, extra=(PLANNER,)) as env:
        res = await env.orchestrate("Check things", planner="oncall_planner", key=uuid.uuid4().hex)
    assert res.status == "rejected"
    assert "no agent 'dba' is registered" in res.reason
    assert [c.name for c in res.children] == ["planner"]  # no task child started
    assert status.restarts == {}


async def test_a_planner_answer_that_is_not_a_plan_escalates(client: Client, status: StatusService,
                                                             tmp_path: Path) -> None:
    # The planner's own answer check sends a non-plan back; after its invalid outputs it escalates.
    model = ScriptedModel([answer("I would check the api first.")] * 5)
    async with env_for(client, model=model, home=tmp_path, extra=(PLANNER,)) as env:
        res = await env.orchestrate("Check things", planner="oncall_planner", key=uuid.uuid4().hex)
    assert res.status == "escalated"
    assert "the planner gave no usable plan" in res.reason
    assert res.results["planner"].status == "escalated"


async def test_a_child_waits_for_keel_approve(client: Client, status: StatusService, tmp_path: Path) -> None:
    tasks = [ChildTask(agent="oncall", name="payments", input="Payments is failing, please fix it"),
             ChildTask(agent="incident_note", name="note", input="Write the incident note.", after=["payments"])]
    async with env_for(client, home=tmp_path) as env:
        handle = await start_orchestration(env.client, env.settings, OrchestratorInput(
            input="Payments incident", tasks=tasks, budget=keel.Budget(max_tokens=12_000, max_usd=0.05),
            key=uuid.uuid4().hex))
        child = f"{handle.id}/payments"

        async def listed() -> str:
            return str((await keel_cli(cli_env(env, tmp_path), "approvals")).output)

        await assert_eventually(listed, lambda out: "/payments" in out and "restart_service" in out,
                               within_s=30)
        approved = await keel_cli(cli_env(env, tmp_path), "approve", child, "--as", "sre-lead")
        assert approved.exit_code == 0, approved.output
        res = await handle.result()
    assert res.status == "completed", res.reason
    assert res.results["payments"].tools_executed == ["service_status", "restart_service"]
    assert len(status.restarts) == 1 and status.services["payments"]["status"] == "healthy"


def test_plans_are_checked_before_anything_runs() -> None:
    known = {"oncall", "incident_note"}
    tasks = named([ChildTask(agent="oncall", input="a"), ChildTask(agent="oncall", input="b"),
                   ChildTask(agent="incident_note", input="c", after=["oncall", "oncall-2"])])
    assert [t.name for t in tasks] == ["oncall", "oncall-2", "incident_note"]
    assert plan_problems(tasks, known) == []
    assert [[t.name for t in s] for s in stages(tasks) or []] == [["oncall", "oncall-2"], ["incident_note"]]
    cycle = named([ChildTask(agent="oncall", name="a", input="x", after=["b"]),
                   ChildTask(agent="oncall", name="b", input="y", after=["a"])])
    assert plan_problems(cycle, known) == ["the tasks' `after` lists form a cycle"]
    bad = named([ChildTask(agent="oncall", name="a", input="x", after=["zz"]),
                 ChildTask(agent="nope", name="a", input="y")])
    problems = plan_problems(bad, known)
    assert "task name 'a' is used twice" in problems
    assert "task 'a': no agent 'nope' is registered on this worker" in problems
    assert "task 'a' waits for 'zz', which is not in the plan" in problems
    with pytest.raises(ValueError, match="needs `tasks` or a `planner`"):
        OrchestratorInput(input="x")


async def test_keel_orchestrate_on_the_command_line(client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client, home=tmp_path) as env:
        out = await keel_cli(cli_env(env, tmp_path), "orchestrate", "Morning check",
                             "--task", "oncall=Is the api service healthy?",
                             "--then", "incident_note=Write the incident note.", "--max-tokens", "10000", "--json")
    assert out.exit_code == 0, out.output
    res = OrchestratorResult.model_validate_json(out.output.strip().splitlines()[-1])
    assert res.status == "completed", res.reason
    assert [(t.name, t.after) for t in res.plan] == [("oncall", []), ("incident_note", ["oncall"])]
    assert res.usage.tokens <= 10_000 and res.results["incident_note"].structured is not None


def test_keel_orchestrate_refuses_a_malformed_task() -> None:
    out = CliRunner().invoke(app, ["orchestrate", "x", "--task", "oncall"])
    assert out.exit_code == 2 and "a task is AGENT=INPUT" in out.output


async def test_a_synthesizer_answers_from_the_children(client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client, home=tmp_path) as env:
        res = await env.orchestrate("Is everything up?", tasks=CHECKS[:2], synthesizer="incident_note",
                                    key=uuid.uuid4().hex)
    assert res.status == "completed", res.reason
    assert [c.name for c in res.children] == ["api", "search", "synthesizer"]
    assert res.structured == res.results["synthesizer"].structured and res.structured is not None
    assert "search" in res.structured["summary"] and "2.14.1" in res.structured["summary"]


async def test_an_unknown_synthesizer_is_refused_before_any_child(client: Client, status: StatusService,
                                                                  tmp_path: Path) -> None:
    async with env_for(client, home=tmp_path) as env:
        res = await env.orchestrate("x", tasks=CHECKS[:1], synthesizer="writer", key=uuid.uuid4().hex)
    assert res.status == "rejected" and "no synthesizer agent 'writer'" in res.reason and res.children == []


async def test_the_heartbeat_timeout_reaches_every_childs_model_calls(client: Client, status: StatusService,
                                                                      tmp_path: Path) -> None:
    """KEEL_LLM_HEARTBEAT_TIMEOUT_S, pinned in the orchestration's input by its starter, schedules every model
    call of the family (its children's, passed down in their inputs)."""
    from temporalio.api.enums.v1 import EventType

    from keel import names

    async with env_for(client, home=tmp_path) as env:
        settings = env.settings.model_copy(update={"llm_heartbeat_timeout_s": 7.0})
        handle = await start_orchestration(env.client, settings, OrchestratorInput(
            input="Morning check", tasks=CHECKS[:2], budget=keel.Budget(max_tokens=9_000, max_usd=0.05),
            key=uuid.uuid4().hex))
        res = await handle.result()
        assert res.status == "completed", res.reason
        timeouts = set()
        for c in res.children:
            async for e in env.client.get_workflow_handle(c.workflow_id).fetch_history_events():
                attrs = e.activity_task_scheduled_event_attributes
                if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED and \
                        attrs.activity_type.name == names.LLM_ACTIVITY:
                    timeouts.add(attrs.heartbeat_timeout.ToTimedelta().total_seconds())
    assert timeouts == {7.0}
