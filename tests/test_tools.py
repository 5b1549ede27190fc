"""Tool activities against a temp SQLite database, run in temporalio's ActivityEnvironment."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.db import (
    AccountRow,
    CustomerRow,
    HumanQueueRow,
    LedgerRow,
    PolicyRow,
    RefundRow,
    ReplyRow,
    TransactionRow,
    init_db,
    make_engine,
    read_only,
)
from activities.ledger import Ledger
from activities.tools import ToolActivities, _get_account, human_queue
from keel.dataset import build_dataset
from keel.tools import TOOLS, GetAccountArgs
from keel.types import TaskContext, TaskOutcome, ToolRequest, ToolResult

DS = build_dataset()
SEEDED = (CustomerRow, AccountRow, TransactionRow, PolicyRow)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = make_engine(f"sqlite:///{tmp_path}/nested/keel.db")
    assert init_db(e) is True
    return e


@pytest.fixture
def tools(engine: Engine) -> ToolActivities:
    return ToolActivities(engine, Ledger(engine))


def req(args: dict[str, Any], step: int = 1, wf: str = "wf-1", customer: str = "C-1001",
        outcome: TaskOutcome | None = None) -> ToolRequest:
    return ToolRequest(task=TaskContext(workflow_id=wf, customer=customer, ticket_id="TK-1"),
                       step=step, call_id=f"call-{step}", arguments=args, outcome=outcome)


def run(fn: Any, r: ToolRequest, attempt: int = 1) -> ToolResult:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt)
    result: ToolResult = env.run(fn, r)
    return result


def count(engine: Engine, table: Any, *where: Any) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(table).where(*where)) or 0


def ledger_rows(engine: Engine, wf: str, kind: str) -> list[LedgerRow]:
    with Session(engine) as s:
        return list(s.scalars(select(LedgerRow).where(LedgerRow.workflow_id == wf, LedgerRow.kind == kind)))


def txs_of(customer_id: str) -> list[Any]:
    return [t for t in DS.transactions if t.customer_id == customer_id]


# --- database ------------------------------------------------------------------------------


def test_seed_is_idempotent(engine: Engine) -> None:
    counts = [count(engine, t) for t in SEEDED]
    assert counts == [len(DS.customers), len(DS.accounts), len(DS.transactions), len(DS.policies)]
    assert init_db(engine) is False
    assert [count(engine, t) for t in SEEDED] == counts


def test_concurrent_init_seeds_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    engines = [make_engine(url) for _ in range(4)]  # separate pools, like separate processes
    with ThreadPoolExecutor(4) as pool:
        seeded = list(pool.map(init_db, engines))
    assert sorted(seeded) == [False, False, False, True]
    assert count(engines[0], CustomerRow) == len(DS.customers)
    assert count(engines[0], TransactionRow) == len(DS.transactions)


def test_activities_are_named_after_the_tools(tools: ToolActivities) -> None:
    names = [activity._Definition.must_from_callable(fn).name for fn in tools.all()]
    assert sorted(names) == sorted(TOOLS)


# --- read tools ----------------------------------------------------------------------------


def test_get_account(tools: ToolActivities) -> None:
    res = run(tools.get_account, req({"customer_id": "C-1001"}))
    assert res.ok, res.error
    c = DS.customers[0]
    assert res.content["customer"]["id"] == "C-1001"
    assert res.content["customer"]["name"] == c.name
    assert res.content["customer"]["card_last4"].endswith(c.card_number[-4:])
    assert c.card_number not in json.dumps(res.content)
    assert [a["id"] for a in res.content["accounts"]] == ["A-5001"]
    assert res.latency_ms >= 0


def test_read_tools_take_no_write_lock_and_record_once(tools: ToolActivities, engine: Engine) -> None:
    # Another writer holds SQLite's write lock: the reads go on; only the ledger row waits for it.
    statements: list[str] = []
    with engine.begin(), read_only(engine) as reader:  # engine.begin(): BEGIN IMMEDIATE
        event.listen(reader, "before_cursor_execute", lambda *a: statements.append(a[2]))
        res = _get_account(reader, req({}), GetAccountArgs(customer_id="C-1001"))
        assert res.ok and res.content["customer"]["id"] == "C-1001"
    assert len(statements) == 2 and not any("BEGIN" in s for s in statements)
    r = req({"topic": "refunds"}, step=4)
    first, again = run(tools.lookup_policy, r), run(tools.lookup_policy, r, attempt=2)
    assert first.ok and again.content == first.content
    rows = ledger_rows(engine, "wf-1", "tool")
    assert [(row.step, row.tool, row.attempt, row.ok) for row in rows] == [(4, "lookup_policy", 2, True)]


def test_unknown_customer_is_a_business_failure(tools: ToolActivities) -> None:
    for fn, args in [
        (tools.get_account, {"customer_id": "C-9"}),
        (tools.get_transactions, {"customer_id": "C-9"}),
        (tools.send_reply, {"customer_id": "C-9", "body": "hi"}),
        (tools.issue_refund, {"customer_id": "C-9", "transaction_id": "T-100001", "amount": 1, "reason": "x"}),
    ]:
        res = run(fn, req(args))
        assert not res.ok and res.error is not None and "C-9" in res.error


def test_get_transactions_newest_first_filtered(tools: ToolActivities) -> None:
    res = run(tools.get_transactions, req({"customer_id": "C-1002", "days": 20, "limit": 100}))
    assert res.ok
    got = res.content["transactions"]
    expected = [t for t in txs_of("C-1002") if t.days_ago <= 20]
    assert {t["id"] for t in got} == {t.id for t in expected}
    assert [t["days_ago"] for t in got] == sorted(t["days_ago"] for t in got)
    limited = run(tools.get_transactions, req({"customer_id": "C-1002", "days": 365, "limit": 3}))
    assert len(limited.content["transactions"]) == 3
    assert limited.content["transactions"][0]["days_ago"] == min(t.days_ago for t in txs_of("C-1002"))


def test_lookup_policy(tools: ToolActivities) -> None:
    res = run(tools.lookup_policy, req({"topic": "Refunds"}))
    assert res.ok and res.content["topic"] == "refunds" and res.content["max_refund"] == 500.0
    bad = run(tools.lookup_policy, req({"topic": "crypto"}))
    assert not bad.ok and bad.error is not None
    assert all(p.topic in bad.error for p in DS.policies)


@pytest.mark.parametrize("name, args", [
    ("get_transactions", {"customer_id": "C-1001", "days": 0}),
    ("get_account", {"customer_id": "C-1001", "extra": 1}),
    ("issue_refund", {"customer_id": "C-1001", "transaction_id": "T-100001", "amount": -5, "reason": "x"}),
    ("escalate_to_human", {"reason": "x", "priority": "whenever"}),
])
def test_invalid_arguments_are_non_retryable(tools: ToolActivities, engine: Engine, name: str,
                                             args: dict[str, Any]) -> None:
    with pytest.raises(ApplicationError) as exc:
        run(getattr(tools, name), req(args))
    assert exc.value.type == "ToolArgumentError" and exc.value.non_retryable
    assert name in str(exc.value)
    assert count(engine, RefundRow) == 0


# --- write tools ---------------------------------------------------------------------------


def refund_args(tx: Any, amount: float | None = None, customer: str | None = None) -> dict[str, Any]:
    return {"customer_id": customer or tx.customer_id, "transaction_id": tx.id,
            "amount": tx.amount if amount is None else amount, "reason": "duplicate charge"}


def test_issue_refund_and_its_business_failures(tools: ToolActivities, engine: Engine) -> None:
    tx = next(t for t in txs_of("C-1001") if t.duplicate_of)
    other = txs_of("C-1002")[0]
    too_much = run(tools.issue_refund, req(refund_args(tx, tx.amount + 0.01), step=1))
    assert not too_much.ok and "exceeds" in (too_much.error or "")
    not_theirs = run(tools.issue_refund, req(refund_args(other, 1.0, customer="C-1001"), step=2))
    assert not not_theirs.ok and "does not belong" in (not_theirs.error or "")
    missing = run(tools.issue_refund, req({**refund_args(tx), "transaction_id": "T-1"}, step=3))
    assert not missing.ok and "T-1" in (missing.error or "")
    assert count(engine, RefundRow) == 0

    half = round(tx.amount / 2, 2)
    ok = run(tools.issue_refund, req(refund_args(tx, half), step=4))
    assert ok.ok, ok.error
    assert ok.content == {"refund_id": ok.content["refund_id"], "transaction_id": tx.id, "amount": half,
                          "status": "executed"}
    # What was refunded already counts against the transaction.
    rest = run(tools.issue_refund, req(refund_args(tx, tx.amount), step=5))
    assert not rest.ok and "already refunded" in (rest.error or "")
    assert [r.ok for r in ledger_rows(engine, "wf-1", "tool")].count(False) == 4


def test_retried_refund_executes_once(tools: ToolActivities, engine: Engine) -> None:
    tx = next(t for t in txs_of("C-1003") if t.duplicate_of)
    r = req(refund_args(tx), step=7, customer="C-1003")
    with Session(engine) as s:
        balance = s.get(AccountRow, tx.account_id).balance  # type: ignore[union-attr]
    first = run(tools.issue_refund, r, attempt=1)
    second = run(tools.issue_refund, r, attempt=2)
    assert first.ok and second.ok
    assert second.content == first.content
    assert count(engine, RefundRow, RefundRow.idempotency_key == "wf-1/7") == 1
    with Session(engine) as s:
        assert s.get(AccountRow, tx.account_id).balance == pytest.approx(balance + tx.amount)  # type: ignore[union-attr]
    rows = ledger_rows(engine, "wf-1", "tool")
    assert [(r.step, r.tool, r.attempt, r.ok) for r in rows] == [(7, "issue_refund", 2, True)]


def test_send_reply_writes_the_outcome_once(tools: ToolActivities, engine: Engine) -> None:
    outcome = TaskOutcome(status="resolved", route="reply", reason="answered", llm_calls=3,
                          input_tokens=900, output_tokens=120, cost_usd=0.004)
    r = req({"customer_id": "C-1001", "body": "Your fee was waived."}, step=9, outcome=outcome)
    first = run(tools.send_reply, r, attempt=1)
    second = run(tools.send_reply, r, attempt=2)
    assert first.ok and first.content["status"] == "sent" and first.content["customer_id"] == "C-1001"
    assert second.content == first.content
    assert count(engine, ReplyRow) == 1
    (row,) = ledger_rows(engine, "wf-1", "outcome")
    assert (row.status, row.route, row.reason, row.cost_usd) == ("resolved", "reply", "answered", 0.004)
    assert Ledger(engine).outcomes()[0]["status"] == "resolved"


def test_failed_send_reply_writes_no_outcome(tools: ToolActivities, engine: Engine) -> None:
    outcome = TaskOutcome(status="resolved", route="reply")
    res = run(tools.send_reply, req({"customer_id": "C-404", "body": "hi"}, outcome=outcome))
    assert not res.ok
    assert ledger_rows(engine, "wf-1", "outcome") == []
    assert count(engine, ReplyRow) == 0


def test_escalate_to_human(tools: ToolActivities, engine: Engine) -> None:
    outcome = TaskOutcome(status="escalated", route="human", reason="fraud")
    r = req({"reason": "suspected fraud", "priority": "urgent"}, step=3, customer="C-1005", outcome=outcome)
    first = run(tools.escalate_to_human, r)
    again = run(tools.escalate_to_human, r, attempt=2)
    assert first.ok and first.content["status"] == "queued" and first.content["reason"] == "suspected fraud"
    assert again.content == first.content
    queue = human_queue(engine)
    assert len(queue) == 1
    assert queue[0]["customer_id"] == "C-1005" and queue[0]["priority"] == "urgent"
    assert queue[0]["created_at"].tzinfo is not None
    assert human_queue(engine, status="resolved") == []
    assert count(engine, HumanQueueRow) == 1
    assert len(ledger_rows(engine, "wf-1", "outcome")) == 1


def test_concurrent_writers(tools: ToolActivities, engine: Engine) -> None:
    def one(i: int) -> ToolResult:
        return run(tools.send_reply, req({"customer_id": "C-1001", "body": f"reply {i}"}, step=i, wf=f"wf-{i}"))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    assert all(r.ok for r in results)
    assert count(engine, ReplyRow) == 64
    assert count(engine, LedgerRow, LedgerRow.kind == "tool") == 64
