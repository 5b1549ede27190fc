"""Tenant budgets end to end, on the real dev server: 50 tasks of one tenant at once against a small
dollar limit. From the ledger: the tenant's spend never passes the limit and ends within one call's
hold of it; the refused tasks are `escalated`, in the human queue with the reason, marked
KeelBudget=limit:tenant; another tenant's tasks run meanwhile; the next day the tenant runs again."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from typer.testing import CliRunner

import keel
from activities import tenant_budgets
from keel import names
from keel.testing import agent_environment
from keel.types import SimConfig
from starter.cli import app

LIMIT_USD = 0.02
SIM = SimConfig(spiral_rate=0.0, latency_ms_min=20, latency_ms_max=120)


class HostArgs(keel.Args):
    host: str


@keel.tool
def ping(ctx: keel.ToolContext, args: HostArgs) -> dict[str, object]:
    """Whether a host answers."""
    return {"host": args.host, "up": True}


@pytest.fixture
def agent(tmp_path: Path) -> keel.Agent:
    prompt = tmp_path / "pinger.v1.md"
    prompt.write_text("You check hosts with the ping tool, then answer in one sentence.\n")
    return keel.Agent(name=f"pinger_{uuid.uuid4().hex[:8]}", prompt=prompt, tools=[ping], models="sim:sim-large",
                      max_output_tokens=300)


async def test_fifty_concurrent_tasks_of_one_tenant_stay_within_its_budget(
        client: Client, agent: keel.Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_TENANT_BUDGETS", json.dumps({"acme": {"period": "day", "max_usd": LIMIT_USD},
                                                          "*": {"period": "day", "max_usd": 10.0}}))
    today = datetime.now(UTC)
    monkeypatch.setattr(tenant_budgets, "_now", lambda: today)
    async with agent_environment(agent, client=client, home=tmp_path) as env:
        handles = [await env.start(agent.name, f"Is host h{i}.example.com up?", tenant="acme", key=f"a{i}", sim=SIM)
                   for i in range(50)]
        other = [await env.start(agent.name, f"Is host g{i}.example.com up?", tenant="globex", key=f"g{i}", sim=SIM)
                 for i in range(3)]
        results = await asyncio.gather(*(h.result() for h in handles))
        others = await asyncio.gather(*(h.result() for h in other))

        with env.engine.connect() as conn:
            ledger = float(conn.execute(text("SELECT coalesce(sum(cost_usd), 0) FROM ledger WHERE kind = 'llm' "
                                             "AND tenant = 'acme'")).scalar_one())
            counter = conn.execute(text("SELECT spent_usd, calls, refused FROM tenant_spend WHERE tenant = 'acme'"
                                        " AND feature = ''")).one()
            queue = {r[0]: r[1] for r in conn.execute(text("SELECT workflow_id, reason FROM human_queue"))}
            llm_rows = conn.execute(text("SELECT count(*) FROM ledger WHERE kind = 'llm' AND tenant = 'acme'")).scalar()

        refused = [r for r in results if r.budget.limit_hit == "tenant"]
        done = [r for r in results if r.status == "completed"]
        assert refused and done, (ledger, [(r.status, r.reason) for r in results])
        # never over; within one call's hold of the limit (the largest hold a refusal asked for)
        needs = [float(m) for r in refused for m in re.findall(r"the next call needs up to \$([0-9.]+)", r.reason)]
        assert len(needs) == len(refused)
        assert ledger <= LIMIT_USD + 1e-9
        assert ledger > LIMIT_USD - max(needs), (ledger, max(needs))
        # the limiter's counter is the ledger's figure, call for call
        assert float(counter[0]) == pytest.approx(ledger, abs=1e-9) and counter[1] == llm_rows
        assert counter[2] == len(refused)
        day = f"{today:%Y-%m-%d}"
        for r in refused:
            assert r.status == "escalated"
            assert r.reason.startswith(f"tenant budget of tenant 'acme' exceeded for the day {day}: $")
            assert queue[r.workflow_id] == r.reason
            assert [d.kind for d in r.decisions if d.kind == "tenant_budget"] == ["tenant_budget"]
        assert all(r.status != "budget_exceeded" and r.budget.limit_hit in (None, "tenant") for r in results)
        desc = await client.get_workflow_handle(refused[0].workflow_id).describe()
        assert desc.typed_search_attributes.get(SearchAttributeKey.for_keyword(names.SA_BUDGET)) == "limit:tenant"
        # another tenant is not touched by acme's limit
        assert all(r.status == "completed" and r.llm_calls >= 2 for r in others)

        # `keel costs --by tenant --period day`: the day's spend beside each tenant's budget
        res = CliRunner().invoke(app, ["costs", "--by", "tenant", "--period", "day", "--format", "json"],
                                 env={"KEEL_DATABASE_URL": f"sqlite:///{tmp_path / 'keel.db'}"})
        assert res.exit_code == 0, res.output
        shown = {r["tenant"]: r for r in json.loads(res.output)}
        assert shown["acme"]["cost_usd"] == pytest.approx(ledger) and shown["acme"]["budget"] == "$0.0200/day"
        assert shown["acme"]["refused"] == len(refused) and shown["acme"]["held_usd"] == 0.0
        assert shown["acme"]["used"] == f"{100 * ledger / LIMIT_USD:.0f}%"
        assert shown["globex"]["budget"] == "$10.0000/day" and shown["globex"]["refused"] == 0

        # the next day acme's budget starts from zero
        monkeypatch.setattr(tenant_budgets, "_now", lambda: today + timedelta(days=1))
        again = await env.run(agent.name, "Is host z.example.com up?", tenant="acme", key="z", sim=SIM)
        assert again.status == "completed" and again.budget.limit_hit is None
