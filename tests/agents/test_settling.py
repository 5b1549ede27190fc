"""A batch's tasks are awaited by one shared loop over the server's visibility store (starter.settling),
not by a progress-query loop per task: what each task ends as is the same as before."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

import keel
from agents.oncall.agent import oncall
from keel.testing import agent_environment
from starter import commands, settling


async def test_a_batch_settles_from_one_listing_a_round(
        client: Client, status: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_own_wait(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a task of the generic agent workflow was awaited on its own")

    listings: list[str] = []
    real_query = settling._query

    def counted(ids: list[str]) -> str:
        listings.append(",".join(ids))
        return real_query(ids)

    monkeypatch.setattr(commands, "settle", no_own_wait)
    monkeypatch.setattr(settling, "_query", counted)
    monkeypatch.setattr(settling, "CHUNK", 2)  # several listings a round
    key = uuid.uuid4().hex[:8]
    async with agent_environment(oncall, client=client, home=tmp_path) as env:
        inputs: list[keel.commands.Startable] = [
            keel.AgentInput(agent="oncall", input="Is the api service healthy?", key=f"a-{key}"),
            keel.AgentInput(agent="oncall", input="The payments service is down, please fix it.", key=f"b-{key}"),
            keel.AgentInput(agent="oncall", input="Is the api service healthy?", key=f"c-{key}"),
            keel.AgentInput(agent="no_such_agent", input="anything", key=f"d-{key}"),
            keel.AgentInput(agent="oncall", input="Is the api service healthy?", key=f"a-{key}"),
        ]
        items = await asyncio.wait_for(commands.run_batch(env.client, env.settings, inputs, 10, idempotent=True), 60)
        waiting = items[1]
        await env.client.get_workflow_handle(waiting.workflow_id).terminate("test over")
    assert [i.workflow_id for i in items] == [f"{i.agent}-{i.key}" for i in inputs]  # type: ignore[union-attr]
    assert [i.status for i in items] == ["completed", "awaiting_approval", "completed", "failed", "completed"]
    assert waiting.pending_action is not None and waiting.pending_action.tool == "restart_service"
    assert "no agent named 'no_such_agent'" in items[3].error
    assert items[0].result == items[4].result and sorted([items[0].existing, items[4].existing]) == [False, True]
    assert status.restarts == {}
    # Every listing names at most CHUNK tasks; each task was listed (not queried) until it settled.
    assert listings and all(len(ids.split(",")) <= 2 for ids in listings)
    assert {w for ids in listings for w in ids.split(",")} == {i.workflow_id for i in items}


def test_ids_that_cannot_be_quoted_are_awaited_on_their_own() -> None:
    assert settling._QUOTABLE.match("support_desk-TK-0-0001")
    assert not settling._QUOTABLE.match("x' OR WorkflowId != '")
    q = settling._query(["a-1", "b-2"])
    assert q.startswith("WorkflowId IN ('a-1', 'b-2') AND (ExecutionStatus != 'Running' OR KeelStatus IN (")
