"""Shadow mode for any registered agent: a candidate prompt version of the on-call agent runs beside the
production task on the real dev server, as a dry run. Production waits for its approver and restarts
once; the candidate's restart is recorded as a proposal and never runs, nothing of it reaches the human
queue, its tokens are ledgered under feature "shadow" and apart from production's; one comparison row
is written and `keel shadow` configures and reports it, per agent, without touching the tickets' shadow."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session
from temporalio.client import Client
from temporalio.worker import Replayer
from typer.testing import CliRunner

from activities.db import ShadowComparisonRow, init_db, make_engine
from activities.ledger import Ledger
from activities.shadow import active_agent_shadows, active_shadow, record_comparison, start_shadow, stop_shadow
from agents.oncall import oncall
from agents.oncall.status_service import StatusService
from keel import names
from keel.shadow import (
    SHADOW_FEATURE,
    CandidateSpec,
    CandidateSpecError,
    ShadowComparison,
    agent_of_label,
    candidate_workflow_id,
    compare_agent,
    failed_agent_primary,
    shadow_workflow_id,
    summarize,
)
from keel.testing import agent_environment
from keel.types import AgentInput, AgentResult, BlockedAction, ModelSpec
from starter.agents import start_agent
from starter.approvals_cli import pending_action
from starter.cli import app
from starter.shadow_cli import forget_shadow_configs, parse_candidate, shadow_agent_task
from tests.conftest import assert_eventually
from workers.worker import STRICT_SANDBOX
from workflows.registry import WORKFLOWS

LABEL = "agent=oncall,prompt=v2"


@pytest.fixture
def status(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatusService]:
    with StatusService() as svc:
        monkeypatch.setenv("ONCALL_STATUS_URL", svc.url)
        yield svc


@pytest.fixture(autouse=True)
def _fresh_configs() -> Iterator[None]:
    forget_shadow_configs()
    yield
    forget_shadow_configs()


async def keel_cli(env: dict[str, str], *args: str) -> Any:
    """The `keel` command, in a thread (it runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def ledger_rows(engine: Any, workflow_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT kind, tool, feature, dry_run, input_tokens + output_tokens AS tokens "
                                 "FROM ledger WHERE workflow_id = :w"), {"w": workflow_id})
        return [dict(r._mapping) for r in rows]


async def test_oncall_v2_candidate_shadows_production_and_never_restarts(
        client: Client, status: StatusService, tmp_path: Path) -> None:
    async with agent_environment(oncall, client=client) as env:
        settings = env.settings.model_copy(update={"database_url": str(env.engine.url)})
        cli = {"TEMPORAL_ADDRESS": client.service_client.config.target_host, "KEEL_TASK_QUEUE": settings.task_queue,
               "KEEL_HOME": str(tmp_path / "home"), "KEEL_DATABASE_URL": str(env.engine.url), "COLUMNS": "200"}

        # Configure: the oncall agent's tasks get the v2 candidate; the tickets' shadow stays off.
        out = await keel_cli(cli, "shadow", "status", "--agent", "oncall")
        assert out.exit_code == 0 and "shadow mode is off for agent oncall" in out.output, out.output
        out = await keel_cli(cli, "shadow", "start", "--agent", "oncall", "--candidate", "prompt=v2")
        assert out.exit_code == 0 and "shadow mode on" in out.output and LABEL in out.output, out.output
        assert "new oncall tasks" in out.output
        assert active_shadow(env.engine) is None  # the tickets' configuration is untouched
        assert set(active_agent_shadows(env.engine)) == {"oncall"}

        # Production starts as `keel run` starts it; it starts shadowed and hands back the production task.
        inp = AgentInput(agent="oncall", input="The payments service is down, please fix it.",
                         key=f"inc-{uuid.uuid4().hex[:8]}", tenant="team-pay")
        handle = await start_agent(client, settings, inp)
        assert handle.id == f"oncall-{inp.key}"
        action = await assert_eventually(lambda: pending_action(client, handle.id), lambda a: a is not None)
        assert action is not None and action.tool == "restart_service"
        assert status.restarts == {}
        ok = await keel_cli(cli, "approve", handle.id, "--as", "sre-lead", "--comment", "go")
        assert ok.exit_code == 0, ok.output
        result = await handle.result()
        comparison_handle = client.get_workflow_handle(shadow_workflow_id(handle.id), result_type=ShadowComparison)
        comparison = await comparison_handle.result()
        cand = await client.get_workflow_handle(candidate_workflow_id(handle.id), result_type=AgentResult).result()
        desc, shadow_desc = await handle.describe(), await comparison_handle.describe()
        history = await comparison_handle.fetch_history()
        again = await start_agent(client, settings, inp)  # the same key again: the run it has, nothing new
        again_result = await again.result()
        shadows = [w async for w in client.list_workflows(f"WorkflowId = '{shadow_workflow_id(handle.id)}'")]
        assert again.id == handle.id and again_result == result and len(shadows) == 1

        # Production: approved, restarted exactly once.
        assert result.status == "completed", result.reason
        assert result.tools_executed == ["service_status", "restart_service"]
        assert [(a.approver, a.accepted) for a in result.approvals] == [("sre-lead", True)]
        assert desc.workflow_type == names.AGENT_WORKFLOW and desc.parent_id == shadow_desc.id
        assert shadow_desc.workflow_type == names.SHADOW_WORKFLOW

        # The candidate: v2, a dry run; its restart was proposed and recorded, asked no one, never ran.
        assert cand.prompt_version == "v2" and result.prompt_version == "v1"
        assert cand.tools_executed == ["service_status"]
        assert [(b.tool, b.reason) for b in cand.tools_blocked] == [
            ("restart_service", "requires human approval (permission: confirm)")]
        assert cand.approvals == [] and cand.status == "escalated"
        assert len(status.restarts) == 1, status.restarts  # production's restart only
        with env.engine.connect() as conn:
            queued = conn.execute(text("SELECT workflow_id FROM human_queue WHERE workflow_id IN (:p, :c)"),
                                  {"p": handle.id, "c": cand.workflow_id}).scalars().all()
        assert queued == []  # a dry run puts nothing in front of people

        # The comparison: returned, stored once, reported.
        assert comparison.candidate == LABEL and comparison.primary_workflow_id == handle.id
        assert comparison.primary_status == "completed" and comparison.candidate_status == "escalated"
        assert comparison.same_outcome is False  # production was approved; a candidate asks no one
        assert comparison.classification_agrees is True  # the same actions: status read, restart
        assert comparison.primary_category == comparison.candidate_category == "restart_service,service_status"
        assert [b.tool for b in comparison.proposed_writes] == ["restart_service"]
        assert comparison.task_key == inp.key and comparison.tenant == "team-pay"
        assert comparison.candidate_tokens == cand.tokens and comparison.primary_tokens == result.tokens
        assert comparison.answer_agrees is False and "Restart" in (comparison.primary_answer or "")
        with Session(env.engine) as s:
            row = s.get(ShadowComparisonRow, shadow_workflow_id(handle.id))
        assert row is not None and row.candidate == LABEL and row.candidate_workflow_id == cand.workflow_id

        # Chargeback: the candidate's tokens are feature "shadow", and not in production's totals.
        prod_rows, cand_rows = ledger_rows(env.engine, handle.id), ledger_rows(env.engine, cand.workflow_id)
        assert {r["feature"] for r in cand_rows} == {SHADOW_FEATURE}
        assert SHADOW_FEATURE not in {r["feature"] for r in prod_rows}
        assert sum(r["tokens"] or 0 for r in cand_rows if r["kind"] == "llm") == cand.tokens > 0
        ledger = Ledger(env.engine)
        assert ledger.task_totals(handle.id)["tokens"] == result.tokens
        assert ledger.task_totals(cand.workflow_id)["tokens"] == cand.tokens
        assert not any(r["tool"] == "restart_service" for r in cand_rows)  # no tool call, not even a dry one
        outcomes = {o["workflow_id"] for o in ledger.outcomes(task_type="oncall")}
        assert handle.id in outcomes and cand.workflow_id not in outcomes

        # `keel shadow report|status`, per agent.
        out = await keel_cli(cli, "shadow", "report", "--agent", "oncall", "--json")
        assert out.exit_code == 0, out.output
        [summary] = json.loads(out.output)
        assert summary["candidate"] == LABEL and summary["agent"] == "oncall" and summary["tasks"] == 1
        assert summary["proposed_writes"] == 1 and summary["classification_agreement_rate"] == 1.0
        table = await keel_cli(cli, "shadow", "report", "--agent", "oncall")
        assert table.exit_code == 0, table.output
        assert f"candidate {LABEL}: 1 shadowed oncall tasks" in table.output, table.output
        assert "same actions" in table.output and "100.0%" in table.output
        doc = json.loads((await keel_cli(cli, "shadow", "status", "--agent", "oncall", "--json")).output)
        assert doc["active"] is True and doc["candidate"] == LABEL and doc["compared"] == 1
        tickets_report = await keel_cli(cli, "shadow", "report", "--agent", "swarm", "--json")
        assert json.loads(tickets_report.output) == []

        # Stopped: the next task starts as usual (the hook declines).
        out = await keel_cli(cli, "shadow", "stop", "--agent", "oncall")
        assert out.exit_code == 0 and "shadow mode off" in out.output, out.output
        assert await shadow_agent_task(client, settings, inp.model_copy(update={"key": "after-stop"})) is None

    # The shadow's history replays on today's code.
    await Replayer(workflows=WORKFLOWS, workflow_runner=STRICT_SANDBOX,
                   data_converter=client.data_converter).replay_workflow(history)


def test_agent_candidate_spec_and_input() -> None:
    spec = parse_candidate("prompt=v2,model=sim:sim-small", agent="oncall")
    assert spec.agent == "oncall" and spec.label == "agent=oncall,prompt=v2,model=sim:sim-small"
    assert CandidateSpec.parse(spec.label) == spec and agent_of_label(spec.label) == "oncall"
    assert agent_of_label("prompt=v2") is None
    with pytest.raises(CandidateSpecError, match="names agent 'swarm', not 'oncall'"):
        parse_candidate("agent=swarm,prompt=v2", agent="oncall")
    with pytest.raises(CandidateSpecError, match="changes nothing"):
        CandidateSpec.parse("agent=oncall")
    primary = AgentInput(agent="oncall", input="x", models={"large": ModelSpec(provider="sim", model="sim-large")})
    cand = CandidateSpec.parse("small=sim:sim-small").apply_agent(primary)
    assert cand.dry_run and cand.feature == SHADOW_FEATURE and not cand.breaker
    assert cand.approval_mode == "escalate" and cand.prompt_version is None
    assert cand.models == {"large": ModelSpec(provider="sim", model="sim-large"),
                           "small": ModelSpec(provider="sim", model="sim-small")}
    assert primary.dry_run is False and primary.feature == ""


def test_agent_comparison_failures_and_summary() -> None:
    inp = AgentInput(agent="oncall", input="x", tenant="t")
    prim = AgentResult(workflow_id="p", agent="oncall", status="completed", output="ok", tokens=100, cost_usd=0.01,
                       tools_executed=["service_status"])
    cand = prim.model_copy(update={"workflow_id": "p.shadow", "output": " OK ", "tokens": 80, "cost_usd": 0.008})
    same = compare_agent(prim, cand, primary_input=inp, shadow_workflow_id="s1", candidate_workflow_id="p.shadow",
                         candidate_label=LABEL)
    assert same.same_outcome and same.classification_agrees and same.answer_agrees
    assert same.token_delta == -20 and same.task_key == "p" and same.tenant == "t"
    failed = compare_agent(prim, None, primary_input=inp, shadow_workflow_id="s2", candidate_workflow_id="c",
                           candidate_label=LABEL, candidate_error="boom")
    assert failed.candidate_failed and failed.answer_agrees is None
    lost = compare_agent(failed_agent_primary("p", inp, "terminated"), cand, primary_input=inp,
                         shadow_workflow_id="s3", candidate_workflow_id="c", candidate_label=LABEL,
                         primary_error="terminated")
    assert lost.primary_status == "failed" and not lost.same_outcome
    proposed = cand.model_copy(update={"status": "escalated", "tools_blocked": [BlockedAction(
        step=2, tool="restart_service", arguments_json="{}", reason="requires human approval (permission: confirm)")]})
    diff = compare_agent(prim, proposed, primary_input=inp, shadow_workflow_id="s4", candidate_workflow_id="c",
                         candidate_label=LABEL)
    assert not diff.same_outcome and not diff.classification_agrees and len(diff.proposed_writes) == 1
    [s] = summarize([same, failed, diff])
    assert s.agent == "oncall" and s.tasks == 3 and s.candidate_failures == 1 and s.proposed_writes == 1
    assert s.outcome_changes == {"completed/reply -> escalated/human": 1}


def test_configs_per_target_and_rows_keep_their_columns(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'keel.db'}")
    init_db(engine)
    try:
        start_shadow(engine, CandidateSpec.parse("prompt=v2"), 0.5)
        start_shadow(engine, CandidateSpec.parse("agent=oncall,prompt=v2"), 1.0)
        start_shadow(engine, CandidateSpec.parse("agent=on_call,model=sim:sim-small"), 1.0)
        ticket_cfg, oncall_cfg = active_shadow(engine), active_shadow(engine, "oncall")
        assert ticket_cfg is not None and ticket_cfg.candidate.label == "prompt=v2" and ticket_cfg.fraction == 0.5
        assert oncall_cfg is not None and oncall_cfg.candidate.agent == "oncall"
        assert set(active_agent_shadows(engine)) == {"oncall", "on_call"}
        # Replacing one agent's candidate leaves the others alone; stopping it too.
        start_shadow(engine, CandidateSpec.parse("agent=oncall,prompt=v3"), 1.0)
        assert active_shadow(engine, "oncall").candidate.prompt_version == "v3"  # type: ignore[union-attr]
        assert active_shadow(engine) == ticket_cfg
        stopped = stop_shadow(engine, "oncall")
        assert stopped is not None and stopped.candidate.prompt_version == "v3"
        assert active_shadow(engine, "oncall") is None and active_shadow(engine) is not None
        assert set(active_agent_shadows(engine)) == {"on_call"}
        assert stop_shadow(engine) is not None and active_shadow(engine, "on_call") is not None

        inp = AgentInput(agent="oncall", input="x")
        prim = AgentResult(workflow_id="p", agent="oncall", status="completed", output="answer")
        c = compare_agent(prim, prim, primary_input=inp, shadow_workflow_id="s", candidate_workflow_id="c",
                          candidate_label=LABEL)
        assert record_comparison(engine, c) and not record_comparison(engine, c)
    finally:
        engine.dispose()


def test_a_starter_needs_no_database_to_start_a_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ledger is where a shadow is configured; a starter that cannot read it still starts tasks,
    without a shadow, and says why (no ledger file: nothing to say, and no file is made)."""
    from keel.settings import KeelSettings
    from starter.shadow_cli import agent_shadow_config

    forget_shadow_configs()
    none = tmp_path / "none.db"
    assert agent_shadow_config(KeelSettings(database_url=f"sqlite:///{none}"), "oncall") is None
    assert not none.exists()
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not a database" * 100)
    assert agent_shadow_config(KeelSettings(database_url=f"sqlite:///{broken}"), "oncall") is None
    assert "shadow configuration not read" in capsys.readouterr().err
    forget_shadow_configs()
