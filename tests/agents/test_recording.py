"""Real traffic as fixtures, end to end: an agent task recorded against a model server (a loopback one
speaking the OpenAI or Anthropic wire format), the server stopped, and the same task replayed offline on
the real worker and workflow: same answer, tool calls, repairs and ledger cost. A request the recording
lacks fails the task saying which and how to fix it, in `keel run` too."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from typer.testing import CliRunner

import keel
from agents.oncall import oncall
from agents.oncall.status_service import StatusService
from keel import errors
from keel.testing import AgentEnvironment, agent_environment
from starter.cli import app
from tests.agents.conftest import rows
from tests.providers.fake_servers import (
    FakeServer,
    Reply,
    anthropic_message,
    openai_completion,
    text_block,
    tool_use_block,
)

ASK = "Is the payments service healthy?"
ANSWER = "payments is down: version 5.2.0, error rate 0.61. Page the payments team."
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}
REPLIES = {
    # A small model's habit: the tool call written as text (the LLM activity repairs it, replayed or live).
    "openai": [Reply(body=openai_completion(content='functions.service_status: {"service": "payments"}',
                                            prompt_tokens=412, completion_tokens=14)),
               Reply(body=openai_completion(content=ANSWER, prompt_tokens=470, completion_tokens=21))],
    "anthropic": [Reply(body=anthropic_message(tool_use_block("toolu_01", "service_status", {"service": "payments"}),
                                               stop_reason="tool_use", input_tokens=500, output_tokens=30)),
                  Reply(body=anthropic_message(text_block(ANSWER), input_tokens=560, output_tokens=25))],
}


def _models(kind: str) -> dict[str, keel.ModelSpec]:
    spec = keel.ModelSpec(provider=kind, model=MODELS[kind])
    return {"small": spec, "large": spec}


def _llm_rows(env: AgentEnvironment, workflow_id: str) -> list[dict[str, Any]]:
    return rows(env.engine, "SELECT step, model, input_tokens, output_tokens, cost_usd, repaired FROM ledger "
                            "WHERE workflow_id = :w AND kind = 'llm' ORDER BY step", w=workflow_id)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_recorded_task_replays_offline_with_the_same_result_and_costs(
        kind: str, client: Client, status: StatusService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recording = tmp_path / "recordings" / f"oncall-{kind}.jsonl"
    with FakeServer() as server:
        server.script(*REPLIES[kind])
        monkeypatch.setenv(f"{kind.upper()}_API_KEY", "sk-test")
        monkeypatch.setenv(f"{kind.upper()}_BASE_URL", f"{server.url}/v1" if kind == "openai" else server.url)
        async with agent_environment(oncall, client=client, home=tmp_path / "live", record=recording) as env:
            live = await env.run("oncall", ASK, tenant="team-web", key=f"rec-{kind}", models=_models(kind))
            live_rows = _llm_rows(env, live.workflow_id)
        server.assert_script_done()
    assert live.status == "completed", live.reason
    assert [x["path"] for x in map(_json, recording.read_text().splitlines())] == [server.last.path] * 2

    # The server is gone, and so are the key and the base URL: the replay needs none of them.
    for var in ("API_KEY", "BASE_URL"):
        monkeypatch.delenv(f"{kind.upper()}_{var}")
    async with agent_environment(oncall, client=client, home=tmp_path / "replay", replay=recording) as env:
        again = await env.run("oncall", ASK, tenant="team-web", key=f"replay-{kind}", models=_models(kind))
        again_rows = _llm_rows(env, again.workflow_id)

    assert again.status == live.status == "completed" and again.output == live.output
    assert "payments is down" in again.output
    assert again.tools_executed == live.tools_executed == ["service_status"]
    assert (again.tokens, again.cost_usd) == (live.tokens, live.cost_usd) and again.cost_usd > 0
    assert again_rows == live_rows
    repaired = [r["repaired"] for r in again_rows if r["repaired"]]
    assert repaired == (["1 tool call(s) written as text (functions)"] if kind == "openai" else [])


async def test_a_request_missing_from_the_recording_fails_the_task_naming_it(
        client: Client, status: StatusService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recording = tmp_path / "oncall.jsonl"
    with FakeServer() as server:
        server.script(*REPLIES["openai"])
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")
        async with agent_environment(oncall, client=client, home=tmp_path / "live", record=recording) as env:
            await env.run("oncall", ASK, tenant="team-web", key="rec-miss", models=_models("openai"))

    changed = "Is the search service healthy?"
    async with agent_environment(oncall, client=client, home=tmp_path / "replay", replay=recording) as env:
        handle = await env.start("oncall", changed, tenant="team-web", key="miss", models=_models("openai"))
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), 60)
        cause = failed.value.cause
        while getattr(cause, "cause", None) is not None and not getattr(cause, "type", None):
            cause = cause.cause
        assert getattr(cause, "type", None) == errors.RECORDING_MISSING and getattr(cause, "non_retryable", False)
        message = str(cause)
        assert "openai:gpt-4o-mini, POST /v1/chat/completions" in message and str(recording) in message
        assert changed in message and f"KEEL_RECORD={recording}" in message
        assert f"messages[1].content: recorded '{ASK}', now '{changed}'" in message, message
        # What `keel run` shows.
        cli = await asyncio.to_thread(CliRunner().invoke, app, [
            "run", "oncall", changed, "--model", "openai:gpt-4o-mini", "--tenant", "team-web", "--key", "miss-cli",
            "--wait"],
            env={"TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
                 "KEEL_TASK_QUEUE": env.settings.task_queue, "KEEL_HOME": str(tmp_path / "home"),
                 "KEEL_DATABASE_URL": str(env.engine.url), "COLUMNS": "200"})
    assert cli.exit_code == 1
    assert "no recorded answer for this openai request" in cli.output and "KEEL_RECORD=" in cli.output


def _json(line: str) -> dict[str, Any]:
    import json

    out: dict[str, Any] = json.loads(line)
    return out
