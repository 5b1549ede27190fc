"""Tenant budgets: the configuration (clear errors), and the limiter on a real SQLite file, many calls at
once: spend never passes a limit, ends within one call's hold of it, a retried call counts once, a dead
call's hold expires, and a new period starts from zero. (End to end through the agent workflow on the
dev server: tests/agents/test_tenant_budgets.py.)"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from temporalio.exceptions import ApplicationError

from activities.db import init_db, make_engine
from activities.tenant_budgets import TenantLimiter
from keel import errors
from keel.settings import KeelSettings
from keel.tenant_budgets import TenantBudgetsError, parse_tenant_budgets, period_key
from keel.types import LlmRequest, ModelSpec, TaskContext

DAY1 = datetime(2026, 12, 6, 23, 59, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh SQLite file, then a fresh PostgreSQL database (tests/pg.py's `pg_url`, when it is there)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keel.db'}"
    try:
        return str(request.getfixturevalue("pg_url"))
    except pytest.FixtureLookupError:
        pytest.skip("no PostgreSQL fixture (tests/pg.py's pg_url) in this checkout")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    init_db(eng)
    yield eng
    eng.dispose()


def request(wid: str, tenant: str = "T-1", feature: str = "chat", step: int = 1, out: int = 200) -> LlmRequest:
    return LlmRequest(task=TaskContext(workflow_id=wid, tenant=tenant, feature=feature), step=step, kind="reason",
                      prompt="p", messages=[], model=ModelSpec.parse("sim:sim-large"), max_output_tokens=out)


def limiter(engine: Engine, config: str, clock: Clock | None = None, margin: float = 1.0) -> TenantLimiter:
    return TenantLimiter(engine, parse_tenant_budgets(config), input_margin=margin, clock=clock or Clock(DAY1))


def spent(engine: Engine, tenant: str = "T-1", feature: str = "") -> tuple[float, int, int, int]:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT spent_usd, spent_tokens, calls, refused FROM tenant_spend WHERE tenant = :t "
                                "AND feature = :f"), {"t": tenant, "f": feature}).one()
    return float(row[0]), int(row[1]), int(row[2]), int(row[3])


# --- configuration --------------------------------------------------------------------------------
def test_the_configuration_says_what_is_wrong(tmp_path: Path) -> None:
    ok = parse_tenant_budgets('{"C-1": {"period": "month", "max_usd": 2, "features": {"chat": {"max_tokens": 10}}},'
                              ' "*": {"max_tokens": 5000}}')
    assert [(s.tenant, s.feature, s.limit.period) for s in ok.scopes("C-1", "chat")] == [
        ("C-1", "", "month"), ("C-1", "chat", "day")]
    assert [(s.tenant, s.feature) for s in ok.scopes("C-1", "search")] == [("C-1", "")]
    # "*": each other tenant gets its own counter with these limits
    assert [(s.tenant, s.limit.max_tokens) for s in ok.scopes("C-2", "chat")] == [("C-2", 5000)]
    assert not parse_tenant_budgets(None) and not parse_tenant_budgets("  ")
    for bad, says in [
        ('{"C-1": {"period": "week", "max_usd": 1}}', "entry 'C-1': period"),
        ('{"C-1": {"max_usd": -1}}', "entry 'C-1': max_usd: Input should be greater than 0"),
        ('{"C-1": {"period": "day"}}', "give max_usd, max_tokens or both"),
        ('{"C-1": {"max_usd": 1, "features": {"chat": {}}}}', "entry 'C-1': features.chat"),
        ('{"C-1": {"max_dollars": 1}}', "max_dollars: Extra inputs are not permitted"),
        ('{"C-1": ', "KEEL_TENANT_BUDGETS (inline JSON): not valid JSON"),
        ("[1]", "no such file"),
    ]:
        with pytest.raises(TenantBudgetsError) as e:
            parse_tenant_budgets(bad)
        assert says in str(e.value), (bad, str(e.value))
    toml = tmp_path / "budgets.toml"
    toml.write_text('["C-1"]\nperiod = "month"\nmax_usd = 3.5\n')
    assert parse_tenant_budgets(str(toml)).budgets["C-1"].max_usd == 3.5
    with pytest.raises(ValueError, match=r"KEEL_TENANT_BUDGETS file .*nope\.json: no such file"):
        KeelSettings(tenant_budgets=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="KEEL_TENANT_BUDGET_HOLD_S=30 must exceed KEEL_LLM_TIMEOUT_S=60"):
        KeelSettings(tenant_budget_hold_s=30, llm_timeout_s=60)


def test_period_keys_are_utc_days_and_months() -> None:
    assert period_key("day", DAY1) == "2026-12-06" and period_key("month", DAY1) == "2026-12"
    assert period_key("day", DAY1 + timedelta(minutes=1)) == "2026-12-07"


# --- the limiter ----------------------------------------------------------------------------------
async def _calls(lims: list[TenantLimiter], n: int, est_in: int, out: int, actual: list[tuple[int, int]],
                 tenant: str = "T-1") -> tuple[list[float], list[str]]:
    """n calls at once, spread over the limiters (as over workers): each holds, 'runs', then settles at its
    actual usage; returns the settled dollar amounts and the refusals."""
    settled: list[float] = []
    refusals: list[str] = []

    async def one(i: int) -> None:
        lim = lims[i % len(lims)]
        req = request(f"w{i}", tenant=tenant, out=out)
        try:
            hold = await lim.reserve(req, est_in, None)
        except ApplicationError as e:
            assert e.type == errors.TENANT_BUDGET_EXCEEDED and e.non_retryable
            refusals.append(str(e))
            return
        assert hold is not None
        await asyncio.sleep(random.random() / 100)
        tokens_in, tokens_out = actual[i]
        usd = lim.worst_case(request("x", out=tokens_out), tokens_in, None)[1]
        await lim.settle(hold, tokens_in + tokens_out, usd)
        settled.append(usd)

    await asyncio.gather(*(one(i) for i in range(n)))
    return settled, refusals


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(limit=st.floats(0.002, 0.05), est_in=st.integers(50, 400), out=st.integers(20, 300),
                  shares=st.lists(st.floats(0.05, 1.0), min_size=30, max_size=30), seed=st.integers(0, 10_000))
def test_concurrent_calls_never_pass_the_limit_and_end_within_one_hold_of_it(
        tmp_path_factory: pytest.TempPathFactory, limit: float, est_in: int, out: int, shares: list[float],
        seed: int) -> None:
    random.seed(seed)
    url = f"sqlite:///{tmp_path_factory.mktemp('tb') / 'keel.db'}"
    eng, other = make_engine(url), make_engine(url)  # two workers' engines on one database
    init_db(eng)
    config = f'{{"T-1": {{"period": "day", "max_usd": {limit}}}}}'
    lims = [limiter(eng, config), limiter(other, config)]
    hold_usd = lims[0].worst_case(request("x", out=out), est_in, None)[1]
    # every call uses its whole input and a share of its output cap (a worst case is rarely spent)
    actual = [(est_in, max(1, int(out * s))) for s in shares]
    settled, refusals = asyncio.run(_calls(lims, 30, est_in, out, actual))
    total, _, calls, refused = spent(eng)
    assert total == pytest.approx(sum(settled), abs=1e-12) and calls == len(settled) and refused == len(refusals)
    assert total <= limit + 1e-12
    if refusals:
        assert total > limit - hold_usd, (total, limit, hold_usd)
        assert all("tenant budget of tenant 'T-1' exceeded for the day 2026-12-06" in r for r in refusals)
    eng.dispose()
    other.dispose()


async def test_fifty_calls_over_two_workers_never_pass_the_limit(db_url: str, engine: Engine) -> None:
    other = make_engine(db_url)  # a second worker's engine on the same database
    config = '{"T-1": {"period": "day", "max_usd": 0.02}}'
    lims = [limiter(engine, config), limiter(other, config)]
    hold_usd = lims[0].worst_case(request("x", out=250), 300, None)[1]
    rnd = random.Random(7)
    settled, refusals = await _calls(lims, 50, 300, 250, [(300, rnd.randint(10, 250)) for _ in range(50)])
    total, _, calls, refused = spent(engine)
    other.dispose()
    assert refusals and settled and calls == len(settled) and refused == len(refusals)
    assert total == pytest.approx(sum(settled), abs=1e-12)
    assert 0.02 - hold_usd < total <= 0.02


async def test_a_retried_call_counts_once_and_a_failed_one_not_at_all(engine: Engine) -> None:
    lim = limiter(engine, '{"T-1": {"max_tokens": 10000}}')
    req = request("w", step=3)
    hold = await lim.reserve(req, 100, None)
    assert hold is not None
    await lim.settle(hold, 150, 0.001)
    again = await lim.reserve(req, 100, None)  # the activity retried after its settle (a crash)
    assert again is not None
    await lim.settle(again, 120, 0.0008)
    assert spent(engine)[1:3] == (120, 1)  # replaced, as the ledger row is
    third = await lim.reserve(req, 100, None)  # retried again, and this attempt fails: the last spend stays
    assert third is not None
    await lim.release(third)
    assert spent(engine)[1:3] == (120, 1)
    failed = await lim.reserve(request("w", step=4), 100, None)
    assert failed is not None
    await lim.release(failed)
    assert spent(engine)[1:3] == (120, 1)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tenant_holds WHERE state = 'held'")).scalar() == 0


async def test_the_tenant_and_its_feature_are_both_held_and_other_tenants_are_apart(engine: Engine) -> None:
    lim = limiter(engine, '{"T-1": {"max_tokens": 1000, "features": {"chat": {"max_tokens": 400}}},'
                          ' "*": {"max_tokens": 400}}')
    h = await lim.reserve(request("a", feature="chat"), 100, None)  # 300 tokens held on both
    assert h is not None
    with pytest.raises(ApplicationError, match="tenant 'T-1' feature 'chat' exceeded"):
        await lim.reserve(request("b", feature="chat", out=350), 100, None)  # 450 > 400 even with nothing held
    await lim.settle(h, 300, 0.0)
    assert (await lim.reserve(request("c", feature="search"), 100, None)) is not None  # the feature's cap only
    assert (await lim.reserve(request("d", tenant="T-2"), 100, None)) is not None  # its own "*" counter
    assert spent(engine, "T-1", "chat")[1] == 300 and spent(engine, "T-1")[1] == 300


async def test_a_call_waits_for_holds_in_flight_then_runs_or_is_refused(engine: Engine) -> None:
    lim = limiter(engine, '{"T-1": {"max_tokens": 500}}')
    first = await lim.reserve(request("a"), 100, None)  # holds 300 of 500
    assert first is not None
    second = asyncio.create_task(lim.reserve(request("b"), 100, None))  # 300 more: must wait
    await asyncio.sleep(0.1)
    assert not second.done()
    await lim.settle(first, 120, 0.0)  # spent 120: 120 + 300 fits
    hold = await asyncio.wait_for(second, 5)
    assert hold is not None
    await lim.settle(hold, 300, 0.0)
    with pytest.raises(ApplicationError, match=r"420 of 500 tokens spent; the next call needs up to 300"):
        await lim.reserve(request("c"), 100, None)


async def test_a_dead_calls_hold_expires_and_a_new_period_starts_from_zero(engine: Engine) -> None:
    clock = Clock(DAY1 - timedelta(hours=1))
    lim = TenantLimiter(engine, parse_tenant_budgets('{"T-1": {"max_tokens": 500}}'), hold_s=60, clock=clock,
                        input_margin=1.0)
    assert await lim.reserve(request("dead"), 100, None) is not None  # never settled: its task died mid-call
    waiting = asyncio.create_task(lim.reserve(request("b"), 100, None))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    clock.now += timedelta(seconds=61)  # the dead call's hold stops counting
    hold = await asyncio.wait_for(waiting, 5)
    assert hold is not None
    await lim.settle(hold, 450, 0.0)
    with pytest.raises(ApplicationError, match=r"exceeded for the day 2026-12-06: 450 of 500 tokens spent"):
        await lim.reserve(request("c"), 100, None)
    clock.now = DAY1 + timedelta(minutes=2)  # 2026-12-07: a new counter
    assert await lim.reserve(request("c"), 100, None) is not None
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT period_key, spent_tokens, refused FROM tenant_spend ORDER BY period_key"))
        assert [tuple(r) for r in rows] == [("2026-12-06", 450, 1), ("2026-12-07", 0, 0)]
