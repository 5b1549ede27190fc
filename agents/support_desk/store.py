"""The support desk's own tables, its database connection and its one-time seed.

Which database: the URL in the environment variable `KEEL_DATABASE_URL`, else the same default as
Keel's own (keel/settings.py: `sqlite:///<KEEL_HOME>/keel.db`, KEEL_HOME defaulting to `.keel` in the
working directory). So by default the agent's tables live beside the platform's ledger in one file,
and in production both follow the same `KEEL_DATABASE_URL` (PostgreSQL included). The URL is read
when a tool first needs the database; each URL gets one engine per process.

Which tables: SQLAlchemy Core tables on this module's OWN `MetaData` (never SQLModel's global one, so
the platform's `create_all` never makes them, and this `create_all` never touches the platform's),
every name prefixed `support_desk_` so they cannot collide with the platform's tables.

The seed: `setup(engine)` creates the tables that are missing and, if `support_desk_customers` is
empty, inserts the seed data (agents/support_desk/data.py) - the check and the inserts in one
transaction holding SQLite's write lock (BEGIN IMMEDIATE) or a PostgreSQL advisory lock, so two
workers, two processes or two test environments starting at once on one database seed it once.
The platform's tables are never read or written by it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from agents.support_desk.data import build_seed

PREFIX = "support_desk_"
metadata = MetaData()
"""The support desk's own metadata: only its tables."""

customers = Table(
    f"{PREFIX}customers", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("email", String(200), nullable=False),
    Column("phone", String(64), nullable=False),
    Column("tier", String(32), nullable=False),
    Column("locked", Boolean, nullable=False),
    Column("card_status", String(32), nullable=False),
    Column("card_number", String(32), nullable=False),
)
accounts = Table(
    f"{PREFIX}accounts", metadata,
    Column("id", String(32), primary_key=True),
    Column("customer_id", String(32), ForeignKey(f"{PREFIX}customers.id"), nullable=False, index=True),
    Column("iban", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("balance", Float, nullable=False),
    Column("currency", String(8), nullable=False, default="EUR"),
)
transactions = Table(
    f"{PREFIX}transactions", metadata,
    Column("id", String(32), primary_key=True),
    Column("customer_id", String(32), ForeignKey(f"{PREFIX}customers.id"), nullable=False, index=True),
    Column("account_id", String(32), ForeignKey(f"{PREFIX}accounts.id"), nullable=False),
    Column("merchant", String(200), nullable=False),
    Column("amount", Float, nullable=False),
    Column("days_ago", Integer, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("disputed", Boolean, nullable=False, default=False),
    Column("duplicate_of", String(32), nullable=True),
)
policies = Table(
    f"{PREFIX}policies", metadata,
    Column("topic", String(64), primary_key=True),
    Column("text", Text, nullable=False),
    Column("max_refund", Float, nullable=True),
)
refunds = Table(
    f"{PREFIX}refunds", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # The call's ToolContext.idempotency_key: a retried call finds its refund instead of making another.
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("workflow_id", String(255), nullable=False, index=True),
    Column("customer_id", String(32), nullable=False),
    Column("transaction_id", String(32), nullable=False, index=True),
    Column("amount", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("status", String(32), nullable=False, default="executed"),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

cases = Table(
    f"{PREFIX}cases", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # Keyed like refunds: a retried hand-off finds its case instead of opening another.
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("workflow_id", String(255), nullable=False, index=True),
    Column("customer_id", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("priority", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

SEED_ORDER = (customers, accounts, transactions, policies)
_SEED_LOCK_ID = 0x73646573  # "sdes": the PostgreSQL advisory lock of this seed (not the platform's)
_READ_ONLY = "support_desk_read_only"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def database_url() -> str:
    """`KEEL_DATABASE_URL`, else Keel's default: SQLite `keel.db` under `KEEL_HOME` (default `.keel`)."""
    return _database_url(os.environ.get("KEEL_DATABASE_URL"), os.environ.get("KEEL_HOME"), os.getcwd())


@functools.lru_cache(maxsize=16)
def _database_url(url: str | None, home: str | None, cwd: str) -> str:
    # Every tool call asks; resolving the path is a few system calls, so it is done once per setting.
    return url or f"sqlite:///{(Path(cwd) / (home or '.keel') / 'keel.db').resolve()}"


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite: WAL, a busy timeout and BEGIN IMMEDIATE for writes (the platform's
    worker writes its ledger to the same file from many threads), reads without a transaction."""
    u = make_url(url)
    if u.drivername == "postgresql" and importlib.util.find_spec("psycopg") is not None:
        u = u.set(drivername="postgresql+psycopg")  # as the platform's engine: the `postgres` extra's driver
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True)
    memory = u.database in (None, "", ":memory:")
    if memory:
        engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    else:
        Path(str(u.database)).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if not memory:
            _wal(cur)
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A read-then-write transaction takes the write lock up front (a lock upgrade would fail at
        # once with SQLITE_BUSY); a read-only connection begins nothing.
        if not conn.get_execution_options().get(_READ_ONLY):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _wal(cur: Any) -> None:
    """Switch a file to WAL. The first switch of a new file needs it alone: connections racing to it may
    be told "database is locked" at once, whatever the busy timeout, so the loser waits and tries again
    (the file is then WAL already, and the pragma a no-op)."""
    for attempt in range(50):
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 49:
                raise
            time.sleep(0.02 * (attempt + 1))


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads alone (on SQLite: no transaction, no write lock)."""
    with engine.connect() as conn:
        yield conn.execution_options(**{_READ_ONLY: True})


def setup(engine: Engine) -> bool:
    """Create the support desk's tables and seed them once. Returns True if this call seeded.

    Idempotent and safe from several processes at once (see the module docstring)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SEED_LOCK_ID})
        metadata.create_all(conn)
        if conn.execute(select(func.count()).select_from(customers)).scalar_one():
            return False
        rows = build_seed()
        for table in SEED_ORDER:
            conn.execute(table.insert(), rows[table.name.removeprefix(PREFIX)])
        return True


_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def engine_for(url: str | None = None) -> Engine:
    """The engine of `url` (default `database_url()`), its tables created and seeded on first use."""
    url = url or database_url()
    with _lock:
        found = _engines.get(url)
        if found is None:
            found = make_engine(url)
            setup(found)
            _engines[url] = found
        return found


def reset() -> None:
    """Forget the engines (tests; a forked process): the next use connects, creates and checks again."""
    with _lock:
        for e in _engines.values():
            e.dispose()
        _engines.clear()
