"""The ledger: upserts keyed by (workflow, step, kind) and the cost reports built on them."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select
from sqlmodel import Session

from activities.db import LedgerRow, init_db, make_engine
from activities.ledger import GROUP_COLUMNS, Ledger
from keel.types import LlmRequest, LlmResponse, Message, TaskContext, TaskOutcome, Usage
from tests.pg import DIALECTS


@pytest.fixture
def engine(any_db_url: str) -> Iterator[Engine]:
    """A fresh ledger on SQLite, then on PostgreSQL (tests/pg.py)."""
    e = make_engine(any_db_url)
    init_db(e)
    yield e
    e.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Engine:
    e = make_engine(f"sqlite:///{tmp_path}/keel.db")
    init_db(e)
    return e


def llm(wf: str, step: int, tokens: tuple[int, int] = (100, 10), cost: float = 0.001, *,
        customer: str = "C-1001", feature: str = "support", model: str = "sim-large",
        version: str = "v1") -> tuple[LlmRequest, LlmResponse]:
    task = TaskContext(workflow_id=wf, tenant=customer, feature=feature, prompt_version=version)
    req = LlmRequest(task=task, step=step, kind="reason", prompt="support/reason",
                     messages=[Message(role="user", content="hi")])
    resp = LlmResponse(usage=Usage(input_tokens=tokens[0], output_tokens=tokens[1]), cost_usd=cost,
                       model=model, provider="sim", prompt_version=version, prompt_hash="abc")
    return req, resp


def llm_rows(engine: Engine) -> list[LedgerRow]:
    with Session(engine) as s:
        return list(s.scalars(select(LedgerRow).where(LedgerRow.kind == "llm")))


def test_upsert_keeps_one_row_with_the_last_figures(engine: Engine) -> None:
    ledger = Ledger(engine)
    ledger.record_llm(*llm("wf-1", 1, (100, 10), 0.01), attempt=1)
    ledger.record_llm(*llm("wf-1", 1, (120, 20), 0.02), attempt=2)
    (row,) = llm_rows(engine)
    assert (row.key, row.input_tokens, row.output_tokens, row.cost_usd, row.attempt) == (
        "wf-1/1/llm", 120, 20, 0.02, 2)
    assert (row.step_kind, row.prompt_name, row.model, row.tier) == ("reason", "support/reason", "sim-large",
                                                                      "large")
    assert row.created_at.tzinfo is not None
    assert ledger.task_totals("wf-1") == {"workflow_id": "wf-1", "llm_calls": 1, "input_tokens": 120,
                                          "output_tokens": 20, "tokens": 140, "cost_usd": 0.02,
                                          "tool_calls": 0, "tool_errors": 0}


def test_costs_group_sums_equal_raw_totals(engine: Engine) -> None:
    ledger = Ledger(engine)
    combos = itertools.product(["C-1001", "C-1002"], ["support", "billing"], ["sim-small", "sim-large"],
                               ["v1", "v2"])
    for i, (customer, feature, model, version) in enumerate(combos):
        ledger.record_llm(*llm(f"wf-{i}", 1, (100 + i, 10 + i), 0.001 * (i + 1), customer=customer,
                               feature=feature, model=model, version=version), attempt=1)
        ledger.record_llm(*llm(f"wf-{i}", 2, (50, 5), 0.0005, customer=customer, feature=feature,
                               model=model, version=version), attempt=1)
    with Session(engine) as s:
        calls, tin, tout, cost = s.execute(select(
            func.count(), func.sum(LedgerRow.input_tokens), func.sum(LedgerRow.output_tokens),
            func.sum(LedgerRow.cost_usd)).where(LedgerRow.kind == "llm")).one()
    for group_by in [[], ["tenant"], ["feature", "model"], ["prompt_version", "provider", "task_type"],
                     list(GROUP_COLUMNS)]:
        rows = ledger.costs(group_by)
        assert sum(r["calls"] for r in rows) == calls == 32
        assert sum(r["input_tokens"] for r in rows) == tin
        assert sum(r["output_tokens"] for r in rows) == tout
        assert sum(r["cost_usd"] for r in rows) == pytest.approx(cost)
        assert all(set(group_by) <= r.keys() for r in rows)
    by_customer = ledger.costs(["tenant"])
    assert {r["tenant"] for r in by_customer} == {"C-1001", "C-1002"}
    assert by_customer[0]["cost_usd"] >= by_customer[1]["cost_usd"]
    assert ledger.costs(["tenant"], since=datetime.now(UTC) + timedelta(hours=1)) == []
    assert len(ledger.costs(["tenant"], since=datetime.now(UTC) - timedelta(hours=1))) == 2


def test_costs_rejects_unknown_groups(engine: Engine) -> None:
    with pytest.raises(ValueError, match="valid names are tenant, feature") as exc:
        Ledger(engine).costs(["tenant", "colour"])
    assert "'colour'" in str(exc.value)


def test_costs_ignore_tool_and_outcome_rows(engine: Engine) -> None:
    ledger = Ledger(engine)
    ledger.record_llm(*llm("wf-1", 1, (100, 10), 0.01), attempt=1)
    task = TaskContext(workflow_id="wf-1", tenant="C-1001")
    ledger.record_outcome(task, TaskOutcome(status="escalated", route="human", reason="fraud", cost_usd=0.01,
                                            input_tokens=100, output_tokens=10))
    ledger.record_outcome(task, TaskOutcome(status="resolved", route="reply", cost_usd=0.01))
    (total,) = ledger.costs([])
    assert (total["calls"], total["cost_usd"]) == (1, 0.01)
    (outcome,) = ledger.outcomes()
    assert (outcome["workflow_id"], outcome["status"], outcome["route"]) == ("wf-1", "resolved", "reply")
    assert ledger.outcomes(since=datetime.now(UTC) + timedelta(minutes=1)) == []


@functools.cache
def memory_engine() -> Engine:
    """One in-memory database for all hypothesis examples; each example uses its own workflow id."""
    e = make_engine("sqlite://")
    init_db(e)
    return e


@pytest.fixture(scope="module", params=DIALECTS)
def shared_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """One database per module for all hypothesis examples (SQLite in memory, then PostgreSQL)."""
    if request.param == "sqlite":
        yield memory_engine()
        return
    server = request.getfixturevalue("pg_server")
    url = server.create_database()
    e = make_engine(url)
    init_db(e)
    yield e
    e.dispose()
    server.drop_database(url)


@settings(max_examples=60, deadline=None)
@given(records=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5000), st.integers(0, 500)), max_size=25))
def test_total_is_the_last_attempt_of_each_step(shared_engine: Engine, records: list[tuple[int, int, int]]) -> None:
    engine = shared_engine
    ledger = Ledger(engine)
    wf = f"wf-{uuid.uuid4()}"
    attempts: dict[int, int] = {}
    last: dict[int, tuple[int, int]] = {}
    for step, tin, tout in records:
        attempts[step] = attempts.get(step, 0) + 1
        ledger.record_llm(*llm(wf, step, (tin, tout), cost=(tin + tout) / 1e6), attempt=attempts[step])
        last[step] = (tin, tout)
    totals = ledger.task_totals(wf)
    assert totals["llm_calls"] == len(last)
    assert totals["input_tokens"] == sum(t[0] for t in last.values())
    assert totals["output_tokens"] == sum(t[1] for t in last.values())
    assert totals["cost_usd"] == pytest.approx(sum(a + b for a, b in last.values()) / 1e6)
    with Session(engine) as s:
        rows = s.scalars(select(LedgerRow).where(LedgerRow.workflow_id == wf)).all()
    assert sorted((r.step, r.attempt) for r in rows) == sorted(attempts.items())


def test_single_row_fast_path_writes_what_sqlalchemy_writes(sqlite_engine: Engine, tmp_path: Path) -> None:
    """A model call's row goes through SQLite's driver in one statement; a tool's rows go through
    SQLAlchemy inside the tool's transaction. Both must store the same values, read back the same."""
    engine = sqlite_engine
    req, resp = llm("wf-fast", 1, (120, 30), 0.0042)
    Ledger(engine).record_llm(req, resp, attempt=2)  # the driver path (no session)
    task = TaskContext(workflow_id="wf-fast", tenant="C-1001")
    outcome = TaskOutcome(status="resolved", route="reply", cost_usd=0.0042, input_tokens=120, output_tokens=30)
    Ledger(engine).record_outcome(task, outcome)  # few columns: the others take their defaults
    other = make_engine(f"sqlite:///{tmp_path}/other.db")
    init_db(other)
    with other.begin() as conn:
        Ledger(other).record_llm(req, resp, attempt=2, conn=conn)  # the SQLAlchemy path
        Ledger(other).record_outcome(task, outcome, conn=conn)

    def rows(e: Engine) -> list[dict[str, object]]:
        with Session(e) as s:
            return [r.model_dump() for r in s.scalars(select(LedgerRow).order_by(LedgerRow.key))]

    fast, slow = rows(engine), rows(other)
    assert len(fast) == len(slow) == 2
    for a, b in zip(fast, slow, strict=True):
        created = a.pop("created_at"), b.pop("created_at")
        assert a == b
        assert all(isinstance(c, datetime) and c.tzinfo == UTC for c in created)
        assert abs(created[0] - created[1]) < timedelta(minutes=1)
    sql = "select created_at, typeof(created_at), ok, typeof(cached_input_tokens) from ledger order by key"
    with engine.connect() as conn, other.connect() as conn2:
        raw, raw2 = conn.exec_driver_sql(sql).all(), conn2.exec_driver_sql(sql).all()
    assert [(len(r[0]), *r[1:]) for r in raw] == [(len(r[0]), *r[1:]) for r in raw2]  # same storage format


def test_single_rows_after_a_failed_one(sqlite_engine: Engine) -> None:
    """The rows written alone share a held connection per thread: each is committed when written
    (another connection sees it at once), and a failed statement leaves the next rows unharmed."""
    engine = sqlite_engine
    ledger = Ledger(engine)
    ledger.record_llm(*llm("wf-held", 1), attempt=1)
    assert [r.step for r in llm_rows(engine)] == [1]
    with engine.begin() as conn:  # a writer after it is not blocked by an open transaction
        conn.exec_driver_sql("UPDATE ledger SET attempt = attempt WHERE workflow_id = 'wf-held'")
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE ledger RENAME TO ledger_away")
    with pytest.raises(Exception, match="no such table"):
        ledger.record_llm(*llm("wf-held", 2), attempt=1)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE ledger_away RENAME TO ledger")
    ledger.record_llm(*llm("wf-held", 2), attempt=1)
    ledger.record_llm(*llm("wf-held", 3), attempt=1)
    assert sorted(r.step for r in llm_rows(engine)) == [1, 2, 3]


def test_init_db_renames_the_columns_an_older_keel_named_after_tickets(any_db_url: str) -> None:
    """A ledger file from before the platform knew no domain: `customer`/`ticket_id` (and the human queue's
    and shadow rows' `customer_id`) become `tenant`/`task_key`, rows kept, once even if run again."""
    import sqlalchemy as sa
    from sqlmodel import SQLModel

    from activities.db import RENAMED_COLUMNS

    engine = make_engine(any_db_url)
    with engine.begin() as conn:
        SQLModel.metadata.create_all(conn)
        for (table, old), new in RENAMED_COLUMNS.items():
            conn.execute(sa.text(f'ALTER TABLE "{table}" RENAME COLUMN "{new}" TO "{old}"'))
        conn.execute(sa.text(
            "INSERT INTO ledger (key, workflow_id, ticket_id, step, kind, customer, feature, task_type, input_tokens, "
            "output_tokens, cached_input_tokens, reasoning_tokens, cost_usd, latency_ms, ok, attempt, created_at) "
            "VALUES ('k', 'wf', 'TK-1', 1, 'llm', 'C-1001', 'f', 't', 1, 1, 0, 0, 0.1, 1.0, TRUE, 1, "
            "'2026-01-01 00:00:00')"))
    init_db(engine)
    init_db(engine)
    columns = {t: {c["name"] for c in sa.inspect(engine).get_columns(t)} for t in ("ledger", "human_queue",
                                                                                  "shadow_comparisons")}
    for (table, old), new in RENAMED_COLUMNS.items():
        assert new in columns[table] and old not in columns[table], (table, columns[table])
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT tenant, task_key FROM ledger WHERE key = 'k'")).one() == ("C-1001", "TK-1")
    engine.dispose()


def test_concurrent_attempts_leave_one_whole_row_per_step(engine: Engine) -> None:
    """Attempts of the same steps written at once from many threads (a retried activity racing its first
    attempt, as after a worker crash): one row per step, each one attempt's figures, never a mix."""
    ledger = Ledger(engine)
    errors: list[BaseException] = []

    def attempts(attempt: int) -> None:
        try:
            for step in range(1, 11):
                figures = (attempt * 100 + step, attempt)
                ledger.record_llm(*llm("wf-race", step, figures, attempt / 1000), attempt=attempt)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=attempts, args=(a,)) for a in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = llm_rows(engine)
    assert sorted(r.step for r in rows) == list(range(1, 11))
    for r in rows:
        assert (r.input_tokens, r.output_tokens, r.cost_usd) == (r.attempt * 100 + r.step, r.attempt, r.attempt / 1000)
    totals = ledger.task_totals("wf-race")
    assert totals["llm_calls"] == 10
    assert totals["input_tokens"] == sum(r.input_tokens for r in rows)
    assert totals["cost_usd"] == pytest.approx(sum(r.cost_usd for r in rows))


def test_a_plain_postgresql_url_uses_the_driver_the_extra_ships(pg_url: str) -> None:
    """`postgresql://` (SQLAlchemy's default driver is psycopg2, not shipped) means psycopg 3, for the platform's
    tables and an agent's alike; a driver that is not installed is named, with what to install."""
    from agents.support_desk import store

    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    engine, desk = make_engine(plain), store.make_engine(plain)
    assert engine.dialect.driver == desk.dialect.driver == "psycopg"
    init_db(engine)
    Ledger(engine).record_llm(*llm("wf-plain", 1, (7, 3)), attempt=1)
    assert Ledger(engine).task_totals("wf-plain")["tokens"] == 10
    assert store.setup(desk) is True
    engine.dispose()
    desk.dispose()
    if importlib.util.find_spec("psycopg2") is None:  # not installed by the project
        with pytest.raises(RuntimeError, match=r"needs the driver 'psycopg2' \(pip install -e '\.\[postgres\]'") as e:
            make_engine("postgresql+psycopg2://keel:secret@127.0.0.1/keel")
        assert "secret" not in str(e.value)
