"""The cost and outcome ledger: one row per (workflow_id, step, kind), written by UPSERT.

An activity retried after a crash rewrites its own row with the last attempt's figures, so the
ledger never counts a step twice. Reporting groups llm rows only.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import PoolProxiedConnection, StaticPool
from sqlmodel import Session, SQLModel, col

from activities.db import LedgerRow, utcnow
from keel.shadow import SHADOW_FEATURE
from keel.types import LlmRequest, LlmResponse, TaskContext, TaskOutcome, ToolRequest, ToolResult

RAW_OUTPUT_CHARS = 8_000
"""A repaired or refused model output's raw text is kept up to this many characters."""
OUTCOME_STEP = -1
"""The step of a task's outcome row."""

GROUP_COLUMNS = ("tenant", "feature", "task_type", "model", "provider", "tier", "step_kind", "prompt_version",
                 "parent_workflow_id")
"""What `Ledger.costs` can group by."""


def raw_output(resp: LlmResponse) -> str:
    """A model output as it came: its text, then (when the provider returned tool calls, not read from
    the text) each call as `NAME ARGUMENTS`, its arguments as sent (unreadable ones included)."""
    if resp.repaired or not resp.tool_calls:
        return resp.text
    calls = "\n".join(f"{c.name} {c.arguments_json}" for c in resp.tool_calls)
    return f"{resp.text}\n{calls}" if resp.text else calls


def ledger_key(workflow_id: str, step: int, kind: str) -> str:
    return f"{workflow_id}/{step}/{kind}"


def _tags(task: TaskContext, step: int, kind: str, attempt: int) -> dict[str, Any]:
    return {
        "key": ledger_key(task.workflow_id, step, kind),
        "workflow_id": task.workflow_id,
        "task_key": task.key,
        "step": step,
        "kind": kind,
        "tenant": task.tenant,
        "feature": task.feature,
        "task_type": task.task_type,
        "prompt_version": task.prompt_version,
        "attempt": attempt,
        "created_at": utcnow(),
        "parent_workflow_id": task.parent_workflow_id or None,
    }


def _as_utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


@functools.cache
def _upsert_statement(dialect: str, columns: tuple[str, ...]) -> Any:
    """INSERT ... ON CONFLICT (key) DO UPDATE, built once per column set so SQLAlchemy's compiled
    cache is hit. created_at stays the first attempt's; everything else is the last attempt's."""
    table = SQLModel.metadata.tables[str(LedgerRow.__tablename__)]
    ins = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(table)
    return ins.on_conflict_do_update(
        index_elements=["key"], set_={c: ins.excluded[c] for c in columns if c not in ("key", "created_at")}
    )


_ABSENT = object()


@dataclass(frozen=True)
class _DriverUpsert:
    """The upsert compiled once for SQLite's driver: its SQL text and, for each of its parameters in
    order, the value key, the column's (scalar) default for a key left out, and the type's bind
    processor: what SQLAlchemy would do per call, worked out once."""

    sql: str
    params: tuple[tuple[str, Any, Callable[[Any], Any] | None], ...]

    def args(self, values: dict[str, Any]) -> list[Any]:
        out = []
        for key, default, proc in self.params:
            v = values.get(key, default)
            if v is _ABSENT:
                raise KeyError(f"ledger value {key!r} missing")
            out.append(v if proc is None or v is None else proc(v))
        return out


def _driver_upsert(dialect: Dialect, columns: tuple[str, ...]) -> _DriverUpsert:
    compiled = _upsert_statement("sqlite", columns).compile(dialect=dialect, column_keys=list(columns))
    defaults: dict[str, Any] = {}
    for column in compiled.insert_prefetch:  # columns left out of `columns`: their defaults
        if column.key in columns:
            continue
        if not (column.default is not None and column.default.is_scalar):
            raise TypeError(f"ledger column {column.key!r} has a default the driver path cannot compute")
        defaults[column.key] = column.default.arg
    binds = {b.key: b for b in compiled.binds.values()}
    return _DriverUpsert(str(compiled), tuple(
        (k, defaults.get(k, _ABSENT), binds[k].type.dialect_impl(dialect).bind_processor(dialect))
        for k in compiled.positiontup or []))


def _execute(conn: PoolProxiedConnection, up: _DriverUpsert, values: dict[str, Any]) -> None:
    driver = conn.dbapi_connection  # SQLite: the driver's own connection
    assert driver is not None
    driver.execute(up.sql, up.args(values))


class Ledger:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._driver: dict[tuple[str, ...], _DriverUpsert] = {}
        """SQLite: the single-row upsert compiled per column set (see _write_alone)."""
        self._held = threading.local()
        """SQLite: the connection (detached from the pool) each thread writes its single rows on (see _write_alone)."""

    # --- writing -------------------------------------------------------------------------

    def _upsert(self, values: dict[str, Any], conn: Connection | None) -> None:
        """`conn`: the transaction of a tool's write, so the row commits or rolls back with it; None:
        the row is written alone."""
        dialect = self.engine.dialect.name
        if conn is None:
            self._write_alone(values)
        elif dialect in ("sqlite", "postgresql"):
            conn.execute(_upsert_statement(dialect, tuple(values)), values)
        else:
            # Other databases: read-then-write, correct as long as one attempt runs at a time.
            with Session(bind=conn) as s:
                row = s.get(LedgerRow, values["key"])
                if row is None:
                    s.add(LedgerRow(**values))
                else:
                    for k, v in values.items():
                        if k not in ("key", "created_at"):
                            setattr(row, k, v)
                s.flush()

    def _write_alone(self, values: dict[str, Any]) -> None:
        if self.engine.dialect.name != "sqlite":
            with self.engine.begin() as conn:
                self._upsert(values, conn)
            return
        # Every model call writes its row here, alone: one statement, run by the driver in autocommit
        # (one SQLite statement is atomic), instead of BEGIN, execute and COMMIT through SQLAlchemy.
        # In the worker each call into sqlite3 hands the GIL to the SDK's threads and back, which costs
        # far more than the statement (bench/throughput.py: 0.40 instead of 0.74 ms of CPU per row in
        # the worker, 0.15 ms on an idle thread).
        columns = tuple(values)
        up = self._driver.get(columns)
        if up is None:
            up = self._driver[columns] = _driver_upsert(self.engine.dialect, columns)
        if isinstance(self.engine.pool, StaticPool):  # one shared in-memory database: no connection of its own
            with self.engine.connect() as conn:
                _execute(conn.connection, up, values)
            return
        held = getattr(self._held, "conn", None)
        if held is None:
            # A connection of this thread's own for these rows, made by the engine (its connect settings
            # applied) and detached from its pool, so it never holds a pool slot: a checkout and return
            # per row cost more than the statement.
            held = self._held.conn = self.engine.raw_connection()
            held.detach()
        try:
            _execute(held, up, values)
        except BaseException:
            self._held.conn = None
            held.invalidate()  # closed; a fresh connection for the next row
            raise

    def record_llm(self, req: LlmRequest, resp: LlmResponse, attempt: int, conn: Connection | None = None,
                   invalid: str | None = None) -> None:
        """`invalid`: why the workflow will refuse this output (keel.output.output_problem); the row then
        keeps its raw text and the reason."""
        values = _tags(req.task, req.step, "llm", attempt) | {
            "provider": resp.provider,
            "model": resp.model,
            "tier": req.tier,
            "step_kind": req.kind,
            "prompt_name": req.prompt,
            "prompt_version": resp.prompt_version or req.task.prompt_version,
            "prompt_hash": resp.prompt_hash,
            "input_tokens": resp.usage.input_tokens,
            "output_tokens": resp.usage.output_tokens,
            "cached_input_tokens": resp.usage.cached_input_tokens,
            "reasoning_tokens": resp.usage.reasoning_tokens,
            "cost_usd": resp.cost_usd,
            "latency_ms": resp.latency_ms,
            "ok": True,
            # The raw text of a repaired output (e.g. tool calls the model wrote as text) or of one the
            # workflow will refuse, as it came; no other output's text is kept here (personal data).
            "repaired": resp.repaired or None,
            "raw_output": raw_output(resp)[:RAW_OUTPUT_CHARS] if resp.repaired or invalid else None,
            "error": f"invalid output: {invalid}" if invalid else None,
        }
        self._upsert(values, conn)

    def record_tool(
        self, req: ToolRequest, tool: str, result: ToolResult, attempt: int, conn: Connection | None = None
    ) -> None:
        """Pass the tool's `conn` so the row commits (or rolls back) with the tool's write."""
        values = _tags(req.task, req.step, "tool", attempt) | {
            "tool": tool,
            "latency_ms": result.latency_ms,
            "ok": result.ok,
            "error": result.error,
            "dry_run": True if req.dry_run else None,
        }
        self._upsert(values, conn)

    def record_outcome(self, task: TaskContext, outcome: TaskOutcome, conn: Connection | None = None) -> None:
        """The task's final status; the token/cost columns hold the workflow's own totals."""
        values = _tags(task, OUTCOME_STEP, "outcome", 1) | {
            "status": outcome.status,
            "route": outcome.route,
            "reason": outcome.reason,
            "category": outcome.category,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "cost_usd": outcome.cost_usd,
            "ok": outcome.status in ("resolved", "escalated"),
            "steps": outcome.steps,
            "tools": json.dumps(outcome.tools),
            "reasoning_loops": outcome.reasoning_loops,
            "repeated_calls": outcome.repeated_calls,
            "answer_tokens": outcome.answer_tokens,
            "input_hash": outcome.input_hash or task.input_hash or None,
            "limit_hit": outcome.limit_hit,
        }
        self._upsert(values, conn)

    def record_guardrails(self, req: ToolRequest, conn: Connection | None = None) -> None:
        """One row per guardrail event of the task (blocked calls, approvals, redactions), keyed by
        position: a retried routing call rewrites the same rows."""
        for i, ev in enumerate(req.guardrails):
            values = _tags(req.task, ev.step, "guardrail", 1) | {
                "key": ledger_key(req.task.workflow_id, ev.step, f"guardrail/{i}"),
                "tool": ev.tool,
                "status": ev.kind,
                "reason": ev.detail[:2000],
                "ok": ev.ok,
            }
            self._upsert(values, conn)

    # --- reporting -----------------------------------------------------------------------

    def costs(self, group_by: list[str], since: datetime | None = None,
              session: Session | Connection | None = None) -> list[dict[str, Any]]:
        """LLM spend grouped by any of GROUP_COLUMNS, most expensive group first.

        Each row: the group's values, then calls, input_tokens, output_tokens, cost_usd. `session`: run
        in that caller's transaction instead of a new one."""
        bad = [g for g in group_by if g not in GROUP_COLUMNS]
        if bad:
            raise ValueError(f"cannot group costs by {bad!r}: valid names are {', '.join(GROUP_COLUMNS)}")
        names = list(dict.fromkeys(group_by))
        cols = [getattr(LedgerRow, g) for g in names]
        cost = func.coalesce(func.sum(col(LedgerRow.cost_usd)), 0.0)
        stmt = select(
            *cols,
            func.count().label("calls"),
            func.coalesce(func.sum(col(LedgerRow.input_tokens)), 0).label("input_tokens"),
            func.coalesce(func.sum(col(LedgerRow.output_tokens)), 0).label("output_tokens"),
            cost.label("cost_usd"),
        ).where(col(LedgerRow.kind) == "llm")
        if since is not None:
            stmt = stmt.where(col(LedgerRow.created_at) >= _as_utc(since))
        if cols:
            stmt = stmt.group_by(*cols).order_by(cost.desc(), *cols)
        if session is not None:
            rows = session.execute(stmt).mappings().all()
        else:
            with Session(self.engine) as s:
                rows = s.execute(stmt).mappings().all()
        return [dict(r) for r in rows if r["calls"]]

    def task_costs(self, task_type: str | None = None, since: datetime | None = None) -> dict[str, float]:
        """What each task cost (USD), by workflow id: its own model calls plus its children's (a pattern's
        family is one task). `task_type`: only tasks of that agent or pattern (the parent's type)."""
        root = func.coalesce(col(LedgerRow.parent_workflow_id), col(LedgerRow.workflow_id))
        stmt = select(root.label("root"), func.sum(col(LedgerRow.cost_usd)).label("cost")).where(
            col(LedgerRow.kind) == "llm").group_by(root)
        if since is not None:
            stmt = stmt.where(col(LedgerRow.created_at) >= _as_utc(since))
        types = select(col(LedgerRow.workflow_id), col(LedgerRow.task_type)).where(
            col(LedgerRow.parent_workflow_id).is_(None)).distinct()
        with Session(self.engine) as s:
            costs = {r.root: float(r.cost or 0.0) for r in s.execute(stmt)}
            kinds = {r.workflow_id: r.task_type for r in s.execute(types)} if task_type else {}
        if task_type:
            costs = {w: c for w, c in costs.items() if kinds.get(w) == task_type}
        return costs

    def task_totals(self, workflow_id: str) -> dict[str, Any]:
        """LLM calls, tokens and cost, and tool calls, of one task."""
        llm = col(LedgerRow.kind) == "llm"
        tool = col(LedgerRow.kind) == "tool"
        stmt = select(
            func.count().filter(llm),
            func.coalesce(func.sum(col(LedgerRow.input_tokens)).filter(llm), 0),
            func.coalesce(func.sum(col(LedgerRow.output_tokens)).filter(llm), 0),
            func.coalesce(func.sum(col(LedgerRow.cost_usd)).filter(llm), 0.0),
            func.count().filter(tool),
            func.count().filter(tool, col(LedgerRow.ok).is_(False)),
        ).where(col(LedgerRow.workflow_id) == workflow_id)
        with Session(self.engine) as s:
            calls, tin, tout, cost, tools, tool_errors = s.execute(stmt).one()
        return {
            "workflow_id": workflow_id,
            "llm_calls": calls,
            "input_tokens": tin,
            "output_tokens": tout,
            "tokens": tin + tout,
            "cost_usd": cost,
            "tool_calls": tools,
            "tool_errors": tool_errors,
        }

    def family_totals(self, parent_id: str) -> dict[str, Any]:
        """LLM calls, tokens and cost of a pattern's parent: its own calls plus every child's (each
        attempt of a retried child included), from the ledger rows."""
        llm = col(LedgerRow.kind) == "llm"
        mine = (col(LedgerRow.workflow_id) == parent_id) | (col(LedgerRow.parent_workflow_id) == parent_id)
        stmt = select(
            func.count(),
            func.coalesce(func.sum(col(LedgerRow.input_tokens)), 0),
            func.coalesce(func.sum(col(LedgerRow.output_tokens)), 0),
            func.coalesce(func.sum(col(LedgerRow.cost_usd)), 0.0),
            func.count(func.distinct(col(LedgerRow.workflow_id))),
        ).where(llm, mine)
        with Session(self.engine) as s:
            calls, tin, tout, cost, tasks = s.execute(stmt).one()
        return {"workflow_id": parent_id, "llm_calls": calls, "input_tokens": tin, "output_tokens": tout,
                "tokens": tin + tout, "cost_usd": cost, "tasks": tasks}

    def outcomes(self, since: datetime | None = None, task_type: str | None = None,
                 include_shadow: bool = False) -> list[dict[str, Any]]:
        """Outcome rows, oldest first; `tools` decoded to a list (None in rows from before it was kept).
        Shadow candidates' rows (feature "shadow": dry runs, nothing they decided acted) only when asked."""
        stmt = select(LedgerRow).where(col(LedgerRow.kind) == "outcome")
        if not include_shadow:
            stmt = stmt.where(col(LedgerRow.feature) != SHADOW_FEATURE)
        if since is not None:
            stmt = stmt.where(col(LedgerRow.created_at) >= _as_utc(since))
        if task_type is not None:
            stmt = stmt.where(col(LedgerRow.task_type) == task_type)
        stmt = stmt.order_by(col(LedgerRow.created_at), col(LedgerRow.key))
        fields = ("workflow_id", "task_key", "tenant", "feature", "task_type", "prompt_version", "status",
                  "route", "reason", "category", "input_tokens", "output_tokens", "cost_usd", "created_at",
                  "steps", "tools", "reasoning_loops", "repeated_calls", "answer_tokens", "input_hash", "limit_hit")
        with Session(self.engine) as s:
            rows = [{f: getattr(r, f) for f in fields} for r in s.scalars(stmt)]
        for r in rows:
            r["tools"] = json.loads(r["tools"]) if r["tools"] else None
        return rows
