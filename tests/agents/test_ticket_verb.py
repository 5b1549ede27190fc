"""`keel ticket submit|batch`, the support desk package's verb group (agents/support_desk/cli.py), on the real
Temporal dev server: a ticket is a task of the `support_desk` agent on the generic agent workflow (never the
legacy SupportTicket workflow), its customer the tenant, its id the key; a batch of the sample tickets
settles with the refunds awaiting a support lead's approval, the fraud report escalated by the triage and
the rest resolved; a ticket submitted again is not run twice; bad input is refused before anything starts."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import text
from temporalio.client import Client
from typer.testing import CliRunner

import keel
from agents.support_desk import store, support_desk
from agents.support_desk.cli import load_batch_file, parse_latency, request_text
from agents.support_desk.data import build_seed, sample_tickets
from keel import names
from keel.testing import AgentEnvironment, agent_environment
from starter.cli import app

SEED = build_seed()
ACCOUNT = next(a for a in SEED["accounts"] if a["customer_id"] == "C-1001")
SAMPLE_SEED = 11
"""The sample batch's seed (its ticket ids are TK-11-0001...): no other test on the session's server uses it."""


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    monkeypatch.setenv("KEEL_DATABASE_URL", url)
    store.reset()
    yield url
    store.reset()


def cli_env(env: AgentEnvironment, tmp_path: Path) -> dict[str, str]:
    return {"TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
            "KEEL_TASK_QUEUE": env.settings.task_queue, "KEEL_HOME": str(tmp_path / "home"),
            "KEEL_DATABASE_URL": str(env.engine.url), "COLUMNS": "200"}


async def keel_cli(env: dict[str, str], *args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def ledger(env: AgentEnvironment, workflow_id: str) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT kind, tool, tenant, task_type FROM ledger WHERE workflow_id = :w ORDER BY step, kind, key"),
            {"w": workflow_id})]


async def test_submit_one_ticket_answers_it_on_the_support_desk_agent(
        client: Client, db_url: str, tmp_path: Path) -> None:
    ticket = f"TK-{uuid.uuid4().hex[:8]}"
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        cli = cli_env(env, tmp_path)
        shown = await keel_cli(cli, "ticket", "submit", "--customer", "C-1001", "--text",
                               "What is the balance of my account?", "--ticket-id", ticket, "--spiral-rate", "0")
        as_json = await keel_cli(cli, "ticket", "submit", "-c", "C-1002", "-t", "What are your support hours?",
                                 "--json", "--spiral-rate", "0")
        wid = f"support_desk-{ticket}"
        desc = await client.get_workflow_handle(wid).describe()
        rows = ledger(env, wid)
    assert shown.exit_code == 0, shown.output
    assert f"started {wid}" in shown.output and "resolved" in shown.output
    assert "general_inquiry (low, confidence 0.86)" in shown.output
    assert f"{ACCOUNT['balance']:.2f} EUR" in shown.output and re.search(r"tools +get_account *\n", shown.output)
    assert "sim: simulated tokens and costs" in shown.output
    # The generic agent workflow, for this customer: the legacy SupportTicket workflow runs no more.
    assert desc.workflow_type == names.AGENT_WORKFLOW
    assert {r["tenant"] for r in rows} == {"C-1001"} and {r["task_type"] for r in rows} == {"support_desk"}

    assert as_json.exit_code == 0, as_json.output
    res = keel.AgentResult.model_validate_json(as_json.stdout)
    assert res.agent == "support_desk" and res.status == "completed" and res.workflow_id.startswith("support_desk-TK-")
    assert res.triage is not None and res.triage["category"] == "general_inquiry"
    assert res.tools_executed == ["lookup_policy"] and "24 hours" in res.output


async def test_a_batch_of_the_sample_tickets(client: Client, db_url: str, tmp_path: Path) -> None:
    samples = sample_tickets(8, seed=SAMPLE_SEED)
    kinds = {t.ticket_id: t.category for t in samples}
    assert set(kinds.values()) == {"refund_request", "billing_question", "account_access", "card_issue",
                                   "fraud_report", "general_inquiry"}
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        cli = cli_env(env, tmp_path)
        out = await asyncio.wait_for(keel_cli(cli, "ticket", "batch", "--sample", "8", "--concurrency", "3",
                                              "--sim-seed", str(SAMPLE_SEED), "--spiral-rate", "0"), 120)
        # Again, as JSON: every ticket id ran already, so nothing starts and each item is that run.
        again = await asyncio.wait_for(keel_cli(cli, "ticket", "batch", "--sample", "8", "--json",
                                                "--sim-seed", str(SAMPLE_SEED), "--spiral-rate", "0"), 120)
        docs = json.loads(again.stdout) if again.exit_code == 0 else []
        waiting = [d["workflow_id"] for d in docs if d["status"] == "awaiting_approval"]
        # The hint's command approves a waiting refund; it then runs, once.
        hinted = re.search(r"keel approve (\S+) --as (\S+)`", out.output)
        assert hinted is not None, out.output
        approved = await keel_cli(cli, "approve", hinted.group(1), "--as", hinted.group(2))
        done = await client.get_workflow_handle(hinted.group(1), result_type=keel.AgentResult).result()
        for wid in set(waiting) - {hinted.group(1)}:
            await client.get_workflow_handle(wid).terminate("test over")
    assert out.exit_code == 0, out.output
    assert "starting 8 tasks, at most 3 at a time" in out.output and "8 support tickets" in out.output
    for t in samples:
        row = next((line for line in out.output.splitlines() if line.strip().startswith(t.ticket_id)), "")
        assert t.customer_id in row, (t.ticket_id, out.output)
        want = {"refund_request": "awaiting_approval", "fraud_report": "escalated"}.get(t.category, "resolved")
        assert f" {want} " in row and f" {t.category} " in row, (t.ticket_id, row)
    assert "resolved 5, awaiting_approval 2, escalated 1;" in out.output
    assert "sim: simulated tokens and costs" in out.output
    assert "2 ticket(s) wait for a support lead's approval of a refund: `keel approvals` lists them" in out.output
    assert hinted.group(2) == "support-lead" and hinted.group(1) in waiting

    assert again.exit_code == 0, again.output
    assert [d["workflow_id"] for d in docs] == [f"support_desk-{t.ticket_id}" for t in samples]
    assert all(d["existing"] for d in docs)
    by_kind = {kinds[d["workflow_id"].removeprefix("support_desk-")]: d for d in docs}
    fraud = by_kind["fraud_report"]["result"]
    assert fraud["status"] == "escalated" and fraud["triage"]["category"] == "fraud_report"
    assert "fraud_report is always handled by a person" in fraud["reason"] and fraud["tools_executed"] == []
    refund = by_kind["refund_request"]
    assert refund["progress"]["pending_action"]["tool"] == "issue_refund"
    assert refund["progress"]["triage"]["category"] == "refund_request"
    assert sorted(waiting) == sorted(f"support_desk-{t}" for t, k in kinds.items() if k == "refund_request")

    assert approved.exit_code == 0, approved.output
    assert done.status == "completed" and done.tools_executed[-1] == "issue_refund"
    assert [(a.approver, a.accepted) for a in done.approvals] == [("support-lead", True)]


async def test_a_ticket_submitted_again_is_not_run_twice(client: Client, db_url: str, tmp_path: Path) -> None:
    ticket = f"TK-{uuid.uuid4().hex[:8]}"
    wid = f"support_desk-{ticket}"
    args = ("ticket", "submit", "-c", "C-1003", "-t", "Why was I charged a fee this month?", "--ticket-id", ticket,
            "--spiral-rate", "0", "--json")
    batch = tmp_path / "again.jsonl"
    batch.write_text("".join(json.dumps({"customer_id": "C-1003", "text": "What are your support hours?",
                                         "ticket_id": f"{ticket}-b"}) + "\n" for _ in range(2)))
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        cli = cli_env(env, tmp_path)
        first = await keel_cli(cli, *args)
        run_id = (await client.get_workflow_handle(wid).describe()).run_id
        calls = len(ledger(env, wid))
        second = await keel_cli(cli, *args)
        shown = await keel_cli(cli, *args[:-1])
        after = (await client.get_workflow_handle(wid).describe()).run_id
        twice = await keel_cli(cli, "ticket", "batch", "--file", str(batch), "--json", "--spiral-rate", "0")
        rows_after = len(ledger(env, wid))
        b_outcomes = [r for r in ledger(env, f"{wid}-b") if r["kind"] == "outcome"]
    assert first.exit_code == 0 and second.exit_code == 0, (first.output, second.output)
    assert json.loads(first.stdout) == json.loads(second.stdout)  # the same run's result
    assert after == run_id and rows_after == calls  # no second run, no model call
    assert f"found {wid} (it exists already: nothing new was started)" in shown.output, shown.output
    assert twice.exit_code == 0, twice.output
    items = json.loads(twice.stdout)
    assert [i["workflow_id"] for i in items] == [f"{wid}-b"] * 2 and sorted(i["existing"] for i in items) == [
        False, True]
    assert len(b_outcomes) == 1


async def test_a_refund_ticket_returns_once_it_waits_for_an_approval(
        client: Client, db_url: str, tmp_path: Path) -> None:
    ticket = f"TK-{uuid.uuid4().hex[:8]}"
    wid = f"support_desk-{ticket}"
    dup = next(t for t in SEED["transactions"] if t["customer_id"] == "C-1001" and t["duplicate_of"])
    args = ("ticket", "submit", "-c", "C-1001", "--ticket-id", ticket, "--spiral-rate", "0", "-t",
            f"I was charged twice at {dup['merchant']} for {dup['amount']:.2f} EUR. "
            "Please refund the duplicate charge.")
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        cli = cli_env(env, tmp_path)
        shown = await asyncio.wait_for(keel_cli(cli, *args), 60)
        as_json = await asyncio.wait_for(keel_cli(cli, *args, "--json"), 60)
        now = await keel_cli(cli, "status", wid)
        await client.get_workflow_handle(wid).terminate("test over")
    text_ = " ".join(shown.output.split())
    assert shown.exit_code == 0, shown.output
    assert "awaiting_approval" in text_ and "support-lead" in text_
    assert f"{wid} waits for the approval of issue_refund#1 (issue_refund): `keel approvals`" in text_
    assert f"`keel approve {wid} --as alice` or `keel reject {wid} --as alice`" in text_
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.stdout)
    assert doc["workflow_id"] == wid and doc["status"] == "awaiting_approval" and doc["existing"] is True
    assert doc["result"] is None and doc["progress"]["pending_action"]["arguments"]["transaction_id"] == dup["id"]
    assert doc["progress"]["triage"]["category"] == "refund_request"
    assert now.exit_code == 0 and "awaiting_approval" in now.output, now.output
    assert "category refund_request, urgency normal, confidence 0.95" in now.output  # the triage, while it waits


def test_bad_tickets_are_refused_before_anything_starts(tmp_path: Path) -> None:
    env = {"KEEL_HOME": str(tmp_path), "TEMPORAL_ADDRESS": "127.0.0.1:1", "COLUMNS": "200"}  # no server there

    def keel_(*args: str) -> Any:
        return CliRunner().invoke(app, ["ticket", *args], env=env)

    def said(out: Any) -> str:
        return " ".join(out.output.split())

    empty = keel_("submit", "-c", "C-1001", "-t", "  ")
    assert empty.exit_code == 2 and "ticket submit refused: ticket text is empty" in said(empty)
    nobody = keel_("submit", "-c", " ", "-t", "hello")
    assert nobody.exit_code == 2 and "customer id is empty" in said(nobody)
    latency = keel_("submit", "-c", "C-1001", "-t", "hi", "--sim-latency", "fast")
    assert latency.exit_code == 2 and "--sim-latency 'fast': use milliseconds" in said(latency)
    backwards = keel_("batch", "--sample", "2", "--sim-latency", "3000-1000")
    assert backwards.exit_code == 2 and "ticket batch refused: --sim-latency '3000-1000'" in said(backwards)
    version = keel_("submit", "-c", "C-1001", "-t", "hi", "--prompt-version", "v9")
    assert version.exit_code == 2 and "prompt version 'v9': the support desk has v1, v2" in said(version)
    missing = keel_("batch", str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 2 and "nope.jsonl: cannot read" in said(missing)
    neither = keel_("batch")
    assert neither.exit_code == 2 and "give a FILE (or --file) or --sample N" in said(neither)
    both = keel_("batch", str(tmp_path / "x.jsonl"), "--sample", "2")
    assert both.exit_code == 2 and "one of them" in said(both)

    bad = tmp_path / "batch.jsonl"
    bad.write_text('{"customer_id": "C-1001", "text": "fine"}\n{"customer_id": "C-1002", "text": \n'
                   '{"customer_id": "C-1003"}\n[1, 2]\n{"customer_id": "C-1004", "text": "x", "amount": 5}\n')
    out = keel_("batch", "--file", str(bad))
    assert out.exit_code == 2, out.output
    for part in ("4 bad ticket(s), nothing was started", "line 2: not valid JSON", "line 3: ticket text is empty",
                 "line 4: expected an object", "line 5: unknown fields ['amount']"):
        assert part in said(out), (part, out.output)


def test_a_batch_file_becomes_support_desk_tasks(tmp_path: Path) -> None:
    f = tmp_path / "batch.json"
    f.write_text(json.dumps([{"customer_id": "C-1001", "text": "hello", "ticket_id": "T1"},
                             {"customer_id": "C-1002", "text": "hi", "feature": "support"}]))
    one, two = load_batch_file(f, keel.SimConfig(seed=3), "v2")
    assert (one.agent, one.key, one.tenant) == ("support_desk", "T1", "C-1001")
    assert one.input == request_text("C-1001", "hello") == "Customer: C-1001\n\nhello"
    assert one.prompt_version == "v2" and one.sim.seed == 3 and two.feature == "support" and two.key.startswith("TK-")
    f.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_batch_file(f)


def test_the_shadow_candidate_of_the_demo_has_its_prompts() -> None:
    """`keel shadow start --agent support_desk --candidate prompt=v2` (make demo): the desk and its triage
    have a v2 (a version needs both)."""
    assert support_desk.prompt_versions() == ["v1", "v2"]
    assert support_desk.prompt_path("v2").is_file()
    assert (support_desk.prompt_dir / "support_desk_triage.v2.md").is_file()


@hypothesis.given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_property_sim_latency_is_a_range_or_refused(low: int, high: int) -> None:
    if low <= high:
        assert parse_latency(f"{low}-{high}") == (low, high) and parse_latency(str(low)) == (low, low)
    else:
        with pytest.raises(ValueError, match="MIN <= MAX"):
            parse_latency(f"{low}-{high}")


TAG = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}", fullmatch=True)


@hypothesis.given(st.lists(st.tuples(TAG, st.text(min_size=1, max_size=200).filter(str.strip), TAG), max_size=12))
@hypothesis.settings(max_examples=40, deadline=None)
def test_property_a_batch_file_keeps_every_ticket_in_order(tmp_path_factory: pytest.TempPathFactory,
                                                           tickets: list[tuple[str, str, str]]) -> None:
    f = tmp_path_factory.mktemp("batch") / "t.jsonl"
    f.write_text("".join(json.dumps({"customer_id": c, "text": t, "ticket_id": k}) + "\n" for c, t, k in tickets))
    if not tickets:
        with pytest.raises(ValueError, match="no tickets in the file"):
            load_batch_file(f)
        return
    got = load_batch_file(f)
    assert [(i.tenant, i.input, i.key) for i in got] == [(c, request_text(c, t), k) for c, t, k in tickets]
    assert {i.agent for i in got} == {"support_desk"}
