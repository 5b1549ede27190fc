"""`keel forecast`: the bootstrap's figures (properties), the per-task costs read from the ledger (a
pattern's family is one task), and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import Session
from typer.testing import CliRunner

from activities.db import LedgerRow, init_db, make_engine
from activities.ledger import Ledger
from keel.forecast import forecast
from starter.cli import app

costs_st = st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(costs=costs_st, per_day=st.integers(1, 300), seed=st.integers(0, 10))
def test_the_forecast_is_ordered_seeded_and_scaled(costs: list[float], per_day: int, seed: int) -> None:
    f = forecast(costs, per_day, samples=200, seed=seed)
    assert f.daily_p50 <= f.daily_p95 + 1e-9 and f.monthly_p50 <= f.monthly_p95 + 1e-6
    # (figures are rounded to 1e-4 dollars)
    assert min(costs) * per_day - 1e-4 <= f.daily_p50 and f.daily_p95 <= max(costs) * per_day + 1e-4
    assert f == forecast(costs, per_day, samples=200, seed=seed)  # seeded: the same figures again
    assert f.budget_3x_daily == pytest.approx(3 * f.daily_expected, abs=1e-3)


def test_equal_costs_forecast_exactly() -> None:
    f = forecast([0.01] * 10, 1_000)
    assert f.daily_p50 == f.daily_p95 == f.daily_expected == pytest.approx(10.0)
    assert f.monthly_p95 == pytest.approx(300.0) and f.p95_within_3x


def test_a_spiralling_tail_shows_in_the_p95() -> None:
    # 1 task in 20 spirals at 20x the cost: the p95 day is over the expected day, a 3x budget holds it.
    costs = [0.01] * 19 + [0.20]
    f = forecast(costs, 100, samples=2_000)
    assert f.daily_p95 > f.daily_expected and f.p95_within_3x
    with pytest.raises(ValueError, match="no task costs"):
        forecast([], 100)


def _row(wf: str, step: int, cost: float, task_type: str, parent: str | None = None) -> LedgerRow:
    return LedgerRow(key=f"{wf}/{step}/llm", workflow_id=wf, step=step, kind="llm", task_type=task_type,
                     cost_usd=cost, parent_workflow_id=parent)


@pytest.fixture
def ledger_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    engine = make_engine(url)
    init_db(engine)
    with Session(engine) as s:
        for r in (_row("a-1", 1, 0.01, "a"), _row("a-1", 2, 0.02, "a"), _row("a-2", 1, 0.05, "a"),
                  _row("research-1", 1, 0.01, "research"), _row("research-1/planner", 1, 0.02, "planner",
                                                                  parent="research-1")):
            s.add(r)
        s.commit()
    monkeypatch.setenv("KEEL_DATABASE_URL", url)
    return url


def test_task_costs_count_a_family_as_one_task(ledger_url: str) -> None:
    ledger = Ledger(make_engine(ledger_url))
    assert ledger.task_costs("a") == pytest.approx({"a-1": 0.03, "a-2": 0.05})
    assert ledger.task_costs("research") == pytest.approx({"research-1": 0.03})
    assert len(ledger.task_costs()) == 3


def test_keel_forecast(ledger_url: str) -> None:
    res = CliRunner().invoke(app, ["forecast", "--tasks-per-day", "1000", "--agent", "a", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["tasks"] == 2 and out["daily_expected"] == pytest.approx(40.0) and out["agent"] == "a"
    table = CliRunner().invoke(app, ["forecast", "--tasks-per-day", "1000"])
    assert table.exit_code == 0 and "budget 3x" in table.output and "per month" in table.output
    none = CliRunner().invoke(app, ["forecast", "--tasks-per-day", "10", "--agent", "nobody"])
    assert none.exit_code == 2 and "no task costs" in none.output


def test_keel_forecast_from_an_eval_run(ledger_url: str) -> None:
    from starter.eval_cli import save_eval

    doc = {"suite": "s", "run_id": "s-1", "cases": [
        {"id": "a", "scores": [{"cost_usd": 0.01}, {"cost_usd": 0.01}]},
        {"id": "b", "scores": [{"cost_usd": 0.04}]}]}
    save_eval(ledger_url, "s-1", "s", doc)
    res = CliRunner().invoke(app, ["forecast", "--tasks-per-day", "300", "--eval", "latest:s", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["tasks"] == 3 and out["daily_expected"] == pytest.approx(6.0) and out["eval"] == "latest:s"
    missing = CliRunner().invoke(app, ["forecast", "--tasks-per-day", "300", "--eval", "nope"])
    assert missing.exit_code == 2 and "no such run" in missing.output
