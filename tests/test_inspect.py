"""Replay and inspection (starter/inspect_cli.py) beyond the agent tests: the divergence report of a
tampered history, `keel history export` of a finished task, `keel prompts list|diff` over the loaded
agents' prompt files, an unknown prompt version refused by the ticket verb and by the LLM activity.
(The what-if of any agent's task: tests/agents/test_whatif.py; replay of agent tasks through the CLI:
tests/agents/test_agent_cli.py.)"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from typer.testing import CliRunner

from activities.ledger import Ledger
from activities.llm import LlmActivities
from activities.prompts import load_prompt_at
from activities.providers.sim import SimProvider
from agents.support_desk import support_desk
from keel import registry
from keel.types import LlmRequest, Message, TaskContext
from starter.cli import app
from starter.inspect_cli import InspectError, diff_prompts, list_prompts, replay_history
from tests.test_replay import TAMPERED_HISTORY

BILLING = ("C-1011", "Why was I charged a fee of 4.90 EUR this month? I thought my account was free.")


@pytest.fixture(autouse=True)
def _desk_registered() -> None:
    registry.register(support_desk)


async def test_a_changed_history_reports_the_divergence() -> None:
    """Tampered like test_replay's test_changed_history_is_detected: the report names the event."""
    doc = json.loads(TAMPERED_HISTORY.read_text())
    tampered = None
    for event in doc["events"]:
        attrs = event.get("activityTaskScheduledEventAttributes")
        if attrs and attrs["activityType"]["name"].startswith("support_desk."):
            original = attrs["activityType"]["name"]
            attrs["activityType"]["name"] = "support_desk.close_account"
            tampered = int(event["eventId"])
            break
    assert tampered is not None
    rep = await replay_history(WorkflowHistory.from_json("tampered", json.dumps(doc)), pydantic_data_converter)
    assert not rep.ok and rep.error_type == "NondeterminismError"
    assert "Nondeterminism" in (rep.error or "") and "close_account" in (rep.error or "")
    assert original in (rep.error or "")
    assert (rep.event_id, rep.event_type, rep.event_detail) == (tampered, "ActivityTaskScheduled",
                                                                  "activity support_desk.close_account")
    # The untampered file replays cleanly through the same function.
    clean = await replay_history(WorkflowHistory.from_json("clean", TAMPERED_HISTORY.read_text()),
                                 pydantic_data_converter)
    assert clean.ok and clean.events == len(json.loads(TAMPERED_HISTORY.read_text())["events"])


def test_prompts_list_and_diff(tmp_path: Path) -> None:
    infos = {(i.name, i.version): i for i in list_prompts([support_desk])}
    for name, stem in (("support_desk", "support_desk"), ("support_desk/triage", "support_desk_triage")):
        for version in ("v1", "v2"):
            info = infos[(name, version)]
            loaded = load_prompt_at(support_desk.prompt_dir, stem, version)
            assert info.sha256 == loaded.sha256 and info.size > 0 and info.short_hash == loaded.short_hash

    diff = diff_prompts("support_desk@v1", "support_desk@v2")
    v1 = load_prompt_at(support_desk.prompt_dir, "support_desk", "v1")
    assert diff.startswith(f"--- support_desk@v1 ({v1.short_hash})")
    assert "\n+++ support_desk@v2" in diff and "\n@@ " in diff
    assert diff_prompts("support_desk@v1", "support_desk@v1") == ""
    with pytest.raises(InspectError, match=r"unknown prompt 'support_desk@v9'.*support_desk@v2"):
        diff_prompts("support_desk@v1", "support_desk@v9")
    with pytest.raises(InspectError, match="AGENT@VERSION"):
        diff_prompts("support_desk", "support_desk@v2")

    env = {"KEEL_HOME": str(tmp_path), "COLUMNS": "200"}
    out = CliRunner().invoke(app, ["prompts", "list", "--agents", "agents.support_desk"], env=env)
    assert out.exit_code == 0, out.output
    assert "support_desk/triage" in out.output and v1.short_hash in out.output
    out = CliRunner().invoke(app, ["prompts", "list", "--json", "--agents", "agents.support_desk"], env=env)
    assert out.exit_code == 0 and {p["name"] for p in json.loads(out.output)["prompts"]} >= {
        "support_desk", "support_desk/triage"}
    out = CliRunner().invoke(app, ["prompts", "diff", "support_desk@v1", "support_desk@v2", "--agents",
                                   "agents.support_desk"], env=env)
    assert out.exit_code == 0 and "+++ support_desk@v2" in out.output
    out = CliRunner().invoke(app, ["prompts", "diff", "support_desk@v1", "nope@v1"], env=env)
    assert out.exit_code == 2 and "unknown prompt 'nope@v1'" in out.output


def test_the_ticket_verb_refuses_an_unknown_prompt_version(tmp_path: Path) -> None:
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
    req = LlmRequest(task=TaskContext(workflow_id=f"wf-{uuid.uuid4().hex[:6]}", tenant="C-1001",
                                      prompt_version="v9"),
                     step=1, kind="reason", prompt="support_desk", agent="support_desk",
                     messages=[Message(role="user", content="Customer: C-1001\n\nhello")])
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(acts.llm_call, req)
    assert e.value.type == "PromptNotFound" and e.value.non_retryable and "'v9'" in e.value.message


async def test_a_model_call_without_an_agent_is_refused(db_engine: Engine) -> None:
    acts = LlmActivities({"sim": SimProvider()}, Ledger(db_engine))
    req = LlmRequest(task=TaskContext(workflow_id=f"wf-{uuid.uuid4().hex[:6]}", tenant="C-1001"),
                     step=1, kind="reason", prompt="support_desk",
                     messages=[Message(role="user", content="hello")])
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(acts.llm_call, req)
    assert e.value.non_retryable and "must name its agent" in e.value.message


async def test_a_model_call_in_flight_heartbeats(db_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow provider call heartbeats while it runs (a dead worker's call is retried after the heartbeat
    timeout, not its whole limit); a fast one does not need to."""
    import asyncio

    import activities.llm as llm_module
    from activities.providers.base import ProviderResult
    from keel.types import ModelSpec, Usage

    class Slow:
        name = "sim"

        async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
            await asyncio.sleep(0.35)
            return ProviderResult(text="done", usage=Usage(input_tokens=10, output_tokens=2), model="sim-large")

    monkeypatch.setattr(llm_module, "HEARTBEAT_EVERY_S", 0.05)
    beats: list[object] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    req = LlmRequest(task=TaskContext(workflow_id=f"wf-{uuid.uuid4().hex[:6]}", tenant="t"), step=1, kind="reason",
                     prompt="support_desk", agent="support_desk", model=ModelSpec(provider="sim", model="sim-large"),
                     messages=[Message(role="user", content="Customer: C-1001\n\nhello")])
    resp = await env.run(LlmActivities({"sim": Slow()}, Ledger(db_engine)).llm_call, req)
    assert resp.text == "done" and len(beats) >= 4, beats
    beats.clear()
    await env.run(LlmActivities({"sim": SimProvider()}, Ledger(db_engine)).llm_call,
                  req.model_copy(update={"step": 2}))
    assert beats == []
