"""Bad configuration and refused writes, said clearly (issue 16): a model the worker cannot call (no
OPENAI_API_KEY) hands the task to a person with the reason (a human-queue row and an outcome row, the CLI
saying why), not a failed workflow; a call the tool refused is not in `tools_executed` but in
`tools_blocked` with the tool's reason; a TEMPORAL_ADDRESS without a port and a KEEL_HOME that is a file
are one-line settings errors."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from temporalio.client import Client
from typer.testing import CliRunner

import keel
from agents.oncall.status_service import StatusService
from keel.testing import SCRIPTED, ScriptedModel, Step, answer
from keel.types import ToolCall
from starter.cli import app
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
