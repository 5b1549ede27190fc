"""Chaos runs: faults injected into the tool and model calls of real tasks (keel/chaos.py), a suite run
with and without them, and the verdict on how the agent degrades."""

from __future__ import annotations

import json
from pathlib import Path

from temporalio.client import Client

from agents.oncall.status_service import StatusService
from keel.chaos import Chaos, draw, hits
from keel.types import AgentResult, BudgetReport
from starter.chaos_cli import degradation
from tests.agents.test_oncall import cli_env, env_for, keel_cli

ROOT = Path(__file__).resolve().parent.parent.parent


def test_faults_are_drawn_per_call_and_attempt_at_their_rate() -> None:
    chaos = Chaos(tool_error_rate=0.3, seed=7)
    assert draw(chaos, "tool_error", "w/3", 1) == draw(chaos, "tool_error", "w/3", 1)
    assert draw(chaos, "tool_error", "w/3", 1) != draw(chaos, "tool_error", "w/3", 2)  # a retry draws again
    share = sum(hits(chaos, "tool_error", f"w/{i}", 1) for i in range(4_000)) / 4_000
    assert 0.27 < share < 0.33
    assert not hits(chaos, "provider_500", "w/1", 1) and not hits(None, "tool_error", "w/1", 1)
    assert not Chaos().active and chaos.active
    one_tool = Chaos(tool_error_rates={"service_status": 1.0})
    assert one_tool.active and hits(one_tool, "tool_error", "w/1", 1, "service_status")
    assert not hits(one_tool, "tool_error", "w/1", 1, "restart_service")


def _r(wf: str, status: str = "completed", calls: int = 3, tokens: int = 100) -> AgentResult:
    return AgentResult(workflow_id=wf, agent="a", status=status, llm_calls=calls, tokens=tokens,
                       budget=BudgetReport(max_tokens=1_000))


def test_what_is_not_graceful_is_named() -> None:
    base = {"c": [_r("b1"), _r("b2")]}
    fine = degradation(base, {"c": [_r("f1"), _r("f2", status="escalated", calls=5)]})
    assert fine["graceful"] and fine["cases"][0]["escalated_chaos"] == 1
    bad = degradation(base, {"c": [_r("f1", calls=40), _r("f2", tokens=5_000), "WorkflowFailureError: boom"]})
    assert not bad["graceful"]
    text = " | ".join(bad["problems"])
    assert "1 task(s) lost" in text and "a retry storm" in text and "over the budget (f2)" in text


async def test_keel_chaos_run(client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client) as env:
        res = await keel_cli(cli_env(env, tmp_path), "chaos", "run", str(ROOT / "evals" / "oncall.yaml"),
                             "--tool-error-rate", "0.3", "--provider-429-rate", "0.2", "--garbage-rate", "0.1",
                             "--runs", "2", "--json")
        refused = await keel_cli(cli_env(env, tmp_path), "chaos", "run", str(ROOT / "evals" / "oncall.yaml"))
        suite = tmp_path / "with_chaos.yaml"
        suite.write_text((ROOT / "evals" / "oncall.yaml").read_text()
                         + "chaos: {tool_error_rates: {service_status: 0.5}, seed: 3}\n")
        from_suite = await keel_cli(cli_env(env, tmp_path), "chaos", "run", str(suite), "--case", "api-healthy",
                                    "--runs", "2", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["graceful"] and doc["chaos"]["tool_error_rate"] == 0.3
    assert {c["id"] for c in doc["cases"]} == {"api-healthy", "search-degraded", "payments-restart-needs-a-person"}
    assert all(c["lost"] == 0 and c["over_budget"] == 0 for c in doc["cases"])
    assert refused.exit_code == 2 and "no fault given" in refused.output
    assert from_suite.exit_code == 0, from_suite.output
    assert json.loads(from_suite.stdout)["chaos"]["tool_error_rates"] == {"service_status": 0.5}
