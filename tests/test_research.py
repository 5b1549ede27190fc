"""The orchestrator pattern (ResearchReportWorkflow) on the Temporal dev server with the sim model, and its
pure parts: plan validation and the default plan, the per-role child inputs, the research tools.

What must hold: a failed child is retried alone (its siblings run once, as the server shows); a child over
its budget stops within it while the others finish and the report is published; the parent's usage is
exactly the family's rows in the ledger and never crosses the parent's budget; the parent's budget bounds
its children (a child that does not fit is not started); the analysis tools never return customer data.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Replayer, Worker

from activities import research_tools
from activities.db import CustomerRow, LedgerRow, ReportRow, TransactionRow
from activities.ledger import Ledger
from keel import names
from keel.corpus import CORPUS, search_terms
from keel.policy import budget_for
from keel.research import (
    MAX_SUBTASKS,
    ROLE_POLICIES,
    TASK_TYPE,
    ResearchInput,
    ResearchPlan,
    ResearchResult,
    Subtask,
    child_budget,
    child_input,
    choose_plan,
    default_plan,
    fallback_report,
    parse_plan,
    plan_problems,
    research_status,
)
from keel.tools import LedgerCostsArgs, ReadDocumentArgs, SearchDocumentsArgs, TransactionStatsArgs
from keel.types import Budget, InjectedFailure, ModelSpec, PatternProgress, SimConfig, TaskContext, ToolRequest
from starter.trace_cli import render, task_trace
from workers.worker import SANDBOX
from workflows.registry import WORKFLOWS

WorkerFactory = Callable[..., contextlib.AbstractAsyncContextManager[Worker]]
QUESTION = "Why did refunds rise in Q3 2024, and how many duplicate charges and disputes do we see now?"
USD_EPS = 1e-8


# --- helpers ---------------------------------------------------------------------------------
async def run_research(client: Client, settings: Any, **kw: Any) -> ResearchResult:
    wid = f"research-{uuid.uuid4().hex[:10]}"
    inp = ResearchInput(question=kw.pop("question", QUESTION), sim=SimConfig(spiral_rate=0.0), **kw)
    handle = await client.start_workflow(names.RESEARCH_REPORT_WORKFLOW, inp, id=wid,
                                         task_queue=settings.task_queue, result_type=ResearchResult)
    result: ResearchResult = await handle.result()
    return result


async def started_children(client: Client, parent_id: str) -> list[str]:
    """Every child workflow the parent started, in order, from its history on the server."""
    out = []
    async for ev in client.get_workflow_handle(parent_id).fetch_history_events():
        if ev.HasField("start_child_workflow_execution_initiated_event_attributes"):
            out.append(ev.start_child_workflow_execution_initiated_event_attributes.workflow_id)
    return out


async def exists(client: Client, workflow_id: str) -> bool:
    try:
        await client.get_workflow_handle(workflow_id).describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


def child(r: ResearchResult, name: str) -> Any:
    return next(c for c in r.children if c.name == name)


def llm_rows(engine: Engine, workflow_id: str) -> list[LedgerRow]:
    with Session(engine) as s:
        return list(s.exec(select(LedgerRow).where(col(LedgerRow.workflow_id) == workflow_id,
                                                   col(LedgerRow.kind) == "llm")).all())


def assert_books(engine: Engine, r: ResearchResult) -> None:
    """The parent's usage is exactly the family's llm rows in the ledger, and within its budget."""
    fam = Ledger(engine).family_totals(r.workflow_id)
    assert (fam["llm_calls"], fam["input_tokens"], fam["output_tokens"]) == (
        r.usage.llm_calls, r.usage.input_tokens, r.usage.output_tokens)
    assert fam["cost_usd"] == pytest.approx(r.usage.cost_usd, abs=USD_EPS)
    own = Ledger(engine).task_totals(r.workflow_id)
    assert (own["llm_calls"], own["tokens"]) == (r.own_usage.llm_calls, r.own_usage.tokens)
    kids = r.own_usage
    for c in r.children:
        kids = kids.plus(c.usage)
    assert (kids.llm_calls, kids.tokens) == (r.usage.llm_calls, r.usage.tokens)
    b = r.budget
    assert b.used_tokens == r.usage.tokens and b.reserved_tokens == 0
    assert b.max_tokens is not None and b.used_tokens <= b.max_tokens
    assert b.max_usd is not None and b.used_usd <= b.max_usd + USD_EPS


def published(engine: Engine, workflow_id: str) -> list[ReportRow]:
    with Session(engine) as s:
        return list(s.exec(select(ReportRow).where(col(ReportRow.workflow_id) == workflow_id)).all())


# --- the workflow on the dev server ------------------------------------------------------------
async def test_report_end_to_end_books_and_progress(
    client: Client, settings: Any, worker_factory: WorkerFactory, db_engine: Engine
) -> None:
    async with worker_factory(client):
        r = await run_research(client, settings)
        progress = await client.get_workflow_handle(r.workflow_id).query(names.PROGRESS_QUERY,
                                                                         result_type=PatternProgress)
        desc = await client.get_workflow_handle(r.workflow_id).describe()
    assert r.status == "completed", (r.reason, r.children)
    assert r.plan_source == "model" and r.plan is not None
    assert [c.name for c in r.children] == ["retrieval", "analysis", "writing"]
    assert all(c.status == "completed" and c.attempts == 1 for c in r.children)
    # Each child on its role's model tier, with its role's narrow tools only.
    assert child(r, "retrieval").model == ModelSpec(provider="sim", model="sim-small").label
    assert child(r, "analysis").model == child(r, "writing").model == ModelSpec().label
    tools = {c.name: {row.tool for row in _tool_rows(db_engine, c.workflow_id)} for c in r.children}
    assert tools == {"retrieval": {"search_documents", "read_document"}, "analysis": {"transaction_stats"},
                     "writing": set()}
    # The report cites what retrieval read and carries analysis's figures; it was published.
    assert "[D-001]" in r.report or "D-001" in r.report
    assert "duplicate charges" in r.report and "EUR" in r.report
    assert [p.body for p in published(db_engine, r.workflow_id)] == [r.report]
    assert r.report_id and r.report_id.startswith("RE-")
    assert_books(db_engine, r)
    # The parent's own calls: plan and synthesize, on the large tier.
    own = sorted(llm_rows(db_engine, r.workflow_id), key=lambda x: x.step)
    assert [(x.step_kind, x.prompt_name, x.model) for x in own] == [
        ("plan", "research/plan", "sim-large"), ("synthesize", "research/synthesize", "sim-large")]
    # Progress query and search attributes at the end.
    assert progress.status == "completed" and progress.phase == "done"
    assert progress.tokens == r.usage.tokens and [c.name for c in progress.children] == ["retrieval", "analysis",
                                                                                          "writing"]
    sa = desc.typed_search_attributes
    assert sa.get(SearchAttributeKey.for_keyword(names.SA_STATUS)) == "completed"
    assert sa.get(SearchAttributeKey.for_int(names.SA_TOKENS)) == r.usage.tokens
    assert sa.get(SearchAttributeKey.for_float(names.SA_COST_USD)) == pytest.approx(r.usage.cost_usd)


def render_text(trace: Any) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render(trace))
    return console.export_text()


async def test_failing_child_is_retried_alone(
    client: Client, settings: Any, worker_factory: WorkerFactory, db_engine: Engine
) -> None:
    async with worker_factory(client):
        r = await run_research(client, settings, child_failures={"analysis": InjectedFailure(at_step=2, runs=1)})
        pid = r.workflow_id
        started = await started_children(client, pid)
        assert not await exists(client, f"{pid}/retrieval~2")
        assert not await exists(client, f"{pid}/writing~2")
        first = await client.get_workflow_handle(f"{pid}/analysis").describe()
        second = await client.get_workflow_handle(f"{pid}/analysis~2").describe()
        # Deterministic: the parent (with its failed and retried child) and the failed attempt replay.
        replayer = Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter, workflow_runner=SANDBOX)
        for wid in (pid, f"{pid}/analysis"):
            await replayer.replay_workflow(await client.get_workflow_handle(wid).fetch_history())
        trace = await task_trace(client, pid)
    assert r.status == "completed", (r.reason, r.children)
    # `keel trace` draws each child under the parent, the failed attempt marked, with the child's own calls.
    kids = [n for n in trace.nodes if n.kind == "child"]
    by_id = {n.detail.split(" -> ")[0]: n for n in kids}
    assert sorted(by_id) == sorted(started) and len(kids) == 4
    assert [wid for wid, n in by_id.items() if not n.ok] == [f"{pid}/analysis"]
    assert "injected failure" in by_id[f"{pid}/analysis"].detail
    assert all(n.child is not None and any(c.kind == "llm" for c in n.child.nodes) for n in kids)
    own = sum(n.tokens for n in trace.nodes if n.kind == "llm")
    assert own + sum(c.tokens for n in kids if n.child for c in n.child.nodes if c.kind == "llm") == r.usage.tokens
    assert trace.summary is not None and trace.summary["tokens"] == r.usage.tokens
    assert "child AgentTask" in render_text(trace)
    # Only the failed child ran again, as a new workflow; its siblings ran exactly once.
    assert started == [f"{pid}/retrieval", f"{pid}/analysis", f"{pid}/analysis~2", f"{pid}/writing"]
    assert first.status == WorkflowExecutionStatus.FAILED
    assert second.status == WorkflowExecutionStatus.COMPLETED
    a = child(r, "analysis")
    assert (a.status, a.attempts, len(a.failures)) == ("completed", 2, 1)
    assert "injected failure at step 3" in a.failures[0]
    assert child(r, "retrieval").attempts == child(r, "writing").attempts == 1
    assert any(d.kind == "child_failed" and "retrying this child alone" in d.reason for d in r.decisions)
    # The failed attempt spent real tokens (its first model call), and the parent counted them.
    failed = Ledger(db_engine).task_totals(f"{pid}/analysis")
    retried = Ledger(db_engine).task_totals(f"{pid}/analysis~2")
    assert failed["llm_calls"] == 1 and failed["tokens"] > 0
    assert a.usage.tokens == failed["tokens"] + retried["tokens"]
    assert a.usage.llm_calls == failed["llm_calls"] + retried["llm_calls"]
    assert_books(db_engine, r)


async def test_child_over_budget_while_others_finish(
    client: Client, settings: Any, worker_factory: WorkerFactory, db_engine: Engine
) -> None:
    cap = 1_500
    async with worker_factory(client):
        r = await run_research(client, settings, child_budgets={"retrieval": Budget(max_tokens=cap)})
    ret = child(r, "retrieval")
    assert ret.status == "budget_exceeded" and ret.attempts == 1 and ret.budget_tokens == cap
    assert "kill switch" in ret.reason
    # It did some work and never used more than its budget, by the ledger.
    spent = Ledger(db_engine).task_totals(ret.workflow_id)
    assert 0 < spent["tokens"] <= cap and spent["tokens"] == ret.usage.tokens
    assert child(r, "analysis").status == child(r, "writing").status == "completed"
    # The task did not fail: a report was published, saying what is missing.
    assert r.status == "partial"
    assert r.missing and r.missing[0].startswith("retrieval (retrieval): stopped by its budget")
    assert "retrieval" in r.report and "Gaps" in r.report
    assert [p.body for p in published(db_engine, r.workflow_id)] == [r.report]
    assert_books(db_engine, r)


async def test_parent_budget_bounds_its_children(
    client: Client, settings: Any, worker_factory: WorkerFactory, db_engine: Engine
) -> None:
    # Room for the plan and the retrieval child's cap, not for the analysis child's beside it.
    budget = Budget(max_tokens=ROLE_POLICIES["retrieval"].budget.max_tokens + 2_000, max_usd=0.2)  # type: ignore[operator]
    async with worker_factory(client):
        r = await run_research(client, settings, budget=budget)
        analysis_ran = await exists(client, f"{r.workflow_id}/analysis")
    ana = child(r, "analysis")
    assert ana.status == "not_started" and ana.attempts == 0 and not analysis_ran
    assert "does not fit what is left of the parent's" in ana.reason
    assert any(d.kind == "skip_child" for d in r.decisions)
    assert child(r, "retrieval").status == "completed"
    assert r.status == "partial" and any(m.startswith("analysis (analysis): not started") for m in r.missing)
    assert r.usage.tokens <= budget.max_tokens  # type: ignore[operator]
    assert_books(db_engine, r)


async def test_parent_out_of_budget_ends_with_what_it_has(
    client: Client, settings: Any, worker_factory: WorkerFactory, db_engine: Engine
) -> None:
    async with worker_factory(client):
        r = await run_research(client, settings, budget=Budget(max_tokens=400, max_usd=0.2))
    assert r.status == "budget_exceeded" and r.budget.limit_hit == "tokens"
    assert r.children == [] and r.usage.llm_calls == 0
    assert "budget" in r.report and published(db_engine, r.workflow_id)
    assert_books(db_engine, r)


async def test_unusable_plan_falls_back_on_the_default_plan(
    client: Client, settings: Any, worker_factory: WorkerFactory, db_engine: Engine
) -> None:
    async with worker_factory(client):
        wid = f"research-{uuid.uuid4().hex[:10]}"
        inp = ResearchInput(question=QUESTION, sim=SimConfig(spiral_rate=0.0, invalid_json_rate=1.0))
        r: ResearchResult = await client.execute_workflow(
            names.RESEARCH_REPORT_WORKFLOW, inp, id=wid, task_queue=settings.task_queue, result_type=ResearchResult)
    assert r.plan_source == "default" and r.plan == default_plan(QUESTION)
    assert any(d.kind == "default_plan" and "not valid JSON" in d.reason for d in r.decisions)
    assert r.status == "completed"
    assert_books(db_engine, r)


def _tool_rows(engine: Engine, workflow_id: str) -> list[LedgerRow]:
    with Session(engine) as s:
        return list(s.exec(select(LedgerRow).where(col(LedgerRow.workflow_id) == workflow_id,
                                                   col(LedgerRow.kind) == "tool")).all())


# --- plan validation and the children's inputs (pure) ------------------------------------------
def _plan(*subs: tuple[str, str]) -> dict[str, Any]:
    return {"title": "t", "subtasks": [{"name": n, "role": role, "instructions": f"do {n}"} for n, role in subs]}


def test_a_valid_plan_is_used() -> None:
    plan, problem = parse_plan(json.dumps(_plan(("docs", "retrieval"), ("numbers", "analysis"), ("w", "writing"))))
    assert problem == "" and plan is not None and [s.name for s in plan.subtasks] == ["docs", "numbers", "w"]
    fenced, _ = parse_plan("```json\n" + json.dumps(_plan(("docs", "retrieval"), ("w", "writing"))) + "\n```")
    assert fenced is not None


@pytest.mark.parametrize(("payload", "why"), [
    ("Sure! {\"title\": ", "not valid JSON"),
    (json.dumps({"title": "t"}), "does not fit the schema"),
    (json.dumps(_plan(("docs", "retrieval"), ("w", "sculpting"))), "does not fit the schema"),
    (json.dumps(_plan(("Bad Name", "retrieval"), ("w", "writing"))), "does not fit the schema"),
    (json.dumps(_plan(("docs", "retrieval"), ("docs", "analysis"), ("w", "writing"))), "must be unique"),
    (json.dumps(_plan(("docs", "retrieval"), ("w", "writing"), ("w2", "writing"))), "exactly one writing"),
    (json.dumps(_plan(("docs", "retrieval"))), "exactly one writing"),
    (json.dumps(_plan(("w", "writing"))), "at least one retrieval or analysis"),
    (json.dumps(_plan(*[(f"r{i}", "retrieval") for i in range(3)], ("w", "writing"))), "at most 2"),
])
def test_an_unusable_plan_is_refused_with_its_reason(payload: str, why: str) -> None:
    plan, problem = parse_plan(payload)
    assert plan is None and why in problem
    chosen, reason = choose_plan(payload, QUESTION)
    assert chosen == default_plan(QUESTION) and reason == problem


def test_default_plan_is_valid_and_bounded() -> None:
    plan = default_plan(QUESTION)
    assert plan_problems(plan) == [] and len(plan.subtasks) <= MAX_SUBTASKS
    assert {s.role for s in plan.subtasks} == {"retrieval", "analysis", "writing"}
    assert plan.title.startswith("Research: Why did refunds rise")
    too_many = ResearchPlan(subtasks=[Subtask(name=f"s{i}", role="analysis", instructions="x") for i in range(6)])
    assert any("at most 5" in p for p in plan_problems(too_many))


def test_child_inputs_follow_their_role_policy() -> None:
    inp = ResearchInput(question=QUESTION, child_budgets={"retrieval": Budget(max_tokens=900, max_usd=None)},
                        child_failures={"analysis": InjectedFailure(at_step=2)})
    plan = default_plan(QUESTION)
    ret, ana, wri = (child_input(s, inp, "research-x", ["ctx"]) for s in plan.subtasks)
    assert ret.model == inp.small_model and ana.model == wri.model == inp.large_model
    assert ret.tools == ["search_documents", "read_document"] and ana.tools == ["transaction_stats", "ledger_costs"]
    assert wri.tools == [] and wri.prompt == "research/writing"
    assert ret.context == [f"Research question: {QUESTION}", "ctx"] and ret.key == "research-x/retrieval"
    # An override's missing limit keeps the role's: a child is always capped.
    assert (ret.budget.max_tokens, ret.budget.max_usd) == (900, ROLE_POLICIES["retrieval"].budget.max_usd)
    assert ana.budget == ROLE_POLICIES["analysis"].budget and ana.inject_failure == InjectedFailure(at_step=2)
    assert ret.inject_failure is None
    assert child_budget(plan.subtasks[2], inp) == ROLE_POLICIES["writing"].budget


def test_default_children_fit_the_parent_budget() -> None:
    parent = budget_for(TASK_TYPE)
    caps = [p.budget for p in ROLE_POLICIES.values()]
    assert parent.max_tokens is not None and parent.max_usd is not None
    assert sum(b.max_tokens or 0 for b in caps) < parent.max_tokens
    assert sum(b.max_usd or 0 for b in caps) < parent.max_usd


def test_status_and_fallback_report() -> None:
    assert research_status(3, [], parent_stopped=False) == "completed"
    assert research_status(2, ["analysis: failed"], parent_stopped=False) == "partial"
    assert research_status(0, ["a", "b", "c"], parent_stopped=False) == "failed"
    assert research_status(3, [], parent_stopped=True) == "budget_exceeded"
    body = fallback_report("Q?", "T", ["Findings of retrieval (retrieval):\n- [D-001] x"], ["analysis: failed"],
                           "budget ran out")
    assert body.startswith("# T") and "Not synthesized: budget ran out." in body and "- analysis: failed" in body


# --- the research tools ----------------------------------------------------------------------
def _req(tool: str = "search_documents") -> ToolRequest:
    return ToolRequest(task=TaskContext(workflow_id=f"t-{uuid.uuid4().hex[:6]}", customer="internal"), step=1,
                       call_id="c", arguments={})


@pytest.mark.parametrize(("query", "best"), [
    ("duplicate charges postmortem processor retries", "D-002"),
    ("overdraft fee proposal", "D-013"),
    ("chargeback dispute process", "D-004"),
    ("LLM cost tokens September", "D-007"),
    ("refund trends Q3", "D-001"),
    ("phishing account takeover", "D-005"),
])
def test_search_ranks_the_best_match_first(db_engine: Engine, query: str, best: str) -> None:
    with Session(db_engine) as s:
        res = research_tools.search_documents(s, _req(), SearchDocumentsArgs(query=query, limit=5))
    assert res.ok, res.error
    results = res.content["results"]
    assert results[0]["doc_id"] == best
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(results) <= 5
    assert all(r["snippet"] and len(r["snippet"]) <= 240 for r in results)


def test_search_without_a_match_says_what_to_try(db_engine: Engine) -> None:
    with Session(db_engine) as s:
        none = research_tools.search_documents(s, _req(), SearchDocumentsArgs(query="zeppelin quantum giraffe"))
        empty = research_tools.search_documents(s, _req(), SearchDocumentsArgs(query="the of and"))
    assert not none.ok and "no document matches 'zeppelin quantum giraffe'" in (none.error or "")
    assert "try other words" in (none.error or "")
    assert not empty.ok and "no searchable words" in (empty.error or "")
    assert search_terms("Refunds, policies & duplicate-charges!") == [
        "refund", "policy", "duplicate-charge", "duplicate", "charge"]


def test_read_document(db_engine: Engine) -> None:
    with Session(db_engine) as s:
        ok = research_tools.read_document(s, _req(), ReadDocumentArgs(doc_id="d-002"))
        bad = research_tools.read_document(s, _req(), ReadDocumentArgs(doc_id="D-999"))
    assert ok.ok and ok.content["doc_id"] == "D-002" and "5,120" in ok.content["body"]
    assert not bad.ok and "no document 'D-999'" in (bad.error or "") and "D-001" in (bad.error or "")
    assert len(CORPUS) >= 12 and len({d.id for d in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("group_by", ["kind", "merchant", "none"])
def test_transaction_stats_are_aggregates_without_customer_data(db_engine: Engine, group_by: str) -> None:
    with Session(db_engine) as s:
        res = research_tools.transaction_stats(s, _req(), TransactionStatsArgs(days=365, group_by=group_by))
        customers = s.exec(select(CustomerRow)).all()
        txs = s.exec(select(TransactionRow)).all()
    assert res.ok, res.error
    totals = res.content["totals"]
    assert totals["count"] == len(txs)
    assert totals["duplicates"] == sum(1 for t in txs if t.duplicate_of)
    assert totals["disputed"] == sum(1 for t in txs if t.disputed)
    assert totals["total_amount"] == pytest.approx(sum(t.amount for t in txs), abs=0.01)
    if group_by != "none":
        assert sum(g["count"] for g in res.content["groups"]) == totals["count"] or res.content["groups_total"] > 20
    dumped = json.dumps(res.content)
    # No customer id, name, email, phone, card number, account or transaction id, whatever the grouping.
    assert not re.search(r"\b(C|T|A)-\d+", dumped)
    for c in customers:
        for value in (c.id, c.name, c.email, c.phone, c.card_number, c.card_number[-4:]):
            assert value not in dumped, value
    for t in txs[:50]:
        assert t.id not in dumped and t.account_id not in dumped


def test_transaction_stats_of_one_kind(db_engine: Engine) -> None:
    with Session(db_engine) as s:
        fees = research_tools.transaction_stats(s, _req(), TransactionStatsArgs(days=365, kind="fee", group_by="none"))
        none = research_tools.transaction_stats(s, _req(), TransactionStatsArgs(days=365, kind="lottery"))
    assert fees.ok and fees.content["totals"]["count"] > 0 and fees.content["totals"]["duplicates"] == 0
    assert not none.ok and "kinds: " in (none.error or "")


def test_ledger_costs_inside_the_tools_transaction(db_engine: Engine) -> None:
    feature = f"probe-{uuid.uuid4().hex[:6]}"
    with Session(db_engine) as s:
        # Written in the tool's own transaction, which then holds SQLite's write lock: the tool must read
        # through that transaction (it sees this row), never wait for a second connection.
        s.add(LedgerRow(key=f"{feature}/1/llm", workflow_id=feature, step=1, kind="llm", feature=feature,
                        model="sim-large", input_tokens=1_000, output_tokens=200, cost_usd=0.0045))
        s.flush()
        res = research_tools.ledger_costs(s, _req(), LedgerCostsArgs(group_by=["feature", "model"], days=1))
        bad = research_tools.ledger_costs(s, _req(), LedgerCostsArgs(group_by=["parent_workflow_id"]))
        worse = research_tools.ledger_costs(s, _req(), LedgerCostsArgs(group_by=["body"]))
        s.rollback()
    assert res.ok, res.error
    mine = [g for g in res.content["groups"] if g["feature"] == feature]
    assert mine == [{"feature": feature, "model": "sim-large", "calls": 1, "tokens": 1_200, "cost_usd": 0.0045}]
    assert res.content["totals"]["calls"] >= 1 and res.content["totals"]["tokens"] >= 1_200
    assert not bad.ok and "cannot group costs by ['parent_workflow_id']" in (bad.error or "")
    assert not worse.ok and "ledger columns: customer" in (worse.error or "")
    assert Ledger(db_engine).task_totals(feature)["llm_calls"] == 0  # rolled back with the tool's transaction


# --- the command line's parsing ----------------------------------------------------------------
def test_cli_options() -> None:
    import typer

    from starter.research_cli import parse_child_budgets, parse_child_failures, prompt_problems

    assert parse_child_budgets(["retrieval=1500", "analysis=2_000"]) == {
        "retrieval": Budget(max_tokens=1500, max_usd=None), "analysis": Budget(max_tokens=2000, max_usd=None)}
    assert parse_child_failures(["analysis", "writing:1"]) == {
        "analysis": InjectedFailure(at_step=2, runs=1), "writing": InjectedFailure(at_step=1, runs=1)}
    for bad in (["retrieval"], ["=10"], ["retrieval=lots"], ["retrieval=0"]):
        with pytest.raises(typer.BadParameter):
            parse_child_budgets(bad)
    for bad in ([":2"], ["analysis:x"], ["analysis:0"]):
        with pytest.raises(typer.BadParameter):
            parse_child_failures(bad)
    assert prompt_problems("v1") == []
    assert "missing research/plan.v9.md" in prompt_problems("v9")[0]
