"""Shadow mode's database side: the comparison rows (written by an activity, once per shadowed
task), the configuration `keel shadow start/stop` writes and the client reads, and the report.

One configuration is active per registered agent (`CandidateSpec.agent`). An agent's rows are told
apart by their label (the `candidate` column), which starts with `agent=<name>,`."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlmodel import Session, col
from temporalio import activity

from activities.db import ShadowComparisonRow, ShadowConfigRow, utcnow
from keel.shadow import (
    AGENT_LABEL_PREFIX,
    NOT_STORED,
    SHADOW_RECORD_ACTIVITY,
    CandidateSpec,
    ShadowComparison,
    ShadowConfig,
    ShadowSummary,
    agent_label_prefix,
    summarize,
)
from keel.types import BlockedAction

_ACTIONS = TypeAdapter(list[BlockedAction])


class ShadowActivities:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @activity.defn(name=SHADOW_RECORD_ACTIVITY)
    def record(self, comparison: ShadowComparison) -> bool:
        """Write the comparison row; False if this shadow workflow's row exists already (a retry)."""
        return record_comparison(self.engine, comparison)

    def all(self) -> list[Callable[..., Any]]:
        return [self.record]


def _as_utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


# --- comparisons ------------------------------------------------------------------------------


def record_comparison(engine: Engine, c: ShadowComparison) -> bool:
    """Insert the row keyed on the shadow workflow id; an existing row is left as it is."""
    values = c.model_dump(exclude={"dry_run_actions", "proposed_writes", "created_at", *NOT_STORED})
    row = ShadowComparisonRow(**values, dry_run_actions=_ACTIONS.dump_json(c.dry_run_actions).decode(),
                              proposed_writes=_ACTIONS.dump_json(c.proposed_writes).decode(),
                              created_at=_as_utc(c.created_at) if c.created_at else utcnow())
    with Session(engine) as s:
        if s.get(ShadowComparisonRow, c.shadow_workflow_id) is not None:
            return False
        s.add(row)
        try:
            s.commit()
        except IntegrityError:
            # Another attempt of this activity committed first.
            return False
    return True


def _comparison(r: ShadowComparisonRow) -> ShadowComparison:
    doc = r.model_dump(exclude={"dry_run_actions", "proposed_writes"})
    return ShadowComparison.model_validate({**doc, "dry_run_actions": json.loads(r.dry_run_actions or "[]"),
                                            "proposed_writes": json.loads(r.proposed_writes or "[]")})


def _target(column: Any, agent: str | None) -> Any:
    """Rows of one target: `agent`'s candidates, or (None) every target's."""
    if agent is None:
        return ~column.startswith(AGENT_LABEL_PREFIX, autoescape=True)
    return column.startswith(agent_label_prefix(agent), autoescape=True)


def comparisons(engine: Engine, since: datetime | None = None, candidate: str | None = None,
                agent: str | None = None) -> list[ShadowComparison]:
    """Comparison rows, oldest first; `agent`: only that agent's candidates."""
    stmt = select(ShadowComparisonRow).order_by(col(ShadowComparisonRow.created_at),
                                                col(ShadowComparisonRow.shadow_workflow_id))
    if since is not None:
        stmt = stmt.where(col(ShadowComparisonRow.created_at) >= _as_utc(since))
    if candidate is not None:
        stmt = stmt.where(col(ShadowComparisonRow.candidate) == candidate)
    if agent is not None:
        stmt = stmt.where(_target(col(ShadowComparisonRow.candidate), agent))
    with Session(engine) as s:
        return [_comparison(r) for r in s.scalars(stmt)]


def shadow_report(engine: Engine, since: datetime | None = None, agent: str | None = None) -> list[ShadowSummary]:
    """`keel shadow report`: one summary per candidate over the comparisons since `since` (`agent`:
    only that agent's candidates)."""
    return summarize(comparisons(engine, since, agent=agent))


# --- the configuration ------------------------------------------------------------------------


def _config(r: ShadowConfigRow) -> ShadowConfig:
    return ShadowConfig(candidate=CandidateSpec.model_validate_json(r.candidate_json), fraction=r.fraction,
                        started_at=r.started_at)


def start_shadow(engine: Engine, candidate: CandidateSpec, fraction: float) -> ShadowConfig:
    """Make `candidate` the active shadow for `fraction` of new tasks of
    `candidate.agent` (replacing that target's active one; other targets' stay)."""
    now = utcnow()
    config = ShadowConfig(candidate=candidate, fraction=fraction, started_at=now)
    with Session(engine) as s:
        active = select(ShadowConfigRow).where(col(ShadowConfigRow.active),
                                               _target(col(ShadowConfigRow.candidate), candidate.agent))
        for old in s.scalars(active):
            old.active, old.stopped_at = False, now
            s.add(old)
        s.add(ShadowConfigRow(candidate=candidate.label, candidate_json=candidate.model_dump_json(),
                              fraction=fraction, started_at=now, active=True))
        s.commit()
    return config


def stop_shadow(engine: Engine, agent: str | None = None) -> ShadowConfig | None:
    """End shadowing of `agent`'s new tasks (running shadows finish); the
    configuration that was active."""
    with Session(engine) as s:
        rows = list(s.scalars(select(ShadowConfigRow).where(col(ShadowConfigRow.active),
                                                             _target(col(ShadowConfigRow.candidate), agent))))
        for r in rows:
            r.active, r.stopped_at = False, utcnow()
            s.add(r)
        s.commit()
        return _config(rows[-1]) if rows else None


def active_shadow(engine: Engine, agent: str | None = None) -> ShadowConfig | None:
    """The active configuration for `agent`'s tasks; None. One indexed read; a ledger
    made before shadow mode existed has no table yet, which means no shadow."""
    stmt = (select(ShadowConfigRow).where(col(ShadowConfigRow.active), _target(col(ShadowConfigRow.candidate), agent))
            .order_by(col(ShadowConfigRow.id).desc()).limit(1))
    try:
        with Session(engine) as s:
            row = s.scalars(stmt).first()
            return _config(row) if row is not None else None
    except (OperationalError, ProgrammingError) as e:
        if "shadow_config" in str(e):  # no such table / relation does not exist
            return None
        raise


def active_agent_shadows(engine: Engine) -> dict[str, ShadowConfig]:
    """Every agent's active configuration, by agent name (one read: what a starter caches)."""
    stmt = (select(ShadowConfigRow).where(col(ShadowConfigRow.active),
                                          col(ShadowConfigRow.candidate).startswith(AGENT_LABEL_PREFIX))
            .order_by(col(ShadowConfigRow.id)))
    try:
        with Session(engine) as s:
            configs = [_config(r) for r in s.scalars(stmt)]
    except (OperationalError, ProgrammingError) as e:
        if "shadow_config" in str(e):
            return {}
        raise
    return {c.candidate.agent: c for c in configs if c.candidate.agent}


def last_shadow(engine: Engine, agent: str | None = None) -> tuple[ShadowConfig, datetime | None, bool] | None:
    """The latest configuration for `agent`'s tasks, its stop time and whether it is
    active; None if there never was one."""
    stmt = (select(ShadowConfigRow).where(_target(col(ShadowConfigRow.candidate), agent))
            .order_by(col(ShadowConfigRow.id).desc()).limit(1))
    with Session(engine) as s:
        row = s.scalars(stmt).first()
        if row is None:
            return None
        return _config(row), row.stopped_at, row.active
