"""The tenant budget limiter: a durable counter per (tenant, feature, period) in the ledger's database,
checked by the LLM activity before every model call, with reservations.

Before the call, one transaction locks the scope's counter row (SQLite: BEGIN IMMEDIATE, the database's
write lock; PostgreSQL: SELECT ... FOR UPDATE on the row) and admits the call only if what was spent,
plus what calls in flight hold, plus this call's worst case (its estimated input, with a margin, and its
output cap, priced) fits the limit; it then holds that worst case. After the call, the hold is settled
at the actual usage (what the ledger row says), or released when the call failed. So concurrent calls,
on any number of workers sharing the database, can never together pass the limit.

A call that does not fit only because of other calls' holds waits (heartbeating) until they settle:
holds are worst cases, and most calls spend far less. A call is refused when it would not fit even
if nothing else were in flight: the task then ends `escalated` with the reason (TenantBudgetExceeded).
So a tenant's spend ends within one call's reservation of its limit, and never over it.

Idempotent per call: the hold's key is the call's ledger key (workflow, step), so a retried call takes
its own hold over, and its settle replaces the first attempt's, as its ledger row does. A hold whose
task died mid-call stops counting after `hold_s`. The period is the calendar day or month of the
worker's clock, in UTC: a new period is a new counter row, so the limit resets at midnight or on the 1st.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, Engine, and_, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.db import TenantHoldRow, TenantSpendRow, table_of
from keel import errors
from keel.pricing import cost_usd
from keel.tenant_budgets import Scope, TenantBudgets
from keel.types import LlmRequest, Price, Usage

log = logging.getLogger(__name__)

USD_EPS = 1e-12
SETTLED_KEPT = timedelta(hours=1)
"""A settled hold is kept this long, so a retried call replaces its spend instead of adding to it."""
PRUNE_EVERY = 500
"""Settled holds older than SETTLED_KEPT are deleted once every this many settles (per worker)."""


def _now() -> datetime:
    """The limiter's clock (the period it counts in); tests replace it."""
    return datetime.now(UTC)


Verdict = Literal["ok", "wait", "refuse"]


@dataclass
class Hold:
    """What a call holds on its scopes; settle or release it."""

    call_key: str
    scopes: list[tuple[Scope, str]]
    """(scope, period key) of each hold."""
    tokens: int
    usd: float

    def key(self, scope: Scope, period_key: str) -> str:
        return f"{self.call_key}|{scope.feature}|{period_key}"


@dataclass
class _Check:
    verdict: Verdict = "ok"
    reasons: list[str] = field(default_factory=list)


class TenantLimiter:
    def __init__(self, engine: Engine, budgets: TenantBudgets, hold_s: float = 600.0, input_margin: float = 1.25,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.engine = engine
        self.budgets = budgets
        self.hold_s = hold_s
        self.input_margin = input_margin
        """The input is estimated at 4 characters a token (exact for the sim); real tokenizers may count
        more, so the hold reserves this multiple of the estimate."""
        self._clock = clock
        self._settles = 0
        self._changed: asyncio.Event | None = None
        """Set (and replaced) when a hold of this worker settles or is released: waiters re-check at once."""

    def now(self) -> datetime:
        return self._clock() if self._clock is not None else _now()

    # -- the activity's side ------------------------------------------------------------------------
    def worst_case(self, req: LlmRequest, est_input: int, pinned: dict[str, Price] | None) -> tuple[int, float]:
        """Tokens and dollars a call may spend at most: its input (estimated, with the margin) and its output cap."""
        inp = math.ceil(est_input * self.input_margin)
        usage = Usage(input_tokens=inp, output_tokens=req.max_output_tokens)
        return inp + req.max_output_tokens, cost_usd(req.model.provider, req.model.model, usage, pinned=pinned)

    async def reserve(self, req: LlmRequest, est_input: int, pinned: dict[str, Price] | None) -> Hold | None:
        """Hold the call's worst case on every tenant budget it counts against, waiting while other calls'
        holds are in the way; None when no budget applies. Raises TenantBudgetExceeded (non-retryable)."""
        scopes = self.budgets.scopes(req.task.tenant, req.task.feature)
        if not scopes:
            return None
        tokens, usd = self.worst_case(req, est_input, pinned)
        call_key = f"{req.task.workflow_id}/{req.step}/llm"
        delay = 0.02
        while True:
            now = self.now()
            hold = Hold(call_key, [(s, s.period_key(now)) for s in scopes], tokens, usd)
            check = await asyncio.to_thread(self.try_reserve, hold, now)
            if check.verdict == "ok":
                return hold
            if check.verdict == "refuse":
                raise ApplicationError("; ".join(check.reasons), {"tokens": tokens, "usd": usd},
                                       type=errors.TENANT_BUDGET_EXCEEDED, non_retryable=True)
            if activity.in_activity():
                activity.heartbeat()
            await self._wait(delay)
            delay = min(delay * 2, 1.0)

    async def settle(self, hold: Hold, tokens: int, usd: float) -> None:
        await asyncio.to_thread(self.settle_now, hold, tokens, usd, self.now())
        self._wake()

    async def release(self, hold: Hold) -> None:
        try:
            await asyncio.to_thread(self.release_now, hold)
        except Exception as e:  # the hold expires by itself; the call's own error matters more
            log.warning("tenant budget hold of %s not released (it expires in %ss): %s", hold.call_key, self.hold_s, e)
        self._wake()

    async def _wait(self, delay: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=delay)
        except TimeoutError:
            pass

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # -- the transactions (synchronous: run in a thread) ------------------------------------------
    def try_reserve(self, hold: Hold, now: datetime) -> _Check:
        spend, holds = table_of(TenantSpendRow), table_of(TenantHoldRow)
        check = _Check()
        refusing: list[tuple[Scope, str]] = []
        with self.engine.begin() as conn:
            mine: dict[str, Any] = {}
            for scope, pk in sorted(hold.scopes, key=lambda sp: (sp[0].tenant, sp[0].feature)):  # one lock order
                counter = self._lock(conn, scope, pk)
                key = hold.key(scope, pk)
                held_usd, held_tokens = held_now(conn, scope.tenant, scope.feature, pk, now, besides=key)
                mine[key] = conn.execute(select(holds).where(holds.c.key == key)).mappings().first()
                verdict, reason = _judge(scope, pk, counter, held_usd, held_tokens, hold)
                if verdict == "refuse":
                    refusing.append((scope, pk))
                    check.verdict = "refuse"
                    check.reasons.append(reason)
                elif verdict == "wait" and check.verdict == "ok":
                    check.verdict = "wait"
                    check.reasons.append(reason)
            if check.verdict == "refuse":
                for scope, pk in refusing:
                    conn.execute(update(spend).where(*_pk(spend, scope, pk)).values(
                        refused=spend.c.refused + 1, updated_at=now))
                return check
            if check.verdict == "wait":
                return check
            expires = now + timedelta(seconds=self.hold_s)
            for scope, pk in hold.scopes:
                key = hold.key(scope, pk)
                values = {"state": "held", "held_usd": hold.usd, "held_tokens": hold.tokens, "expires_at": expires}
                if mine[key] is None:
                    conn.execute(insert(holds).values(key=key, call_key=hold.call_key, tenant=scope.tenant,
                                                      feature=scope.feature, period_key=pk, **values))
                else:
                    conn.execute(update(holds).where(holds.c.key == key).values(**values))
                conn.execute(update(spend).where(*_pk(spend, scope, pk)).values(
                    max_usd=scope.limit.max_usd, max_tokens=scope.limit.max_tokens, period=scope.limit.period,
                    updated_at=now))
        return check

    def settle_now(self, hold: Hold, tokens: int, usd: float, now: datetime) -> None:
        """Charge the call's actual usage to each of its scopes (replacing an earlier attempt's)."""
        spend, holds = table_of(TenantSpendRow), table_of(TenantHoldRow)
        with self.engine.begin() as conn:
            for scope, pk in sorted(hold.scopes, key=lambda sp: (sp[0].tenant, sp[0].feature)):
                key = hold.key(scope, pk)
                self._lock(conn, scope, pk)
                row = conn.execute(select(holds).where(holds.c.key == key)).mappings().first()
                prev_usd, prev_tokens = (row["settled_usd"], row["settled_tokens"]) if row is not None else (0.0, 0)
                first = row is None or (prev_tokens == 0 and prev_usd == 0)
                conn.execute(update(spend).where(*_pk(spend, scope, pk)).values(
                    spent_usd=spend.c.spent_usd + (usd - prev_usd),
                    spent_tokens=spend.c.spent_tokens + (tokens - prev_tokens),
                    calls=spend.c.calls + (1 if first else 0), updated_at=now))
                values = {"state": "settled", "held_usd": 0.0, "held_tokens": 0, "settled_usd": usd,
                          "settled_tokens": tokens, "expires_at": now + SETTLED_KEPT}
                if row is None:  # its hold expired and was pruned while the call ran: still charged
                    conn.execute(insert(holds).values(key=key, call_key=hold.call_key, tenant=scope.tenant,
                                                      feature=scope.feature, period_key=pk, **values))
                else:
                    conn.execute(update(holds).where(holds.c.key == key).values(**values))
                if tokens > hold.tokens or usd > hold.usd + USD_EPS:
                    log.warning("call %s spent %s tokens / $%.6f, more than its tenant budget hold (%s / $%.6f): "
                                "raise KEEL_TENANT_BUDGET_INPUT_MARGIN",
                                hold.call_key, tokens, usd, hold.tokens, hold.usd)
            self._settles += 1
            if self._settles % PRUNE_EVERY == 0:
                conn.execute(delete(holds).where(holds.c.expires_at < now - SETTLED_KEPT))

    def release_now(self, hold: Hold) -> None:
        """The call failed: drop its holds (an earlier attempt's settled spend stays counted)."""
        holds = table_of(TenantHoldRow)
        with self.engine.begin() as conn:
            for scope, pk in hold.scopes:
                key = hold.key(scope, pk)
                row = conn.execute(select(holds).where(holds.c.key == key)).mappings().first()
                if row is None or row["state"] != "held":
                    continue
                if row["settled_tokens"] or row["settled_usd"]:
                    conn.execute(update(holds).where(holds.c.key == key).values(state="settled", held_usd=0.0,
                                                                                 held_tokens=0))
                else:
                    conn.execute(delete(holds).where(holds.c.key == key))

    def _lock(self, conn: Connection, scope: Scope, pk: str) -> Any:
        """The scope's counter row for the period, created if missing, locked for this transaction."""
        spend = table_of(TenantSpendRow)
        values = {"tenant": scope.tenant, "feature": scope.feature, "period_key": pk, "period": scope.limit.period,
                  "max_usd": scope.limit.max_usd, "max_tokens": scope.limit.max_tokens, "updated_at": self.now()}
        dialect = conn.dialect.name
        if dialect in ("sqlite", "postgresql"):
            ins = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(spend)
            conn.execute(ins.values(**values).on_conflict_do_nothing(
                index_elements=["tenant", "feature", "period_key"]))
        elif conn.execute(select(spend.c.tenant).where(*_pk(spend, scope, pk))).first() is None:
            conn.execute(insert(spend).values(**values))
        return conn.execute(select(spend).where(*_pk(spend, scope, pk)).with_for_update()).mappings().one()



def held_now(conn: Connection, tenant: str, feature: str, pk: str, now: datetime,
             besides: str | None = None) -> tuple[float, int]:
    """Dollars and tokens held by the calls in flight on a scope's period (but `besides`, a hold key)."""
    holds = table_of(TenantHoldRow)
    where = [holds.c.tenant == tenant, holds.c.feature == feature, holds.c.period_key == pk,
             holds.c.state == "held", holds.c.expires_at > now]
    if besides is not None:
        where.append(holds.c.key != besides)
    usd, tokens = conn.execute(select(func.coalesce(func.sum(holds.c.held_usd), 0.0),
                                      func.coalesce(func.sum(holds.c.held_tokens), 0)).where(*where)).one()
    return float(usd), int(tokens)


def _pk(spend: Any, scope: Scope, pk: str) -> list[Any]:
    return [and_(spend.c.tenant == scope.tenant, spend.c.feature == scope.feature, spend.c.period_key == pk)]


def _judge(scope: Scope, pk: str, counter: Any, held_usd: float, held_tokens: int, hold: Hold) -> tuple[Verdict, str]:
    lim = scope.limit
    spent_usd, spent_tokens = float(counter["spent_usd"]), int(counter["spent_tokens"])
    over_now: list[str] = []
    for name, spent, held, need, cap, fmt in (
        ("dollars", spent_usd, held_usd, hold.usd, lim.max_usd, "${:.4f}"),
        ("tokens", spent_tokens, held_tokens, hold.tokens, lim.max_tokens, "{:,}"),
    ):
        if cap is None:
            continue
        if spent + need > cap + (USD_EPS if name == "dollars" else 0):
            return "refuse", (f"tenant budget of {scope.label()} exceeded for the {lim.period} {pk}: "
                              f"{fmt.format(spent)} of {fmt.format(cap)} {name} spent; the next call needs up to "
                              f"{fmt.format(need)}")
        if spent + held + need > cap + (USD_EPS if name == "dollars" else 0):
            over_now.append(f"{name}: {fmt.format(spent)} spent + {fmt.format(held)} held by calls in flight")
    if over_now:
        return "wait", f"waiting for calls in flight on {scope.label()} ({'; '.join(over_now)})"
    return "ok", ""
