"""The disaster-recovery planner on the generic supervisor (agents/dr_plan): the planner drafts, the
runbook's rules (named checks of the planner) send a plan that breaks one back, the reviewer reviews a
plan that keeps them, until one is accepted or the rounds run out (then a human). Workflow tests run
on the dev server with a real worker, the SQLite ledger and the sim model (agents/dr_plan/sim.py);
unit and property tests cover the rule checker (agents/dr_plan/runbooks.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import text
from temporalio.client import Client
from temporalio.worker import Replayer

import keel
from agents.dr_plan import AGENTS, Plan, supervision
from agents.dr_plan.agent import dr_planner, get_service_status, lookup_runbook, rules_for
from agents.dr_plan.runbooks import DESTRUCTIVE, RULES, SERVICES, PlanStep, StepMatch, StepRule, check_plan
from agents.dr_plan.runbooks import rules_for as runbook_rules
from agents.dr_plan.sim import draft
from keel.supervision import SupervisorResult
from keel.testing import AgentEnvironment, agent_environment
from tests.agents.test_oncall import cli_env, keel_cli
from workers.worker import STRICT_SANDBOX
from workflows.registry import WORKFLOWS

SCENARIO = "payments-db primary in eu-west-1 is down: storage controller failure, card payments failing"


async def plan(env: AgentEnvironment, scenario: str = SCENARIO, topic: str = "database_failover", **kw: Any) -> Any:
    inp = supervision(scenario, topic, key=kw.pop("key", "t"), **kw)
    return await env.supervise(inp.input, **inp.model_dump(exclude={"input"}))


def ledger(env: AgentEnvironment, parent: str) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        rows = conn.execute(text("SELECT workflow_id, kind, status, task_type, input_tokens + output_tokens AS tokens,"
                                 " cost_usd FROM ledger WHERE workflow_id = :p OR parent_workflow_id = :p "
                                 "ORDER BY workflow_id, step"), {"p": parent})
        return [dict(r._mapping) for r in rows]


def human_queue(env: AgentEnvironment, workflow_id: str) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM human_queue WHERE workflow_id = :w"), {"w": workflow_id})
        return [dict(r._mapping) for r in rows]


def steps_of(structured: dict[str, Any] | None) -> list[PlanStep]:
    assert structured is not None
    return Plan.model_validate(structured).steps


# --- the supervision, on a real dev server -------------------------------------------------------------
async def test_a_rule_violation_goes_back_then_the_reviewer_then_accepted(client: Client, tmp_path: Path) -> None:
    # Seed 1: the first draft misses the snapshot before the promotion (a rule) and names no verification
    # for its cutover (only the reviewer sees that).
    async with agent_environment(*AGENTS, client=client, home=tmp_path) as env:
        res = await plan(env, sim_seed=1, key="seed1")
    assert res.status == "completed", res.reason
    assert [c.name for c in res.children] == ["worker-1", "worker-2", "reviewer-2", "worker-3", "reviewer-3"]
    first, second, third = res.rounds
    # Round 1: the rule sends it back; an unsafe plan is never even reviewed.
    assert len(first.violations) == 1 and first.violations[0].startswith("[snapshot_before_promote] step 4")
    assert first.review is None and not first.accepted
    # Round 2: the planner fixed exactly that; the rules pass, the reviewer finds the missing verification.
    actions = [s.action for s in steps_of(second.structured)]
    assert actions.index("snapshot") == actions.index("promote") - 1
    assert second.violations == [] and second.review is not None and not second.review.approved
    assert any("no verification" in i and "dns_cutover" in i for i in second.review.issues)
    # Round 3: fixed, every rule passes, approved; the accepted plan is the result.
    assert third.accepted and third.violations == [] and third.review == keel.Review(approved=True)
    assert res.structured == third.structured and all(s.verify for s in steps_of(res.structured))
    assert check_plan(steps_of(res.structured), runbook_rules("database_failover"), SERVICES) == []
    # The family's books: within the parent's budget, every child's usage on the ledger.
    assert res.usage.tokens == sum(c.usage.tokens for c in res.children) <= 40_000
    assert res.budget.used_tokens == res.usage.tokens and res.budget.reserved_tokens == 0
    rows = ledger(env, res.workflow_id)
    assert sum(r["tokens"] for r in rows if r["kind"] == "llm") == res.usage.tokens
    outcome = [r for r in rows if r["workflow_id"] == res.workflow_id and r["kind"] == "outcome"]
    assert [(o["status"], o["task_type"]) for o in outcome] == [("resolved", "dr_plan")]
    assert human_queue(env, res.workflow_id) == []
    # The parent's history replays (the rules run as pure code in the workflow).
    history = await client.get_workflow_handle(res.workflow_id).fetch_history()
    await Replayer(workflows=WORKFLOWS, workflow_runner=STRICT_SANDBOX,
                   data_converter=client.data_converter).replay_workflow(history)


async def test_the_planner_is_told_its_plan_and_every_violation(client: Client, tmp_path: Path) -> None:
    async with agent_environment(*AGENTS, client=client, home=tmp_path) as env:
        res = await plan(env, sim_seed=0, key="seed0")
        worker2 = res.results["worker-2"].workflow_id
        events = client.get_workflow_handle(worker2).fetch_history_events()
        started = await anext(aiter(events))
    assert res.status == "completed" and len(res.rounds) == 2, res.reason
    context = json.loads(started.workflow_execution_started_event_attributes.input.payloads[0].data)["context"]
    assert context[0].startswith("Your previous answer (round 1): {")
    assert "[snapshot_before_promote] step 4" in context[1]
    # A planner round reads the status and the runbook, then answers: three model calls.
    assert res.results["worker-1"].tools_executed == ["get_service_status", "lookup_runbook"]
    assert res.results["worker-1"].llm_calls == 3 and res.results["reviewer-2"].llm_calls == 1


async def test_no_plan_accepted_in_max_rounds_goes_to_a_human(client: Client, tmp_path: Path) -> None:
    async with agent_environment(*AGENTS, client=client, home=tmp_path) as env:
        res = await plan(env, max_rounds=1, key="one-round")
    assert res.status == "escalated" and len(res.rounds) == 1
    assert "no answer was accepted in 1 round(s)" in res.reason and "snapshot_before_promote" in res.reason
    assert res.output == "" and res.structured is None  # an unsafe plan is never the result
    queued = human_queue(env, res.workflow_id)
    assert len(queued) == 1 and "snapshot_before_promote" in queued[0]["reason"]


async def test_an_unsafe_promotion_that_cannot_be_fixed_is_never_approved(client: Client, tmp_path: Path) -> None:
    # cards-db's only replica is degraded and 95 s behind: no plan can keep the rule; the rounds run out.
    async with agent_environment(*AGENTS, client=client, home=tmp_path) as env:
        res = await plan(env, "cards-db primary in eu-central-1 is degraded; fail it over", key="cards")
    assert res.status == "escalated" and len(res.rounds) == 3
    for r in res.rounds:
        assert not r.accepted and r.review is None
        assert any(v.startswith("[promote_healthy_replica]") and "cards-db-eu-west" in v for v in r.violations)
    assert res.structured is None and len(human_queue(env, res.workflow_id)) == 1


async def test_a_budget_too_small_ends_budget_exceeded(client: Client, tmp_path: Path) -> None:
    async with agent_environment(*AGENTS, client=client, home=tmp_path) as env:
        res = await plan(env, budget=keel.Budget(max_tokens=300, max_usd=0.25), key="poor")
    assert res.status == "budget_exceeded" and res.usage.tokens == 0
    assert [(c.name, c.status) for c in res.children] == [("worker-1", "not_started")]


async def test_a_rule_naming_a_check_the_planner_lacks_is_refused(client: Client, tmp_path: Path) -> None:
    async with agent_environment(*AGENTS, client=client, home=tmp_path) as env:
        inp = supervision(SCENARIO, key="nocheck")
        res = await env.supervise(inp.input, **inp.model_dump(exclude={"input", "rules"}),
                                  rules=[keel.Rule(op="check", value="no_such_rule")])
    assert res.status == "rejected" and res.children == []
    assert "the worker agent 'dr_planner' declares no check 'no_such_rule'" in res.reason


async def test_keel_plan_on_the_command_line(client: Client, tmp_path: Path) -> None:
    async with agent_environment(*AGENTS, client=client, home=tmp_path) as env:
        out = await keel_cli(cli_env(env, tmp_path), "plan", SCENARIO, "--sim-seed", "1", "--key", "cli")
        js = await keel_cli(cli_env(env, tmp_path), "plan", SCENARIO, "--max-rounds", "1", "--json")
        bad = await keel_cli(cli_env(env, tmp_path), "plan", "db down", "--runbook", "nope")
    assert out.exit_code == 0, out.output
    assert "started dr_plan-cli" in out.output and "/workflows/dr_plan-cli" in out.output
    assert "round 1" in out.output and "[snapshot_before_promote] step 4" in out.output
    assert "reviewer: not approved" in out.output and "no verification" in out.output
    assert "accepted plan" in out.output and "accepted:" in out.output and "review overhead" in out.output
    assert js.exit_code == 0, js.output
    doc = SupervisorResult.model_validate_json(js.output)
    assert doc.status == "escalated" and len(doc.rounds) == 1
    assert bad.exit_code == 2 and "unknown runbook 'nope'" in bad.output


# --- the tools --------------------------------------------------------------------------------------------
def _ctx() -> keel.ToolContext:
    return keel.ToolContext(agent="dr_planner", tool="t", workflow_id="w", step=1, idempotency_key="w/1", attempt=1,
                            tenant="internal", key="")


def test_the_tools_answer_from_the_shipped_data() -> None:
    every = get_service_status.fn(_ctx(), get_service_status.args())
    cluster = get_service_status.fn(_ctx(), get_service_status.args(service="payments-db"))
    assert len(every["services"]) == len(SERVICES) and every["max_promote_lag_s"] == 30
    assert {x["name"] for x in cluster["services"]} == {
        "payments-db-eu-west", "payments-db-eu-central", "payments-db-eu-west-r2"}
    with pytest.raises(keel.ToolError, match=r"unknown service 'mainframe'.*card-auth-eu-west"):
        get_service_status.fn(_ctx(), get_service_status.args(service="mainframe"))
    book = lookup_runbook.fn(_ctx(), lookup_runbook.args(topic="Database Failover"))
    assert book["topic"] == "database_failover" and book["steps"]
    assert [r["id"] for r in book["rules"]] == [r.id for r in runbook_rules("database_failover")]
    with pytest.raises(keel.ToolError, match="known topics: database_failover, dns_cutover, region_evacuation"):
        lookup_runbook.fn(_ctx(), lookup_runbook.args(topic="alien_invasion"))


def test_a_runbooks_rules_are_supervision_rules_by_name() -> None:
    assert [r.value for r in rules_for("dns_cutover")] == ["notify_first", "no_destructive_on_data",
                                                            "rollback_named", "health_check_after_cutover"]
    assert all(r.op == "check" and r.value in dr_planner.checks for r in rules_for("database_failover"))
    with pytest.raises(ValueError, match="unknown runbook 'nope'"):
        supervision("db down", "nope")
    with pytest.raises(ValueError, match="the scenario is empty"):
        supervision("  ")


def test_the_planners_checks_find_each_violation() -> None:
    flawed = Plan(summary="s", steps=[PlanStep.model_validate(s) for s in draft("database_failover", SCENARIO,
                                                                               SERVICES, flawed=True)])
    out = keel.FinalOutput(text=flawed.model_dump_json(), structured=flawed, input="x", tenant="t", executed=())
    found = {name: check(out) for name, check in dr_planner.checks.items()}
    assert {k: v for k, v in found.items() if v} == {
        "snapshot_before_promote": ["[snapshot_before_promote] step 4: no snapshot/backup of payments-db before "
                                    "'promote payments-db-eu-central'"]}


# --- the rule checker (pure) ------------------------------------------------------------------------------
GOOD = [PlanStep.model_validate(s) for s in draft("database_failover", SCENARIO, SERVICES, flawed=False)]
ALL = list(RULES)


def _rules(violations: list[Any]) -> list[str]:
    return [v.rule for v in violations]


def _replace(steps: list[PlanStep], i: int, **changes: str) -> list[PlanStep]:
    out = list(steps)
    out[i] = out[i].model_copy(update=changes)
    return out


def _index(steps: list[PlanStep], action: str) -> int:
    return next(i for i, s in enumerate(steps) if s.action == action)


@pytest.mark.parametrize("topic", ["database_failover", "region_evacuation", "dns_cutover"])
def test_good_plans_pass_every_rule(topic: str) -> None:
    steps = [PlanStep.model_validate(s) for s in draft(topic, SCENARIO, SERVICES, flawed=False)]
    assert check_plan(steps, ALL, SERVICES) == []


@pytest.mark.parametrize("topic, rule", [("database_failover", "snapshot_before_promote"),
                                         ("region_evacuation", "snapshot_before_promote"),
                                         ("dns_cutover", "health_check_after_cutover")])
def test_first_drafts_have_their_runbooks_usual_mistake(topic: str, rule: str) -> None:
    steps = [PlanStep.model_validate(s) for s in draft(topic, SCENARIO, SERVICES, flawed=True)]
    assert set(_rules(check_plan(steps, runbook_rules(topic), SERVICES))) == {rule}


def test_notify_first() -> None:
    moved = [*GOOD[1:], GOOD[0]]
    assert [(v.rule, v.step) for v in check_plan(moved, ALL, SERVICES)] == [("notify_first", 1)]
    wrong_channel = _replace(GOOD, 0, target="#general", detail="Heads up: failing over.")
    assert _rules(check_plan(wrong_channel, ALL, SERVICES)) == ["notify_first"]
    assert _rules(check_plan([], ALL, SERVICES)) == ["notify_first"]


def test_snapshot_before_promote() -> None:
    snap, promote = _index(GOOD, "snapshot"), _index(GOOD, "promote")
    without = GOOD[:snap] + GOOD[snap + 1:]
    assert [(v.rule, v.step) for v in check_plan(without, ALL, SERVICES)] == [("snapshot_before_promote", promote)]
    after = [*without[:promote], GOOD[snap], *without[promote:]]  # the snapshot after the promotion
    assert _rules(check_plan(after, ALL, SERVICES)) == ["snapshot_before_promote"]
    other_db = _replace(GOOD, snap, target="ledger-db-eu-central")  # a snapshot of another cluster
    assert _rules(check_plan(other_db, ALL, SERVICES)) == ["snapshot_before_promote"]
    cluster_backup = _replace(GOOD, snap, action="backup", target="payments-db")  # the whole cluster counts
    assert check_plan(cluster_backup, ALL, SERVICES) == []


def test_no_destructive_action_on_production_data() -> None:
    drop = PlanStep(action="drop_table", target="ledger-db-eu-west", detail="drop the stale journal",
                    rollback="restore from backup", verify="table gone")
    steps = [*GOOD[:3], drop, *GOOD[3:]]
    assert [(v.rule, v.step) for v in check_plan(steps, ALL, SERVICES)] == [("no_destructive_on_data", 4)]
    unknown = [*GOOD, drop.model_copy(update={"action": "wipe", "target": "old-payments-volume"})]
    assert _rules(check_plan(unknown, ALL, SERVICES)) == ["no_destructive_on_data"]  # unknown: assumed data
    harmless = [*GOOD, drop.model_copy(update={"action": "purge_cache", "target": "dns"})]
    assert check_plan(harmless, ALL, SERVICES) == []  # DNS holds no production data
    assert check_plan(_replace(GOOD, 0, detail=GOOD[0].detail + " Do not delete the old primary."), ALL,
                      SERVICES) == []


@pytest.mark.parametrize("missing", ["", "  ", "n/a", "None", "TBD."])
def test_every_step_names_a_rollback(missing: str) -> None:
    i = _index(GOOD, "dns_cutover")
    violations = check_plan(_replace(GOOD, i, rollback=missing), ALL, SERVICES)
    assert [(v.rule, v.step) for v in violations] == [("rollback_named", i + 1)]


def test_cutover_is_followed_by_a_health_check() -> None:
    hc = _index(GOOD, "health_check")
    without = GOOD[:hc] + GOOD[hc + 1:]
    cut = _index(without, "dns_cutover")
    assert [(v.rule, v.step) for v in check_plan(without, ALL, SERVICES)] == [("health_check_after_cutover", cut + 1)]
    last = [*GOOD, PlanStep(action="shift_traffic", target="dns", detail="move api", rollback="move back",
                            verify="resolves")]
    assert _rules(check_plan(last, ALL, SERVICES)) == ["health_check_after_cutover"]


@pytest.mark.parametrize("target, why", [
    ("payments-db-eu-west-r2", "is degraded"),  # degraded, 310 s behind
    ("payments-db-eu-west", "is a primary"),
    ("payments-db", "is a cluster"),
    ("payments-db-eu-nowhere", "no known service"),
    ("cards-db-eu-west", "is degraded"),
])
def test_promoted_replica_must_be_healthy_and_close(target: str, why: str) -> None:
    p = _index(GOOD, "promote")
    steps = _replace(GOOD, p, target=target)
    steps = _replace(steps, p - 1, target=target)  # its snapshot follows it, so only this rule can fail
    found = [v for v in check_plan(steps, ALL, SERVICES) if v.rule == "promote_healthy_replica"]
    assert len(found) == 1 and found[0].step == p + 1 and why in found[0].message


def test_lag_limit_comes_from_the_service_status() -> None:
    lagging = [s.model_copy(update={"lag_s": 31.0}) if s.name == "payments-db-eu-central" else s for s in SERVICES]
    violations = check_plan(GOOD, ALL, lagging)
    assert _rules(violations) == ["promote_healthy_replica"] and "lags 31 s" in violations[0].message


def test_adding_a_rule_is_data() -> None:
    no_restart = StepRule(id="no_restart_of_primary", description="Never restart a database primary mid-incident.",
                          check="never", when=StepMatch(actions=["restart", "reboot"], target_kinds=["database"]))
    steps = [*GOOD, PlanStep(action="reboot", target="ledger-db-eu-west", rollback="none possible", verify="up")]
    assert _rules(check_plan(steps, [*ALL, no_restart], SERVICES)) == ["no_restart_of_primary"]


@hypothesis.given(st.data())
@hypothesis.settings(max_examples=60, deadline=None)
def test_property_blank_rollbacks_are_each_caught(data: st.DataObject) -> None:
    blanks = data.draw(st.sets(st.integers(0, len(GOOD) - 1)))
    steps = [s.model_copy(update={"rollback": ""}) if i in blanks else s for i, s in enumerate(GOOD)]
    violations = check_plan(steps, ALL, SERVICES)
    assert {v.step for v in violations if v.rule == "rollback_named"} == {i + 1 for i in blanks}
    assert all(v.rule == "rollback_named" for v in violations)


@hypothesis.given(st.data())
@hypothesis.settings(max_examples=60, deadline=None)
def test_property_destructive_steps_on_data_are_always_caught(data: st.DataObject) -> None:
    verb = data.draw(st.sampled_from(DESTRUCTIVE))
    suffix = data.draw(st.sampled_from(["", "_table", " rows", "-volume"]))
    target = data.draw(st.sampled_from([s.name for s in SERVICES if s.holds_data] + ["payments-db", "ledger-db"]))
    at = data.draw(st.integers(1, len(GOOD)))
    step = PlanStep(action=f"{verb.upper() if data.draw(st.booleans()) else verb}{suffix}", target=target,
                    detail="cleanup", rollback="restore from the snapshot", verify="gone")
    steps = [*GOOD[:at], step, *GOOD[at:]]
    violations = check_plan(steps, ALL, SERVICES)
    # (Inserted right after the cutover, it also separates the cutover from its health check.)
    assert [(v.rule, v.step) for v in violations if v.rule != "health_check_after_cutover"] == [
        ("no_destructive_on_data", at + 1)]


@hypothesis.given(st.permutations(GOOD))
@hypothesis.settings(max_examples=40, deadline=None)
def test_property_checker_is_deterministic_and_ordered(steps: list[PlanStep]) -> None:
    a, b = check_plan(steps, ALL, SERVICES), check_plan(list(steps), ALL, SERVICES)
    assert a == b
    order = {r.id: k for k, r in enumerate(ALL)}
    assert [(v.step, order[v.rule]) for v in a] == sorted((v.step, order[v.rule]) for v in a)
    assert (steps[0].action == "notify") == ("notify_first" not in _rules(a))
