"""Replay and inspection (starter/inspect_cli.py): `keel replay`, `keel history export`, the what-if
replay on another prompt version, `keel prompts list|diff`, and `--prompt-version` on submit."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from typer.testing import CliRunner

from activities.db import HumanQueueRow, LedgerRow, RefundRow, ReplyRow
from activities.ledger import Ledger
from activities.llm import LlmActivities
from activities.prompts import load_prompt
from activities.providers.sim import SimProvider, task_traits
from keel.codec import data_converter
from keel.settings import KeelSettings
from keel.types import LlmRequest, Message, SimConfig, TaskContext
from starter import tickets
from starter.approvals_cli import decide, pending_action
from starter.cli import app
from starter.inspect_cli import (
    NOT_RECORDED,
    InspectError,
    diff_prompts,
    export_history,
    list_prompts,
    replay_history,
    replay_workflow,
    what_if,
)
from tests.conftest import assert_eventually, run_ticket, ticket
from tests.test_replay import TICKET_HISTORY, replayer

BILLING = ("C-1011", "Why was I charged a fee of 4.90 EUR this month? I thought my account was free.")
REFUND = ("C-1028", "I was charged twice at CloudHost for 198.78 EUR. Please refund the duplicate charge.")


def write_counts(engine: Engine) -> dict[str, int]:
    """Rows of the tables the write tools fill (refunds, replies, the human queue)."""
    with engine.connect() as c:
        return {str(row.__tablename__): c.execute(sa.select(sa.func.count()).select_from(row)).scalar_one()
                for row in (RefundRow, ReplyRow, HumanQueueRow)}


def ledger_rows(engine: Engine, workflow_id: str) -> list[LedgerRow]:
    with Session(engine) as s:
        return list(s.exec(select(LedgerRow).where(LedgerRow.workflow_id == workflow_id)).all())


def cli_env(client: Client, settings: KeelSettings, tmp_path: Path) -> dict[str, str]:
    return {"TEMPORAL_ADDRESS": client.service_client.config.target_host, "KEEL_TASK_QUEUE": settings.task_queue,
            "KEEL_HOME": str(tmp_path / "cli-home"), "KEEL_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
            "KEEL_ENCRYPT": "0", "COLUMNS": "200"}


def keel(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


# -- replay and export -------------------------------------------------------------------------------------


async def test_replay_export_and_cli(client: Client, settings: KeelSettings, worker_factory: Any,
                                     tmp_path: Path) -> None:
    async with worker_factory(client):
        res = await run_ticket(client, settings, ticket(*BILLING))
    rep = await replay_workflow(client, res.workflow_id)
    assert rep.ok and rep.error is None and rep.events > 10

    # Export: exactly the JSON tests/histories/ holds, and the Replayer accepts it.
    path, events = await export_history(client, res.workflow_id, tmp_path / "h" / "exported.json")
    assert events == rep.events
    history = WorkflowHistory.from_json(res.workflow_id, path.read_text())
    assert len(history.events) == events
    await replayer().replay_workflow(history)
    fetched = await client.get_workflow_handle(res.workflow_id).fetch_history()
    assert json.loads(path.read_text()) == json.loads(fetched.to_json())  # maps (search attributes) are unordered

    # The commands, as a user types them (their own event loop: in a thread).
    env = cli_env(client, settings, tmp_path)
    out = await asyncio.to_thread(keel, env, "replay", res.workflow_id)
    assert out.exit_code == 0, out.output
    assert f"replays cleanly ({rep.events} events)" in out.output
    out = await asyncio.to_thread(keel, env, "replay", res.workflow_id, "--json")
    assert out.exit_code == 0 and json.loads(out.output)["ok"] is True
    target = tmp_path / "cli-export.json"
    out = await asyncio.to_thread(keel, env, "history", "export", res.workflow_id, "--out", str(target))
    assert out.exit_code == 0, out.output
    assert "wrote" in out.output and json.loads(target.read_text()) == json.loads(fetched.to_json())
    out = await asyncio.to_thread(keel, env, "replay", "no-such-workflow")
    assert out.exit_code == 1 and "no workflow 'no-such-workflow'" in out.output


async def test_a_changed_history_reports_the_divergence() -> None:
    """Tampered like test_replay's test_changed_history_is_detected: the report names the event."""
    doc = json.loads(TICKET_HISTORY.read_text())
    tampered = None
    for event in doc["events"]:
        attrs = event.get("activityTaskScheduledEventAttributes")
        if attrs and attrs["activityType"]["name"] != "llm_call":
            original = attrs["activityType"]["name"]
            attrs["activityType"]["name"] = "close_account"
            tampered = int(event["eventId"])
            break
    assert tampered is not None
    rep = await replay_history(WorkflowHistory.from_json("tampered", json.dumps(doc)), pydantic_data_converter)
    assert not rep.ok and rep.error_type == "NondeterminismError"
    assert "Nondeterminism" in (rep.error or "") and "close_account" in (rep.error or "")
    assert original in (rep.error or "")
    assert (rep.event_id, rep.event_type, rep.event_detail) == (tampered, "ActivityTaskScheduled",
                                                                  "activity close_account")
    # The untampered file replays cleanly through the same function.
    clean = await replay_history(WorkflowHistory.from_json("clean", TICKET_HISTORY.read_text()),
                                 pydantic_data_converter)
    assert clean.ok and clean.events == len(json.loads(TICKET_HISTORY.read_text())["events"])


# -- what-if -----------------------------------------------------------------------------------------------


async def test_what_if_with_the_same_version_reproduces_the_path_without_writes(
    client: Client, settings: KeelSettings, worker_factory: Any, db_engine: Engine
) -> None:
    # A refund that waits for a human and is approved: the what-if serves the recorded decision and the
    # recorded refund; nothing is executed again.
    async with worker_factory(client):
        handle = await tickets.start_ticket(client, settings, ticket(*REFUND, approval_mode="wait"))
        await assert_eventually(lambda: pending_action(client, handle.id), lambda a: a is not None)
        await decide(client, handle.id, "alice", "approve", comment="verified")
        res = await handle.result()
    assert "issue_refund" in res.tools_executed and res.status == "resolved"
    before = write_counts(db_engine)

    report = await what_if(client, settings, res.workflow_id, prompt_version="v1", engine=db_engine)

    assert write_counts(db_engine) == before  # no tool wrote anything
    assert report.changes == {}
    assert report.same_path and report.first_difference is None
    assert report.new.tools_executed == report.old.tools_executed == res.tools_executed
    assert (report.new.status, report.new.route, report.new.category) == (res.status, res.route, res.category)
    assert report.new.tokens == report.old.tokens == res.tokens
    assert report.not_executed == []
    assert report.whatif_workflow_id.startswith(f"whatif-{res.workflow_id}-")
    rows = ledger_rows(db_engine, report.whatif_workflow_id)
    assert rows and all(r.kind == "llm" and r.feature == "what-if" and r.prompt_version == "v1" for r in rows)
    assert len(rows) == res.llm_calls
    assert len(ledger_rows(db_engine, res.workflow_id)) > len(rows)  # the original's rows are untouched


def _ticket_id_whose_spiral_flips(sim: SimConfig) -> str:
    """A ticket that spirals on v1 and not on v2 (the sim mixes the prompt version into its seed)."""
    for i in range(1000):
        tid = f"TK-whatif-{i}"
        if task_traits(sim, tid).spiral and not task_traits(sim, f"{tid}@v2").spiral:
            return tid
    raise AssertionError("no such ticket id")


async def test_what_if_on_v2_runs_and_is_shown_beside_the_old(
    client: Client, settings: KeelSettings, worker_factory: Any, db_engine: Engine, tmp_path: Path
) -> None:
    inp = ticket(*BILLING, spiral_rate=0.5)
    inp.ticket_id = _ticket_id_whose_spiral_flips(inp.sim)
    async with worker_factory(client):
        res = await run_ticket(client, settings, inp)
    before = write_counts(db_engine)

    report = await what_if(client, settings, res.workflow_id, prompt_version="v2", engine=db_engine)

    assert write_counts(db_engine) == before
    assert report.changes == {"prompt_version": ("v1", "v2")}
    assert (report.old.prompt_version, report.new.prompt_version) == ("v1", "v2")
    assert not report.same_path and report.first_difference is not None
    assert report.new.tokens < report.old.tokens  # the v1 run spiralled, the v2 run does not
    assert report.new.status in ("resolved", "escalated") and report.new.route in ("reply", "human")
    for note in report.not_executed:
        assert "step" in note
    agent_v2 = load_prompt("support/agent", "v2").short_hash
    rows = ledger_rows(db_engine, report.whatif_workflow_id)
    assert rows and {r.prompt_version for r in rows} == {"v2"}
    assert agent_v2 in {r.prompt_hash for r in rows}

    # The command: the old and the new path side by side, and --json.
    env = {**cli_env(client, settings, tmp_path), "KEEL_DATABASE_URL": str(db_engine.url)}
    out = await asyncio.to_thread(keel, env, "replay", res.workflow_id, "--prompt-version", "v2")
    assert out.exit_code == 0, out.output
    for text in ("old: call", "new: call", "prompt_version v1 -> v2", "the path changed at row", "whatif-",
                 res.status, "classify"):
        assert text in out.output, (text, out.output)
    out = await asyncio.to_thread(keel, env, "replay", res.workflow_id, "--prompt-version", "v2", "--json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["same_path"] is False and doc["new"]["prompt_version"] == "v2"
    assert [s["kind"] for s in doc["old"]["steps"]][:1] == ["classify"]
    assert doc["old"]["tools_executed"] == res.tools_executed
    out = await asyncio.to_thread(keel, env, "replay", res.workflow_id, "--prompt-version", "v9")
    assert out.exit_code == 1 and "support/classify.v9.md" in out.output
    out = await asyncio.to_thread(keel, env, "replay", res.workflow_id, "--model", "sim:no-such-model")
    assert out.exit_code == 1 and "--model 'sim:no-such-model'" in out.output
    assert write_counts(db_engine) == before


async def test_what_if_tools_never_recorded_are_not_executed(
    client: Client, settings: KeelSettings, worker_factory: Any, db_engine: Engine
) -> None:
    """A what-if whose agent asks for a call the original never made gets "not executed"."""
    inp = ticket(*BILLING, spiral_rate=0.5)
    # The other way round: no spiral on v1, a spiral on v2 (new calls, some never recorded).
    for i in range(1000):
        tid = f"TK-whatif-r{i}"
        if not task_traits(inp.sim, tid).spiral and task_traits(inp.sim, f"{tid}@v2").spiral:
            inp.ticket_id = tid
            break
    async with worker_factory(client):
        res = await run_ticket(client, settings, inp)
    before = write_counts(db_engine)
    report = await what_if(client, settings, res.workflow_id, prompt_version="v2", engine=db_engine)
    assert write_counts(db_engine) == before
    assert not report.same_path and report.new.tokens > report.old.tokens
    # The v2 spiral asks for transactions over another period: never recorded, so never executed; the
    # agent is told so, like any tool error, and the task goes on.
    unrecorded = [s for s in report.new.steps if s.kind == "tool" and s.note.startswith("not recorded")]
    assert unrecorded and all(not s.ok for s in unrecorded)
    assert len(report.not_executed) == len(unrecorded)
    assert all(n.startswith(f"step {s.step}: {s.name}:") for n, s in zip(report.not_executed, unrecorded, strict=True))
    assert report.new.status in ("resolved", "escalated")
    assert NOT_RECORDED.startswith("not recorded in the original run")


async def test_encrypted_history_replays_and_what_ifs_with_the_keys(
    client: Client, settings: KeelSettings, worker_factory: Any, db_engine: Engine
) -> None:
    """KEEL_ENCRYPT: replay and what-if decode through the client's data converter (its codec)."""
    key = base64.b64encode(os.urandom(32)).decode()
    enc = data_converter(settings.model_copy(update={"encrypt": True, "encryption_keys": f"k1:{key}"}))
    enc_client = await Client.connect(client.service_client.config.target_host, namespace=client.namespace,
                                      data_converter=enc)
    async with worker_factory(enc_client):
        res = await run_ticket(enc_client, settings, ticket(*BILLING))
    assert (await replay_workflow(enc_client, res.workflow_id)).ok
    report = await what_if(enc_client, settings, res.workflow_id, prompt_version="v1", engine=db_engine)
    assert report.same_path and report.new.tools_executed == res.tools_executed
    # Without the keys the payloads cannot be read: a clear error, not a traceback.
    with pytest.raises(InspectError, match="encrypted history needs KEEL_ENCRYPT=1"):
        await what_if(client, settings, res.workflow_id, prompt_version="v1", engine=db_engine)
    plain = await replay_workflow(client, res.workflow_id)
    assert not plain.ok and plain.event_id is None


async def test_what_if_refuses_what_is_not_a_ticket(client: Client, settings: KeelSettings) -> None:
    with pytest.raises(InspectError, match="no workflow"):
        await what_if(client, settings, f"nope-{uuid.uuid4().hex[:6]}", prompt_version="v2")


# -- prompts -----------------------------------------------------------------------------------------------


def test_prompts_list_and_diff(tmp_path: Path) -> None:
    infos = {(i.name, i.version): i for i in list_prompts()}
    for name in ("support/classify", "support/agent", "support/draft"):
        for version in ("v1", "v2"):
            info = infos[(name, version)]
            assert info.sha256 == load_prompt(name, version).sha256 and info.size > 0
            assert info.short_hash == load_prompt(name, version).short_hash

    diff = diff_prompts("support/agent@v1", "support/agent@v2")
    assert diff.startswith(f"--- support/agent@v1 ({load_prompt('support/agent', 'v1').short_hash})")
    assert "\n+++ support/agent@v2" in diff and "\n@@ " in diff and "\n-" in diff and "\n+" in diff
    assert diff_prompts("support/draft@v1", "support/draft@v1") == ""
    with pytest.raises(InspectError, match=r"unknown prompt 'support/agent@v9'.*support/agent@v2"):
        diff_prompts("support/agent@v1", "support/agent@v9")
    with pytest.raises(InspectError, match="NAME@VERSION"):
        diff_prompts("support/agent", "support/agent@v2")

    env = {"KEEL_HOME": str(tmp_path), "COLUMNS": "200"}
    out = CliRunner().invoke(app, ["prompts", "list"], env=env)
    assert out.exit_code == 0, out.output
    assert "support/agent" in out.output and load_prompt("support/agent", "v2").short_hash in out.output
    assert "v1, v2" in out.output
    out = CliRunner().invoke(app, ["prompts", "list", "--json"], env=env)
    assert out.exit_code == 0 and json.loads(out.output)["ticket_versions"] == ["v1", "v2"]
    out = CliRunner().invoke(app, ["prompts", "diff", "support/agent@v1", "support/agent@v2"], env=env)
    assert out.exit_code == 0 and "+++ support/agent@v2" in out.output
    out = CliRunner().invoke(app, ["prompts", "diff", "support/agent@v1", "support/nope@v1"], env=env)
    assert out.exit_code == 2 and "unknown prompt 'support/nope@v1'" in out.output


# -- --prompt-version on submit ----------------------------------------------------------------------------


def test_submit_with_an_unknown_prompt_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = KeelSettings(home=tmp_path)
    assert tickets.make_input(settings, *BILLING, prompt_version="v2").prompt_version == "v2"
    with pytest.raises(tickets.TicketInputError, match=r"missing support/classify\.v9\.md"):
        tickets.make_input(settings, *BILLING, prompt_version="v9")
    with pytest.raises(tickets.TicketInputError, match=r"prompt version '\.\./v1'"):
        tickets.make_input(settings, *BILLING, prompt_version="../v1")

    # A version with some of the pipeline's prompts: the missing file is named.
    partial = tmp_path / "prompts"
    (partial / "support").mkdir(parents=True)
    for name in ("classify", "agent"):
        (partial / "support" / f"{name}.v3.md").write_text("x")
    monkeypatch.setattr(tickets, "PROMPTS_DIR", partial)
    with pytest.raises(tickets.TicketInputError) as e:
        tickets.make_input(settings, *BILLING, prompt_version="v3")
    assert "support/draft.v3.md" in str(e.value) and "classify.v3" not in str(e.value)
    monkeypatch.undo()

    # `keel ticket` (the support desk agent's verbs) refuses before it connects (no server at this address).
    env = {"KEEL_HOME": str(tmp_path), "TEMPORAL_ADDRESS": "127.0.0.1:1", "COLUMNS": "200"}
    out = CliRunner().invoke(app, ["ticket", "submit", "-c", BILLING[0], "-t", BILLING[1], "--prompt-version", "v9"],
                             env=env)
    assert out.exit_code == 2 and "ticket submit refused" in out.output, out.output
    assert "prompt version 'v9': the support desk has v1, v2" in out.output
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"customer_id": BILLING[0], "text": BILLING[1]}) + "\n")
    out = CliRunner().invoke(app, ["ticket", "batch", str(batch), "--prompt-version", "v9"], env=env)
    assert out.exit_code == 2 and "prompt version 'v9'" in out.output, out.output


async def test_the_llm_activity_refuses_a_missing_prompt_version(db_engine: Engine) -> None:
    acts = LlmActivities({"sim": SimProvider()}, Ledger(db_engine))
    req = LlmRequest(task=TaskContext(workflow_id=f"wf-{uuid.uuid4().hex[:6]}", customer="C-1001",
                                      prompt_version="v9"),
                     step=1, kind="classify", prompt="support/classify",
                     messages=[Message(role="user", content="Customer: C-1001\nTicket: T\n\nhello")])
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(acts.llm_call, req)
    assert e.value.type == "PromptNotFound" and e.value.non_retryable and "'v9'" in e.value.message
