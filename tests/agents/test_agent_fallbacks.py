"""An agent's fallback models (`keel.Agent(fallbacks=...)`) on the generic agent workflow: a model that
is unavailable (503) is retried to the end, then the call is made again on the next model of the chain,
recorded as a decision, with nothing charged for the failed model; an authentication error (401) is
never answered by another model."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from temporalio.client import Client, WorkflowFailureError

import keel
from activities.providers.base import ProviderResult, provider_error
from activities.providers.sim import SimProvider
from agents.support_desk import store, support_desk
from keel import registry
from keel.testing import agent_environment
from keel.types import LlmRequest

REQUEST = "Customer: C-1003\n\nWhy was I charged a fee of 4.90 EUR this month?"


class LargeModelDown:
    """The sim provider, with sim-large failing every call with `status`."""

    name = "sim"

    def __init__(self, status: int) -> None:
        self.status = status
        self.sim = SimProvider()
        self.asked: list[str] = []

    async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
        self.asked.append(req.model.model)
        if req.model.model == "sim-large":
            raise provider_error("sim", status=self.status, message="sim-large is down for this test")
        return await self.sim.complete(req, system)


@pytest.fixture
def desk_with_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, keel.Agent]]:
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    monkeypatch.setenv("KEEL_DATABASE_URL", url)
    store.reset()
    agent = dataclasses.replace(support_desk, prompt=support_desk.prompt_path(), fallbacks=["sim:sim-small"])
    monkeypatch.setitem(registry._AGENTS, "support_desk", agent)
    yield url, agent
    store.reset()


def llm_rows(engine: Any, workflow_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT step, model, attempt FROM ledger WHERE workflow_id = :w AND kind = 'llm' ORDER BY step"),
            {"w": workflow_id})]


async def test_an_unavailable_model_falls_back_to_the_next(own_ts_env: Any,
                                                          desk_with_fallback: tuple[str, keel.Agent]) -> None:
    url, agent = desk_with_fallback
    provider = LargeModelDown(503)
    # On the time-skipping server: the retries' backoff before each fallback is skipped.
    async with agent_environment(agent, client=own_ts_env.client, db_url=url, providers={"sim": provider}) as env:
        res = await env.run("support_desk", REQUEST, tenant="C-1003")
        rows = llm_rows(env.engine, res.workflow_id)
    assert res.status == "completed", res.reason
    fallbacks = [d for d in res.decisions if d.kind == "fallback"]
    assert fallbacks and all("ProviderUnavailable" in d.reason and "trying sim-small" in d.reason
                                 for d in fallbacks), fallbacks
    assert "sim-large" in provider.asked and set(res.models) == {"sim-small [sim (offline simulator)]"}
    assert {r["model"] for r in rows} == {"sim-small"}  # nothing charged for the failed model
    assert len(rows) == res.llm_calls


async def test_an_authentication_error_never_falls_back(client: Client,
                                                        desk_with_fallback: tuple[str, keel.Agent]) -> None:
    url, agent = desk_with_fallback
    provider = LargeModelDown(401)
    async with agent_environment(agent, client=client, db_url=url, providers={"sim": provider}) as env:
        handle = await env.start("support_desk", REQUEST, tenant="C-1003")
        try:
            res = await handle.result()
        except WorkflowFailureError as e:  # today the task fails with the provider's error (issue 16)
            res, failure = None, str(getattr(e.cause, "cause", None) or e.cause)
        rows = llm_rows(env.engine, handle.id)
    # The triage ran on the small tier; the first large-tier call met the 401 once and nothing else.
    assert provider.asked.count("sim-large") == 1
    assert provider.asked.index("sim-large") == len(provider.asked) - 1
    assert all(r["model"] == "sim-small" for r in rows)
    if res is not None:
        assert res.status != "completed" and "401" in res.reason, res
        assert not any(d.kind == "fallback" for d in res.decisions)
    else:
        assert "authentication failed (401)" in failure, failure
