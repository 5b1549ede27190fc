"""Two generic controls a support desk needs, for any agent: a triage (a first, cheap call whose
structured answer routes the task, acknowledges it at once and becomes the agent's context) and a
hands-off tool (a successful call ends the task in the human queue with its reason). On the real dev
server, with the scripted model (which fails on a step it does not have) and with the sim."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field
from temporalio.client import Client

import keel
from keel.testing import ScriptedModel, agent_environment, answer, call
from keel.types import Progress

HANDED: list[str] = []
PINGED: list[str] = []


class Sorting(BaseModel):
    kind: Literal["question", "outage", "abuse"]
    confidence: float = Field(ge=0, le=1)


def route(s: Sorting) -> str | None:
    if s.kind == "abuse":
        return "abuse reports are always handled by a person"
    return f"low confidence ({s.confidence:.2f})" if s.confidence < 0.6 else None


def acknowledge(s: Sorting) -> str:
    return f"We have your {s.kind} and are on it."


class PingArgs(keel.Args):
    host: str


class HandArgs(keel.Args):
    reason: str = Field(min_length=3)
    priority: Literal["normal", "urgent"] = "normal"


@keel.tool
def ping(ctx: keel.ToolContext, args: PingArgs) -> dict[str, object]:
    """Whether a host answers."""
    PINGED.append(args.host)
    return {"host": args.host, "up": True}


@keel.tool(permission="autonomous", hands_off=True)
def hand_to_person(ctx: keel.ToolContext, args: HandArgs) -> dict[str, object]:
    """Give this request to a person on the team."""
    HANDED.append(ctx.idempotency_key)
    return {"case": f"CASE-{len(HANDED)}", "priority": args.priority}


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    (tmp_path / "desk.v1.md").write_text("You check hosts with ping, then answer in one sentence.\n")
    (tmp_path / "desk_triage.v1.md").write_text("Sort the request: kind and confidence, as JSON.\n")
    return tmp_path


def desk(prompts: Path, models: str = "scripted:scripted") -> keel.Agent:
    triage = keel.Triage(prompt=prompts / "desk_triage.v1.md", output_type=Sorting, route=route,
                         acknowledge=acknowledge)
    return keel.Agent(name=f"desk_{uuid.uuid4().hex[:8]}", prompt=prompts / "desk.v1.md",
                      tools=[ping, hand_to_person], models=models, triage=triage)


async def test_the_triage_answers_first_then_becomes_the_agents_context(client: Client, prompts: Path) -> None:
    agent = desk(prompts)
    model = ScriptedModel([answer('{"kind": "outage", "confidence": 0.9}'), call("ping", host="db-1"),
                           answer("db-1 answers.")])
    PINGED.clear()
    async with agent_environment(agent, model=model, client=client) as env:
        handle = await env.start(agent.name, "Is db-1 down?")
        res = await handle.result()
        progress = await handle.query("progress", result_type=Progress)
    model.assert_all_used()
    assert res.status == "completed", res.reason
    assert res.triage == {"kind": "outage", "confidence": 0.9}
    assert progress.acknowledgement == "We have your outage and are on it."
    first, second = model.calls[0], model.calls[1]
    assert "Sort the request" in first.system and first.tools == []
    assert "check hosts" in second.system and second.tools == ["ping", "hand_to_person"]
    assert any(m.content.startswith("Triage: ") and '"outage"' in m.content for m in second.messages)
    assert PINGED == ["db-1"]


@pytest.mark.parametrize("verdict, reason", [('{"kind": "abuse", "confidence": 0.99}', "always handled by a person"),
                                             ('{"kind": "question", "confidence": 0.3}', "low confidence (0.30)")])
async def test_the_triage_routes_to_a_human_before_any_tool(client: Client, prompts: Path, verdict: str,
                                                             reason: str) -> None:
    agent = desk(prompts)
    model = ScriptedModel([answer(verdict)])
    PINGED.clear()
    async with agent_environment(agent, model=model, client=client) as env:
        res = await env.run(agent.name, "Ping db-1 please")
    model.assert_all_used()
    assert res.status == "escalated" and reason in res.reason and res.reason.startswith("triage: ")
    assert res.triage is not None and res.tools_executed == [] and PINGED == []


async def test_an_invalid_triage_is_sent_back_then_a_human_takes_the_task(client: Client, prompts: Path) -> None:
    agent = desk(prompts)
    model = ScriptedModel([answer("an outage, I think"), answer('{"kind": "outage", "confidence": 2}')])
    async with agent_environment(agent, model=model, client=client) as env:
        res = await env.run(agent.name, "Is db-1 down?")
    model.assert_all_used()
    assert res.status == "escalated" and "could not be triaged" in res.reason
    assert [d.kind for d in res.decisions].count("invalid_output") == 2
    assert "Your answer was not accepted" in model.calls[1].messages[-1].content
    assert res.triage is None and res.tools_executed == []


async def test_a_hands_off_tool_ends_the_task_with_a_person_and_its_reason(client: Client, prompts: Path) -> None:
    agent = desk(prompts)
    model = ScriptedModel([answer('{"kind": "question", "confidence": 0.8}'),
                           call("hand_to_person", reason="needs a contract decision", priority="urgent")])
    HANDED.clear()
    async with agent_environment(agent, model=model, client=client) as env:
        res = await env.run(agent.name, "Can we extend the contract?")
    model.assert_all_used()  # no model call after the hand-off
    assert res.status == "escalated"
    assert res.reason == "hand_to_person: needs a contract decision"
    assert res.tools_executed == ["hand_to_person"] and len(HANDED) == 1


async def test_on_the_sim_an_agent_without_a_triage_behaviour_gets_one_from_the_schema(
        client: Client, prompts: Path) -> None:
    agent = desk(prompts, models="sim:sim-small")
    async with agent_environment(agent, client=client) as env:
        res = await env.run(agent.name, "Is db-1 down?", sim=keel.SimConfig(spiral_rate=0))
    assert res.triage is not None and Sorting.model_validate(res.triage)


def test_a_triage_prompt_must_sit_beside_the_agents_with_every_version(tmp_path: Path, prompts: Path) -> None:
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "desk_triage.v1.md").write_text("x")
    with pytest.raises(keel.AgentDefinitionError, match="beside the agent's prompt"):
        keel.Agent(name="desk_far", prompt=prompts / "desk.v1.md",
                   triage=keel.Triage(prompt=elsewhere / "desk_triage.v1.md", output_type=Sorting))
    (prompts / "desk.v2.md").write_text("v2")
    with pytest.raises(keel.AgentDefinitionError, match="version v2 has no triage prompt"):
        keel.Agent(name="desk_v2", prompt=prompts / "desk.v1.md",
                   triage=keel.Triage(prompt=prompts / "desk_triage.v1.md", output_type=Sorting))
    with pytest.raises(keel.AgentDefinitionError, match="pydantic model"):
        keel.Triage(prompt=prompts / "desk_triage.v1.md", output_type=dict)  # type: ignore[arg-type]
