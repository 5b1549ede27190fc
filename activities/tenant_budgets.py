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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, Engine, bindparam, text
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.db import UtcDateTime
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
        self._waiters: deque[asyncio.Future[None]] = deque()
        """Calls of this worker waiting for holds to settle, oldest first. A settle or release here wakes the
        first (not all: each re-check is a transaction); a waiter admitted or refused wakes the next. Holds
        settled by other workers are seen by polling (every 20 ms, backing off to 1 s)."""

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
            if check.verdict != "wait":
                self._wake()  # whatever room is left may fit the next waiter
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
        if len(self._waiters) > 1024:  # timed-out waits are left behind: sweep them now and then
            self._waiters = deque(f for f in self._waiters if not f.done())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout=delay)
        except TimeoutError:
            pass

    def _wake(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    # -- the transactions (synchronous: run in a thread) ------------------------------------------
    def try_reserve(self, hold: Hold, now: datetime) -> _Check:
        check = _Check()
        refusing: list[tuple[Scope, str]] = []
        with self.engine.begin() as conn:
            mine: dict[str, Any] = {}
            for scope, pk in sorted(hold.scopes, key=lambda sp: (sp[0].tenant, sp[0].feature)):  # one lock order
                counter = _lock(conn, scope, pk, now)
                key = hold.key(scope, pk)
                held_usd, held_tokens = held_now(conn, scope.tenant, scope.feature, pk, now, besides=key)
                mine[key] = conn.execute(_MINE, {"key": key}).first()
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
                    conn.execute(_REFUSED, _pk(scope, pk) | {"now": now})
                return check
            if check.verdict == "wait":
                return check
            expires = now + timedelta(seconds=self.hold_s)
            for scope, pk in hold.scopes:
                key = hold.key(scope, pk)
                values = {"key": key, "usd": hold.usd, "tokens": hold.tokens, "expires": expires}
                if mine[key] is None:
                    conn.execute(_HOLD_NEW, values | _pk(scope, pk) | {"call_key": hold.call_key, "state": "held",
                                                                     "settled_usd": 0.0, "settled_tokens": 0})
                else:
                    conn.execute(_HOLD_AGAIN, values)
        return check

    def settle_now(self, hold: Hold, tokens: int, usd: float, now: datetime) -> None:
        """Charge the call's actual usage to each of its scopes (replacing an earlier attempt's)."""
        with self.engine.begin() as conn:
            for scope, pk in sorted(hold.scopes, key=lambda sp: (sp[0].tenant, sp[0].feature)):
                key = hold.key(scope, pk)
                _lock(conn, scope, pk, now)
                row = conn.execute(_MINE, {"key": key}).first()
                prev_usd, prev_tokens = (float(row[1]), int(row[2])) if row is not None else (0.0, 0)
                first = row is None or (prev_tokens == 0 and prev_usd == 0)
                conn.execute(_CHARGE, _pk(scope, pk) | {"usd": usd - prev_usd, "tokens": tokens - prev_tokens,
                                                        "first": 1 if first else 0, "now": now})
                values = {"key": key, "usd": usd, "tokens": tokens, "expires": now + SETTLED_KEPT}
                if row is None:  # its hold expired and was pruned while the call ran: still charged
                    conn.execute(_HOLD_NEW, values | _pk(scope, pk) | {
                        "call_key": hold.call_key, "state": "settled", "settled_usd": usd, "settled_tokens": tokens,
                        "usd": 0.0, "tokens": 0})
                else:
                    conn.execute(_HOLD_SETTLED, values)
                if tokens > hold.tokens or usd > hold.usd + USD_EPS:
                    log.warning("call %s spent %s tokens / $%.6f, more than its tenant budget hold (%s / $%.6f): "
                                "raise KEEL_TENANT_BUDGET_INPUT_MARGIN",
                                hold.call_key, tokens, usd, hold.tokens, hold.usd)
            self._settles += 1
            if self._settles % PRUNE_EVERY == 0:
                conn.execute(_PRUNE, {"before": now - SETTLED_KEPT})

    def release_now(self, hold: Hold) -> None:
        """The call failed: drop its holds (an earlier attempt's settled spend stays counted)."""
        with self.engine.begin() as conn:
            for scope, pk in hold.scopes:
                key = hold.key(scope, pk)
                row = conn.execute(_MINE, {"key": key}).first()
                if row is None or row[0] != "held":
                    continue
                conn.execute(_HOLD_BACK if row[1] or row[2] else _HOLD_DROP, {"key": key})


# Plain SQL, valid on SQLite (3.24+) and PostgreSQL, parsed once: SQLAlchemy's expression building and
# cache keys cost more than these statements (a profile of reserve + settle: two thirds of its CPU).
_T = UtcDateTime()
_SCOPE = "tenant = :tenant AND feature = :feature AND period_key = :period_key"
_ENSURE = text(
    "INSERT INTO tenant_spend (tenant, feature, period_key, period, spent_usd, spent_tokens, calls, refused, "
    "max_usd, max_tokens, updated_at) VALUES (:tenant, :feature, :period_key, :period, 0, 0, 0, 0, :max_usd, "
    ":max_tokens, :now) ON CONFLICT (tenant, feature, period_key) DO UPDATE SET period = excluded.period, "
    "max_usd = excluded.max_usd, max_tokens = excluded.max_tokens").bindparams(bindparam("now", type_=_T))
_COUNTER = f"SELECT spent_usd, spent_tokens FROM tenant_spend WHERE {_SCOPE}"
_COUNTER_SQLITE = text(_COUNTER)
_COUNTER_LOCKED = text(_COUNTER + " FOR UPDATE")
_HELD = text(f"SELECT coalesce(sum(held_usd), 0), coalesce(sum(held_tokens), 0) FROM tenant_holds WHERE {_SCOPE} "
             "AND state = 'held' AND expires_at > :now AND key <> :besides").bindparams(bindparam("now", type_=_T))
_MINE = text("SELECT state, settled_usd, settled_tokens FROM tenant_holds WHERE key = :key")
_REFUSED = text(f"UPDATE tenant_spend SET refused = refused + 1, updated_at = :now WHERE {_SCOPE}").bindparams(
    bindparam("now", type_=_T))
_CHARGE = text(f"UPDATE tenant_spend SET spent_usd = spent_usd + :usd, spent_tokens = spent_tokens + :tokens, "
               f"calls = calls + :first, updated_at = :now WHERE {_SCOPE}").bindparams(bindparam("now", type_=_T))
_HOLD_NEW = text(
    "INSERT INTO tenant_holds (key, call_key, tenant, feature, period_key, state, held_usd, held_tokens, "
    "settled_usd, settled_tokens, expires_at) VALUES (:key, :call_key, :tenant, :feature, :period_key, :state, "
    ":usd, :tokens, :settled_usd, :settled_tokens, :expires)").bindparams(bindparam("expires", type_=_T))
_HOLD_AGAIN = text("UPDATE tenant_holds SET state = 'held', held_usd = :usd, held_tokens = :tokens, "
                   "expires_at = :expires WHERE key = :key").bindparams(bindparam("expires", type_=_T))
_HOLD_SETTLED = text("UPDATE tenant_holds SET state = 'settled', held_usd = 0, held_tokens = 0, settled_usd = :usd, "
                     "settled_tokens = :tokens, expires_at = :expires WHERE key = :key").bindparams(
    bindparam("expires", type_=_T))
_HOLD_BACK = text("UPDATE tenant_holds SET state = 'settled', held_usd = 0, held_tokens = 0 WHERE key = :key")
_HOLD_DROP = text("DELETE FROM tenant_holds WHERE key = :key")
_PRUNE = text("DELETE FROM tenant_holds WHERE expires_at < :before").bindparams(bindparam("before", type_=_T))


def _pk(scope: Scope, pk: str) -> dict[str, Any]:
    return {"tenant": scope.tenant, "feature": scope.feature, "period_key": pk}


def _lock(conn: Connection, scope: Scope, pk: str, now: datetime) -> Any:
    """The scope's counter row for the period, created if missing (with the limits it is checked against),
    locked for this transaction: SQLite's write lock is the database's (BEGIN IMMEDIATE), PostgreSQL's
    the row's (the upsert, then FOR UPDATE)."""
    lim = scope.limit
    conn.execute(_ENSURE, _pk(scope, pk) | {"period": lim.period, "max_usd": lim.max_usd, "max_tokens": lim.max_tokens,
                                            "now": now})
    locked = _COUNTER_SQLITE if conn.dialect.name == "sqlite" else _COUNTER_LOCKED
    return conn.execute(locked, _pk(scope, pk)).one()


def held_now(conn: Connection, tenant: str, feature: str, pk: str, now: datetime,
             besides: str = "") -> tuple[float, int]:
    """Dollars and tokens held by the calls in flight on a scope's period (but `besides`, a hold key)."""
    usd, tokens = conn.execute(_HELD, {"tenant": tenant, "feature": feature, "period_key": pk, "now": now,
                                       "besides": besides}).one()
    return float(usd), int(tokens)


def _judge(scope: Scope, pk: str, counter: Any, held_usd: float, held_tokens: int, hold: Hold) -> tuple[Verdict, str]:
    lim = scope.limit
    spent_usd, spent_tokens = float(counter[0]), int(counter[1])
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
