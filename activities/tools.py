"""The support agent's tools as Temporal activities, one per tool, named after it.

Business failures (unknown customer, a refund larger than the transaction) are results the agent
sees (`ToolResult(ok=False)`); invalid arguments are a non-retryable ToolArgumentError. Writes are
idempotent on the request's idempotency key, and the ledger row (plus the task's outcome row, when
the request carries one) commits in the same transaction as the write.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection, Engine, RowMapping, Select, Table, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.alerts import TaskObserver
from activities.breaker import UsageReporter
from activities.db import (
    AccountRow,
    CustomerRow,
    HumanQueueRow,
    PolicyRow,
    RefundRow,
    ReplyRow,
    TransactionRow,
    read_only,
    table_of,
    utcnow,
)
from activities.ledger import Ledger
from activities.tracing import Tracing
from keel.breaker import UsageReport
from keel.tools import (
    TOOLS,
    EscalateArgs,
    GetAccountArgs,
    GetTransactionsArgs,
    IssueRefundArgs,
    LookupPolicyArgs,
    SendReplyArgs,
)
from keel.types import ToolRequest, ToolResult

Handler = Callable[[Connection, ToolRequest, Any], ToolResult]
"""A tool's body, inside the caller's transaction on `Connection` (SQLAlchemy Core)."""
OrmHandler = Callable[[Session, ToolRequest, Any], ToolResult]


def _orm(handler: OrmHandler) -> Handler:
    """A tool written with the ORM (the DR pattern's tools), on a Session joined to the
    caller's connection and transaction (committed or rolled back with it)."""

    def run(conn: Connection, req: ToolRequest, args: Any) -> ToolResult:
        with Session(bind=conn, expire_on_commit=False) as s:
            result = handler(s, req, args)
            s.flush()
            return result

    return run


def _ms_since(start: float) -> float:
    """A tool call's latency: milliseconds since `start` (time.perf_counter())."""
    return round((time.perf_counter() - start) * 1000, 3)


def _fail(error: str) -> ToolResult:
    return ToolResult(ok=False, error=error)


def _unknown_customer(customer_id: str) -> ToolResult:
    return _fail(f"customer {customer_id!r} not found")


class ToolActivities:
    def __init__(self, engine: Engine, ledger: Ledger, reporter: UsageReporter | None = None,
                 tracing: Tracing | None = None, observer: TaskObserver | None = None) -> None:
        self.engine = engine
        self.ledger = ledger
        self.reporter = reporter
        """Receives the usage of tasks whose routing call names a breaker (`ToolRequest.report_to`)."""
        self.tracing = tracing or Tracing.off()
        self.observer = observer
        """Told of every task whose outcome row committed: metrics and behavioral alerts (never raises)."""

    def all(self) -> list[Callable[..., Any]]:
        """The activities for `Worker(activities=...)`: async wrappers of the sync ones below. On
        SQLite the sub-millisecond transaction runs inline (measured: a thread hand-off per tool
        call cost more worker CPU than the query); on a networked database it runs in a thread."""
        handlers: list[tuple[str, Handler]] = [
            ("get_account", _get_account), ("get_transactions", _get_transactions),
            ("lookup_policy", _lookup_policy), ("issue_refund", _issue_refund),
            ("send_reply", _send_reply), ("escalate_to_human", _escalate),
        ]
        return [self._async_activity(name, handler) for name, handler in handlers]

    def _async_activity(self, name: str, handler: Handler) -> Callable[..., Any]:
        inline = self.engine.dialect.name == "sqlite"

        async def run(req: ToolRequest) -> ToolResult:
            with self.tracing.tool_span(name, req) as span:
                if inline:
                    result = self._run(name, req, handler)
                else:
                    result = await asyncio.to_thread(self._run, name, req, handler)
                self.tracing.tool_result(span, req, result)
            if req.report_to and req.outcome is not None and self.reporter is not None:
                o = req.outcome
                self.reporter.add(req.report_to, UsageReport(workflow_id=req.task.workflow_id,
                                                             tokens=o.input_tokens + o.output_tokens,
                                                             cost_usd=o.cost_usd))
            return result

        run.__name__ = name
        return activity.defn(name=name)(run)

    # --- the activities ------------------------------------------------------------------

    @activity.defn(name="get_account")
    def get_account(self, req: ToolRequest) -> ToolResult:
        return self._run("get_account", req, _get_account)

    @activity.defn(name="get_transactions")
    def get_transactions(self, req: ToolRequest) -> ToolResult:
        return self._run("get_transactions", req, _get_transactions)

    @activity.defn(name="lookup_policy")
    def lookup_policy(self, req: ToolRequest) -> ToolResult:
        return self._run("lookup_policy", req, _lookup_policy)

    @activity.defn(name="issue_refund")
    def issue_refund(self, req: ToolRequest) -> ToolResult:
        return self._run("issue_refund", req, _issue_refund)

    @activity.defn(name="send_reply")
    def send_reply(self, req: ToolRequest) -> ToolResult:
        return self._run("send_reply", req, _send_reply)

    @activity.defn(name="escalate_to_human")
    def escalate_to_human(self, req: ToolRequest) -> ToolResult:
        return self._run("escalate_to_human", req, _escalate)

    # --- the common frame ----------------------------------------------------------------

    def _run(self, name: str, req: ToolRequest, handler: Handler) -> ToolResult:
        start = time.perf_counter()
        attempt = activity.info().attempt
        try:
            args: BaseModel = TOOLS[name].args.model_validate(req.arguments)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '(arguments)'}: {err['msg']}" for err in e.errors()
            )
            result = ToolResult(ok=False, error=f"invalid arguments for {name}: {problems}",
                                latency_ms=_ms_since(start))
            self.ledger.record_tool(req, name, result, attempt)
            raise ApplicationError(result.error or "", type="ToolArgumentError", non_retryable=True) from None
        if req.dry_run and TOOLS[name].writes:
            return self._dry_run(name, req, args, start, attempt)
        if not TOOLS[name].writes and req.outcome is None:  # a routing call's outcome row needs the transaction
            return self._read(name, req, handler, args, start, attempt)
        try:
            return self._transaction(name, req, handler, args, start, attempt)
        except IntegrityError:
            # Another attempt of this very step committed first (unique idempotency key): run
            # again, which now finds and returns that attempt's row.
            return self._transaction(name, req, handler, args, start, attempt)

    def _dry_run(self, name: str, req: ToolRequest, args: BaseModel, start: float, attempt: int) -> ToolResult:
        """A shadow run's write: validated (above) and recorded in the ledger (`dry_run`), never
        executed. The task's outcome row, when the request carries it, is written as usual."""
        result = ToolResult(ok=True, content={"dry_run": True, "status": "recorded, not executed (shadow run)",
                                              "tool": name, "arguments": args.model_dump()},
                            latency_ms=_ms_since(start))
        with self.engine.begin() as conn:
            self._record(conn, req, name, result, attempt)
        return result

    def _record(self, conn: Connection, req: ToolRequest, name: str, result: ToolResult, attempt: int) -> None:
        """The call's ledger row and, for a routing call that succeeded, the task's outcome and
        guardrail rows: in the tool's transaction."""
        self.ledger.record_tool(req, name, result, attempt, conn=conn)
        if req.outcome is not None and result.ok:
            self.ledger.record_outcome(req.task, req.outcome, conn=conn)
            self.ledger.record_guardrails(req, conn=conn)

    def _read(self, name: str, req: ToolRequest, handler: Handler, args: BaseModel, start: float,
              attempt: int) -> ToolResult:
        """A read-only tool: its queries outside any write transaction, then its ledger row alone (an
        upsert, so a retried attempt rewrites it). On SQLite that is no BEGIN IMMEDIATE/COMMIT and no
        write lock held during the reads: in the worker every call into sqlite3 costs a GIL round trip."""
        with read_only(self.engine) as conn:
            result = handler(conn, req, args)
        result.latency_ms = _ms_since(start)
        self.ledger.record_tool(req, name, result, attempt)
        return result

    def _transaction(
        self, name: str, req: ToolRequest, handler: Handler, args: BaseModel, start: float, attempt: int
    ) -> ToolResult:
        with self.engine.begin() as conn:
            result = handler(conn, req, args)
            result.latency_ms = _ms_since(start)
            self._record(conn, req, name, result, attempt)
        if req.outcome is not None and result.ok and self.observer is not None:
            self.observer.task_finished(req.task, req.outcome)
        return result


# --- the tools, each inside the caller's transaction ---------------------------------------
# SQLAlchemy Core on the transaction's connection, not ORM objects: these run on every tool call, and
# loading rows as ORM instances cost 3-4x the queries themselves (bench/throughput.py). The tables
# are the SQLModel ones of activities.db; the writes set every column's default here, as the
# models would.

_CUSTOMERS = table_of(CustomerRow)
_ACCOUNTS = table_of(AccountRow)
_TRANSACTIONS = table_of(TransactionRow)
_POLICIES = table_of(PolicyRow)
_REFUNDS = table_of(RefundRow)
_REPLIES = table_of(ReplyRow)
_QUEUE = table_of(HumanQueueRow)

_CUSTOMER_BY_ID = select(_CUSTOMERS).where(_CUSTOMERS.c.id == bindparam("id"))
_ACCOUNTS_OF = select(_ACCOUNTS).where(_ACCOUNTS.c.customer_id == bindparam("id")).order_by(_ACCOUNTS.c.id)
_POLICY_BY_TOPIC = select(_POLICIES).where(_POLICIES.c.topic == bindparam("topic"))
_TRANSACTION_BY_ID = select(_TRANSACTIONS).where(_TRANSACTIONS.c.id == bindparam("id"))
_T = _TRANSACTIONS.c
_TRANSACTIONS_OF = (
    select(_T.id, _T.merchant, _T.amount, _T.days_ago, _T.kind, _T.disputed, _T.duplicate_of)
    .where(_T.customer_id == bindparam("id"), _T.days_ago <= bindparam("days"))
    .order_by(_T.days_ago, _T.id.desc())
    .limit(bindparam("limit"))
)


def _customer(conn: Connection, customer_id: str) -> RowMapping | None:
    return conn.execute(_CUSTOMER_BY_ID, {"id": customer_id}).mappings().first()


def _get_account(conn: Connection, req: ToolRequest, args: GetAccountArgs) -> ToolResult:
    c = _customer(conn, args.customer_id)
    if c is None:
        return _unknown_customer(args.customer_id)
    accounts = conn.execute(_ACCOUNTS_OF, {"id": c["id"]}).mappings()
    return ToolResult(ok=True, content={
        "customer": {
            "id": c["id"], "name": c["name"], "email": c["email"], "phone": c["phone"], "tier": c["tier"],
            "locked": c["locked"], "card_status": c["card_status"], "card_last4": f"**** {c['card_number'][-4:]}",
        },
        "accounts": [
            {"id": a["id"], "iban": a["iban"], "kind": a["kind"], "balance": a["balance"], "currency": a["currency"]}
            for a in accounts
        ],
    })


def _get_transactions(conn: Connection, req: ToolRequest, args: GetTransactionsArgs) -> ToolResult:
    if _customer(conn, args.customer_id) is None:
        return _unknown_customer(args.customer_id)
    rows = conn.execute(_TRANSACTIONS_OF, {"id": args.customer_id, "days": args.days, "limit": args.limit})
    return ToolResult(ok=True, content={"transactions": [dict(r) for r in rows.mappings()]})


def _lookup_policy(conn: Connection, req: ToolRequest, args: LookupPolicyArgs) -> ToolResult:
    topic = args.topic.strip().lower().replace(" ", "_").replace("-", "_")
    p = conn.execute(_POLICY_BY_TOPIC, {"topic": topic}).mappings().first()
    if p is None:
        known = conn.execute(select(_POLICIES.c.topic).order_by(_POLICIES.c.topic)).scalars().all()
        return _fail(f"no policy on {args.topic!r}; known topics: {', '.join(known)}")
    return ToolResult(ok=True, content={"topic": p["topic"], "text": p["text"], "max_refund": p["max_refund"]})


@functools.cache
def _by_key(table: Table) -> Select[Any]:
    return select(table).where(table.c.idempotency_key == bindparam("key"))


def _existing(conn: Connection, table: Table, key: str) -> RowMapping | None:
    return conn.execute(_by_key(table), {"key": key}).mappings().first()


def _insert(conn: Connection, table: Table, **values: Any) -> RowMapping:
    """INSERT one row (created_at now) and return it (RETURNING: SQLite 3.35+, PostgreSQL)."""
    stmt = insert(table).values(created_at=utcnow(), **values).returning(*table.c)
    return conn.execute(stmt).mappings().one()


def _issue_refund(conn: Connection, req: ToolRequest, args: IssueRefundArgs) -> ToolResult:
    r = _existing(conn, _REFUNDS, req.idempotency_key)
    if r is None:
        if _customer(conn, args.customer_id) is None:
            return _unknown_customer(args.customer_id)
        t = conn.execute(_TRANSACTION_BY_ID, {"id": args.transaction_id}).mappings().first()
        if t is None:
            return _fail(f"transaction {args.transaction_id!r} not found")
        if t["customer_id"] != args.customer_id:
            return _fail(f"transaction {args.transaction_id!r} does not belong to customer {args.customer_id!r}")
        amount = round(args.amount, 2)
        refunded: float = conn.execute(
            select(func.coalesce(func.sum(_REFUNDS.c.amount), 0.0)).where(_REFUNDS.c.transaction_id == t["id"])
        ).scalar() or 0.0
        refundable = round(t["amount"] - refunded, 2)
        if amount > refundable:
            already = f" ({refunded:.2f} already refunded)" if refunded else ""
            return _fail(f"refund of {amount:.2f} exceeds the refundable amount {refundable:.2f} of "
                         f"transaction {t['id']!r}{already}")
        r = _insert(conn, _REFUNDS, idempotency_key=req.idempotency_key, workflow_id=req.task.workflow_id,
                    customer_id=args.customer_id, transaction_id=t["id"], amount=amount, reason=args.reason,
                    status="executed")
        a = _ACCOUNTS.c
        balance = conn.execute(select(a.balance).where(a.id == t["account_id"])).scalar()
        if balance is not None:
            conn.execute(update(_ACCOUNTS).where(a.id == t["account_id"]).values(balance=round(balance + amount, 2)))
    return ToolResult(ok=True, content={"refund_id": f"RF-{r['id']}", "transaction_id": r["transaction_id"],
                                        "amount": r["amount"], "status": r["status"]})


def _send_reply(conn: Connection, req: ToolRequest, args: SendReplyArgs) -> ToolResult:
    r = _existing(conn, _REPLIES, req.idempotency_key)
    if r is None:
        if _customer(conn, args.customer_id) is None:
            return _unknown_customer(args.customer_id)
        r = _insert(conn, _REPLIES, idempotency_key=req.idempotency_key, workflow_id=req.task.workflow_id,
                    customer_id=args.customer_id, body=args.body, status="sent")
    return ToolResult(ok=True, content={"reply_id": f"RP-{r['id']}", "customer_id": r["customer_id"],
                                        "status": r["status"]})


def _escalate(conn: Connection, req: ToolRequest, args: EscalateArgs) -> ToolResult:
    q = _existing(conn, _QUEUE, req.idempotency_key)
    if q is None:
        q = _insert(conn, _QUEUE, idempotency_key=req.idempotency_key, workflow_id=req.task.workflow_id,
                    customer_id=req.task.customer, reason=args.reason, priority=args.priority, status="open")
    return ToolResult(ok=True, content={"queue_item_id": f"HQ-{q['id']}", "status": "queued", "reason": q["reason"]})


def human_queue(engine: Engine, status: str | None = "open") -> list[dict[str, Any]]:
    """Items of the human queue with `status` ("open", "resolved", or None for all), oldest first."""
    stmt = select(HumanQueueRow).order_by(col(HumanQueueRow.created_at), col(HumanQueueRow.id))
    if status is not None:
        stmt = stmt.where(col(HumanQueueRow.status) == status)
    with Session(engine) as s:
        return [
            {"queue_item_id": f"HQ-{q.id}", "workflow_id": q.workflow_id, "customer_id": q.customer_id,
             "reason": q.reason, "priority": q.priority, "status": q.status, "created_at": q.created_at}
            for q in s.scalars(stmt)
        ]
