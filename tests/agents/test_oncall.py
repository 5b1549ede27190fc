"""The proof that Keel is a platform: the on-call agent (agents/oncall, public API only) end to end on
the real Temporal server, with every control: approvals through `keel approve`, a guardrail refusal,
the output checks, a budget kill, trace, costs and replay."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Replayer
from typer.testing import CliRunner

import keel
from agents.oncall import oncall
from agents.oncall.status_service import StatusService
from keel.testing import SCRIPTED, AgentEnvironment, ScriptedModel, agent_environment, answer, call, raw_call
from starter.approvals_cli import pending_action
from starter.cli import app
from tests.conftest import assert_eventually
from workers.worker import STRICT_SANDBOX
from workflows.registry import WORKFLOWS


@pytest.fixture
def status(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatusService]:
    with StatusService() as svc:
        monkeypatch.setenv("ONCALL_STATUS_URL", svc.url)
        yield svc


@contextlib.asynccontextmanager
async def env_for(client: Client, model: ScriptedModel | None = None,
                  home: Path | None = None) -> AsyncIterator[AgentEnvironment]:
    async with agent_environment(oncall, model=model, client=client, home=home) as env:
        yield env


def cli_env(env: AgentEnvironment, tmp_path: Path) -> dict[str, str]:
    return {"TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
            "KEEL_TASK_QUEUE": env.settings.task_queue, "KEEL_HOME": str(tmp_path / "home"),
            "KEEL_DATABASE_URL": str(env.engine.url), "COLUMNS": "200"}


async def keel_cli(env: dict[str, str], *args: str) -> Any:
    """The `keel` command, in a thread (it runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def ledger(env: AgentEnvironment, workflow_id: str) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        rows = conn.execute(text("SELECT step, kind, tool, status, "
                                 "input_tokens + output_tokens AS total_tokens, ok, tenant, task_type, feature "
                                 "FROM ledger WHERE workflow_id = :w ORDER BY step, kind"), {"w": workflow_id})
        return [dict(r._mapping) for r in rows]


async def test_a_healthy_service_is_read_and_reported(client: Client, status: StatusService,
                                                      tmp_path: Path) -> None:
    async with env_for(client, home=tmp_path) as env:
        result = await env.run("oncall", "Is the api service healthy?", tenant="team-web", key=uuid.uuid4().hex)
    assert result.status == "completed", result.reason
    assert result.tools_executed == ["service_status"]
    assert "api is healthy" in result.output and "2.14.1" in result.output
    rows = ledger(env, result.workflow_id)
    assert [r["kind"] for r in rows] == ["outcome", "llm", "tool", "llm"]
    assert {r["task_type"] for r in rows} == {"oncall"} and {r["tenant"] for r in rows} == {"team-web"}
    assert rows[0]["status"] == "resolved"
    assert sum(r["total_tokens"] or 0 for r in rows if r["kind"] == "llm") == result.tokens
    assert status.restarts == {}


async def test_a_restart_waits_for_the_listed_approver_and_runs_once(
        client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client) as env:
        handle = await env.start("oncall", "The payments service is down, please fix it.")
        action = await assert_eventually(lambda: pending_action(client, handle.id), lambda a: a is not None)
        assert action is not None and action.tool == "restart_service" and action.approvers == ["sre-lead"]
        assert status.restarts == {}  # nothing runs before the decision
        cli = cli_env(env, tmp_path)
        refused = await keel_cli(cli, "approve", handle.id, "--as", "intern")
        assert refused.exit_code != 0 and "not an approver" in refused.output
        ok = await keel_cli(cli, "approve", handle.id, "--as", "sre-lead", "--comment", "go")
        assert ok.exit_code == 0, ok.output
        result = await handle.result()
    assert result.status == "completed", result.reason
    assert result.tools_executed == ["service_status", "restart_service"]
    assert len(status.restarts) == 1 and status.services["payments"]["status"] == "healthy"
    assert [(a.approver, a.accepted) for a in result.approvals] == [("sre-lead", True)]
    assert "RS-1" in result.output


async def test_a_rejected_restart_never_runs(client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client) as env:
        handle = await env.start("oncall", "The payments service is down.")
        await assert_eventually(lambda: pending_action(client, handle.id), lambda a: a is not None)
        out = await keel_cli(cli_env(env, tmp_path), "reject", handle.id, "--as", "sre-lead", "--comment", "not now")
        assert out.exit_code == 0, out.output
        result = await handle.result()
    assert status.restarts == {}
    assert "restart_service" not in result.tools_executed
    assert result.status == "completed" and "not carried out" in result.output


async def test_escalate_mode_sends_the_restart_to_the_human_queue(client: Client, status: StatusService) -> None:
    async with env_for(client) as env:
        result = await env.run("oncall", "payments is down", approval_mode="escalate")
        with env.engine.connect() as conn:
            queued = conn.execute(text("SELECT reason FROM human_queue WHERE workflow_id = :w"),
                                  {"w": result.workflow_id}).scalars().all()
    assert result.status == "escalated" and "restart_service" in result.reason
    assert status.restarts == {} and len(queued) == 1 and "restart_service" in queued[0]


async def test_the_agent_validator_refuses_a_restart_before_a_status_read(client: Client,
                                                                         status: StatusService) -> None:
    model = ScriptedModel([
        call("restart_service", service="payments", reason="it is down"),
        answer("I could not restart payments without checking it first."),
    ])
    async with env_for(client, model) as env:
        result = await env.run("oncall", "restart payments", models={"small": SCRIPTED, "large": SCRIPTED})
    model.assert_all_used()
    assert result.status == "completed" and status.restarts == {}
    assert result.tools_blocked[0].tool == "restart_service"
    assert "refused by policy: read the service's status" in result.tools_blocked[0].reason
    assert result.validation_failures == 1
    # The model saw why.
    assert "read the service's status" in model.calls[1].messages[-1].content


@pytest.mark.parametrize(("said", "problem"), [
    ("The payments service has been restarted.", "claims an action that was not executed (restart_service)"),
    ("Dear [Your Name], payments is down.", "unfilled template placeholder"),
    ("payments is down. The admin password: hunter2", "the answer contains a credential"),
])
async def test_output_checks_hold_an_answer_back(client: Client, status: StatusService, said: str,
                                                 problem: str) -> None:
    model = ScriptedModel([call("service_status", service="payments"), answer(said)])
    async with env_for(client, model) as env:
        result = await env.run("oncall", "how is payments?", models={"small": SCRIPTED, "large": SCRIPTED})
    assert result.status == "escalated" and problem in result.reason
    assert result.output == ""
    assert [g.kind for g in result.guardrails] == ["output_check"]


async def test_invalid_model_output_is_never_a_final_answer(client: Client, status: StatusService) -> None:
    model = ScriptedModel([
        call("reboot_everything", now=True),               # a tool the agent does not have
        raw_call("service_status", '{"service": "api"'),    # invalid JSON
        call("service_status", service="api", force=True),  # against the schema
        answer("api is healthy."),
    ])
    async with env_for(client, model) as env:
        result = await env.run("oncall", "api?", models={"small": SCRIPTED, "large": SCRIPTED})
    model.assert_all_used()
    assert result.status == "completed" and result.output == "api is healthy."
    assert result.tools_executed == [] and len(result.tools_blocked) == 3
    assert result.invalid_outputs == 3
    assert [b.reason.split(" ")[0] for b in result.tools_blocked] == ["unknown", "arguments", "invalid"]


async def test_an_empty_answer_is_sent_back_not_taken(client: Client, status: StatusService) -> None:
    model = ScriptedModel([call("service_status", service="api"), answer(""), answer("api is healthy.")])
    async with env_for(client, model) as env:
        result = await env.run("oncall", "api?", models={"small": SCRIPTED, "large": SCRIPTED})
    model.assert_all_used()
    assert result.status == "completed" and result.output == "api is healthy." and result.invalid_outputs == 1
    assert "the answer is empty" in model.calls[2].messages[-1].content


async def test_too_many_invalid_outputs_go_to_a_human(client: Client, status: StatusService) -> None:
    model = ScriptedModel([answer("")] * 5)
    async with env_for(client, model) as env:
        result = await env.run("oncall", "api?", models={"small": SCRIPTED, "large": SCRIPTED})
    assert result.status == "escalated" and "the answer is empty" in result.reason


async def test_the_budget_kill_stops_before_a_call_would_cross_it(client: Client, status: StatusService,
                                                                  tmp_path: Path) -> None:
    async with env_for(client, home=tmp_path) as env:
        result = await env.run("oncall", "The payments service is down.", approval_mode="escalate",
                               budget=keel.Budget(max_tokens=500, max_usd=None))
        rows = ledger(env, result.workflow_id)
    assert result.status == "budget_exceeded", result
    assert result.budget.limit_hit == "tokens"
    assert sum(r["total_tokens"] or 0 for r in rows if r["kind"] == "llm") <= 500


async def test_an_unknown_agent_fails_the_task_at_once(client: Client) -> None:
    async with env_for(client) as env:
        handle = await env.start("no_such_agent", "hello")
        with pytest.raises(WorkflowFailureError) as e:
            await handle.result()
    assert "no agent named 'no_such_agent'" in str(e.value.cause)


async def test_the_script_running_out_fails_clearly(client: Client, status: StatusService) -> None:
    model = ScriptedModel([call("service_status", service="api")])
    async with env_for(client, model) as env:
        handle = await env.start("oncall", "api?", models={"small": SCRIPTED, "large": SCRIPTED})
        with pytest.raises(WorkflowFailureError) as e:
            await handle.result()
    assert "the scripted model has no step 2" in str(e.value.cause.cause if e.value.cause else e.value)


async def test_trace_costs_and_replay(client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client) as env:
        result = await env.run("oncall", "Is the api service ok?", tenant="team-web")
        cli = cli_env(env, tmp_path)
        trace = await keel_cli(cli, "trace", result.workflow_id)
        costs = await keel_cli(cli, "costs", "--by", "task_type")
        history = await client.get_workflow_handle(result.workflow_id).fetch_history()
    assert trace.exit_code == 0, trace.output
    assert "service_status" in trace.output and "llm" in trace.output.lower()
    assert costs.exit_code == 0 and "oncall" in costs.output
    await Replayer(workflows=WORKFLOWS, workflow_runner=STRICT_SANDBOX,
                   data_converter=client.data_converter).replay_workflow(history)


async def test_keel_run_starts_any_agent_and_prints_its_result(client: Client, status: StatusService,
                                                               tmp_path: Path) -> None:
    async with env_for(client) as env:
        out = await keel_cli(cli_env(env, tmp_path), "run", "oncall", "Is the api service healthy?", "--key",
                             f"k-{uuid.uuid4().hex[:8]}", "--tenant", "team-web", "--json")
    assert out.exit_code == 0, out.output
    res = keel.AgentResult.model_validate_json(out.output.strip().splitlines()[-1])
    assert res.status == "completed" and res.workflow_id.startswith("oncall-k-") and "api is healthy" in res.output


async def test_keel_run_of_an_unknown_agent_says_why(client: Client, tmp_path: Path) -> None:
    async with env_for(client) as env:
        out = await keel_cli(cli_env(env, tmp_path), "run", "nope", "hello", "--wait")
    assert out.exit_code == 1 and "no agent named 'nope'" in out.output
