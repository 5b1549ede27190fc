"""The research assistant (agents/research, public API only) as a configuration of the generic
orchestrator, on the real Temporal dev server with the sim model: a planner agent's plan, retrieval and
analysis workers on their own tiers with their own narrow tools, a writer that publishes the report.

What must hold: every child runs its agent's tier and only its tools; the report cites only documents a
worker really read; the family's usage is exactly its ledger rows and within the orchestration's budget;
a worker stopped by its budget leaves the report `partial`, with the gap named in it; the orchestration's
budget bounds its children (shrunk to what is left, not started below the floor); the analysis tool
never returns customer data; `keel research` prints the report, its status, sources and costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from temporalio.client import Client
from typer.testing import CliRunner

import keel
from agents.research import AGENTS, BUDGET, NAME, orchestration, store
from agents.research.corpus import CORPUS, search_terms
from agents.research.guardrails import (
    analysis_used_data,
    figures,
    publish_cites_its_context,
    report_cites_its_context,
    report_figures_found,
    retrieval_cites_what_it_read,
    retrieval_found_documents,
)
from agents.research.sim import plan
from agents.research.tools import (
    PublishArgs,
    ReadArgs,
    SearchArgs,
    StatsArgs,
    publish_report,
    read_document,
    search_documents,
    transaction_stats,
)
from agents.support_desk.data import build_seed
from keel.orchestration import OrchestratorResult
from keel.testing import SCRIPTED, AgentEnvironment, ScriptedModel, agent_environment, answer, call
from starter.agents import start_orchestration
from starter.cli import app
from tests.pg import database_url, on_both_databases

QUESTION = "Why did refunds rise in Q3 2024, and how many duplicate charges and disputes do we see now?"


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """One database for the platform's ledger and the agents' tables, as in production: SQLite, and
    PostgreSQL too for a test marked `on_both_databases`."""
    url = database_url(request, tmp_path)
    monkeypatch.setenv("KEEL_DATABASE_URL", url)
    store.reset()
    yield url
    store.reset()


@contextlib.asynccontextmanager
async def research_env(client: Client, db_url: str) -> AsyncIterator[AgentEnvironment]:
    async with agent_environment(*AGENTS, client=client, db_url=db_url) as env:
        yield env


async def research(env: AgentEnvironment, question: str = QUESTION, **kw: Any) -> OrchestratorResult:
    handle = await start_orchestration(env.client, env.settings, orchestration(question, key=uuid.uuid4().hex[:10],
                                                                                **kw))
    res: OrchestratorResult = await handle.result()
    return res


def rows(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def family(engine: Engine, parent: str) -> list[dict[str, Any]]:
    return rows(engine, "SELECT workflow_id, kind, tool, status, model, task_type, "
                        "input_tokens + output_tokens AS tokens, cost_usd FROM ledger "
                        "WHERE workflow_id = :p OR parent_workflow_id = :p ORDER BY workflow_id, step", p=parent)


def child(r: OrchestratorResult, name: str) -> Any:
    return next(c for c in r.children if c.name == name)


def assert_books(engine: Engine, r: OrchestratorResult) -> None:
    """The family's usage is exactly its llm rows in the ledger, and within the orchestration's budget."""
    llm = [x for x in family(engine, r.workflow_id) if x["kind"] == "llm"]
    assert sum(x["tokens"] for x in llm) == r.usage.tokens == sum(c.usage.tokens for c in r.children)
    assert sum(x["cost_usd"] for x in llm) == pytest.approx(r.usage.cost_usd, abs=1e-8)
    b = r.budget
    assert b.used_tokens == r.usage.tokens and b.reserved_tokens == 0
    assert b.max_tokens is not None and b.used_tokens <= b.max_tokens
    assert b.max_usd is not None and b.used_usd <= b.max_usd + 1e-8


# --- on the dev server -----------------------------------------------------------------------------
@on_both_databases
async def test_report_end_to_end(client: Client, db_url: str) -> None:
    async with research_env(client, db_url) as env:
        r = await research(env)
        rows_ = family(env.engine, r.workflow_id)
        published = rows(env.engine, "SELECT * FROM research_reports WHERE workflow_id = :w",
                         w=child(r, "synthesizer").workflow_id)
    assert r.status == "completed", (r.reason, r.children)
    assert r.plan_source == "planner" and [t.name for t in r.plan] == ["retrieval", "analysis"]
    assert [(c.name, c.model) for c in r.children] == [
        ("planner", "research_planner"), ("retrieval", "research_retrieval"), ("analysis", "research_analysis"),
        ("synthesizer", "research_writer")]
    assert all(c.status == "completed" and c.attempts == 1 for c in r.children)
    # Each child on its agent's tier, with its agent's narrow tools only.
    by_child = {c.name: [x for x in rows_ if x["workflow_id"] == c.workflow_id] for c in r.children}
    models = {n: {x["model"] for x in xs if x["kind"] == "llm"} for n, xs in by_child.items()}
    assert models == {"planner": {"sim-large"}, "retrieval": {"sim-small"}, "analysis": {"sim-large"},
                      "synthesizer": {"sim-large"}}
    tools = {n: {x["tool"] for x in xs if x["kind"] == "tool"} for n, xs in by_child.items()}
    assert tools == {"planner": set(), "retrieval": {"search_documents", "read_document"},
                     "analysis": {"transaction_stats"}, "synthesizer": {"publish_report"}}
    # The report: the writer's structured answer, citing what retrieval read, with analysis's figures.
    assert r.structured is not None
    report = r.structured["report"]
    read = set(re.findall(r"\[(D-\d{3})\]", r.results["retrieval"].output))
    assert read and set(r.structured["sources"]) == read and "D-001" in read
    assert "duplicate charges" in report and "EUR" in report and "## Gaps" not in report
    # Published once, the same body; the id is in the answer.
    assert [p["body"] for p in published] == [report]
    key = published[0]["idempotency_key"]  # the id comes from the call's key (the same in a replay), not the row
    assert r.structured["report_id"] == f"RE-{sha256(key.encode()).hexdigest()[:8].upper()}"
    assert_books(env.engine, r)
    outcome = [x for x in rows_ if x["workflow_id"] == r.workflow_id and x["kind"] == "outcome"]
    assert len(outcome) == 1 and outcome[0]["status"] == "resolved" and outcome[0]["task_type"] == NAME


async def test_a_worker_over_its_budget_leaves_the_report_partial(client: Client, db_url: str) -> None:
    cap = 1_500
    async with research_env(client, db_url) as env:
        r = await research(env, child_budgets={"retrieval": keel.Budget(max_tokens=cap)})
        spent = rows(env.engine, "SELECT SUM(input_tokens + output_tokens) AS t FROM ledger WHERE workflow_id = :w "
                                 "AND kind = 'llm'", w=child(r, "retrieval").workflow_id)[0]["t"]
    ret = child(r, "retrieval")
    assert ret.status == "budget_exceeded" and ret.attempts == 1 and ret.budget_tokens == cap
    # It did some work and never used more than its cap, by the ledger.
    assert 0 < spent <= cap and spent == ret.usage.tokens
    assert child(r, "analysis").status == child(r, "synthesizer").status == "completed"
    # The orchestration did not fail: the report was written and published, and says what is missing.
    assert r.status == "partial" and r.missing and r.missing[0].startswith("retrieval: budget_exceeded")
    assert r.structured is not None and r.structured["report_id"]
    assert "## Gaps" in r.structured["report"] and "retrieval: budget_exceeded" in r.structured["report"]
    assert r.structured["sources"] == []  # nothing read, nothing cited
    assert_books(env.engine, r)


async def test_the_budget_bounds_the_children(client: Client, db_url: str) -> None:
    budget = keel.Budget(max_tokens=9_000, max_usd=0.2)
    async with research_env(client, db_url) as env:
        r = await research(env, budget=budget)
        starved = await research(env, budget=keel.Budget(max_tokens=1_400, max_usd=0.2))
    # 12,000 + 10,000 worker caps do not fit what the planner left: each is cut to its share.
    assert any(d.kind == "shrink_child" and d.reason.startswith("retrieval:") for d in r.decisions)
    assert sum(child(r, n).budget_tokens or 0 for n in ("retrieval", "analysis")) <= 9_000
    assert r.usage.tokens <= 9_000
    for c in r.children:
        assert c.status in ("completed", "budget_exceeded", "not_started"), c
    assert r.status in ("completed", "partial", "escalated") and (r.status == "completed") == (not r.missing)
    assert_books(env.engine, r)
    # What the planner leaves is below a child's floor: no worker starts, and none is dropped silently.
    assert [c.status for c in starved.children[1:]] == ["not_started", "not_started"]
    assert starved.status in ("escalated", "budget_exceeded") and "no task completed" in starved.reason
    assert starved.usage.tokens <= 1_400 and starved.children[0].status == "completed"
    assert_books(env.engine, starved)


async def test_a_budget_for_a_task_not_in_the_plan_is_refused(client: Client, db_url: str) -> None:
    async with research_env(client, db_url) as env:
        r = await research(env, child_budgets={"retreival": keel.Budget(max_tokens=2_000)})
    assert r.status == "rejected" and "child_budgets name ['retreival']" in r.reason
    assert [c.name for c in r.children] == ["planner"]


async def test_keel_research_on_the_command_line(client: Client, db_url: str, tmp_path: Path) -> None:
    async with research_env(client, db_url) as env:
        cli_env = {"TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
                   "KEEL_TASK_QUEUE": env.settings.task_queue, "KEEL_HOME": str(tmp_path / "home"),
                   "KEEL_DATABASE_URL": db_url, "COLUMNS": "200"}
        out = await asyncio.to_thread(CliRunner().invoke, app, ["research", QUESTION], env=cli_env)
        as_json = await asyncio.to_thread(CliRunner().invoke, app, ["research", QUESTION, "--json", "--key", "cli"],
                                          env=cli_env)
    assert out.exit_code == 0, out.output
    assert "started research-" in out.output and "Why did refunds rise in Q3 2024" in out.output
    assert "completed" in out.output and "sources: D-" in out.output and "report RE-" in out.output
    assert "research_retrieval" in out.output and "total" in out.output  # the costs table
    res = OrchestratorResult.model_validate_json(as_json.output)
    assert res.workflow_id == "research-cli" and res.status == "completed"


def test_keel_research_refuses_bad_input() -> None:
    empty = CliRunner().invoke(app, ["research", "  "])
    assert empty.exit_code == 2 and "the question is empty" in empty.output
    bad = CliRunner().invoke(app, ["research", "Q?", "--child-budget", "retrieval=lots"])
    assert bad.exit_code == 2 and "use NAME=TOKENS" in bad.output


# --- the plan and the guardrails (pure) ------------------------------------------------------------
def test_the_sim_planner_makes_a_valid_plan_within_the_budget() -> None:
    p = keel.Plan.model_validate(plan(QUESTION))
    assert [(t.agent, t.name) for t in p.tasks] == [("research_retrieval", "retrieval"),
                                                    ("research_analysis", "analysis")]
    assert all(t.input.startswith(f"Research question: {QUESTION}") for t in p.tasks)
    # The default caps of the planner, both workers and the writer fit the family's budget.
    caps = [a.budget for a in AGENTS]
    assert sum(b.max_tokens or 0 for b in caps) < (BUDGET.max_tokens or 0)
    assert sum(b.max_usd or 0 for b in caps) < (BUDGET.max_usd or 0)


def _outcome(tool: str, content: dict[str, Any]) -> keel.ToolOutcome:
    return keel.ToolOutcome(tool=tool, arguments={}, content=content)


def test_a_report_cites_only_real_sources() -> None:
    context = ("retrieval (research_retrieval): Findings:\n- [D-001] Q3 refunds: ...\n- [D-002] Postmortem: ...",
               "Missing: analysis: budget_exceeded")

    def action(body: str) -> keel.ProposedAction:
        return keel.ProposedAction(tool="publish_report", arguments={"title": "t", "body": body},
                                   permission="autonomous", input="Q?", tenant="internal", executed=(),
                                   context=context)

    assert publish_cites_its_context(action("As [D-001] and [D-002] show...")) is None
    assert publish_cites_its_context(action("As [D-005] shows")) == "the report cites D-005, which no worker found"
    assert "not a document of the corpus" in (publish_cites_its_context(action("See D-999.")) or "")

    def final(text_: str, sources: list[str]) -> keel.FinalOutput:
        from agents.research import Report

        return keel.FinalOutput(text=text_, structured=Report(title="t", report=text_, sources=sources),
                                input="Q?", tenant="internal", executed=(), context=context)

    assert report_cites_its_context(final("[D-001]", ["D-001", "D-002"])) == []
    assert report_cites_its_context(final("[D-001]", ["D-013"])) == ["the report cites D-013, which no worker found"]
    # The retrieval worker cites only what its own searches and reads returned.
    read = (_outcome("search_documents", {"results": [{"doc_id": "D-001"}, {"doc_id": "D-004"}]}),
            _outcome("read_document", {"doc_id": "D-002"}))
    ok = keel.FinalOutput(text="[D-001] [D-002] [D-004]", structured=None, input="", tenant="", executed=read)
    invented = keel.FinalOutput(text="[D-001] [D-007]", structured=None, input="", tenant="", executed=read)
    assert retrieval_cites_what_it_read(ok) == []
    assert retrieval_cites_what_it_read(invented) == ["the answer cites D-007, which no worker found"]


# --- the tools, on the agent's own tables ----------------------------------------------------------
def _ctx(tool: str = "search_documents") -> keel.ToolContext:
    wid = f"t-{uuid.uuid4().hex[:6]}"
    return keel.ToolContext(agent="research_retrieval", tool=tool, workflow_id=wid, step=1,
                            idempotency_key=f"{wid}/1", attempt=1, tenant="internal", key="")


@pytest.mark.parametrize(("query", "best"), [
    ("duplicate charges postmortem processor retries", "D-002"),
    ("overdraft fee proposal", "D-013"),
    ("chargeback dispute process", "D-004"),
    ("LLM cost tokens September", "D-007"),
    ("refund trends Q3", "D-001"),
    ("phishing account takeover", "D-005"),
])
def test_search_ranks_the_best_match_first(db_url: str, query: str, best: str) -> None:
    results = search_documents.fn(_ctx(), SearchArgs(query=query, limit=5))["results"]
    assert results[0]["doc_id"] == best
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(results) <= 5
    assert all(r["snippet"] and len(r["snippet"]) <= 240 for r in results)


def test_search_and_read_say_what_to_do_when_nothing_matches(db_url: str) -> None:
    with pytest.raises(keel.ToolError, match=r"no document matches 'zeppelin quantum giraffe'.*try other words"):
        search_documents.fn(_ctx(), SearchArgs(query="zeppelin quantum giraffe"))
    with pytest.raises(keel.ToolError, match="no searchable words"):
        search_documents.fn(_ctx(), SearchArgs(query="the of and"))
    assert search_terms("Refunds, policies & duplicate-charges!") == [
        "refund", "policy", "duplicate-charge", "duplicate", "charge"]
    doc = read_document.fn(_ctx("read_document"), ReadArgs(doc_id="d-002"))
    assert doc["doc_id"] == "D-002" and "5,120" in doc["body"]
    with pytest.raises(keel.ToolError, match="no document 'D-999'; known ids: D-001"):
        read_document.fn(_ctx("read_document"), ReadArgs(doc_id="D-999"))
    assert len(CORPUS) >= 12 and len({d.id for d in CORPUS}) == len(CORPUS)


@on_both_databases
@pytest.mark.parametrize("group_by", ["kind", "merchant", "none"])
def test_transaction_stats_are_aggregates_without_customer_data(db_url: str, group_by: str) -> None:
    seed = build_seed()
    txs = seed["transactions"]
    res = transaction_stats.fn(_ctx("transaction_stats"), StatsArgs(days=365, group_by=group_by))
    totals = res["totals"]
    assert totals["count"] == len(txs)
    assert totals["duplicates"] == sum(1 for t in txs if t["duplicate_of"])
    assert totals["disputed"] == sum(1 for t in txs if t["disputed"])
    assert totals["total_amount"] == pytest.approx(sum(t["amount"] for t in txs), abs=0.01)
    if group_by != "none":
        assert sum(g["count"] for g in res["groups"]) == totals["count"] or res["groups_total"] > 20
    dumped = json.dumps(res)
    # No customer id, name, email, phone, card number, account or transaction id, whatever the grouping.
    assert not re.search(r"\b(C|T|A)-\d+", dumped)
    for c in seed["customers"]:
        for value in (c["id"], c["name"], c["email"], c["phone"], c["card_number"], c["card_number"][-4:]):
            assert value not in dumped, value
    # The table itself holds no identifier to leak.
    assert set(store.transactions.c.keys()) == {"id", "kind", "merchant", "amount", "days_ago", "disputed",
                                                 "duplicate"}


@on_both_databases
def test_transaction_stats_of_one_kind(db_url: str) -> None:
    fees = transaction_stats.fn(_ctx("transaction_stats"), StatsArgs(days=365, kind="fee", group_by="none"))
    assert fees["totals"]["count"] > 0 and fees["totals"]["duplicates"] == 0
    with pytest.raises(keel.ToolError, match="kinds: "):
        transaction_stats.fn(_ctx("transaction_stats"), StatsArgs(days=365, kind="lottery"))


@on_both_databases
def test_publish_is_idempotent_and_the_tables_are_seeded_once(db_url: str) -> None:
    ctx = _ctx("publish_report")
    first = publish_report.fn(ctx, PublishArgs(title="T", body="# T\n\nAs [D-002] says."))
    again = publish_report.fn(ctx, PublishArgs(title="T", body="# T\n\nAs [D-002] says."))
    assert first == again and first["sources"] == ["D-002"] and first["report_id"].startswith("RE-")
    engine = store.engine_for()
    assert len(rows(engine, "SELECT id FROM research_reports")) == 1
    assert store.setup(engine) is False  # a second worker finds the seed there
    assert len(rows(engine, "SELECT id FROM research_documents")) == len(CORPUS)


@on_both_databases
def test_concurrent_first_uses_seed_once_and_racing_attempts_publish_once(db_url: str) -> None:
    """Workers starting together seed the tables once; attempts of one publish call racing (a retry while
    the first still runs) write one report and all answer alike."""
    seeded: list[bool] = []
    threads = [threading.Thread(target=lambda: seeded.append(store.setup(store.make_engine(db_url))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seeded) == [False, False, False, True]
    ctx = _ctx("publish_report")
    args = PublishArgs(title="T", body="# T\n\nAs [D-002] says.")
    go = threading.Barrier(6)
    out: list[Any] = []

    def publish(attempt: int) -> None:
        go.wait()
        try:
            out.append(publish_report.fn(dataclasses.replace(ctx, attempt=attempt), args))
        except Exception as e:
            out.append(e)
    threads = [threading.Thread(target=publish, args=(a,)) for a in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 6 and all(r == out[0] for r in out), out
    assert out[0]["status"] == "published"
    engine = store.engine_for()
    assert len(rows(engine, "SELECT id FROM research_reports")) == 1
    assert len(rows(engine, "SELECT id FROM research_documents")) == len(CORPUS)


# --- evidence: a finding rests on what the task retrieved -------------------------------------------
def _final(text: str, executed: tuple[keel.ToolOutcome, ...] = (), context: tuple[str, ...] = (),
           structured: Any = None) -> keel.FinalOutput:
    return keel.FinalOutput(text=text, structured=structured, input="How did duplicate charges change in Q3?",
                            tenant="internal", executed=executed, context=context)


def test_figures_are_read_as_values() -> None:
    assert figures("1,234 charges (12.5%) in 90 days, see [D-002], 3 of them") == {"1234", "12.5", "90"}


def test_evidence_of_each_research_agent() -> None:
    read = keel.ToolOutcome(tool="read_document", arguments={"doc_id": "D-002"}, content={"doc_id": "D-002"})
    assert "no document was retrieved" in (retrieval_found_documents(_final("Refunds rose.")) or "")
    assert "cite no document" in (retrieval_found_documents(_final("Refunds rose.", (read,))) or "")
    assert retrieval_found_documents(_final("- [D-002] Refunds rose.", (read,))) is None
    assert "no figures were computed" in (analysis_used_data(_final("1,200 disputes.")) or "")
    stats = keel.ToolOutcome(tool="transaction_stats", arguments={}, content={"totals": {"count": 1200}})
    assert analysis_used_data(_final("1,200 disputes.", (stats,))) is None
    context = ("analysis (research_analysis): Figures:\n- Transactions: 1,200 totalling 45,000.50 EUR.",)
    assert report_figures_found(_final("1,200 transactions, 45,000.50 EUR.", context=context)) is None
    invented = report_figures_found(_final("1,200 transactions; refunds up 37% to 5,000 EUR.", context=context))
    assert invented is not None and "37" in invented and "5000" in invented


async def test_a_retrieval_that_found_nothing_is_not_an_answer(client: Client, db_url: str) -> None:
    # What a small real model did: "completed" with findings it never read. Sent back with the reason;
    # still nothing read: the task goes to a human (an orchestration leaves it in `missing`: partial).
    invented = "Findings:\n- Duplicate charges rose 40% in Q3 [D-999]."
    model = ScriptedModel([answer(invented), answer(invented), call("search_documents", query="duplicate charges"),
                           answer(invented), answer(invented)])
    async with agent_environment(*AGENTS, model=model, client=client, db_url=db_url) as env:
        r = await env.run("research_retrieval", "How did duplicate charges change in Q3?",
                          models={"small": SCRIPTED, "large": SCRIPTED},
                          budget=keel.Budget(max_tokens=50_000, max_usd=1.0))
    assert r.status == "escalated" and "lacks its evidence" in r.reason, r.reason
    assert [d.kind for d in r.decisions].count("missing_evidence") == 4 and r.output == ""
