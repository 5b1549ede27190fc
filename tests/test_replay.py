"""Replay: recorded histories under tests/histories/ must replay against today's workflow code, and a
history that no longer matches the code must be caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner
from temporalio.workflow import NondeterminismError

from keel.settings import KeelSettings
from tests.conftest import run_ticket, ticket
from workers.worker import SANDBOX, STRICT_SANDBOX
from workflows.registry import WORKFLOWS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
TICKET_HISTORY = Path(__file__).parent / "histories" / "ticket_v1.json"
"""The history the tampering tests change (recorded under its file name as the workflow id)."""


def replayer(runner: SandboxedWorkflowRunner = STRICT_SANDBOX) -> Replayer:
    return Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter, workflow_runner=runner)


def test_there_are_recorded_histories() -> None:
    assert HISTORIES, "tests/histories/ should hold at least one recorded ticket history"


@pytest.mark.parametrize("runner", [STRICT_SANDBOX, SANDBOX], ids=["strict", "shared"])
@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays(path: Path, runner: SandboxedWorkflowRunner) -> None:
    # The recorded workflow id (a pattern's children's ids derive from it): the file name, `__` for `/`.
    # Both sandboxes: the tests' strict one checks the modules, the workers' shared one is what runs.
    history = WorkflowHistory.from_json(path.stem.replace("__", "/"), path.read_text())  # noqa: ASYNC240
    await replayer(runner).replay_workflow(history)


async def test_changed_history_is_detected() -> None:
    """A history whose commands differ from what the code does now must fail replay, loudly."""
    path = TICKET_HISTORY
    doc = json.loads(path.read_text())
    for event in doc["events"]:
        attrs = event.get("activityTaskScheduledEventAttributes")
        if attrs and attrs["activityType"]["name"] != "llm_call":
            attrs["activityType"]["name"] = "close_account"
            break
    history = WorkflowHistory.from_json(path.stem, json.dumps(doc))
    with pytest.raises(NondeterminismError):
        await replayer().replay_workflow(history)


async def test_run_then_replay(client: Client, settings: KeelSettings, worker_factory) -> None:
    async with worker_factory(client):
        res = await run_ticket(client, settings, ticket("C-1003", "My card keeps getting declined online.",
                                                        spiral_rate=1.0, hallucinated_tool_rate=0.3))
    history = await client.get_workflow_handle(res.workflow_id).fetch_history()
    await replayer().replay_workflow(history)
