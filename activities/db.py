"""The platform's database: SQLModel tables (ledger, human queue, alerts, shadow) and the engine.

SQLite by default (a file under KEEL_HOME); any SQLAlchemy URL works, PostgreSQL included.
All calls are synchronous: activities run them in worker threads.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, DateTime, Engine, Index, Table, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel, create_engine

SQLITE_BUSY_TIMEOUT_MS = 30_000
_SEED_LOCK_ID = 0x6B65656C  # "keel": PostgreSQL advisory lock that serializes init_db


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, also on SQLite (which stores no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use timezone-aware UTC, e.g. datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def table_of(model: type[SQLModel]) -> Table:
    """The Core table of a SQLModel table class (for statements that skip the ORM)."""
    return SQLModel.metadata.tables[str(model.__tablename__)]


def _created_at() -> Any:
    return Field(default_factory=utcnow, sa_type=UtcDateTime, index=True)


class HumanQueueRow(SQLModel, table=True):
    __tablename__ = "human_queue"
    id: int | None = Field(default=None, primary_key=True)
    idempotency_key: str = Field(unique=True)
    workflow_id: str = Field(index=True)
    tenant: str
    reason: str
    priority: str = "normal"
    status: str = Field(default="open", index=True)
    """open | resolved"""
    created_at: datetime = _created_at()



class LedgerRow(SQLModel, table=True):
    """One row per (workflow_id, step, kind); kind is llm | tool | outcome.

    Outcome rows (step -1) repeat the task's own totals in the token/cost columns: sum llm rows
    (kind == "llm") for spend, never the whole table."""

    __tablename__ = "ledger"
    key: str = Field(primary_key=True)
    workflow_id: str = Field(index=True)
    task_key: str = ""
    step: int
    kind: str = Field(index=True)
    tenant: str = Field(default="", index=True)
    feature: str = ""
    task_type: str = ""
    provider: str | None = None
    model: str | None = None
    tier: str | None = None
    step_kind: str | None = None
    prompt_name: str | None = None
    prompt_version: str | None = None
    prompt_hash: str | None = None
    tool: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ok: bool = True
    error: str | None = None
    status: str | None = None
    route: str | None = None
    reason: str | None = None
    category: str | None = None
    attempt: int = 1
    created_at: datetime = _created_at()
    # Outcome rows: the agent's figures (keel.types.TaskOutcome). Nullable: added to existing files by init_db.
    steps: int | None = None
    tools: str | None = None
    """JSON list of the tools executed, in order."""
    reasoning_loops: int | None = None
    repeated_calls: int | None = None
    answer_tokens: int | None = None
    input_hash: str | None = None
    limit_hit: str | None = None
    parent_workflow_id: str | None = Field(default=None, index=True)
    """A child task's parent (orchestrator, supervisor, swarm, shadow): a parent's spend is its own rows
    plus the rows whose parent it is."""
    dry_run: bool | None = None
    """Tool rows of a shadow run's writes: validated and recorded, never executed."""
    repaired: str | None = None
    """Model rows whose output was repaired (tool calls written as text): how; `raw_output` is the text."""
    raw_output: str | None = None
    """Model rows: the output as it came, when it was repaired or will be refused as invalid (`error`
    then says why: "invalid output: ..."); NULL for every other output (its text stays in the history)."""


class AlertRow(SQLModel, table=True):
    """A behavioral alert (keel.alerts). A repeat within the policy's dedup time is counted on the row."""

    __tablename__ = "alerts"
    id: int | None = Field(default=None, primary_key=True)
    dedup_key: str = Field(index=True)
    """rule:task_type:subject"""
    rule: str
    task_type: str = ""
    feature: str = ""
    subject: str = ""
    message: str
    value: float
    threshold: float
    workflow_id: str
    """The task that raised it."""
    last_workflow_id: str
    """The last task that repeated it."""
    count: int = 1
    created_at: datetime = _created_at()
    last_seen_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


class ShadowComparisonRow(SQLModel, table=True):
    """Shadow mode: one row per shadowed task, the primary against the candidate (keel.shadow)."""

    __tablename__ = "shadow_comparisons"
    shadow_workflow_id: str = Field(primary_key=True)
    primary_workflow_id: str = Field(index=True)
    candidate_workflow_id: str
    task_key: str = ""
    tenant: str = ""
    candidate: str = Field(index=True)
    primary_status: str
    candidate_status: str | None = None
    primary_route: str
    candidate_route: str | None = None
    primary_category: str | None = None
    candidate_category: str | None = None
    same_outcome: bool = False
    classification_agrees: bool | None = None
    primary_cost_usd: float = 0.0
    candidate_cost_usd: float | None = None
    cost_delta_usd: float | None = None
    primary_steps: int = 0
    candidate_steps: int | None = None
    step_delta: int | None = None
    primary_tokens: int = 0
    candidate_tokens: int | None = None
    token_delta: int | None = None
    dry_run_writes: int = 0
    dry_run_actions: str = "[]"
    """JSON list of the candidate's dry-run writes (keel.types.BlockedAction)."""
    proposed_writes: str = "[]"
    """JSON list of the `confirm` writes the candidate proposed."""
    candidate_failed: bool = False
    candidate_error: str = ""
    created_at: datetime = _created_at()


class EvalRunRow(SQLModel, table=True):
    """One `keel eval run`: the suite's report (every case, every run's score) as JSON."""

    __tablename__ = "eval_runs"
    run_id: str = Field(primary_key=True)
    suite: str = Field(index=True)
    report: str
    created_at: datetime = _created_at()


class ShadowConfigRow(SQLModel, table=True):
    """Shadow mode's configuration (`keel shadow start/stop`): at most one row is active."""

    __tablename__ = "shadow_config"
    id: int | None = Field(default=None, primary_key=True)
    candidate: str
    """The candidate's spec (keel.shadow.CandidateSpec.label)."""
    candidate_json: str
    fraction: float
    active: bool = Field(default=True, index=True)
    started_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    stopped_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class TenantSpendRow(SQLModel, table=True):
    """A tenant budget's counter for one period (activities.tenant_budgets): what its calls spent, settled
    at their actual usage. Its row is the lock every reservation of the scope and period takes."""

    __tablename__ = "tenant_spend"
    tenant: str = Field(primary_key=True)
    feature: str = Field(default="", primary_key=True)
    """"": the tenant's calls of every feature; else that feature's."""
    period_key: str = Field(primary_key=True)
    """2026-12-06 (a day) or 2026-12 (a month), UTC."""
    period: str = "day"
    spent_usd: float = 0.0
    spent_tokens: int = 0
    calls: int = 0
    refused: int = 0
    max_usd: float | None = None
    """The limits the last reservation was checked against (as the worker was configured)."""
    max_tokens: int | None = None
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


class TenantHoldRow(SQLModel, table=True):
    """One model call's hold on one tenant budget: its worst case while it runs (`held`), its actual usage
    once settled (`settled`; kept a while so a retried call replaces it instead of counting twice)."""

    __tablename__ = "tenant_holds"
    key: str = Field(primary_key=True)
    """The call's ledger key and the scope."""
    call_key: str = Field(index=True)
    tenant: str
    feature: str = ""
    period_key: str
    state: str = "held"
    """held | settled"""
    held_usd: float = 0.0
    held_tokens: int = 0
    settled_usd: float = 0.0
    """What the call's last settled attempt spent (0 before any): counted in the counter's spent_*."""
    settled_tokens: int = 0
    expires_at: datetime = Field(sa_type=UtcDateTime)
    """A hold nobody settled (its task was terminated mid-call) stops counting after this."""


Index("ix_tenant_holds_scope", TenantHoldRow.tenant, TenantHoldRow.feature, TenantHoldRow.period_key,
      TenantHoldRow.state)


_READ_ONLY = "keel_read_only"


@contextlib.contextmanager
def read_only(engine: Engine) -> Iterator[Connection]:
    """A connection for reads alone. On SQLite it takes no transaction and no write lock: each statement
    reads a committed state in its own implicit transaction (two statements may see two states), and a
    read never waits behind a writer. Other databases: a transaction, rolled back at the end."""
    with engine.connect() as conn:
        yield conn.execution_options(**{_READ_ONLY: True})


def with_driver(url: str) -> URL:
    """`url` as a URL, `postgresql://` meaning psycopg 3 (the driver `pip install -e '.[postgres]'`
    installs) when it is installed, not SQLAlchemy's default psycopg2."""
    u = make_url(url)
    if u.drivername == "postgresql" and importlib.util.find_spec("psycopg") is not None:
        return u.set(drivername="postgresql+psycopg")
    return u


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE so that many
    activity threads (and processes) can write; other databases are used unchanged."""
    u = with_driver(url)
    if u.get_backend_name() != "sqlite":
        try:
            return create_engine(u, pool_pre_ping=True)
        except ModuleNotFoundError as e:
            hint = (" (pip install -e '.[postgres]' installs psycopg 3, the driver of postgresql:// and "
                    "postgresql+psycopg:// URLs)" if u.get_backend_name() == "postgresql" else "")
            raise RuntimeError(f"the database {u.render_as_string()} needs the driver {e.name!r}{hint}") from e
    memory = u.database in (None, "", ":memory:")
    if memory:
        # One shared connection, or every pooled connection would see its own empty database.
        engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    else:
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        engine = create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 driver (see "begin" below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if not memory:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that reads and then writes can fail at once with SQLITE_BUSY
        # (the busy timeout does not apply to a lock upgrade); taking the write lock up front
        # makes concurrent writers wait their turn instead. A read-only connection (read_only
        # below) begins nothing: each of its statements reads in its own implicit transaction.
        if not conn.get_execution_options().get(_READ_ONLY):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def init_db(engine: Engine) -> None:
    """Create the platform's tables (ledger, human queue, alerts, shadow) and add the columns an older
    file lacks. The platform seeds nothing: an agent creates and seeds its own tables.

    Safe to call again and from several processes at once: it runs in one transaction holding the write
    lock (SQLite) or an advisory lock (PostgreSQL)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SEED_LOCK_ID})
        SQLModel.metadata.create_all(conn)
        _rename_columns(conn)
        _add_missing_columns(conn)


RENAMED_COLUMNS = {
    ("ledger", "customer"): "tenant",
    ("ledger", "ticket_id"): "task_key",
    ("human_queue", "customer_id"): "tenant",
    ("shadow_comparisons", "customer_id"): "tenant",
    ("shadow_comparisons", "ticket_id"): "task_key",
}
"""Columns an older Keel named after its first domain, and their names now."""


def _rename_columns(conn: Connection) -> list[str]:
    """`ALTER TABLE ... RENAME COLUMN` for each column an older file still has under its old name (SQLite
    3.25+ and PostgreSQL). Runs inside init_db's locked transaction, so concurrent starts rename once."""
    inspector = inspect(conn)
    renamed = []
    for (table, old), new in RENAMED_COLUMNS.items():
        if not inspector.has_table(table):
            continue
        have = {c["name"] for c in inspector.get_columns(table)}
        if old in have and new not in have:
            prep = conn.dialect.identifier_preparer
            conn.execute(text(f"ALTER TABLE {prep.quote(table)} RENAME COLUMN {prep.quote(old)} TO {prep.quote(new)}"))
            renamed.append(f"{table}.{old}")
    return renamed


def _add_missing_columns(conn: Connection) -> list[str]:
    """The migration of files made by an older Keel: `ALTER TABLE ... ADD COLUMN` for each nullable
    column a model gained after its table was created (create_all makes missing tables, never columns).
    Runs inside init_db's locked transaction, so concurrent starts add each column once."""
    inspector = inspect(conn)
    added = []
    for table in SQLModel.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable:
                raise RuntimeError(f"table {table.name!r} lacks the NOT NULL column {column.name!r}: "
                                   "only nullable columns are added automatically; migrate it by hand")
            prep = conn.dialect.identifier_preparer
            ddl = (f"ALTER TABLE {prep.format_table(table)} ADD COLUMN {prep.format_column(column)} "
                   f"{column.type.compile(dialect=conn.dialect)}")
            conn.execute(text(ddl))
            added.append(f"{table.name}.{column.name}")
    return added
