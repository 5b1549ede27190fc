"""The swarm pattern over any agent with a structured answer: K peers under one budget, a vote on one
field, no agreement to a human, peers that never act."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from sqlalchemy import text
from temporalio.client import Client

import keel
from agents.oncall.agent import incident_note, oncall
from agents.oncall.status_service import StatusService
from keel.orchestration import PeerAnswer, SwarmInput, SwarmResult, tally
from keel.testing import ScriptedModel, agent_environment, answer, call
from tests.agents.test_oncall import cli_env, keel_cli


class Label(BaseModel):
    label: str


LABELER = keel.Agent(name="labeler", prompt=str(Path(__file__).parent / "prompts" / "labeler.v1.md"),
                     models="scripted:scripted", budget=keel.Budget(max_tokens=1_500, max_usd=0.01), output_type=Label)


@pytest.fixture
def status(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatusService]:
    with StatusService() as svc:
        monkeypatch.setenv("ONCALL_STATUS_URL", svc.url)
        yield svc


def labels(*values: str) -> ScriptedModel:
    return ScriptedModel([answer(json.dumps({"label": v})) for v in values])


async def test_the_majority_value_wins(client: Client, tmp_path: Path) -> None:
    model = labels("billing", "billing", "fraud")
    async with agent_environment(LABELER, model=model, client=client, home=tmp_path) as env:
        res = await env.vote("labeler", "Why was I charged twice?", "label", peers=3, key=uuid.uuid4().hex)
    model.assert_all_used()
    assert res.status == "completed", res.reason
    assert res.value == "billing" and res.votes == {'"billing"': 2, '"fraud"': 1}
    assert res.agreement == pytest.approx(2 / 3)
    assert [c.name for c in res.children] == ["peer-1", "peer-2", "peer-3"]
    assert sorted(a.answer["label"] for a in res.answers if a.answer) == ["billing", "billing", "fraud"]
    assert [a.temperature for a in res.answers] == [0.0, 0.4, 0.8] and all(a.model == "" for a in res.answers)
    assert res.usage.tokens == sum(c.usage.tokens for c in res.children) <= 20_000


async def test_no_agreement_goes_to_a_human(client: Client, tmp_path: Path) -> None:
    model = labels("billing", "fraud", "cards")
    async with agent_environment(LABELER, model=model, client=client, home=tmp_path) as env:
        res = await env.vote("labeler", "Something is wrong", "label", peers=3, key=uuid.uuid4().hex)
        with env.engine.connect() as conn:
            queued = conn.execute(text("SELECT reason FROM human_queue WHERE workflow_id = :w"),
                                  {"w": res.workflow_id}).scalars().all()
    assert res.status == "escalated" and res.value is None
    assert "no agreement on label" in res.reason and len(queued) == 1


async def test_peers_never_act(client: Client, status: StatusService, tmp_path: Path) -> None:
    # Every peer proposes the restart (approval mode escalate, dry run): none is executed.
    steps = []
    for _ in range(3):
        steps += [call("service_status", service="payments"),
                  call("restart_service", service="payments", reason="payments is down")]
    model = ScriptedModel(steps)
    scripted_oncall = keel.Agent(name="oncall_voter", prompt=oncall.prompt_dir / "oncall.v1.md",
                                 tools=list(oncall.tools), models="scripted:scripted",
                                 approvers={"restart_service": ["sre-lead"]}, output_type=Label)
    async with agent_environment(scripted_oncall, model=model, client=client, home=tmp_path) as env:
        res = await env.vote("oncall_voter", "Payments is failing", "label", peers=3, key=uuid.uuid4().hex)
    assert status.restarts == {}  # proposed three times, executed never
    assert res.status == "escalated"
    model.assert_all_used()
    assert all(a.problem for a in res.answers)


async def test_an_agent_without_a_structured_answer_is_refused(client: Client, tmp_path: Path) -> None:
    async with agent_environment(oncall, incident_note, client=client, home=tmp_path) as env:
        res = await env.vote("oncall", "Is api up?", "label", key=uuid.uuid4().hex)
        missing = await env.vote("nobody", "Is api up?", "label", key=uuid.uuid4().hex)
    assert res.status == "rejected" and "declares no structured answer" in res.reason and res.children == []
    assert missing.status == "rejected" and "no agent 'nobody'" in missing.reason


async def test_peers_are_shrunk_to_shares_of_the_parent_budget(client: Client, tmp_path: Path) -> None:
    model = labels("a", "a", "a", "a")
    async with agent_environment(LABELER, model=model, client=client, home=tmp_path) as env:
        res = await env.vote("labeler", "Label this", "label", peers=4, key=uuid.uuid4().hex,
                             budget=keel.Budget(max_tokens=4_000, max_usd=None))
    assert [c.budget_tokens for c in res.children] == [1_000] * 4
    assert res.status == "completed" and res.usage.tokens <= 4_000


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=9), st.floats(0.1, 0.9))
def test_a_winner_has_more_than_the_quorum_and_no_tie(values: list[str], quorum: float) -> None:
    answers = [PeerAnswer(name=f"p{i}", status="completed", value=v) for i, v in enumerate(values)]
    value, votes, share, why = tally(answers, len(values), quorum)
    assert sum(votes.values()) == len(values)
    counts = sorted(votes.values(), reverse=True)
    if value is None:
        assert why and (share <= quorum or (len(counts) > 1 and counts[0] == counts[1]))
    else:
        assert not why and share > quorum and votes[json.dumps(value)] == counts[0]
        assert len(counts) == 1 or counts[0] > counts[1]


async def test_keel_vote_on_the_command_line(client: Client, tmp_path: Path) -> None:
    model = labels("fees", "fees", "fees")
    async with agent_environment(LABELER, model=model, client=client, home=tmp_path) as env:
        out = await keel_cli(cli_env(env, tmp_path), "vote", "labeler", "A fee I do not know", "--field", "label",
                             "--json")
    assert out.exit_code == 0, out.output
    res = SwarmResult.model_validate_json(out.output.strip().splitlines()[-1])
    assert res.status == "completed" and res.value == "fees" and res.agreement == 1.0


def test_a_swarm_input_is_checked_before_it_starts() -> None:
    with pytest.raises(ValueError, match="blank"):
        SwarmInput(agent="labeler", input="   ", field="label")
    with pytest.raises(ValueError, match="at least 1 item"):
        SwarmInput(agent="labeler", input="x", field="label", temperatures=[])
    with pytest.raises(ValueError, match="less than or equal to 2"):
        SwarmInput(agent="labeler", input="x", field="label", temperatures=[0.0, 3.0])
