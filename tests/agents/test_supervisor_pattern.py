"""The supervisor pattern over any registered agents: a worker's answer checked by rules (data, pure
code in the workflow) and a reviewer agent, sent back until it is accepted or `max_rounds` runs out,
under one parent budget; the rules themselves as unit and property tests."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import text
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer

import keel
from agents.oncall.agent import incident_note
from keel.supervision import Review, Rule, SupervisorInput, SupervisorResult, check_rule, field_value, violations
from keel.testing import AgentEnvironment, ScriptedModel, agent_environment, answer
from tests.agents.test_oncall import cli_env, keel_cli
from workers.worker import STRICT_SANDBOX
from workflows.registry import WORKFLOWS

PROMPTS = Path(__file__).parent / "prompts"


class Fix(BaseModel):
    service: str
    summary: str
    risk: int = Field(ge=0, le=10)


WRITER = keel.Agent(name="fix_writer", prompt=str(PROMPTS / "fix_writer.v1.md"), models="scripted:scripted",
                    budget=keel.Budget(max_tokens=2_000, max_usd=0.01), output_type=Fix)
REVIEWER = keel.Agent(name="fix_reviewer", prompt=str(PROMPTS / "fix_reviewer.v1.md"), models="scripted:scripted",
                      budget=keel.Budget(max_tokens=2_000, max_usd=0.01), output_type=Review)

RULES = [Rule(field="risk", op="max", value=3, message="the fix must be low risk"),
         Rule(field="service", op="one_of", value=["api", "search"]),
         Rule(field="summary", op="not_matches", value=r"(?i)\b(drop|delete)\b", message="no destructive steps")]
BUDGET = keel.Budget(max_tokens=10_000, max_usd=0.05)
REQUEST = "The api returns 502s since the last deploy. Propose a fix."


def fix(service: str = "api", summary: str = "Roll back the api to 2.14.0", risk: int = 2) -> Any:
    return answer(json.dumps({"service": service, "summary": summary, "risk": risk}))


def review(approved: bool, *issues: str) -> Any:
    return answer(json.dumps({"approved": approved, "issues": list(issues)}))


async def supervise(client: Client, model: ScriptedModel, home: Path, **fields: Any) -> tuple[Any, AgentEnvironment]:
    async with agent_environment(WRITER, REVIEWER, model=model, client=client, home=home) as env:
        fields = {"worker": "fix_writer", "reviewer": "fix_reviewer", "rules": RULES, "budget": BUDGET,
                  "key": uuid.uuid4().hex, **fields}
        res = await env.supervise(REQUEST, **fields)
    return res, env


def ledger(env: AgentEnvironment, parent: str) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        rows = conn.execute(text("SELECT workflow_id, kind, status, task_type, input_tokens + output_tokens AS tokens,"
                                 " cost_usd FROM ledger WHERE workflow_id = :p OR parent_workflow_id = :p "
                                 "ORDER BY workflow_id, step"), {"p": parent})
        return [dict(r._mapping) for r in rows]


def assert_family_books(env: AgentEnvironment, res: Any) -> None:
    """The family's usage is its children's, within the parent's budget, and the ledger agrees."""
    assert res.usage.tokens == sum(c.usage.tokens for c in res.children) == sum(r.tokens for r in res.results.values())
    assert res.usage.cost_usd == pytest.approx(sum(c.usage.cost_usd for c in res.children))
    assert res.usage.tokens <= BUDGET.max_tokens and res.usage.cost_usd <= (BUDGET.max_usd or 0)
    assert res.budget.used_tokens == res.usage.tokens and res.budget.reserved_tokens == 0
    rows = ledger(env, res.workflow_id)
    assert sum(r["tokens"] for r in rows if r["kind"] == "llm") == res.usage.tokens
    assert {r["workflow_id"] for r in rows if r["kind"] == "llm"} == {c.workflow_id for c in res.children}


def parent_outcome(env: AgentEnvironment, res: Any) -> dict[str, Any]:
    rows = [r for r in ledger(env, res.workflow_id) if r["workflow_id"] == res.workflow_id and r["kind"] == "outcome"]
    assert len(rows) == 1, rows
    return rows[0]


# --- the workflow, on a real dev server --------------------------------------------------------------
async def test_an_answer_within_the_rules_and_approved_completes_in_one_round(client: Client, tmp_path: Path) -> None:
    model = ScriptedModel([fix(), review(True)])
    res, env = await supervise(client, model, tmp_path)
    model.assert_all_used()
    assert res.status == "completed", res.reason
    assert [c.name for c in res.children] == ["worker-1", "reviewer-1"]
    assert [c.role for c in res.children] == ["worker", "reviewer"]
    assert len(res.rounds) == 1 and res.rounds[0].accepted and res.rounds[0].violations == []
    assert res.rounds[0].review == Review(approved=True)
    assert res.structured == {"service": "api", "summary": "Roll back the api to 2.14.0", "risk": 2}
    # The reviewer was given the worker's answer as its context.
    reviewer_call = model.calls[1]
    assert reviewer_call.workflow_id.endswith("/reviewer-1")
    assert any("Roll back the api to 2.14.0" in m.content for m in reviewer_call.messages)
    assert_family_books(env, res)
    outcome = parent_outcome(env, res)
    assert outcome["status"] == "resolved" and outcome["task_type"] == "supervisor"
    assert outcome["tokens"] == res.usage.tokens


async def test_an_answer_breaking_a_rule_goes_back_and_is_fixed_in_round_two(client: Client, tmp_path: Path) -> None:
    # Round 1 breaks two rules: no review is asked for; round 2 keeps them and is approved.
    model = ScriptedModel([fix(summary="Drop the api cache table", risk=7), fix(), review(True)])
    res, env = await supervise(client, model, tmp_path)
    model.assert_all_used()
    assert res.status == "completed", res.reason
    assert [c.name for c in res.children] == ["worker-1", "worker-2", "reviewer-2"]
    first, second = res.rounds
    assert not first.accepted and first.review is None and len(first.violations) == 2
    assert first.violations[0] == "the fix must be low risk (risk is 7, above the maximum 3)"
    assert first.violations[1].startswith("no destructive steps (summary contains 'Drop'")
    assert second.accepted and second.violations == [] and res.structured["risk"] == 2
    # The second worker was told its last answer and every violation.
    sent_back = " ".join(m.content for m in model.calls[1].messages)
    assert "Drop the api cache table" in sent_back and "above the maximum 3" in sent_back
    assert "no destructive steps" in sent_back
    assert any(d.kind == "send_back" for d in res.decisions)
    assert_family_books(env, res)
    # The parent's history replays deterministically (rules are pure code in the workflow).
    history = await client.get_workflow_handle(res.workflow_id).fetch_history()
    await Replayer(workflows=WORKFLOWS, workflow_runner=STRICT_SANDBOX,
                   data_converter=client.data_converter).replay_workflow(history)


async def test_a_review_that_is_not_approved_goes_back_with_its_issues(client: Client, tmp_path: Path) -> None:
    model = ScriptedModel([fix(summary="Restart the api"), review(False, "say which version to roll back to"),
                           fix(), review(True)])
    res, env = await supervise(client, model, tmp_path)
    model.assert_all_used()
    assert res.status == "completed", res.reason
    assert [c.name for c in res.children] == ["worker-1", "reviewer-1", "worker-2", "reviewer-2"]
    assert res.rounds[0].reasons == ["say which version to roll back to"]
    assert "say which version to roll back to" in " ".join(m.content for m in model.calls[2].messages)
    assert_family_books(env, res)


async def test_an_answer_never_fixed_escalates_after_max_rounds(client: Client, tmp_path: Path) -> None:
    model = ScriptedModel([fix(risk=9), fix(risk=8)])
    res, env = await supervise(client, model, tmp_path, max_rounds=2)
    model.assert_all_used()
    assert res.status == "escalated"
    assert [c.name for c in res.children] == ["worker-1", "worker-2"]
    assert [r.violations for r in res.rounds] == [["the fix must be low risk (risk is 9, above the maximum 3)"],
                                                  ["the fix must be low risk (risk is 8, above the maximum 3)"]]
    assert "no answer was accepted in 2 round(s)" in res.reason and "risk is 8, above the maximum 3" in res.reason
    assert res.output == "" and res.structured is None
    assert_family_books(env, res)
    outcome = parent_outcome(env, res)
    assert outcome["status"] == "escalated" and outcome["tokens"] == res.usage.tokens


async def test_a_reviewer_not_registered_is_rejected_before_any_child(client: Client, tmp_path: Path) -> None:
    model = ScriptedModel([])
    res, env = await supervise(client, model, tmp_path, reviewer="fix_auditor")
    assert res.status == "rejected"
    assert "no reviewer agent 'fix_auditor' is registered" in res.reason
    assert res.children == [] and res.rounds == [] and model.calls == []
    assert res.usage.tokens == 0
    assert parent_outcome(env, res)["status"] == "rejected"


async def test_a_reviewer_that_does_not_answer_a_review_is_rejected(client: Client, tmp_path: Path) -> None:
    model = ScriptedModel([])
    res, _ = await supervise(client, model, tmp_path, reviewer="fix_writer", worker="no_such_agent")
    assert res.status == "rejected"
    assert "no worker agent 'no_such_agent' is registered" in res.reason
    assert "the reviewer agent 'fix_writer' must answer a keel.supervision.Review" in res.reason
    assert res.children == [] and model.calls == []


# --- the rules, pure code ------------------------------------------------------------------------------
def test_rules_read_the_text_or_a_path_of_the_structured_answer() -> None:
    structured = {"risk": 4, "actions": [{"service": "api"}, {"service": "db"}], "note": None}
    assert field_value("", "the text", structured) == "the text"
    assert field_value("actions.1.service", "", structured) == "db"
    assert check_rule(Rule(field="actions.2.service", op="equals", value="x"), "", structured) == \
        "actions.2.service is missing from the answer"
    assert check_rule(Rule(field="risk", op="equals", value=4), "", None) == "risk is missing from the answer"
    # Lengths for texts and lists; numbers as they are.
    assert check_rule(Rule(op="max", value=5), "too long", None) == \
        "the answer's text has length 8, above the maximum 5"
    assert check_rule(Rule(field="actions", op="min", value=3), "", structured) == \
        "actions has length 2, below the minimum 3"
    assert check_rule(Rule(field="note", op="max", value=3), "", structured) == \
        "note is null, not a number or something with a length"
    # JSON equality: True is not 1, 4 is 4.0.
    assert check_rule(Rule(field="risk", op="equals", value=4.0), "", structured) is None
    assert check_rule(Rule(field="risk", op="equals", value=True), "", structured) is not None
    assert check_rule(Rule(field="risk", op="one_of", value=[1, 2, 3]), "", structured) == \
        "risk is 4, not one of 1, 2, 3"
    assert check_rule(Rule(op="matches", value=r"\d+\.\d+"), "roll back to 2.14", None) is None
    assert check_rule(Rule(op="not_equals", value="ok"), "ok", None) == "the answer's text must not be 'ok'"
    assert violations([Rule(op="matches", value="rollback", message="say rollback"),
                       Rule(op="max", value=100)], "restart it", None) == \
        ["say rollback (the answer's text does not match 'rollback')"]


def test_rules_are_checked_when_they_are_made() -> None:
    for bad in ({"op": "max", "value": "3"}, {"op": "min", "value": True}, {"op": "one_of", "value": []},
                {"op": "matches", "value": "("}, {"op": "matches", "value": 3}, {"op": "equals", "field": "a..b"},
                {"op": "between", "value": 1}):
        with pytest.raises(ValidationError):
            Rule.model_validate(bad)
    with pytest.raises(ValidationError, match="needs `rules` or a `reviewer`"):
        SupervisorInput(input="x", worker="fix_writer")
    # Rules are data: they survive the trip through a workflow's input.
    inp = SupervisorInput(input="x", worker="fix_writer", rules=RULES)
    assert SupervisorInput.model_validate_json(inp.model_dump_json()) == inp


numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6, allow_nan=False))


@given(value=numbers, limit=numbers)
def test_max_and_min_hold_exactly_at_the_limit(value: float, limit: float) -> None:
    s = {"x": value}
    assert (check_rule(Rule(field="x", op="max", value=limit), "", s) is None) == (value <= limit)
    assert (check_rule(Rule(field="x", op="min", value=limit), "", s) is None) == (value >= limit)


keys = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
json_values = st.recursive(st.none() | st.booleans() | numbers | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                           max_leaves=10)


@given(path=st.lists(keys, min_size=1, max_size=4), value=json_values)
def test_a_path_finds_the_value_it_names(path: list[str], value: Any) -> None:
    structured: Any = value
    for k in reversed(path):
        structured = {k: structured}
    assert field_value(".".join(path), "", structured) == value
    assert check_rule(Rule(field=".".join(path), op="equals", value=value), "", structured) is None


@given(structured=st.dictionaries(keys, json_values, max_size=4), text_=st.text(max_size=50),
       field=st.sampled_from(["", "a", "a.b", "a.0", "risk"]))
def test_checking_any_answer_never_raises(structured: dict[str, Any], text_: str, field: str) -> None:
    rules = [Rule(field=field, op=op, value=v) for op, v in
             (("max", 3), ("min", 1), ("equals", 1), ("not_equals", "x"), ("one_of", [1, "a"]),
              ("matches", "a"), ("not_matches", "b"))]
    out = violations(rules, text_, structured)
    assert all(isinstance(v, str) and v for v in out)


async def test_a_parent_budget_too_small_for_a_worker_ends_budget_exceeded(client: Client, tmp_path: Path) -> None:
    model = ScriptedModel([])
    res, env = await supervise(client, model, tmp_path, budget=keel.Budget(max_tokens=400, max_usd=0.05))
    assert res.status == "budget_exceeded"
    assert "round 1: the worker did not run to its end: not_started" in res.reason
    assert [(c.name, c.status) for c in res.children] == [("worker-1", "not_started")]
    assert model.calls == [] and res.usage.tokens == 0
    assert parent_outcome(env, res)["status"] == "budget_exceeded"


async def test_keel_supervise_on_the_command_line(client: Client, tmp_path: Path) -> None:
    # The incident note (generic sim) answers severity "none": a rule wanting "major" is never met.
    ok_rule = json.dumps({"field": "severity", "op": "one_of", "value": ["none", "minor"]})
    bad_rule = json.dumps({"field": "severity", "op": "equals", "value": "major", "message": "say major"})
    async with agent_environment(incident_note, client=client, home=tmp_path) as env:
        ok = await keel_cli(cli_env(env, tmp_path), "supervise", "Write the note", "--worker", "incident_note",
                            "--rule", ok_rule, "--json")
        bad = await keel_cli(cli_env(env, tmp_path), "supervise", "Write the note", "--worker", "incident_note",
                             "--rule", bad_rule, "--max-rounds", "2", "--json")
        refused = await keel_cli(cli_env(env, tmp_path), "supervise", "x", "--worker", "incident_note",
                                 "--rule", '{"field": "severity", "op": "bigger"}')
    assert ok.exit_code == 0, ok.output
    res = SupervisorResult.model_validate_json(ok.output.strip().splitlines()[-1])
    assert res.status == "completed" and len(res.rounds) == 1
    res = SupervisorResult.model_validate_json(bad.output.strip().splitlines()[-1])
    assert res.status == "escalated" and len(res.rounds) == 2 and "say major" in res.reason
    assert refused.exit_code == 2


# --- rules that run a check the worker agent declares (op="check") -------------------------------------
def version_named(out: keel.FinalOutput) -> str | None:
    """A deterministic check of the writer's answer: a rollback names the version it goes back to."""
    assert isinstance(out.structured, Fix)  # the structured answer arrives as the agent's output_type
    if "roll back" in out.structured.summary.lower() and not re.search(r"\d+\.\d+", out.structured.summary):
        return f"the rollback of {out.structured.service} names no version"
    return None


def broken_check(out: keel.FinalOutput) -> None:
    raise RuntimeError("the check has a bug")


CHECKED_WRITER = keel.Agent(name="fix_writer_checked", prompt=str(PROMPTS / "fix_writer.v1.md"),
                            models="scripted:scripted", budget=keel.Budget(max_tokens=2_000, max_usd=0.01),
                            output_type=Fix, checks={"version_named": version_named, "broken": broken_check})


def test_a_check_rule_runs_the_named_check_on_the_answer() -> None:
    rule = Rule(op="check", value="version_named", message="say the version")
    checks = {"version_named": lambda text, s: ["no version", "and no date"] if "2." not in text else None}
    assert violations([rule, Rule(field="risk", op="max", value=3)], "roll back", {"risk": 5}, checks) == [
        "say the version (no version)", "say the version (and no date)", "risk is 5, above the maximum 3"]
    assert violations([rule], "roll back to 2.14", None, checks) == []
    with pytest.raises(KeyError, match="declares no check 'other'"):
        violations([Rule(op="check", value="other")], "x", None, checks)
    with pytest.raises(ValueError, match="use violations"):
        check_rule(rule, "x", None)
    for bad in ({"op": "check"}, {"op": "check", "value": ""}, {"op": "check", "value": "x", "field": "risk"}):
        with pytest.raises(ValidationError, match="needs the name of a check"):
            Rule.model_validate(bad)


async def test_an_answer_failing_the_workers_check_goes_back_and_is_fixed(client: Client, tmp_path: Path) -> None:
    model = ScriptedModel([fix(summary="Roll back the api"), fix(), review(True)])
    async with agent_environment(CHECKED_WRITER, REVIEWER, model=model, client=client, home=tmp_path) as env:
        res = await env.supervise(REQUEST, worker="fix_writer_checked", reviewer="fix_reviewer", budget=BUDGET,
                                  rules=[Rule(op="check", value="version_named")], key=uuid.uuid4().hex)
    model.assert_all_used()
    assert res.status == "completed", res.reason
    assert res.rounds[0].violations == ["the rollback of api names no version"] and res.rounds[0].review is None
    assert "the rollback of api names no version" in " ".join(m.content for m in model.calls[1].messages)
    assert res.rounds[1].accepted and res.structured["summary"] == "Roll back the api to 2.14.0"


async def test_a_check_that_raises_fails_the_supervision_with_its_error(client: Client, tmp_path: Path) -> None:
    model = ScriptedModel([fix()])
    async with agent_environment(CHECKED_WRITER, REVIEWER, model=model, client=client, home=tmp_path) as env:
        with pytest.raises(WorkflowFailureError) as e:
            await env.supervise(REQUEST, worker="fix_writer_checked", budget=BUDGET,
                                rules=[Rule(op="check", value="broken")], key=uuid.uuid4().hex)
    assert isinstance(e.value.cause, ApplicationError) and e.value.cause.type == "AgentConfigError"
    assert "a check of the supervision's rules raised RuntimeError: the check has a bug" in str(e.value.cause)
