"""The supervisor pattern (SupervisedPlanWorkflow, disaster recovery): a worker child drafts a plan, the
supervisor checks it against the runbook's rules and reviews it, then accepts, revises or escalates.

Workflow tests run on the dev server with a real worker, the real SQLite ledger and the sim model
(see activities/providers/sim_dr.py for what its worker and reviewer do); unit tests cover the rule
checker (keel.runbooks) and the parsing and decisions (keel.supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, Worker

from activities.db import LedgerRow
from activities.ledger import Ledger
from activities.providers.sim_dr import draft
from activities.tools import human_queue, reports
from keel import names
from keel.runbooks import (
    DESTRUCTIVE,
    RULES,
    SERVICES,
    PlanStep,
    check_plan,
    rules_for,
)
from keel.settings import KeelSettings
from keel.supervisor import (
    INVALID_PLAN,
    ReviewVerdict,
    SupervisedPlanInput,
    SupervisedPlanResult,
    decide_round,
    parse_plan,
    parse_verdict,
)
from keel.types import SimConfig, TaskUsage
from starter import patterns
from workers.worker import SANDBOX
from workflows.registry import WORKFLOWS

WorkerFactory = Callable[..., contextlib.AbstractAsyncContextManager[Worker]]
SCENARIO = "payments-db primary in eu-west-1 is down: storage controller failure, card payments failing"
USD_EPS = 1e-9


async def run_plan(client: Client, settings: KeelSettings, inp: SupervisedPlanInput) -> SupervisedPlanResult:
    wid = f"plan-{uuid.uuid4().hex[:8]}"
    handle = await patterns.start_pattern(
        client, settings, names.SUPERVISED_PLAN_WORKFLOW, inp, wid, summary="test", task_type="supervised_plan",
        feature=inp.feature, result_type=SupervisedPlanResult)
    res: SupervisedPlanResult = await handle.result()
    return res


async def started_input(client: Client, workflow_id: str) -> dict[str, Any]:
    """The input a workflow was started with, from its history."""
    async for ev in client.get_workflow_handle(workflow_id).fetch_history_events():
        if ev.HasField("workflow_execution_started_event_attributes"):
            data: dict[str, Any] = json.loads(ev.workflow_execution_started_event_attributes.input.payloads[0].data)
            return data
    raise AssertionError(f"no start event for {workflow_id}")


def ledger_usage(engine: Engine, *where: Any) -> TaskUsage:
    stmt = select(func.count(), func.coalesce(func.sum(col(LedgerRow.input_tokens)), 0),
                  func.coalesce(func.sum(col(LedgerRow.output_tokens)), 0),
                  func.coalesce(func.sum(col(LedgerRow.cost_usd)), 0.0)).where(col(LedgerRow.kind) == "llm", *where)
    with Session(engine) as s:
        calls, tin, tout, cost = s.execute(stmt).one()
    return TaskUsage(llm_calls=calls, input_tokens=tin, output_tokens=tout, cost_usd=cost)


def same_usage(a: TaskUsage, b: TaskUsage) -> bool:
    return (a.llm_calls, a.input_tokens, a.output_tokens) == (b.llm_calls, b.input_tokens, b.output_tokens) and abs(
        a.cost_usd - b.cost_usd) < USD_EPS


# --- workflow tests (dev server) ---------------------------------------------------------------


async def test_supervisor_rejects_then_accepts(client: Client, settings: KeelSettings, db_engine: Engine,
                                               worker_factory: WorkerFactory) -> None:
    # Seed 1: the first draft also names no verification for its cutover, which only the reviewer sees.
    inp = SupervisedPlanInput(scenario=SCENARIO, runbook="database_failover", sim=SimConfig(seed=1, spiral_rate=0))
    async with worker_factory(client):
        r = await run_plan(client, settings, inp)
        p = await patterns.pattern_progress(client, r.workflow_id)  # a query: answered by the worker

    assert r.status == "accepted", r.reason
    assert [x.round for x in r.rounds] == [1, 2]
    first, second = r.rounds
    # Round 1: the rule catches the missing snapshot, the reviewer the missing verification; sent back.
    assert first.plan is not None
    assert [v.rule for v in first.violations] == ["snapshot_before_promote"]
    assert first.violations[0].step == [s.action for s in first.plan.steps].index("promote") + 1
    assert first.verdict == "revise" and first.action == "revise"
    assert any("no verification" in f and "dns_cutover" in f for f in first.feedback)
    # Round 2: the worker got its plan and exactly that feedback, fixed both, and the plan passed.
    ctx = (await started_input(client, second.worker_id))["context"]
    assert any(c.startswith("Your previous plan (round 1)") for c in ctx)
    feedback = next(c for c in ctx if c.startswith("Supervisor feedback on round 1"))
    assert "[snapshot_before_promote] step" in feedback and "no verification" in feedback
    assert (await started_input(client, first.worker_id))["context"] == []
    assert second.violations == [] and second.verdict == "accept" and second.action == "accept"
    assert second.plan is not None and r.plan == second.plan
    actions = [s.action for s in second.plan.steps]
    assert actions.index("snapshot") == actions.index("promote") - 1
    assert all(s.verify for s in second.plan.steps)
    assert check_plan(second.plan.steps, rules_for("database_failover"), SERVICES) == []
    # Each round's worker is its own child workflow under the parent.
    assert [x.worker_id for x in r.rounds] == [f"{r.workflow_id}/worker-1", f"{r.workflow_id}/worker-2"]
    assert [c.status for c in r.children] == ["completed", "completed"]
    # Published (reports table), nothing in the human queue; the outcome row says so.
    published = reports(db_engine, r.workflow_id)
    assert len(published) == 1 and published[0]["kind"] == "plan" and r.report_id == published[0]["report_id"]
    assert "**snapshot** payments-db-eu-central" in published[0]["body"]
    assert not [q for q in human_queue(db_engine, None) if q["workflow_id"] == r.workflow_id]
    outcome = [o for o in Ledger(db_engine).outcomes() if o["workflow_id"] == r.workflow_id]
    assert [(o["status"], o["route"]) for o in outcome] == [("resolved", "report")]
    assert [d.kind for d in r.decisions if d.kind in ("revise", "accept")] == ["revise", "accept"]
    # The progress query: the supervisor's phase and both workers, with the family's tokens.
    assert (p.status, p.phase, p.tokens) == ("accepted", "done", r.usage.tokens)
    assert [c.name for c in p.children] == ["worker-1", "worker-2"]
    # Deterministic: the supervisor's and each worker's histories replay against today's code.
    replayer = Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter, workflow_runner=SANDBOX)
    for wid in [r.workflow_id, *(x.worker_id for x in r.rounds)]:
        await replayer.replay_workflow(await client.get_workflow_handle(wid).fetch_history())


async def test_supervisor_escalates_after_max_rounds(client: Client, settings: KeelSettings, db_engine: Engine,
                                                     worker_factory: WorkerFactory) -> None:
    inp = SupervisedPlanInput(scenario=SCENARIO, max_rounds=1, sim=SimConfig(seed=0, spiral_rate=0))
    async with worker_factory(client):
        r = await run_plan(client, settings, inp)

    assert r.status == "escalated"
    assert len(r.rounds) == 1 and r.rounds[0].action == "escalate"
    assert [v.rule for v in r.rounds[0].violations] == ["snapshot_before_promote"]
    assert "no acceptable plan after 1 round" in r.reason and "snapshot_before_promote" in r.reason
    queued = [q for q in human_queue(db_engine, None) if q["workflow_id"] == r.workflow_id]
    assert len(queued) == 1 and queued[0]["priority"] == "high"
    assert "snapshot_before_promote" in queued[0]["reason"] and r.queue_item_id == queued[0]["queue_item_id"]
    assert reports(db_engine, r.workflow_id) == [] and r.report_id is None
    assert r.plan == r.rounds[0].plan  # the last draft goes to the human with the reasons


async def test_reviewer_escalates_when_no_replica_is_fit(client: Client, settings: KeelSettings, db_engine: Engine,
                                                         worker_factory: WorkerFactory) -> None:
    # cards-db's only replica is degraded and 95 s behind: no plan can pass; the reviewer hands it over at once.
    inp = SupervisedPlanInput(scenario="cards-db primary in eu-central-1 is degraded; fail it over",
                              sim=SimConfig(seed=0, spiral_rate=0))
    async with worker_factory(client):
        r = await run_plan(client, settings, inp)
    assert r.status == "escalated" and len(r.rounds) == 1
    assert r.rounds[0].verdict == "escalate"
    assert "promote_healthy_replica" in {v.rule for v in r.rounds[0].violations}
    assert "the reviewer escalated in round 1" in r.reason and "cards-db-eu-west" in r.reason
    assert [q["workflow_id"] for q in human_queue(db_engine, None)].count(r.workflow_id) == 1
    assert reports(db_engine, r.workflow_id) == []


async def test_invalid_worker_output_goes_back_as_feedback(client: Client, settings: KeelSettings, db_engine: Engine,
                                                           worker_factory: WorkerFactory) -> None:
    inp = SupervisedPlanInput(scenario=SCENARIO, sim=SimConfig(seed=0, spiral_rate=0, invalid_json_rate=1.0))
    async with worker_factory(client):
        r = await run_plan(client, settings, inp)
    first = r.rounds[0]
    assert first.plan is None and [v.rule for v in first.violations] == [INVALID_PLAN]
    assert "not valid JSON" in first.violations[0].message and first.action == "revise"
    ctx = (await started_input(client, r.rounds[1].worker_id))["context"]
    assert any(f"[{INVALID_PLAN}] plan: the output is not valid JSON" in c for c in ctx)
    assert r.status == "accepted" and len(r.rounds) == 2 and r.rounds[1].violations == []


async def test_review_overhead_reported_separately(client: Client, settings: KeelSettings, db_engine: Engine,
                                                   worker_factory: WorkerFactory) -> None:
    inp = SupervisedPlanInput(scenario=SCENARIO, sim=SimConfig(seed=1, spiral_rate=0))
    async with worker_factory(client):
        r = await run_plan(client, settings, inp)
    wid = r.workflow_id
    assert r.status == "accepted" and len(r.rounds) == 2

    own = ledger_usage(db_engine, col(LedgerRow.workflow_id) == wid)
    children = ledger_usage(db_engine, col(LedgerRow.parent_workflow_id) == wid)
    assert own.llm_calls == 2  # one review per round: the supervisor's own calls
    assert same_usage(r.review_usage, own)
    assert children.llm_calls == 6  # each round's worker: status, runbook, then the plan
    assert same_usage(r.worker_usage, children)
    family = Ledger(db_engine).family_totals(wid)
    assert (r.usage.llm_calls, r.usage.input_tokens, r.usage.output_tokens) == (
        family["llm_calls"], family["input_tokens"], family["output_tokens"])
    assert abs(r.usage.cost_usd - family["cost_usd"]) < USD_EPS
    assert same_usage(r.usage, r.worker_usage.plus(r.review_usage))
    # Per round too, and the overhead is the review's share of all tokens.
    assert same_usage(r.review_usage, _sum(x.review_usage for x in r.rounds))
    assert same_usage(r.worker_usage, _sum(x.worker_usage for x in r.rounds))
    assert r.review_overhead == round(own.tokens / family["tokens"], 4) and 0 < r.review_overhead < 1
    assert r.budget.used_tokens == family["tokens"] and r.budget.reserved_tokens == 0


async def test_cli_plans_and_prints_rounds_plan_and_overhead(client: Client, settings: KeelSettings,
                                                             worker_factory: WorkerFactory) -> None:
    from typer.testing import CliRunner

    from starter.cli import app

    env = {"TEMPORAL_ADDRESS": client.service_client.config.target_host, "KEEL_TASK_QUEUE": settings.task_queue,
           "COLUMNS": "200"}

    def keel(*args: str) -> Any:
        return CliRunner().invoke(app, list(args), env=env)

    async with worker_factory(client):
        out = await asyncio.to_thread(keel, "plan", SCENARIO, "--sim-seed", "1")
        js = await asyncio.to_thread(keel, "plan", SCENARIO, "--max-rounds", "1", "--json")
    assert out.exit_code == 0, out.output
    assert "started plan-" in out.output and "/workflows/plan-" in out.output
    assert "round 1" in out.output and "[snapshot_before_promote] step 4" in out.output
    assert "reviewer: revise" in out.output and "reviewer: accept" in out.output
    assert "accepted plan" in out.output and "published as RE-" in out.output
    assert "review overhead" in out.output and "worker " in out.output
    assert js.exit_code == 0, js.output
    doc = json.loads(js.output)
    assert doc["status"] == "escalated" and doc["queue_item_id"].startswith("HQ-") and len(doc["rounds"]) == 1
    bad = await asyncio.to_thread(keel, "plan", "db down", "--runbook", "nope")
    assert bad.exit_code == 2 and "unknown runbook 'nope'" in bad.output


def test_dr_tools_answer_from_the_shipped_data(db_engine: Engine) -> None:
    from activities import dr_tools
    from keel.tools import GetServiceStatusArgs, LookupRunbookArgs
    from keel.types import TaskContext, ToolRequest

    req = ToolRequest(task=TaskContext(workflow_id="w", customer="internal"), step=1, call_id="c", arguments={})
    with Session(db_engine) as s:
        every = dr_tools.get_service_status(s, req, GetServiceStatusArgs())
        cluster = dr_tools.get_service_status(s, req, GetServiceStatusArgs(service="payments-db"))
        unknown = dr_tools.get_service_status(s, req, GetServiceStatusArgs(service="mainframe"))
        book = dr_tools.lookup_runbook(s, req, LookupRunbookArgs(topic="Database Failover"))
        nobook = dr_tools.lookup_runbook(s, req, LookupRunbookArgs(topic="alien_invasion"))
    assert every.ok and len(every.content["services"]) == len(SERVICES) and every.content["max_promote_lag_s"] == 30
    assert cluster.ok and {x["name"] for x in cluster.content["services"]} == {
        "payments-db-eu-west", "payments-db-eu-central", "payments-db-eu-west-r2"}
    assert not unknown.ok and "unknown service 'mainframe'" in (unknown.error or "")
    assert "payments-db" in (unknown.error or "") and "card-auth-eu-west" in (unknown.error or "")
    assert book.ok and book.content["topic"] == "database_failover" and book.content["steps"]
    assert [r["id"] for r in book.content["rules"]] == [r.id for r in rules_for("database_failover")]
    assert not nobook.ok and "known topics: database_failover, dns_cutover, region_evacuation" in (nobook.error or "")


def _sum(usages: Any) -> TaskUsage:
    total = TaskUsage()
    for u in usages:
        total = total.plus(u)
    return total


# --- the rule checker --------------------------------------------------------------------------

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
    assert set(_rules(check_plan(steps, rules_for(topic), SERVICES))) == {rule}


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
    # A step that only says it will not delete anything is not destructive (the action decides).
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
    from keel.runbooks import Rule, StepMatch
    no_restart = Rule(id="no_restart_of_primary", description="Never restart a database primary mid-incident.",
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


# --- parsing and decisions ---------------------------------------------------------------------


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    ("I think we should fail over.", "no JSON object"),
    ('{"summary": "x", "steps": [{"action": "notify"', "not valid JSON"),
    ('["notify", "promote"]', "no JSON object"),
    ('{"summary": "x"}', "steps: Field required"),
    ('{"summary": "x", "steps": []}', "no steps"),
    ('{"steps": [{"action": 3}]}', "steps.0.action"),
    ('{"steps": [{"action": " ", "target": "dns"}]}', "no action"),
])
def test_invalid_worker_output_is_a_violation(text: str, problem: str) -> None:
    plan, violations = parse_plan(text)
    assert plan is None and len(violations) == 1
    assert violations[0].rule == INVALID_PLAN and problem in violations[0].message


def test_plan_parsing_tolerates_fences_and_chatter() -> None:
    body = json.dumps({"summary": "s", "steps": [{"action": "notify", "target": "#incident-bridge"}]})
    for text in (body, f"```json\n{body}\n```", f"Here is the plan:\n{body}\nGood luck."):
        plan, violations = parse_plan(text)
        assert violations == [] and plan is not None and plan.steps[0].action == "notify"


def test_verdict_parsing() -> None:
    assert parse_verdict('{"verdict": "Accept", "feedback": "fine"}')[0] == ReviewVerdict(verdict="accept",
                                                                                           feedback=["fine"])
    for bad in ("", "accept", '{"verdict": "maybe"}', '{"feedback": []}'):
        verdict, note = parse_verdict(bad)
        assert verdict is None and note.startswith("reviewer output invalid")


def test_decisions() -> None:
    from keel.runbooks import Violation
    v = [Violation(step=2, rule="rollback_named", message="no rollback")]
    accept, revise = ReviewVerdict(verdict="accept"), ReviewVerdict(verdict="revise", feedback=["add a check"])
    assert decide_round(1, 3, [], accept)[0] == "accept"
    assert decide_round(1, 3, v, accept) == ("revise", decide_round(1, 3, v, accept)[1])
    assert "rules override" in decide_round(1, 3, v, accept)[1]  # the rules win over the reviewer
    assert decide_round(1, 3, [], revise)[0] == "revise"
    assert decide_round(1, 3, [], None)[0] == "revise"  # an invalid review counts as revise
    action, why = decide_round(3, 3, [], revise)
    assert action == "escalate" and "after 3 round(s)" in why and "add a check" in why
    assert decide_round(1, 3, [], ReviewVerdict(verdict="escalate", feedback=["no safe replica"]))[0] == "escalate"
