"""Bad configuration and refused writes, said clearly (issue 16): a model the worker cannot call (no
OPENAI_API_KEY) hands the task to a person with the reason (a human-queue row and an outcome row, the CLI
saying why), not a failed workflow; a call the tool refused is not in `tools_executed` but in
`tools_blocked` with the tool's reason; a TEMPORAL_ADDRESS without a port and a KEEL_HOME that is a file
are one-line settings errors; an unreachable Temporal is waited for, saying so, then a clear error; a call
that times out is named. Exactly once (#16 item 1): the write tools answer a call made again with its key
as the first time; `keel run --key` runs once; a batch file's tickets without ids keep their ids."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import text
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from typer.testing import CliRunner

import keel
from agents.oncall.status_service import StatusService
from agents.support_desk import store
from agents.support_desk.cli import load_batch_file
from agents.support_desk.data import build_seed
from agents.support_desk.tools import HandOffArgs, RefundArgs, escalate_to_human, issue_refund
from keel.settings import KeelSettings
from keel.testing import SCRIPTED, ScriptedModel, Step, answer
from keel.types import ToolCall
from starter.cli import app
from starter.rpc import Temporal, TemporalCallError
from tests.agents.test_oncall import cli_env, env_for, keel_cli

NO_KEY = keel.ModelSpec(provider="openai", model="gpt-4o-mini")


def rows(engine: Any, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


async def test_a_missing_api_key_hands_the_task_to_a_person_saying_why(client: Client, tmp_path: Path) -> None:
    async with env_for(client) as env:
        res = await env.run("oncall", "Is the api service healthy?", models={"small": NO_KEY, "large": NO_KEY})
        queued = rows(env.engine, "SELECT reason FROM human_queue WHERE workflow_id = :w", w=res.workflow_id)
        outcome = rows(env.engine, "SELECT status, reason FROM ledger WHERE workflow_id = :w AND kind = 'outcome'",
                       w=res.workflow_id)
        shown = await keel_cli(cli_env(env, tmp_path), "run", "oncall", "Is the api service healthy?",
                               "--model", "openai:gpt-4o-mini", "--key", f"nokey-{uuid.uuid4().hex[:6]}", "--wait")
    assert res.status == "escalated" and "OPENAI_API_KEY" in res.reason and "openai:gpt-4o-mini" in res.reason, res
    assert len(queued) == 1 and "OPENAI_API_KEY" in queued[0]["reason"]
    assert len(outcome) == 1 and outcome[0]["status"] == "escalated" and "OPENAI_API_KEY" in outcome[0]["reason"]
    assert shown.exit_code == 0, shown.output
    said = " ".join(shown.output.split())
    assert "OPENAI_API_KEY" in said and "Activity task failed" not in said


async def test_a_call_the_tool_refused_is_blocked_not_executed(client: Client, status: StatusService) -> None:
    model = ScriptedModel([
        Step(text="", tool_calls=[ToolCall(id="", name="service_status", arguments_json='{"service": "nosuch"}')]),
        answer("There is no service called nosuch."),
    ])
    async with env_for(client, model=model) as env:
        res = await env.run("oncall", "Is nosuch healthy?", models={"small": SCRIPTED, "large": SCRIPTED})
    assert res.tools_executed == [], res
    assert [b.tool for b in res.tools_blocked] == ["service_status"]
    assert "no service at" in res.tools_blocked[0].reason


@pytest.mark.parametrize(("env", "said"), [
    ({"TEMPORAL_ADDRESS": "localhost"}, "TEMPORAL_ADDRESS='localhost': give HOST:PORT"),
    ({"TEMPORAL_ADDRESS": "localhost:port"}, "give HOST:PORT"),
    ({"KEEL_HOME": "FILE"}, "is a file, not a directory"),
])
def test_bad_addresses_and_homes_are_one_line_errors(tmp_path: Path, env: dict[str, str], said: str) -> None:
    home = tmp_path / "home-file"
    home.write_text("not a directory")
    env = {k: str(home) if v == "FILE" else v for k, v in env.items()}
    res = CliRunner().invoke(app, ["ticket", "submit", "-c", "C-1001", "-t", "hello"], env=env)
    assert res.exit_code == 2, res.output
    assert said in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not isinstance(res.exception, IndexError | NotADirectoryError)


def test_an_unreachable_temporal_is_waited_for_then_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket is closed
    res = CliRunner().invoke(app, ["ticket", "submit", "-c", "C-1001", "-t", "hello"],
                             env={"TEMPORAL_ADDRESS": f"127.0.0.1:{port}", "KEEL_TEMPORAL_WAIT_S": "1.5",
                                  "KEEL_HOME": str(tmp_path / "home")})
    said = " ".join(res.output.split())
    assert res.exit_code == 1, res.output
    assert f"waiting for Temporal at 127.0.0.1:{port}" in said and "retrying for up to 1.5 s" in said, said
    assert f"cannot reach Temporal at 127.0.0.1:{port} (tried for" in said and "KEEL_TEMPORAL_WAIT_S" in said, said


async def test_a_call_that_times_out_is_named_and_a_transient_failure_is_retried() -> None:
    settings = KeelSettings(temporal_address="10.0.0.1:7233", temporal_rpc_timeout_s=7, temporal_wait_s=0)
    calls: list[str] = []

    async def times_out() -> None:
        calls.append("x")
        raise RPCError("Timeout expired", RPCStatusCode.DEADLINE_EXCEEDED, b"")

    with pytest.raises(TemporalCallError) as failed:
        await Temporal(settings).call("start of support_desk-TK-1", times_out)
    assert str(failed.value) == "Temporal: start of support_desk-TK-1 to 10.0.0.1:7233 timed out after 7 s"

    said: list[str] = []
    patient = Temporal(settings.model_copy(update={"temporal_wait_s": 60}), say=said.append)

    async def flaky() -> str:
        calls.append("y")
        if calls.count("y") < 3:
            raise RPCError("tcp connect error", RPCStatusCode.UNAVAILABLE, b"")
        return "answered"

    assert await patient.call("result of wf-1", flaky) == "answered"
    assert patient.retries == 2 and len(said) == 1 and "not answering (result of wf-1: tcp connect error)" in said[0]

    async def refused() -> None:
        raise RPCError("namespace not found", RPCStatusCode.NOT_FOUND, b"")

    refusal = re.escape("describe of wf-2 to 10.0.0.1:7233 failed: namespace not found")
    with pytest.raises(TemporalCallError, match=refusal):
        await patient.call("describe of wf-2", refused)  # not transient: not retried


def test_write_tools_are_idempotent_on_the_call_key_not_a_business_rule(db_url: str) -> None:
    """A write made again with its call's key answers what it did the first time, even where a business
    rule would now refuse it (the refund is fully refunded); another key is another write."""
    seed = build_seed()
    dup = next(t for t in seed["transactions"] if t["customer_id"] == "C-1001" and t["duplicate_of"])
    ctx = keel.ToolContext(agent="support_desk", tool="issue_refund", workflow_id="support_desk-TK-1", step=4,
                           idempotency_key="support_desk-TK-1/4", attempt=1, tenant="C-1001", key="TK-1")
    refund = RefundArgs(customer_id="C-1001", transaction_id=dup["id"], amount=dup["amount"], reason="duplicate")
    first = issue_refund.fn(ctx, refund)
    again = issue_refund.fn(dataclasses.replace(ctx, attempt=3), refund)
    assert first == again and first["status"] == "executed"
    with pytest.raises(keel.ToolError, match="already refunded"):  # another call: the business rule answers
        issue_refund.fn(dataclasses.replace(ctx, step=9, idempotency_key="support_desk-TK-1/9"), refund)

    hand = HandOffArgs(customer_id="C-1001", reason="the customer disputes a card payment")
    case_ctx = dataclasses.replace(ctx, tool="escalate_to_human", step=5, idempotency_key="support_desk-TK-1/5")
    case = escalate_to_human.fn(case_ctx, hand)
    assert escalate_to_human.fn(dataclasses.replace(case_ctx, attempt=2), hand) == case
    other = escalate_to_human.fn(dataclasses.replace(case_ctx, step=6, idempotency_key="support_desk-TK-1/6"), hand)
    assert other["case_id"] != case["case_id"]
    made = rows(store.engine_for(), f"SELECT idempotency_key FROM {store.cases.name}")
    refunds = rows(store.engine_for(), f"SELECT idempotency_key FROM {store.refunds.name}")
    assert sorted(r["idempotency_key"] for r in made) == ["support_desk-TK-1/5", "support_desk-TK-1/6"]
    assert [r["idempotency_key"] for r in refunds] == ["support_desk-TK-1/4"]


async def test_keel_run_with_a_key_runs_once(client: Client, status: StatusService, tmp_path: Path) -> None:
    key = f"once-{uuid.uuid4().hex[:8]}"
    async with env_for(client) as env:
        cli = cli_env(env, tmp_path)
        first = await keel_cli(cli, "run", "oncall", "Is the api service healthy?", "--key", key, "--json")
        again = await keel_cli(cli, "run", "oncall", "Is the search service healthy?", "--key", key, "--json")
        runs = [w async for w in client.list_workflows(f"WorkflowId = 'oncall-{key}'")]
    assert first.exit_code == 0 and again.exit_code == 0, (first.output, again.output)
    assert json.loads(first.stdout) == json.loads(again.stdout)  # the first run's result, nothing run again
    assert len(runs) == 1


def test_a_batch_files_tickets_without_ids_are_keyed_on_their_content(tmp_path: Path) -> None:
    path = tmp_path / "tickets.jsonl"
    lines = [{"customer_id": "C-1001", "text": "Why was I charged a fee?"},
             {"customer_id": "C-1002", "text": "Why was I charged a fee?"},
             {"customer_id": "C-1001", "text": "Why was I charged a fee?"},  # the same ticket sent twice
             {"customer_id": "C-1003", "text": "Card lost", "ticket_id": "TK-own"}]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    keys = [t.key for t in load_batch_file(path)]
    assert keys == [t.key for t in load_batch_file(path)]  # the same file: the same tasks
    assert len(set(keys)) == 4 and keys[3] == "TK-own" and all(k.startswith("TK-") for k in keys)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.sampled_from(["C-1001", "C-1002"]),
                                     st.text(alphabet="abc fee?", min_size=1, max_size=12).filter(str.strip)),
                           min_size=1, max_size=12))
def test_content_keys_are_stable_and_one_per_ticket(tickets: list[tuple[str, str]]) -> None:
    """Whatever a file holds (the same ticket several times too): one task per line, the same ones on
    every run of the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl"
        path.write_text("\n".join(json.dumps({"customer_id": c, "text": t}) for c, t in tickets))
        keys = [t.key for t in load_batch_file(path)]
        assert keys == [t.key for t in load_batch_file(path)]
    assert len(set(keys)) == len(tickets)
