"""Tenant budgets: spend limits per tenant (and per feature of a tenant) over a day or a month, in
tokens and dollars, from KEEL_TENANT_BUDGETS. Pure: parsing, validation and period keys; the limiter
that enforces them before every model call is activities/tenant_budgets.py.

    {"C-1001": {"period": "day", "max_usd": 1.0, "max_tokens": 200000,
                "features": {"research": {"period": "month", "max_usd": 5.0}}},
     "*": {"period": "month", "max_usd": 20.0}}

A tenant's entry limits all of its calls together; its `features` limit its calls of one feature
(`"*"` among them: each other feature, separately). The `"*"` tenant applies to every tenant not
listed, to each on its own (not a pool they share). Periods are calendar days or months in UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keel.config_source import ConfigSourceError, read_table

Period = Literal["day", "month"]
ANY = "*"


class TenantBudgetsError(ValueError):
    """KEEL_TENANT_BUDGETS cannot be used: the message names the file (or inline JSON) and the entries at fault."""


class Limit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    period: Period = "day"
    max_usd: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)

    @property
    def limited(self) -> bool:
        return self.max_usd is not None or self.max_tokens is not None


class FeatureLimit(Limit):
    @model_validator(mode="after")
    def _some_limit(self) -> FeatureLimit:
        if not self.limited:
            raise ValueError("give max_usd, max_tokens or both")
        return self


class TenantBudget(Limit):
    features: dict[str, FeatureLimit] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _some_limit(self) -> TenantBudget:
        if not self.limited and not self.features:
            raise ValueError("give max_usd, max_tokens or both, or per-feature limits in `features`")
        return self


class Scope(BaseModel):
    """One counter a call is checked against: a tenant's (feature "") or one feature's of a tenant."""

    tenant: str
    feature: str = ""
    limit: Limit

    def period_key(self, now: datetime) -> str:
        return period_key(self.limit.period, now)

    def label(self) -> str:
        return f"tenant {self.tenant!r}" + (f" feature {self.feature!r}" if self.feature else "")


def period_key(period: Period, now: datetime) -> str:
    """The period `now` (UTC) falls in: `2026-12-06` for a day, `2026-12` for a month."""
    return f"{now:%Y-%m-%d}" if period == "day" else f"{now:%Y-%m}"


class TenantBudgets(BaseModel):
    budgets: dict[str, TenantBudget] = Field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.budgets)

    def scopes(self, tenant: str, feature: str) -> list[Scope]:
        """The limits a call of `tenant` for `feature` is checked against (none: not limited)."""
        entry = self.budgets.get(tenant) or self.budgets.get(ANY)
        if entry is None:
            return []
        out = []
        if entry.limited:
            out.append(Scope(tenant=tenant, limit=Limit(period=entry.period, max_usd=entry.max_usd,
                                                        max_tokens=entry.max_tokens)))
        feat = entry.features.get(feature) or entry.features.get(ANY)
        if feat is not None:
            out.append(Scope(tenant=tenant, feature=feature, limit=feat))
        return out


def _example() -> str:
    return ('{"C-1001": {"period": "day", "max_usd": 1.0, "max_tokens": 200000}, '
            '"*": {"period": "month", "max_usd": 20}}')


def parse_tenant_budgets(source: str | None) -> TenantBudgets:
    """KEEL_TENANT_BUDGETS: a path to a .json or .toml file, or inline JSON starting with `{`. Raises
    TenantBudgetsError naming the file and every bad entry."""
    text = (source or "").strip()
    if not text:
        return TenantBudgets()
    try:
        raw, where = read_table("KEEL_TENANT_BUDGETS", text)
    except ConfigSourceError as e:
        raise TenantBudgetsError(str(e)) from None
    if not isinstance(raw, dict):
        raise TenantBudgetsError(f"{where}: must map a tenant (or \"*\") to its limits, e.g. {_example()}")
    budgets: dict[str, TenantBudget] = {}
    problems: list[str] = []
    for tenant, value in raw.items():
        if not str(tenant).strip():
            problems.append("an entry with an empty tenant name")
            continue
        try:
            budgets[str(tenant)] = TenantBudget.model_validate(value)
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(p) for p in err["loc"])
                problems.append(f"entry {tenant!r}{': ' + loc if loc else ''}: {err['msg']}")
    if problems:
        raise TenantBudgetsError(f"{where}: " + "; ".join(problems) + f" (example: {_example()})")
    return TenantBudgets(budgets=budgets)
