"""`keel costs --period day|month`: the current period's spend, and, grouped by tenant (or tenant and
feature), each group's tenant budget beside it: its limit, the share used, what calls in flight hold now,
and how many calls it refused. Read-only over the ledger's database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, inspect, select

from activities.db import TenantSpendRow, read_only, table_of
from activities.tenant_budgets import held_now
from keel.tenant_budgets import Limit, Period, parse_tenant_budgets, period_key


def period_start(period: Period, now: datetime | None = None) -> datetime:
    """The start of the current UTC day or month."""
    now = now or datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def check_period(period: str | None, since: str | None) -> Period | None:
    """--period's value (None: not given); a ValueError says what is wrong with it."""
    if period is None:
        return None
    if period not in ("day", "month"):
        raise ValueError(f"--period {period!r}: use day or month")
    if since is not None:
        raise ValueError("--period and --since both say where the costs start: give one")
    return "day" if period == "day" else "month"


def _limit_text(lim: Limit) -> str:
    parts = ([f"${lim.max_usd:.4f}"] if lim.max_usd is not None else []) + (
        [f"{lim.max_tokens:,} tok"] if lim.max_tokens is not None else [])
    return " + ".join(parts) + f"/{lim.period}"


def with_budgets(rows: list[dict[str, Any]], group: list[str], period: Period, engine: Engine,
                 config: str | None, now: datetime | None = None) -> list[dict[str, Any]]:
    """`rows` (the ledger's costs since the period's start, grouped by tenant or tenant and feature) with
    the budget columns; tenants whose budget refused calls this period but spent nothing get a row too.
    The limits are those the workers enforced (their counter rows), else KEEL_TENANT_BUDGETS's."""
    if "tenant" not in group or not set(group) <= {"tenant", "feature"}:
        return rows
    budgets = parse_tenant_budgets(config)  # a TenantBudgetsError is a ValueError
    now = now or datetime.now(UTC)
    pk = period_key(period, now)
    by_feature = "feature" in group
    spend = table_of(TenantSpendRow)
    counters: dict[tuple[str, str], dict[str, Any]] = {}
    held: dict[tuple[str, str], tuple[float, int]] = {}
    if inspect(engine).has_table(spend.name):  # else no worker of this version ran on this database yet
        with read_only(engine) as conn:
            counters = {(r["tenant"], r["feature"]): dict(r) for r in conn.execute(
                select(spend).where(spend.c.period_key == pk)).mappings()}
            held = {k: held_now(conn, k[0], k[1], pk, now) for k in counters}
    out = [dict(r) for r in rows]
    seen = {(r["tenant"], r.get("feature", "") if by_feature else "") for r in out}
    for tenant, feature in counters:
        if (by_feature and feature) or (not by_feature and not feature):
            if (tenant, feature) not in seen:
                out.append({"tenant": tenant, **({"feature": feature} if by_feature else {}), "calls": 0,
                            "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
    for r in out:
        key = (r["tenant"], r.get("feature", "") if by_feature else "")
        counter = counters.get(key)
        lim: Limit | None = None
        if counter is not None and counter["period"] == period:
            lim = Limit(period=period, max_usd=counter["max_usd"], max_tokens=counter["max_tokens"])
        else:
            lim = next((s.limit for s in budgets.scopes(key[0], key[1] or "\x00")
                        if s.feature == key[1] and s.limit.period == period), None)
        r["budget"] = _limit_text(lim) if lim is not None else ""
        used = ""
        if lim is not None:
            spent_usd = float(counter["spent_usd"]) if counter else 0.0
            spent_tokens = int(counter["spent_tokens"]) if counter else 0
            shares = ([spent_usd / lim.max_usd] if lim.max_usd else []) + (
                [spent_tokens / lim.max_tokens] if lim.max_tokens else [])
            used = f"{100 * max(shares):.0f}%" if shares else ""
        r["used"] = used
        r["held_usd"] = round(held.get(key, (0.0, 0))[0], 6) if counter else 0.0
        r["refused"] = int(counter["refused"]) if counter else 0
    return out
