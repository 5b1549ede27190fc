"""Metrics and behavioral alerts for generic agent tasks (the support desk on KeelAgent), end to end on
the dev server: a spiral raises the steps and tokens alerts against the agent's usual tasks, with its
figures on the outcome row, the keel_* Prometheus metrics and `keel metrics` / `keel alerts`; a run of
fraud reports shifts the distribution of the triage's categories; a tool the agent never used before
raises an alert that reaches the webhook."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from temporalio.client import Client
from typer.testing import CliRunner

import keel
from activities.alerts import AlertEngine, TaskObserver, WebhookSink, list_alerts
from activities.db import init_db
from activities.ledger import Ledger
from activities.metrics import KeelMetrics, sdk_runtime
from agents.support_desk import store, support_desk
from agents.support_desk.data import sample_tickets
from keel.alerts import AlertPolicy
from keel.settings import KeelSettings
from keel.testing import AgentEnvironment, agent_environment
from starter.cli import app
from starter.client import connect
from tests.test_metrics_alerts import free_port, webhook_server  # noqa: F401  (a fixture)

AGENT = "support_desk"
FEE = "Customer: C-1003\n\nWhy was I charged a fee of 4.90 EUR this month?"


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Engine]]:
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    monkeypatch.setenv("KEEL_DATABASE_URL", url)
    store.reset()
    engine = create_engine(url)
    init_db(engine)
    yield url, engine
    engine.dispose()
    store.reset()


def request(t: Any) -> str:
    return f"Customer: {t.customer_id}\n\n{t.text}"


async def run_all(env: AgentEnvironment, inputs: list[tuple[str, str]], **fields: Any) -> list[keel.AgentResult]:
    return list(await asyncio.gather(*(env.run(AGENT, text, tenant=tenant, breaker=False, **fields)
                                       for text, tenant in inputs)))


def keel_cli(engine: Engine, *args: str) -> Any:
    out = CliRunner().invoke(app, list(args), env={"KEEL_DATABASE_URL": str(engine.url), "COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


async def test_a_spiral_raises_steps_and_tokens_alerts_with_metrics_and_cli(
        client: Client, db: tuple[str, Engine]) -> None:
    url, engine = db
    metrics = KeelMetrics()
    port = metrics.serve("127.0.0.1", 0)
    observer = TaskObserver(metrics, AlertEngine(engine, AlertPolicy(min_history=3)))
    async with agent_environment(support_desk, client=client, db_url=url, observer=observer) as env:
        normal = await run_all(env, [(FEE, "C-1003")] * 3)
        assert await asyncio.to_thread(observer.drain, 30)
        spiral = await env.run(AGENT, FEE, tenant="C-1003", breaker=False, key="spiral",
                               sim=keel.SimConfig(spiral_rate=1.0), budget=keel.Budget(max_tokens=None, max_usd=None),
                               max_steps=60)
    assert await asyncio.to_thread(observer.drain, 30)
    assert all(r.status == "completed" for r in normal), normal
    assert spiral.status == "completed" and spiral.steps > 2 * max(r.steps for r in normal), spiral

    rows = {r["workflow_id"]: r for r in Ledger(engine).outcomes(task_type=AGENT)}
    row = rows[spiral.workflow_id]
    assert (row["steps"], row["tools"]) == (spiral.steps, spiral.tools_executed)
    assert row["category"] == spiral.triage["category"] == "billing_question"  # from the triage
    found = list_alerts(engine, task_type=AGENT)
    assert sorted(a["rule"] for a in found) == ["steps", "tokens"], found
    assert {a["workflow_id"] for a in found} == {spiral.workflow_id}

    page = await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/metrics")
    assert f'keel_task_steps_count{{task_type="{AGENT}"}} 4.0' in page
    assert f'keel_task_outcomes_total{{category="billing_question",status="resolved",task_type="{AGENT}"}} 4.0' in page
    assert f'keel_tool_calls_total{{task_type="{AGENT}",tool="lookup_policy"}}' in page
    assert f'keel_task_tokens_total{{task_type="{AGENT}"}} {float(sum(r.tokens for r in [*normal, spiral]))}' in page
    metrics.shutdown()

    doc = await asyncio.to_thread(keel_cli, engine, "metrics", "--task-type", AGENT, "--since", "1h", "--json")
    assert doc["tasks"] == 4 and doc["escalation_rate"] == 0
    assert doc["consistency"]["inputs"] == 1 and doc["consistency"]["repeated_inputs"] == 1
    listed = await asyncio.to_thread(keel_cli, engine, "alerts", "--task-type", AGENT, "--json")
    assert sorted(a["rule"] for a in listed) == ["steps", "tokens"]


async def test_a_run_of_fraud_reports_shifts_the_triage_distribution(
        client: Client, db: tuple[str, Engine]) -> None:
    url, engine = db
    policy = AlertPolicy(min_history=1000, shift_recent=5, shift_baseline=10, shift_min_baseline=8, shift_min_count=3)
    observer = TaskObserver(None, AlertEngine(engine, policy))
    samples = sample_tickets(60, seed=11)
    usual = [t for t in samples if t.category in ("billing_question", "card_issue", "general_inquiry")][:10]
    fraud = [t for t in samples if t.category == "fraud_report"][:5]
    async with agent_environment(support_desk, client=client, db_url=url, observer=observer) as env:
        before = await run_all(env, [(request(t), t.customer_id) for t in usual])
        assert await asyncio.to_thread(observer.drain, 30)
        assert list_alerts(engine, task_type=AGENT) == []
        reports = await run_all(env, [(request(t), t.customer_id) for t in fraud])
    assert await asyncio.to_thread(observer.drain, 30)
    assert "fraud_report" not in {(r.triage or {}).get("category") for r in before}
    assert {(r.triage or {}).get("category") for r in reports} == {"fraud_report"}
    assert all(r.status == "escalated" and r.tools_executed == [] for r in reports)  # a person, before any tool
    (shift,) = list_alerts(engine, task_type=AGENT)
    assert (shift["rule"], shift["subject"]) == ("distribution_shift", "fraud_report")
    assert shift["workflow_id"] in {r.workflow_id for r in reports}


async def test_a_tool_new_to_the_agent_raises_an_alert_that_reaches_the_webhook(
        client: Client, db: tuple[str, Engine], webhook_server: tuple[str, list[dict[str, Any]]]) -> None:  # noqa: F811
    url, engine = db
    hook, received = webhook_server
    observer = TaskObserver(None, AlertEngine(engine, AlertPolicy(min_history=3), WebhookSink(hook, timeout_s=5)))
    async with agent_environment(support_desk, client=client, db_url=url, observer=observer) as env:
        usual = await run_all(env, [("Customer: C-1004\n\nWhat are your support hours?", "C-1004")] * 3)
        assert await asyncio.to_thread(observer.drain, 30)
        card = await env.run(AGENT, "Customer: C-1004\n\nMy card was declined at ShopNow, what is wrong with it?",
                             tenant="C-1004", breaker=False)
    assert await asyncio.to_thread(observer.drain, 30)
    assert all(r.tools_executed == ["lookup_policy"] for r in usual), usual
    new = sorted(set(card.tools_executed) - {"lookup_policy"})
    assert new and {"get_account", "get_transactions"} <= set(new)
    found = list_alerts(engine, task_type=AGENT)
    assert sorted((a["rule"], a["subject"]) for a in found) == [("new_tool", t) for t in new]
    assert sorted(r["alert"]["subject"] for r in received) == new
    observer.close()


async def test_the_sdk_metrics_endpoint_of_the_worker_runtime(client: Client, db: tuple[str, Engine]) -> None:
    url, _ = db
    port = free_port()
    s = KeelSettings(temporal_address=client.service_client.config.target_host, sdk_metrics_port=port)
    runtime = sdk_runtime(s)
    assert runtime is not None
    own = await connect(s, tracing=False, runtime=runtime)
    async with agent_environment(support_desk, client=own, db_url=url) as env:
        res = await env.run(AGENT, "Customer: C-1004\n\nWhat are your support hours?", tenant="C-1004")
    assert res.status == "completed"
    page = await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/metrics")
    assert "temporal_" in page and "activity" in page
