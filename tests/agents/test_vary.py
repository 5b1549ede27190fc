"""`keel vary`: one input N times through the real workflow, each run sorted into benign, cost, outcome
or catastrophic variance (keel/vary.py), and the sorting itself on known results."""

from __future__ import annotations

import json
from pathlib import Path

from temporalio.client import Client

from agents.oncall.status_service import StatusService
from keel.types import AgentResult, BlockedAction, BudgetReport
from keel.vary import classify
from tests.agents.test_oncall import cli_env, env_for, keel_cli

ONCALL_SUITE = Path(__file__).resolve().parent.parent.parent / "evals" / "oncall.yaml"


def _r(i: int, status: str = "completed", tools: tuple[str, ...] = ("service_status",), cost: float = 0.01,
       **kw: object) -> AgentResult:
    return AgentResult.model_validate({"workflow_id": f"w-{i}", "agent": "a", "status": status,
                                       "tools_executed": list(tools), "cost_usd": cost, **kw})


def test_each_kind_of_variance() -> None:
    runs = [
        _r(0), _r(1), _r(2, tools=("service_status", "service_status")),            # benign: the usual path, another
        _r(3, cost=0.05),                                                           # cost: 5x the cheapest
        _r(4, status="escalated"),                                                  # outcome
        _r(5, status="budget_exceeded", reason="token budget exceeded"),            # catastrophic: kill switch
        _r(6, tools_blocked=[BlockedAction(step=2, tool="delete_db", arguments_json="{}",
                                           reason="unknown tool 'delete_db'; available tools: []")]),
        _r(7, tools_blocked=[BlockedAction(step=2, tool="restart_service", arguments_json="{}",
                                           reason="refused by policy: not during business hours")]),
        _r(8, budget=BudgetReport(limit_hit="steps")),                             # a loop: the step cap
    ]
    report = classify(runs)
    assert [r.kind for r in report.runs] == ["benign", "benign", "benign", "cost", "outcome", "catastrophic",
                                            "catastrophic", "catastrophic", "catastrophic"]
    assert report.runs[2].why == "another path, same outcome" and report.runs[0].why == "the usual path"
    assert "hallucinated tool delete_db" in report.runs[6].why and "forbidden" in report.runs[7].why
    assert report.kinds == {"benign": 3, "cost": 1, "outcome": 1, "catastrophic": 4}
    assert report.modal_outcome == "completed" and report.cost_spread == 5.0


async def test_keel_vary_runs_an_input_n_times(client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client) as env:
        # Spirals on half the runs (the sim's seed differs per run): the same answer at several times the cost.
        res = await keel_cli(cli_env(env, tmp_path), "vary", "oncall", "Is the api service healthy?", "--runs", "8",
                             "--spiral-rate", "0.5", "--json")
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.stdout)
    assert len(doc["runs"]) == 8 and sum(doc["kinds"].values()) == 8
    assert len({r["workflow_id"] for r in doc["runs"]}) == 8
    assert doc["kinds"]["benign"] >= 1 and doc["modal_outcome"].startswith("completed")
    assert all(r["path"] for r in doc["runs"] if r["kind"] == "benign")


async def test_keel_vary_a_suite_case(client: Client, status: StatusService, tmp_path: Path) -> None:
    suite = str(ONCALL_SUITE)
    async with env_for(client) as env:
        res = await keel_cli(cli_env(env, tmp_path), "vary", "--suite", suite, "--case", "api-healthy", "--runs", "3",
                             "--spiral-rate", "0", "--json")
        bad = await keel_cli(cli_env(env, tmp_path), "vary", "--suite", suite, "--case", "nope")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["agent"] == "oncall" and doc["input"] == "Is the api service healthy?" and doc["kinds"]["benign"] == 3
    assert bad.exit_code == 2 and "api-healthy" in bad.output
