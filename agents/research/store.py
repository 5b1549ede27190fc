"""The research agents' own tables, seeded by the agent itself on first use.

Which database: the same as the support desk's (`KEEL_DATABASE_URL`, else Keel's default SQLite file),
through the support desk store's engine settings (WAL, busy timeout, BEGIN IMMEDIATE for writes).

Which tables, on this module's own `MetaData` and prefixed `research_` (the platform's `create_all`
never makes them, and this one never touches the platform's):
- `research_documents`: the internal document corpus (corpus.py);
- `research_transactions`: an anonymised extract of the bank's transactions (kind, merchant, amount,
  age, disputed, duplicate), made from the support desk's seed with every identifier dropped (no
  customer, account or transaction id): the analysis tool cannot leak what the table does not hold;
- `research_reports`: the reports the writer publishes (idempotent on the call's key).

The seed runs once per database, in one transaction holding SQLite's write lock or a PostgreSQL
advisory lock, so workers starting together seed it once.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    select,
    text,
)

from agents.research.corpus import CORPUS
from agents.support_desk.data import build_seed
from agents.support_desk.store import database_url, make_engine, reading

PREFIX = "research_"
metadata = MetaData()

documents = Table(
    f"{PREFIX}documents", metadata,
    Column("id", String(16), primary_key=True),
    Column("title", String(300), nullable=False),
    Column("tags", Text, nullable=False),
    Column("body", Text, nullable=False),
)
transactions = Table(
    f"{PREFIX}transactions", metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(32), nullable=False, index=True),
    Column("merchant", String(200), nullable=False),
    Column("amount", Float, nullable=False),
    Column("days_ago", Integer, nullable=False),
    Column("disputed", Boolean, nullable=False),
    Column("duplicate", Boolean, nullable=False),
)
reports = Table(
    f"{PREFIX}reports", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("workflow_id", String(255), nullable=False, index=True),
    Column("title", String(300), nullable=False),
    Column("body", Text, nullable=False),
    Column("sources", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

_SEED_LOCK_ID = 0x72736368  # "rsch": the PostgreSQL advisory lock of this seed

__all__ = ["documents", "engine_for", "metadata", "reading", "reports", "reset", "setup", "transactions"]


def transaction_extract() -> list[dict[str, Any]]:
    """The bank's transactions without anything that identifies a person, an account or a transaction."""
    return [{"id": i, "kind": t["kind"], "merchant": t["merchant"], "amount": t["amount"], "days_ago": t["days_ago"],
             "disputed": bool(t.get("disputed")), "duplicate": t.get("duplicate_of") is not None}
            for i, t in enumerate(build_seed()["transactions"], start=1)]


def setup(engine: Engine) -> bool:
    """Create the research tables and seed them once. Returns True if this call seeded."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SEED_LOCK_ID})
        metadata.create_all(conn)
        if conn.execute(select(func.count()).select_from(documents)).scalar_one():
            return False
        conn.execute(documents.insert(), [d.model_dump() for d in CORPUS])
        conn.execute(transactions.insert(), transaction_extract())
        return True


_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def engine_for(url: str | None = None) -> Engine:
    """The engine of `url` (default the support desk's `database_url()`), seeded on first use."""
    url = url or database_url()
    with _lock:
        found = _engines.get(url)
        if found is None:
            found = make_engine(url)
            setup(found)
            _engines[url] = found
        return found


def reset() -> None:
    """Forget the engines (tests): the next use connects, creates and checks again."""
    with _lock:
        for e in _engines.values():
            e.dispose()
        _engines.clear()
