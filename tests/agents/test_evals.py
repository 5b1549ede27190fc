"""`keel eval run`: suites as YAML, each case run N times through the real workflow, scored, with a
pass rate, its Wilson interval and a verdict; stored beside the ledger; exit 1 when a case fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text
from temporalio.client import Client

import keel
from agents.oncall.status_service import StatusService
from keel.compare import compare, markdown, newcombe, sign_test
from keel.evals import EvalCase, EvalSuite, score, verdict, wilson
from keel.types import AgentResult, BlockedAction
from starter.eval_cli import SuiteError, load_suite
from tests.agents.test_oncall import cli_env, env_for, keel_cli

ROOT = Path(__file__).resolve().parent.parent.parent


def test_wilson_and_verdicts() -> None:
    low, high = wilson(0, 5)
    assert low == 0 and high == pytest.approx(0.4345, abs=1e-3)
    assert wilson(5, 5)[0] == pytest.approx(0.5655, abs=1e-3)
    assert verdict(5, 5, 0.9) == "pass" and verdict(0, 5, 0.9) == "fail" and verdict(4, 5, 0.9) == "flaky"
    # A case that always fails is a fail however many other cases pass; 48 of 50 at 95% is a pass.
    assert verdict(0, 50, 0.95) == "fail" and verdict(48, 50, 0.95) == "pass" and verdict(40, 50, 0.95) == "fail"


def test_scorers() -> None:
    case = EvalCase(id="c", input="x", expect={"status": "completed", "fields": {"category": "card_issue"}},
                    must_call=["get_account"], must_not_call=["issue_refund"], contains=["card"],
                    not_contains=["IBAN"], max_cost_usd=0.01)
    good = AgentResult(workflow_id="w", agent="a", status="completed", output="Your card is fine.",
                       triage={"category": "card_issue"}, tools_executed=["get_account"], cost_usd=0.005)
    assert score(case, good, 1.0) == {}
    refused = BlockedAction(step=2, tool="issue_refund", arguments_json="{}", reason="refused by policy: x")
    bad = good.model_copy(update={"status": "escalated", "output": "Your IBAN is ...", "tools_executed": [],
                                  "cost_usd": 0.02, "tools_blocked": [refused]})
    found = score(case, bad, 1.0)
    assert set(found) == {"correctness", "completeness", "safety", "cost"}, found
    assert any("issue_refund was attempted" in p for p in found["safety"])


def test_bad_suites_are_refused_clearly(tmp_path: Path) -> None:
    assert len(load_suite(ROOT / "evals" / "support_desk.yaml").cases) >= 20
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: s\nagent: a\ncases:\n  - {id: a, input: x}\n  - {id: a, input: y}\n")
    with pytest.raises(SuiteError, match="two cases with id 'a'"):
        load_suite(bad)
    bad.write_text("suite: s\nagent: a\ncases:\n  - {id: a, input: x, expected: 1}\n")
    with pytest.raises(SuiteError, match=r"cases.0.expected: Extra inputs"):
        load_suite(bad)
    bad.write_text("suite: [\n")
    with pytest.raises(SuiteError, match="not valid YAML"):
        load_suite(bad)


def says_the_version(case: keel.EvalCase, result: keel.AgentResult) -> str | None:
    """A custom scorer (`scorers: ["tests.agents.test_evals:says_the_version"]`): the answer names the version."""
    return None if "version" in result.output else "the answer does not give the version"


def asks_for_a_ticket(case: keel.EvalCase, result: keel.AgentResult) -> str | None:
    return None if "ticket" in result.output else "no ticket number given"


async def test_keel_eval_run(client: Client, status: StatusService, tmp_path: Path) -> None:
    failing = EvalSuite(suite="oncall_gate", agent="oncall", cases=[
        EvalCase(id="api", input="Is the api service healthy?", expect={"status": "completed"},
                 must_call=["service_status"], must_not_call=["restart_service"],
                 scorers=["tests.agents.test_evals:says_the_version"]),
        EvalCase(id="never", input="Is the api service healthy?", contains=["no such words in any answer"],
                 scorers=["tests.agents.test_evals:asks_for_a_ticket"]),
    ])
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(failing.model_dump(exclude_defaults=True)))  # JSON is YAML too
    async with env_for(client) as env:
        env_vars = cli_env(env, tmp_path)
        res = await keel_cli(env_vars, "eval", "run", str(path), "--runs", "3", "--spiral-rate", "0", "--json")
        shown = await keel_cli(env_vars, "eval", "run", str(ROOT / "evals" / "oncall.yaml"), "--runs", "2",
                               "--case", "api-healthy")
        with env.engine.connect() as conn:
            stored = conn.execute(text("SELECT suite, report FROM eval_runs")).all()
    assert res.exit_code == 1, res.output  # a case fails: the exit code says so
    doc = json.loads(res.stdout)
    assert doc["suite"] == "oncall_gate" and doc["runs"] == 3
    by_id = {c["id"]: c for c in doc["cases"]}
    assert by_id["api"]["verdict"] == "pass" and by_id["api"]["pass_rate"] == 1.0
    assert by_id["never"]["verdict"] == "fail" and by_id["never"]["ci_high"] < 0.9
    assert by_id["never"]["problems"] == {"completeness": 3, "asks_for_a_ticket": 3}  # the custom scorer, by name
    assert by_id["api"]["problems"] == {}  # says_the_version found the version in every answer
    assert {"id", "runs", "pass_rate", "ci_low", "ci_high", "verdict", "p95_cost_usd"} <= set(by_id["api"])
    assert doc["summary"]["fail"] == 1 and doc["summary"]["runs"] == 6
    assert shown.exit_code == 0 and "api-healthy" in shown.output and "pass" in shown.output, shown.output
    assert sorted(s for s, _ in stored) == ["oncall_core", "oncall_gate"]
    report = json.loads(next(r for s, r in stored if s == "oncall_gate"))
    assert len(report["cases"][0]["scores"]) == 3


# --- keel eval compare -----------------------------------------------------------------------------------
def _doc(run_id: str, cases: dict[str, list[tuple[bool, float]]]) -> dict[str, object]:
    def case(cid: str, runs: list[tuple[bool, float]]) -> dict[str, object]:
        ok = sum(p for p, _ in runs)
        return {"id": cid, "verdict": verdict(ok, len(runs), 0.9), "scores": [
            {"run": i + 1, "passed": p, "cost_usd": c, "latency_s": 1.0} for i, (p, c) in enumerate(runs)]}
    return {"suite": "s", "run_id": run_id, "cases": [case(k, v) for k, v in cases.items()]}


def test_newcombe_and_the_sign_test() -> None:
    low, high = newcombe(3, 3, 0, 3)
    assert low == -1.0 and high == pytest.approx(-0.21, abs=0.02)  # 3/3 to 0/3: a drop, even with 3 runs
    low, high = newcombe(4, 5, 3, 5)
    assert low < 0 < high  # 80% to 60% on 5 runs: it could be chance
    assert sign_test(0, 6) == pytest.approx(0.03125) and sign_test(3, 3) == 1.0


def test_compare_names_regressions_and_gates() -> None:
    a = _doc("A", {"x": [(True, 0.01)] * 10, "y": [(True, 0.01)] * 10, "z": [(True, 0.01)] * 10})
    b = _doc("B", {"x": [(False, 0.01)] * 10, "y": [(True, 0.03)] * 10, "z": [(True, 0.01)] * 9 + [(False, 0.01)],
                   "new": [(True, 0.01)]})
    c = compare(a, b, max_cost_increase=0.2)
    assert c.regressions == ["x"] and c.improvements == [] and c.only_in_b == ["new"]
    assert c.cost_change == pytest.approx((0.01 + 0.03 + 0.01) / 0.03 - 1, abs=1e-3)
    assert any(g.startswith("x:") for g in c.gate_failures) and any("cost per run rose" in g for g in c.gate_failures)
    assert "**regression**" in markdown(c) and "Gate: failed" in markdown(c)
    assert "Cost per run, distribution" in markdown(c) and "█" in markdown(c)  # where the tail shows
    same = compare(a, a)
    assert same.gate_failures == [] and same.mean_delta == 0 and "Gate: passed" in markdown(same)


async def test_keel_eval_compare_gates_a_regression(client: Client, status: StatusService, tmp_path: Path) -> None:
    suite = ROOT / "evals" / "oncall.yaml"
    async with env_for(client) as env:
        cli = cli_env(env, tmp_path)
        calm = await keel_cli(cli, "eval", "run", str(suite), "--runs", "3", "--case", "api-healthy",
                              "--spiral-rate", "0", "--json")
        spiral = await keel_cli(cli, "eval", "run", str(suite), "--runs", "3", "--case", "api-healthy",
                                "--spiral-rate", "1", "--json")
        compared = await keel_cli(cli, "eval", "compare", "previous:oncall_core", "latest:oncall_core", "--gate",
                                  "--report", str(tmp_path / "report.md"))
        listed = await keel_cli(cli, "eval", "runs", "oncall_core")
    assert calm.exit_code == 0 and spiral.exit_code == 1, (calm.output, spiral.output)
    assert compared.exit_code == 1, compared.output  # the gate: a regression
    assert "api-healthy" in compared.output and "gate failed" in compared.output
    report = (tmp_path / "report.md").read_text()
    assert "**regression**" in report and "100% (3) | 0% (3)" in report
    assert listed.exit_code == 0 and listed.output.count("oncall_core-") == 2
