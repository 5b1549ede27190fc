"""The support desk's tools: reads of the customer's account, transactions and the bank's policies, and
the one write, `issue_refund` (permission confirm: it runs only after a listed approver approves these
exact arguments).

Each runs as its own activity, `support_desk.<tool>`, on the agent's own tables (store.py), on the
database named by KEEL_DATABASE_URL (created and seeded on first use). Business failures (an unknown
customer, a refund the policy forbids) are `keel.ToolError`s the model sees; anything else is retried.
The refund is idempotent on `ctx.idempotency_key` (a unique column): however often Temporal retries
the call, one refund row is written and the balance is credited once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import Connection, RowMapping, func, select, update
from sqlalchemy.exc import IntegrityError

import keel
from agents.support_desk import store
from agents.support_desk.data import MAX_REFUND
from agents.support_desk.guardrails import CUSTOMER_ID, REFUND_CLAIMS

_CUSTOMER = Field(pattern=r"^C-[0-9]{4,}$", description="The customer id, e.g. C-1001")


class CustomerArgs(keel.Args):
    customer_id: str = _CUSTOMER


class TransactionsArgs(keel.Args):
    customer_id: str = _CUSTOMER
    days: int = Field(30, ge=1, le=365, description="How many days back to look")
    limit: int = Field(20, ge=1, le=100, description="At most this many transactions, newest first")


class PolicyArgs(keel.Args):
    topic: str = Field(min_length=1, max_length=64,
                       description="Policy topic: refunds, fees, account_access, cards, fraud, general")


class RefundArgs(keel.Args):
    customer_id: str = _CUSTOMER
    transaction_id: str = Field(pattern=r"^T-[0-9]+$", description="The transaction to refund, e.g. T-100234")
    amount: float = Field(gt=0, le=1_000_000, description="Amount in the transaction's currency (EUR)")
    reason: str = Field(min_length=1, max_length=500, description="Why the refund is due")


def _own_customer(ctx: keel.ToolContext, customer_id: str) -> None:
    """Defence in depth behind the validator: a task run for a customer (tenant) acts only on them."""
    if CUSTOMER_ID.match(ctx.tenant) and customer_id != ctx.tenant:
        raise keel.ToolError(f"customer {customer_id!r} is not this task's customer {ctx.tenant!r}")


def _customer(conn: Connection, customer_id: str) -> RowMapping:
    c = conn.execute(select(store.customers).where(store.customers.c.id == customer_id)).mappings().first()
    if c is None:
        raise keel.ToolError(f"customer {customer_id!r} not found")
    return c


@keel.tool
def get_account(ctx: keel.ToolContext, args: CustomerArgs) -> dict[str, Any]:
    """Look up a customer's profile and accounts (balances, lock status, card state)."""
    _own_customer(ctx, args.customer_id)
    with store.reading(store.engine_for()) as conn:
        c = _customer(conn, args.customer_id)
        a = store.accounts.c
        accounts = conn.execute(select(store.accounts).where(a.customer_id == c["id"]).order_by(a.id)).mappings()
        return {
            "customer": {"id": c["id"], "name": c["name"], "email": c["email"], "phone": c["phone"],
                         "tier": c["tier"], "locked": c["locked"], "card_status": c["card_status"],
                         "card_last4": f"**** {c['card_number'][-4:]}"},
            "accounts": [{"id": r["id"], "iban": r["iban"], "kind": r["kind"], "balance": r["balance"],
                          "currency": r["currency"]} for r in accounts],
        }


@keel.tool
def get_transactions(ctx: keel.ToolContext, args: TransactionsArgs) -> dict[str, Any]:
    """List a customer's recent transactions, newest first, with dispute and duplicate flags."""
    _own_customer(ctx, args.customer_id)
    t = store.transactions.c
    stmt = (select(t.id, t.merchant, t.amount, t.days_ago, t.kind, t.disputed, t.duplicate_of)
            .where(t.customer_id == args.customer_id, t.days_ago <= args.days)
            .order_by(t.days_ago, t.id.desc()).limit(args.limit))
    with store.reading(store.engine_for()) as conn:
        _customer(conn, args.customer_id)
        return {"transactions": [dict(r) for r in conn.execute(stmt).mappings()]}


@keel.tool
def lookup_policy(ctx: keel.ToolContext, args: PolicyArgs) -> dict[str, Any]:
    """Read the bank's policy on a topic."""
    topic = args.topic.strip().lower().replace(" ", "_").replace("-", "_")
    p = store.policies.c
    with store.reading(store.engine_for()) as conn:
        row = conn.execute(select(store.policies).where(p.topic == topic)).mappings().first()
        if row is None:
            known = conn.execute(select(p.topic).order_by(p.topic)).scalars().all()
            raise keel.ToolError(f"no policy on {args.topic!r}; known topics: {', '.join(known)}")
        return {"topic": row["topic"], "text": row["text"], "max_refund": row["max_refund"]}


def _write_once(write: Callable[[Connection], dict[str, Any]]) -> dict[str, Any]:
    """A write keyed on the call's idempotency key, in one transaction. When another attempt of this
    very call committed first (the unique key), the second try finds and returns its row."""
    engine = store.engine_for()
    try:
        with engine.begin() as conn:
            return write(conn)
    except IntegrityError:
        with engine.begin() as conn:
            return write(conn)


def reference(prefix: str, idempotency_key: str) -> str:
    """The id a customer and the model see for a write: from the call's idempotency key, not the row's number,
    so it is the same however many tasks run at once or ran before (a keyed task's recorded traffic replays).
    It starts with a digit: an id like `RF-AB12CDEF` followed by the amount and a transaction id reads, to
    the IBAN check, as the start of an IBAN (letters, two digits, then enough alphanumerics)."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:8].upper()
    return f"{prefix}-{int(digest[0], 16) % 10}{digest[1:]}"


def _refund_content(r: RowMapping) -> dict[str, Any]:
    return {"refund_id": reference("RF", r["idempotency_key"]), "transaction_id": r["transaction_id"],
            "amount": r["amount"], "status": r["status"]}


def _refund_once(conn: Connection, ctx: keel.ToolContext, args: RefundArgs) -> dict[str, Any]:
    rf = store.refunds
    tx = store.transactions
    # The transaction's row locked first (PostgreSQL; SQLite holds the write lock already): refunds of one
    # transaction run one at a time, each seeing what the one before it committed - a retry racing its first
    # attempt finds that attempt's refund, and two calls cannot both refund what is left.
    t = conn.execute(select(tx).where(tx.c.id == args.transaction_id).with_for_update()).mappings().first()
    done = conn.execute(select(rf).where(rf.c.idempotency_key == ctx.idempotency_key)).mappings().first()
    if done is not None:
        return _refund_content(done)  # a retry of a call that already refunded
    _customer(conn, args.customer_id)
    if t is None:
        raise keel.ToolError(f"transaction {args.transaction_id!r} not found")
    if t["customer_id"] != args.customer_id:
        raise keel.ToolError(f"transaction {args.transaction_id!r} does not belong to customer {args.customer_id!r}")
    amount = round(args.amount, 2)
    bound = conn.execute(select(store.policies.c.max_refund).where(store.policies.c.topic == "refunds")).scalar()
    bound = float(bound) if bound is not None else MAX_REFUND
    if amount > bound:
        raise keel.ToolError(f"refund of {amount:.2f} exceeds the policy maximum of {bound:.2f}; "
                             "larger refunds go to the disputes team")
    refunded = float(conn.execute(select(func.coalesce(func.sum(rf.c.amount), 0.0))
                                  .where(rf.c.transaction_id == t["id"])).scalar() or 0.0)
    refundable = round(t["amount"] - refunded, 2)
    if amount > refundable:
        already = f" ({refunded:.2f} already refunded)" if refunded else ""
        raise keel.ToolError(f"refund of {amount:.2f} exceeds the refundable amount {refundable:.2f} of "
                             f"transaction {t['id']!r}{already}")
    row = conn.execute(rf.insert().values(
        idempotency_key=ctx.idempotency_key, workflow_id=ctx.workflow_id, customer_id=args.customer_id,
        transaction_id=t["id"], amount=amount, reason=args.reason, status="executed", created_at=datetime.now(UTC),
    ).returning(*rf.c)).mappings().one()
    a = store.accounts.c
    # Read under a row lock (PostgreSQL; SQLite holds the write lock already), credit, rounded to cents.
    held = conn.execute(select(a.balance).where(a.id == t["account_id"]).with_for_update()).scalar()
    if held is not None:
        conn.execute(update(store.accounts).where(a.id == t["account_id"]).values(balance=round(held + amount, 2)))
    return _refund_content(row)


@keel.tool(permission="confirm", claims=REFUND_CLAIMS)
def issue_refund(ctx: keel.ToolContext, args: RefundArgs) -> dict[str, Any]:
    """Refund (part of) one of the customer's transactions, within the refunds policy. Runs only after a
    support lead approves it."""
    _own_customer(ctx, args.customer_id)
    return _write_once(lambda conn: _refund_once(conn, ctx, args))


class HandOffArgs(keel.Args):
    customer_id: str = _CUSTOMER
    reason: str = Field(min_length=5, max_length=500, description="What the specialist must look at")
    priority: Literal["normal", "high", "urgent"] = "normal"


def _case_once(conn: Connection, ctx: keel.ToolContext, args: HandOffArgs) -> dict[str, Any]:
    c = store.cases
    done = conn.execute(select(c).where(c.c.idempotency_key == ctx.idempotency_key)).mappings().first()
    if done is None:
        _customer(conn, args.customer_id)
        done = conn.execute(c.insert().values(
            idempotency_key=ctx.idempotency_key, workflow_id=ctx.workflow_id, customer_id=args.customer_id,
            reason=args.reason, priority=args.priority, created_at=datetime.now(UTC),
        ).returning(*c.c)).mappings().one()
    return {"case_id": reference("CASE", done["idempotency_key"]), "reason": done["reason"],
            "priority": done["priority"]}


@keel.tool(permission="autonomous", hands_off=True)
def escalate_to_human(ctx: keel.ToolContext, args: HandOffArgs) -> dict[str, Any]:
    """Hand the request to a specialist (a case in the support queue) when it needs a person: a dispute,
    a complaint, anything the tools cannot settle. The task then ends with the specialist."""
    _own_customer(ctx, args.customer_id)
    return _write_once(lambda conn: _case_once(conn, ctx, args))
