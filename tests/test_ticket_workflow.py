"""SupportTicketWorkflow end to end on the real Temporal dev server, with the sim model and the real DB."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.client import Client

from activities.db import RefundRow
from activities.ledger import Ledger
from activities.tools import human_queue
from keel.dataset import build_dataset, sample_tickets
from keel.names import PROGRESS_QUERY, SA_COST_USD, SA_STATUS, SA_TOKENS
from keel.policy import MAX_TICKET_CHARS, UNLIMITED, budget_for
from keel.settings import KeelSettings
from keel.types import Progress, TicketInput, TicketResult
from starter import tickets
from tests.conftest import assert_eventually, run_ticket, ticket

DS = build_dataset()
CUSTOMER = DS.customers[0]


def _check_books(engine: Engine, res: TicketResult) -> None:
    """The ledger holds each call once and agrees with the workflow's own totals, to the token."""
    totals = Ledger(engine).task_totals(res.workflow_id)
    assert totals["llm_calls"] == res.llm_calls
    assert totals["input_tokens"] == res.input_tokens
    assert totals["output_tokens"] == res.output_tokens
    assert totals["cost_usd"] == pytest.approx(res.cost_usd, abs=1e-7)
    # tool rows: every executed tool (including the final routing call)
    assert totals["tool_calls"] == len(res.tools_executed)
    outcomes = [o for o in Ledger(engine).outcomes() if o["workflow_id"] == res.workflow_id]
    assert len(outcomes) == 1
    assert outcomes[0]["status"] == res.status
    assert outcomes[0]["route"] == res.route


async def test_billing_question_resolved_with_reply(client: Client, settings: KeelSettings, worker_factory,
                                                    db_engine: Engine) -> None:
    async with worker_factory(client):
        res = await run_ticket(client, settings, ticket(CUSTOMER.id, "Why was I charged a fee of 4.90 EUR?"))
    assert res.status == "resolved", res
    assert res.route == "reply"
    assert res.category == "billing_question"
    assert res.tools_executed[-1] == "send_reply"
    assert "get_transactions" in res.tools_executed
    assert res.reply and CUSTOMER.name.split()[0] in res.reply
    assert res.tokens > 0 and res.cost_usd > 0
    assert any("sim (offline simulator)" in m for m in res.models)
    _check_books(db_engine, res)

    desc = await client.get_workflow_handle(res.workflow_id).describe()
    sa = {k.name: v for k, v in ((p.key, p.value) for p in desc.typed_search_attributes)}
    assert sa[SA_STATUS] == "resolved"
    assert sa[SA_TOKENS] == res.tokens
    assert sa[SA_COST_USD] == pytest.approx(res.cost_usd)


async def test_refund_is_never_executed_without_approval(client: Client, settings: KeelSettings, worker_factory,
                                                         db_engine: Engine) -> None:
    sample = next(t for t in sample_tickets(16) if t.category == "refund_request")
    async with worker_factory(client):
        res = await run_ticket(client, settings, ticket(sample.customer_id, sample.text))
    assert res.category == "refund_request"
    assert res.route == "human" and res.status == "escalated"
    assert [b.tool for b in res.tools_blocked] == ["issue_refund"]
    assert "approval" in res.reason
    assert "issue_refund" not in res.tools_executed
    with Session(db_engine) as s:
        refunds = s.exec(select(RefundRow).where(RefundRow.idempotency_key.startswith(res.workflow_id))).all()
    assert refunds == []
    queued = [q for q in human_queue(db_engine) if q["workflow_id"] == res.workflow_id]
    assert len(queued) == 1 and "issue_refund" in queued[0]["reason"]
    # The reply draft must not claim a refund that was not executed.
    assert res.reply and "has been refunded" not in res.reply.lower()
    _check_books(db_engine, res)


async def test_fraud_goes_to_human(client: Client, settings: KeelSettings, worker_factory, db_engine: Engine) -> None:
    async with worker_factory(client):
        res = await run_ticket(client, settings, ticket(CUSTOMER.id, "Someone stole my card, this is fraud!"))
    assert res.category == "fraud_report" and res.urgency == "urgent"
    assert res.route == "human"
    assert "fraud_report" in res.reason
    _check_books(db_engine, res)


async def test_unknown_customer_escalated_with_reason(client: Client, settings: KeelSettings, worker_factory,
                                                      db_engine: Engine) -> None:
    async with worker_factory(client):
        res = await run_ticket(client, settings, ticket("C-9999", "I can't log in, my account is locked."))
    assert res.route == "human"
    assert "unknown customer" in res.reason
    assert any("not found" in o for o in res.observations)
    _check_books(db_engine, res)


@pytest.mark.parametrize("text", ["", "   ", "x" * (1024 * 1024)], ids=["empty", "blank", "1MB"])
async def test_bad_ticket_rejected_not_lost(text: str, client: Client, settings: KeelSettings, worker_factory,
                                            db_engine: Engine) -> None:
    # The CLI refuses it up front...
    with pytest.raises(tickets.TicketInputError):
        tickets.make_input(settings, CUSTOMER.id, text)
    # ...and a client that bypasses the CLI gets a rejected task in the human queue, with no LLM spend.
    inp = TicketInput(ticket_id="TK-bad", customer_id=CUSTOMER.id, text=text)
    async with worker_factory(client):
        res = await run_ticket(client, settings, inp)
    assert res.status == "rejected" and res.route == "human"
    assert ("empty" in res.reason) or (f"{MAX_TICKET_CHARS:,}" in res.reason)
    assert res.llm_calls == 0 and res.tokens == 0
    assert [q["workflow_id"] for q in human_queue(db_engine)].count(res.workflow_id) == 1
    _check_books(db_engine, res)


async def test_hallucinated_tool_is_blocked_and_recorded(client: Client, settings: KeelSettings, worker_factory,
                                                         db_engine: Engine) -> None:
    async with worker_factory(client):
        res = await run_ticket(client, settings,
                               ticket(CUSTOMER.id, "My card was declined at ShopNow.", hallucinated_tool_rate=1.0))
    known = {"get_account", "get_transactions", "lookup_policy", "issue_refund", "escalate_to_human",
             "send_reply"}
    assert res.tools_blocked, res
    assert all(b.tool not in known for b in res.tools_blocked if "unknown tool" in b.reason)
    assert set(res.tools_executed) <= known
    assert any("unknown tool" in o for o in res.observations)
    # Invalid outputs beyond the policy's tolerance send the task to a human, with the reason.
    assert res.route == "human"
    _check_books(db_engine, res)


async def test_invalid_arguments_never_reach_a_tool(client: Client, settings: KeelSettings, worker_factory,
                                                    db_engine: Engine) -> None:
    async with worker_factory(client):
        res = await run_ticket(client, settings,
                               ticket(CUSTOMER.id, "Why was I charged a fee?", invalid_args_rate=1.0))
    assert any("invalid arguments" in b.reason or "not valid JSON" in b.reason for b in res.tools_blocked)
    # Only the routing call ran; every tool call of the agent was refused before execution.
    assert res.tools_executed == ["escalate_to_human"]
    assert res.route == "human"
    _check_books(db_engine, res)


async def test_invalid_classification_json_goes_to_human(client: Client, settings: KeelSettings, worker_factory,
                                                         db_engine: Engine) -> None:
    async with worker_factory(client):
        res = await run_ticket(client, settings, ticket(CUSTOMER.id, "What are your support hours?",
                                                        invalid_json_rate=1.0))
    assert res.category is None
    assert "could not classify" in res.reason
    assert sum("classification output invalid" in o for o in res.observations) == 2
    _check_books(db_engine, res)


async def test_progress_query_while_running(client: Client, settings: KeelSettings, worker_factory) -> None:
    inp = ticket(CUSTOMER.id, "Why was I charged a fee?", latency_ms_min=150, latency_ms_max=150)
    async with worker_factory(client):
        handle = await tickets.start_ticket(client, settings, inp)
        seen = await assert_eventually(
            lambda: handle.query(PROGRESS_QUERY, result_type=Progress), lambda p: p.step >= 3 and p.tokens > 0
        )
        assert seen.status == "running"
        assert seen.category == "billing_question"
        res = await handle.result()
        final = await handle.query(PROGRESS_QUERY, result_type=Progress)
    assert final.status == res.status and final.tokens == res.tokens and final.action == "done"


async def test_spiral_costs_more_unless_budgeted(client: Client, settings: KeelSettings, worker_factory,
                                                 db_engine: Engine) -> None:
    text = "My card was declined online."
    async with worker_factory(client):
        calm = await run_ticket(client, settings, ticket(CUSTOMER.id, text))
        free = ticket(CUSTOMER.id, text, spiral_rate=1.0)
        free.budget = UNLIMITED
        unbudgeted = await run_ticket(client, settings, free)
        budgeted = await run_ticket(client, settings, ticket(CUSTOMER.id, text, spiral_rate=1.0))
    assert unbudgeted.tokens > 2 * calm.tokens
    assert unbudgeted.llm_calls > calm.llm_calls
    limit = budget_for("support_ticket").max_tokens
    assert limit is not None and budgeted.tokens <= limit < unbudgeted.tokens
    assert budgeted.budget.soft_at_step is not None
    _check_books(db_engine, unbudgeted)
    _check_books(db_engine, budgeted)


async def test_results_serialise_for_the_cli(client: Client, settings: KeelSettings, worker_factory) -> None:
    from starter.views import result_json

    async with worker_factory(client):
        res = await run_ticket(client, settings, ticket(CUSTOMER.id, "How do I change my postal address?"))
    doc = json.loads(json.dumps(result_json(res)))
    for key in ("workflow_id", "status", "category", "route", "tools_executed", "tools_blocked", "tokens",
                "cost_usd"):
        assert key in doc


async def test_unpriced_model_fails_the_task_with_its_reason(client: Client, settings: KeelSettings,
                                                            worker_factory) -> None:
    """A model missing from the price table is never counted as $0, and never leaves the workflow task
    retrying forever (the budget check raises in workflow code): the task fails at once, saying why."""
    from temporalio.client import WorkflowFailureError

    from keel.types import ModelSpec

    inp = ticket(CUSTOMER.id, "Why was I charged a fee of 4.90 EUR?").model_copy(
        update={"small_model": ModelSpec(provider="sim", model="sim-unpriced")})
    async with worker_factory(client):
        handle = await tickets.start_ticket(client, settings, inp)
        with pytest.raises(WorkflowFailureError) as exc:
            # Bounded: before the fix the workflow task failed and was retried forever, so this never returned.
            await asyncio.wait_for(handle.result(), timeout=30)
    assert "sim-unpriced" in str(exc.value.cause)
    assert getattr(exc.value.cause, "type", None) == "UnpricedModel"
