"""The support desk (agents/support_desk, public API only) end to end on the real Temporal dev server:
a balance question answered from the account read, a refund through `keel approve` that runs once even
when its activity is retried, the refund bound held by the agent's validator, the card-number and
refund-claim output checks, and the agent's own tables seeded once beside the platform's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, inspect, select, text
from temporalio.client import Client
from typer.testing import CliRunner

import keel
from activities.db import init_db, make_engine
from activities.ledger import Ledger
from agents.support_desk import AGENTS, issue_refund, store, support_desk
from agents.support_desk.data import build_seed
from agents.support_desk.tools import RefundArgs, reference
from keel import registry
from keel.testing import SCRIPTED, AgentEnvironment, ScriptedModel, agent_environment, answer, call
from starter.approvals_cli import pending_action
from starter.cli import app
from tests.conftest import assert_eventually
from tests.pg import database_url, on_both_databases

SEED = build_seed()
CUSTOMER = "C-1001"
ACCOUNT = next(a for a in SEED["accounts"] if a["customer_id"] == CUSTOMER)
CARD = next(c for c in SEED["customers"] if c["id"] == CUSTOMER)["card_number"]
DUPLICATE = next(t for t in SEED["transactions"] if t["customer_id"] == CUSTOMER and t["duplicate_of"])
SCRIPT_MODELS = {"small": SCRIPTED, "large": SCRIPTED}


def ask(text: str, customer: str = CUSTOMER) -> str:
    return f"Customer: {customer}\n\n{text}"


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """One database for the platform's ledger and the agent's tables, as in production: SQLite, and
    PostgreSQL too for a test marked `on_both_databases`."""
    url = database_url(request, tmp_path)
    monkeypatch.setenv("KEEL_DATABASE_URL", url)
    store.reset()
    yield url
    store.reset()


@contextlib.asynccontextmanager
async def desk(client: Client, db_url: str, model: ScriptedModel | None = None,
               agent: keel.Agent = support_desk) -> AsyncIterator[AgentEnvironment]:
    async with agent_environment(agent, model=model, client=client, db_url=db_url) as env:
        yield env


def rows(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def ledger(env: AgentEnvironment, workflow_id: str) -> list[dict[str, Any]]:
    return rows(env.engine, "SELECT step, kind, tool, status, reason, attempt, tenant, task_type FROM ledger "
                            "WHERE workflow_id = :w ORDER BY step, kind, key", w=workflow_id)


def refunds(engine: Engine) -> list[dict[str, Any]]:
    store.engine_for()  # the agent's tables exist even when no tool of this test ran
    return rows(engine, "SELECT * FROM support_desk_refunds ORDER BY id")


def balance(engine: Engine, account_id: str) -> float:
    return float(rows(engine, "SELECT balance FROM support_desk_accounts WHERE id = :a", a=account_id)[0]["balance"])


def assert_ledger_equals_result(env: AgentEnvironment, result: keel.AgentResult) -> None:
    """The task's ledger rows add up to what its result says: model calls, tokens, cost, tools executed."""
    ledger = Ledger(env.engine)
    totals = ledger.task_totals(result.workflow_id)
    assert (totals["llm_calls"], totals["input_tokens"], totals["output_tokens"]) == (
        result.llm_calls, result.input_tokens, result.output_tokens)
    assert totals["cost_usd"] == pytest.approx(result.cost_usd)
    (outcome,) = [o for o in ledger.outcomes() if o["workflow_id"] == result.workflow_id]
    assert (outcome["input_tokens"], outcome["output_tokens"], outcome["tools"]) == (
        result.input_tokens, result.output_tokens, result.tools_executed)
    assert outcome["cost_usd"] == pytest.approx(result.cost_usd)


def cli_env(env: AgentEnvironment, tmp_path: Path) -> dict[str, str]:
    return {"TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
            "KEEL_TASK_QUEUE": env.settings.task_queue, "KEEL_HOME": str(tmp_path / "home"),
            "KEEL_DATABASE_URL": str(env.engine.url), "COLUMNS": "200"}


async def keel_cli(env: dict[str, str], *args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def retried_once(t: keel.Tool) -> keel.Tool:
    """The tool, but its first attempt fails after its write committed (a lost response): Temporal retries."""

    def fn(ctx: keel.ToolContext, args: RefundArgs) -> dict[str, Any]:
        out: dict[str, Any] = t.fn(ctx, args)
        if ctx.attempt == 1:
            raise RuntimeError("connection lost after the commit")
        return out

    return dataclasses.replace(t, fn=fn)


def triaged(category: str, confidence: float = 0.9) -> Any:
    """The scripted triage step every support desk task starts with."""
    return answer(json.dumps({"category": category, "urgency": "normal", "confidence": confidence}))


# --- the definition ----------------------------------------------------------------------------------
def test_the_definition_uses_the_public_api() -> None:
    assert AGENTS == [support_desk] and support_desk.name == "support_desk"
    assert {n: t.permission for n, t in support_desk.tool_map.items()} == {
        "get_account": "read_only", "get_transactions": "read_only", "lookup_policy": "read_only",
        "issue_refund": "confirm", "escalate_to_human": "autonomous"}
    assert support_desk.tool_map["escalate_to_human"].hands_off
    assert support_desk.triage is not None and support_desk.triage.prompt_name == "support_desk_triage"
    assert "support-lead" in support_desk.approvers["issue_refund"]
    assert support_desk.prompt_path().name == "support_desk.v1.md" and support_desk.prompt_path().is_file()
    assert issue_refund.claims and all(t.startswith("support_desk_") for t in store.metadata.tables)


# --- end to end on Temporal ------------------------------------------------------------------------------
@on_both_databases
async def test_a_balance_question_is_answered_from_the_account(client: Client, db_url: str) -> None:
    async with desk(client, db_url) as env:
        result = await env.run("support_desk", ask("What is the balance of my account?"), tenant=CUSTOMER)
        lines = ledger(env, result.workflow_id)
        assert_ledger_equals_result(env, result)
    assert result.status == "completed", result.reason
    assert result.tools_executed == ["get_account"]
    assert f"{ACCOUNT['balance']:.2f} EUR" in result.output and "Hello Ana Silva" in result.output
    assert [r["kind"] for r in lines] == ["outcome", "llm", "llm", "tool", "llm"]  # triage, then the desk
    assert {r["tenant"] for r in lines} == {CUSTOMER} and {r["task_type"] for r in lines} == {"support_desk"}
    assert lines[0]["status"] == "resolved" and lines[3]["tool"] == "get_account"
    assert result.triage == {"category": "general_inquiry", "urgency": "low", "confidence": 0.86}


async def test_the_sim_answers_each_kind_of_request_from_what_it_read(client: Client, db_url: str) -> None:
    fee = next(t for t in SEED["transactions"] if t["customer_id"] == CUSTOMER and t["kind"] == "fee")
    async with desk(client, db_url) as env:
        fees = await env.run("support_desk", ask("Why was I charged a fee this month?"), tenant=CUSTOMER)
        address = await env.run("support_desk", ask("How do I change my postal address?"), tenant=CUSTOMER)
        nobody = await env.run("support_desk", "What is my balance?")
        # This request spirals under the sim's default seed and spiral rate: pinned calm, as its path is checked.
        pending = await env.run("support_desk", ask("Refund the duplicate charge please."), tenant=CUSTOMER,
                                approval_mode="escalate", sim=keel.SimConfig(spiral_rate=0))
        made = refunds(env.engine)
    assert fees.tools_executed == ["get_account", "get_transactions", "lookup_policy"]
    assert f"{fee['id']}: a fee of 4.90 EUR" in fees.output and "Monthly account fee 4.90 EUR" in fees.output
    assert address.tools_executed == ["lookup_policy"] and "under Profile" in address.output
    assert nobody.tools_executed == [] and "customer id" in nobody.output
    # With nobody to approve it, the proposed refund goes to the human queue, never executed.
    assert pending.status == "escalated" and "issue_refund" in pending.reason and made == []
    proposed = pending.tools_blocked[0]
    assert proposed.tool == "issue_refund" and DUPLICATE["id"] in proposed.arguments_json


@on_both_databases
async def test_a_refund_waits_for_a_support_lead_and_runs_once_although_retried(
        client: Client, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = dataclasses.replace(support_desk, prompt=support_desk.prompt_path(),
                                tools=[*support_desk.tools[:3], retried_once(issue_refund)])
    monkeypatch.setitem(registry._AGENTS, "support_desk", agent)  # this variant serves the name for this test
    request = ask(f"I was charged twice at {DUPLICATE['merchant']} for {DUPLICATE['amount']:.2f} EUR. "
                  "Please refund the duplicate charge.")
    async with desk(client, db_url, agent=agent) as env:
        before = balance(store.engine_for(), ACCOUNT["id"])  # the agent's tables, made on first use
        handle = await env.start("support_desk", request, tenant=CUSTOMER)
        action = await assert_eventually(lambda: pending_action(client, handle.id), lambda a: a is not None)
        assert action is not None and action.tool == "issue_refund"
        assert action.arguments["transaction_id"] == DUPLICATE["id"]
        assert action.arguments["amount"] == DUPLICATE["amount"]
        assert refunds(env.engine) == []  # nothing runs before the decision
        cli = cli_env(env, tmp_path)
        refused = await keel_cli(cli, "approve", handle.id, "--as", "intern")
        assert refused.exit_code != 0 and "not an approver" in refused.output
        ok = await keel_cli(cli, "approve", handle.id, "--as", "support-lead", "--comment", "duplicate")
        assert ok.exit_code == 0, ok.output
        result = await handle.result()
        made = refunds(env.engine)
        tool_rows = [r for r in ledger(env, result.workflow_id) if r["tool"] == "issue_refund" and r["kind"] == "tool"]
        after = balance(env.engine, ACCOUNT["id"])
        assert_ledger_equals_result(env, result)
    assert result.status == "completed", result.reason
    assert result.tools_executed == ["get_account", "get_transactions", "lookup_policy", "issue_refund"]
    assert [(a.approver, a.accepted) for a in result.approvals] == [("support-lead", True)]
    assert len(made) == 1 and made[0]["transaction_id"] == DUPLICATE["id"]
    assert made[0]["idempotency_key"].startswith(result.workflow_id)
    assert tool_rows and tool_rows[0]["attempt"] == 2  # the call was retried, and refunded once
    assert after == pytest.approx(before + DUPLICATE["amount"])
    assert f"Refund {reference('RF', made[0]['idempotency_key'])}" in result.output and "is complete" in result.output


@on_both_databases
def test_the_refund_is_idempotent_on_the_call_key(db_url: str) -> None:
    ctx = keel.ToolContext(agent="support_desk", tool="issue_refund", workflow_id="wf-1", step=4,
                           idempotency_key="wf-1/4", attempt=1, tenant=CUSTOMER, key="")
    args = RefundArgs(customer_id=CUSTOMER, transaction_id=DUPLICATE["id"], amount=DUPLICATE["amount"],
                      reason="duplicate")
    engine = store.engine_for()
    before = balance(engine, ACCOUNT["id"])
    first = issue_refund.fn(ctx, args)
    again = issue_refund.fn(dataclasses.replace(ctx, attempt=2), args)
    assert first == again and first["status"] == "executed"
    # Its id is the call's, whatever the database held before (a replayed task sends the same id back).
    assert first["refund_id"] == reference("RF", "wf-1/4") and first["refund_id"] != reference("RF", "wf-1/5")
    assert len(refunds(engine)) == 1 and balance(engine, ACCOUNT["id"]) == pytest.approx(before + DUPLICATE["amount"])
    # Another call (another key) of the same refund finds nothing left to refund: the tool refuses it too.
    with pytest.raises(keel.ToolError, match="exceeds the refundable amount"):
        issue_refund.fn(dataclasses.replace(ctx, idempotency_key="wf-1/9"), args)
    with pytest.raises(keel.ToolError, match="exceeds the policy maximum"):
        issue_refund.fn(dataclasses.replace(ctx, idempotency_key="wf-2/1"), args.model_copy(update={"amount": 501.0}))
    with pytest.raises(keel.ToolError, match="not this task's customer"):
        issue_refund.fn(dataclasses.replace(ctx, idempotency_key="wf-3/1", tenant="C-1002"), args)
    assert len(refunds(engine)) == 1


async def test_a_refund_above_the_policy_bound_is_refused_by_the_validator(client: Client, db_url: str) -> None:
    big = {"customer_id": CUSTOMER, "transaction_id": DUPLICATE["id"], "amount": 650.0, "reason": "customer asks"}
    model = ScriptedModel([
        triaged("refund_request"),
        call("get_transactions", customer_id=CUSTOMER, days=60),
        call("lookup_policy", topic="refunds"),
        call("issue_refund", **big),
        call("get_account", customer_id="C-1002"),  # another customer's account: refused too
        answer("Refunds above 500 EUR go to our disputes team, who will review the charge."),
    ])
    async with desk(client, db_url, model) as env:
        result = await env.run("support_desk", ask("Refund 650 EUR please."), tenant=CUSTOMER, models=SCRIPT_MODELS)
        guard = [r for r in ledger(env, result.workflow_id) if r["kind"] == "guardrail"]
        made = refunds(env.engine)
    model.assert_all_used()
    assert result.status == "completed", result.reason
    assert made == [] and "issue_refund" not in result.tools_executed
    assert [b.tool for b in result.tools_blocked] == ["issue_refund", "get_account"]
    assert "refused by policy: refund of 650.00 exceeds the policy maximum of 500.00" in result.tools_blocked[0].reason
    assert "not this task's customer" in result.tools_blocked[1].reason
    assert result.validation_failures == 2
    assert "exceeds the policy maximum" in model.calls[4].messages[-1].content  # the model saw why
    assert [(g["tool"], g["status"]) for g in guard] == [("issue_refund", "blocked"), ("get_account", "blocked")]


async def test_a_refund_of_a_transaction_not_read_is_refused(client: Client, db_url: str) -> None:
    model = ScriptedModel([
        triaged("refund_request"),
        call("issue_refund", customer_id=CUSTOMER, transaction_id=DUPLICATE["id"], amount=1.0, reason="dup"),
        call("get_account", customer_id=CUSTOMER),
        answer("We are looking into the charge."),
    ])
    async with desk(client, db_url, model) as env:
        result = await env.run("support_desk", ask("refund it"), tenant=CUSTOMER, models=SCRIPT_MODELS)
        made = refunds(env.engine)
    assert made == [] and "not among the customer's transactions retrieved" in result.tools_blocked[0].reason


async def test_an_answer_about_the_account_without_reading_it_is_sent_back(client: Client, db_url: str) -> None:
    # A real small model answers a refund request at once, from nothing: the desk's evidence hook
    # (keel.Agent(evidence=...)) sends it back; it reads the account, then its answer goes out.
    model = ScriptedModel([
        triaged("refund_request"),
        answer("Your refund is being handled."),
        call("get_account", customer_id=CUSTOMER),
        answer("I have looked at your account; a support lead will review the charge."),
    ])
    async with desk(client, db_url, model) as env:
        result = await env.run("support_desk", ask("Refund my duplicate charge"), tenant=CUSTOMER,
                               models=SCRIPT_MODELS)
    assert result.status == "completed", result.reason
    assert [d.kind for d in result.decisions].count("missing_evidence") == 1
    assert result.output.startswith("I have looked at your account") and result.invalid_outputs == 1


async def test_an_answer_that_never_rests_on_the_account_goes_to_a_human(client: Client, db_url: str) -> None:
    model = ScriptedModel([triaged("billing_question"), answer("All fine."), answer("All fine, really."),
                           answer("Fine."), answer("Still fine.")])
    async with desk(client, db_url, model) as env:
        result = await env.run("support_desk", ask("Why was I charged 30 EUR?"), tenant=CUSTOMER,
                               models=SCRIPT_MODELS)
    assert result.status == "escalated" and "lacks its evidence" in result.reason, result.reason
    assert "were not read" in result.reason and result.output == ""
    assert result.partial_output and "Still fine" in result.partial_output


async def test_a_general_question_needs_no_account(client: Client, db_url: str) -> None:
    model = ScriptedModel([triaged("general_inquiry"), call("lookup_policy", topic="fees"),
                           answer("Our fees are listed in the policy.")])
    async with desk(client, db_url, model) as env:
        result = await env.run("support_desk", ask("What are your fees?"), tenant=CUSTOMER, models=SCRIPT_MODELS)
    assert result.status == "completed" and "missing_evidence" not in [d.kind for d in result.decisions]


@pytest.mark.parametrize(("said", "problem"), [
    (f"Your card {'.'.join(CARD[i:i + 4] for i in range(0, 16, 4))} is active.", "contains a full card number"),
    ("Your IBAN DE00-5001-2345-6789-0123-45 is fine.", "contains an IBAN"),
    ("We have refunded the duplicate charge.", "claims an action that was not executed (issue_refund)"),
    ("You will receive a refund within 3 days.", "promises a refund that was not executed"),
])
async def test_output_checks_hold_an_answer_back(client: Client, db_url: str, said: str, problem: str) -> None:
    model = ScriptedModel([triaged("card_issue"), call("get_account", customer_id=CUSTOMER), answer(said)])
    async with desk(client, db_url, model) as env:
        result = await env.run("support_desk", ask("Is my card ok?"), tenant=CUSTOMER, models=SCRIPT_MODELS)
    assert result.status == "escalated" and problem in result.reason, result.reason
    assert result.output == "" and "output_check" in [g.kind for g in result.guardrails]
    assert CARD not in result.reason


@on_both_databases
async def test_the_seed_runs_once_for_two_environments_on_one_database(client: Client, db_url: str) -> None:
    for _ in range(2):
        store.reset()  # as a second worker process would: connect, create and check again
        async with desk(client, db_url) as env:
            result = await env.run("support_desk", ask("What is my balance?"), tenant=CUSTOMER)
            assert result.status == "completed", result.reason
    engine = create_engine(db_url)
    for name, seeded in SEED.items():
        count = rows(engine, f"SELECT count(*) AS n FROM support_desk_{name}")[0]["n"]
        assert count == len(seeded), name
    assert store.setup(store.make_engine(db_url)) is False
    engine.dispose()


def test_concurrent_first_uses_seed_once(any_db_url: str) -> None:
    url = any_db_url
    seeded: list[bool] = []
    threads = [threading.Thread(target=lambda: seeded.append(store.setup(store.make_engine(url)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seeded) == [False, False, False, True]
    engine = create_engine(url)
    assert rows(engine, "SELECT count(*) AS n FROM support_desk_customers")[0]["n"] == len(SEED["customers"])
    engine.dispose()


@on_both_databases
def test_concurrent_attempts_of_one_refund_refund_once(db_url: str) -> None:
    """Attempts of one call racing (a retry while the first attempt still runs) make one refund, all answering
    alike; calls of different keys racing to refund one transaction in full: one refund, the others refused."""
    ctx = keel.ToolContext(agent="support_desk", tool="issue_refund", workflow_id="wf-r", step=4,
                           idempotency_key="wf-r/4", attempt=1, tenant=CUSTOMER, key="")
    args = RefundArgs(customer_id=CUSTOMER, transaction_id=DUPLICATE["id"], amount=DUPLICATE["amount"],
                      reason="duplicate")
    engine = store.engine_for()
    before = balance(engine, ACCOUNT["id"])

    def race(contexts: list[keel.ToolContext]) -> list[Any]:
        out: list[Any] = [None] * len(contexts)
        go = threading.Barrier(len(contexts))

        def one(i: int) -> None:
            go.wait()
            try:
                out[i] = issue_refund.fn(contexts[i], args)
            except Exception as e:
                out[i] = e
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(contexts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    same = race([dataclasses.replace(ctx, attempt=a) for a in range(1, 7)])
    assert all(r == same[0] for r in same), same
    assert same[0]["refund_id"] == reference("RF", "wf-r/4") and same[0]["status"] == "executed"
    assert len(refunds(engine)) == 1
    assert balance(engine, ACCOUNT["id"]) == pytest.approx(before + DUPLICATE["amount"])
    store.reset()  # undo the refund on a fresh seed: drop the agent's tables
    with engine.begin() as conn:
        store.metadata.drop_all(conn)
    engine = store.engine_for()
    others = race([dataclasses.replace(ctx, idempotency_key=f"wf-{i}/4", workflow_id=f"wf-{i}") for i in range(6)])
    done = [r for r in others if isinstance(r, dict)]
    refused = [r for r in others if isinstance(r, keel.ToolError)]
    assert len(done) == 1 and len(refused) == 5, others
    assert all("exceeds the refundable amount" in str(e) for e in refused)
    assert len(refunds(engine)) == 1
    assert balance(engine, ACCOUNT["id"]) == pytest.approx(before + DUPLICATE["amount"])


def _platform_state(engine: Engine) -> dict[str, tuple[list[str], int]]:
    with engine.connect() as conn:
        insp = inspect(conn)
        return {t: ([c["name"] for c in insp.get_columns(t)],
                    conn.execute(select(func.count()).select_from(text(f'"{t}"'))).scalar_one())
                for t in insp.get_table_names() if not t.startswith("support_desk_")}


def test_the_agent_seed_leaves_the_platform_tables_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    platform = make_engine(url)
    init_db(platform)
    before = _platform_state(platform)
    assert store.setup(store.make_engine(url)) is True
    after = _platform_state(platform)
    assert after == before
    assert set(inspect(platform).get_table_names()) - set(before) == set(store.metadata.tables)
    # On a database of its own it makes only its own tables.
    alone = store.make_engine(f"sqlite:///{tmp_path / 'alone.db'}")
    store.setup(alone)
    assert set(inspect(alone).get_table_names()) == set(store.metadata.tables)


# --- triage and hand-off ------------------------------------------------------------------------------
async def test_fraud_and_unclear_requests_go_to_a_person_before_any_tool(client: Client, db_url: str) -> None:
    async with desk(client, db_url) as env:
        fraud = await env.start("support_desk", ask("I do not recognise a payment, I think it is fraud."),
                                tenant=CUSTOMER)
        fraud_res = await fraud.result()
        ack = (await fraud.query("progress", result_type=keel.types.Progress)).acknowledgement
        unclear = await env.run("support_desk", ask("Hello, something is odd."), tenant=CUSTOMER)
    assert fraud_res.status == "escalated" and fraud_res.triage is not None
    assert fraud_res.triage["category"] == "fraud_report" and fraud_res.triage["urgency"] == "urgent"
    assert "fraud_report is always handled by a person" in fraud_res.reason and fraud_res.tools_executed == []
    assert ack is not None and "fraud team" in ack
    assert unclear.status == "escalated" and "confidence 0.45 is under 0.6" in unclear.reason
    assert unclear.tools_executed == [] and unclear.llm_calls == 1


@on_both_databases
async def test_escalate_to_human_opens_one_case_and_ends_the_task(client: Client, db_url: str) -> None:
    model = ScriptedModel([
        triaged("billing_question"),
        call("get_account", customer_id=CUSTOMER),
        call("escalate_to_human", customer_id=CUSTOMER, reason="disputes the overdraft terms", priority="high"),
    ])
    async with desk(client, db_url, model) as env:
        result = await env.run("support_desk", ask("I dispute your overdraft terms."), tenant=CUSTOMER,
                               models=SCRIPT_MODELS)
        cases = rows(env.engine, "SELECT workflow_id, customer_id, reason, priority FROM support_desk_cases")
    model.assert_all_used()  # no model call after the hand-off
    assert result.status == "escalated"
    assert result.reason == "escalate_to_human: disputes the overdraft terms"
    assert cases == [{"workflow_id": result.workflow_id, "customer_id": CUSTOMER,
                      "reason": "disputes the overdraft terms", "priority": "high"}]


def test_a_refund_reference_never_reads_as_an_iban() -> None:
    # Before: RF-<8 hex>, and when the hex began with two letters and two digits, the sim's answer "Refund
    # RF-AB12CDEF of 25.67 EUR on T-100304 is ..." was held back as an IBAN (about 1 task in 20).
    from agents.support_desk.guardrails import no_iban
    from agents.support_desk.tools import reference

    for i in range(2_000):
        ref = reference("RF", f"support_desk-{i}/7")
        answer = f"Refund {ref} of 25.67 EUR on T-100304 is approved and was issued."
        assert no_iban(keel.FinalOutput(text=answer, structured=None, input="", tenant="C-1", executed=())) is None, ref
