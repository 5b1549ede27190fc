"""The swarm classifier: K peers of the triage agent (agents/triage) on the generic swarm pattern
(KeelSwarm), a vote on the category of their structured answers; no quorum goes to a human.

On the Temporal dev server with the real worker, the sim model and the real SQLite ledger; plus a
statistical check of the triage sim behaviour (how peers disagree) and `keel swarm` on the command line.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

import keel
from activities.ledger import Ledger
from agents.triage import Triage, triage
from agents.triage.sim import PRIORITY, candidate_categories, classify, first_mentioned
from keel import names
from keel.orchestration import SwarmInput, SwarmResult
from keel.testing import AgentEnvironment, agent_environment
from starter.swarm_cli import spread
from tests.agents.test_oncall import cli_env, keel_cli
from workers.worker import STRICT_SANDBOX
from workflows.registry import WORKFLOWS

SMALL = keel.ModelSpec(provider="sim", model="sim-small")
LARGE = keel.ModelSpec(provider="sim", model="sim-large")
CLEAR = "My card was declined at ShopNow yesterday, what is wrong with my card?"
SPLIT = "My card is declined at the ATM and I was charged twice at ShopNow."
"""Two categories match equally: a small model reads the first mentioned (card_issue), a large one the
one that decides who handles it first (refund_request)."""


def swarm_of(text: str, **kw: Any) -> SwarmInput:
    """`keel swarm`'s configuration: five triage peers over sim-small/sim-large, T from 0 to 1."""
    peers = kw.pop("peers", 5)
    fields: dict[str, Any] = {"agent": "triage", "input": text, "field": "category", "peers": peers, "quorum": 0.6,
                              "temperatures": spread(peers), "models": [SMALL, LARGE], "key": uuid.uuid4().hex[:10],
                              "tenant": "C-1001", **kw}
    return SwarmInput(**fields)


async def vote(env: AgentEnvironment, inp: SwarmInput) -> SwarmResult:
    res: SwarmResult = await env.vote(inp.agent, inp.input, inp.field, **inp.model_dump(
        exclude={"agent", "input", "field"}))
    return res


def queued(env: AgentEnvironment, workflow_id: str) -> list[str]:
    with env.engine.connect() as conn:
        return list(conn.execute(text("SELECT reason FROM human_queue WHERE workflow_id = :w"),
                                 {"w": workflow_id}).scalars())


def check_books(env: AgentEnvironment, res: SwarmResult) -> None:
    """The parent's usage is its family's in the ledger, to the token; each peer within its caps."""
    ledger = Ledger(env.engine)
    fam = ledger.family_totals(res.workflow_id)
    assert (fam["llm_calls"], fam["input_tokens"], fam["output_tokens"]) == (
        res.usage.llm_calls, res.usage.input_tokens, res.usage.output_tokens)
    assert ledger.task_totals(res.workflow_id)["llm_calls"] == 0  # the parent only counts
    for rec in res.children:
        t = ledger.task_totals(rec.workflow_id)
        assert (t["llm_calls"], t["tokens"]) == (rec.usage.llm_calls, rec.usage.tokens), rec
        assert rec.budget_tokens is not None and t["tokens"] <= rec.budget_tokens, rec
    assert res.budget.max_tokens is not None and res.usage.tokens <= res.budget.max_tokens
    assert res.budget.reserved_tokens == 0


async def test_peers_agree_on_a_clear_message(client: Client, tmp_path: Path) -> None:
    async with agent_environment(triage, client=client, home=tmp_path) as env:
        res = await vote(env, swarm_of(CLEAR))
        child = client.get_workflow_handle(res.children[0].workflow_id)
        desc = await child.describe()
        started = (await child.fetch_history()).events[0].workflow_execution_started_event_attributes
        peer_input = json.loads(started.input.payloads[0].data)
        with env.engine.connect() as conn:
            rows = conn.execute(text("SELECT workflow_id, model, tenant, parent_workflow_id FROM ledger "
                                     "WHERE kind = 'llm' AND parent_workflow_id = :w ORDER BY workflow_id"),
                                {"w": res.workflow_id}).all()
        human = queued(env, res.workflow_id)
        check_books(env, res)
    assert res.status == "completed", res.reason
    assert res.value == "card_issue" and res.votes == {'"card_issue"': 5} and res.agreement == 1.0
    assert [a.name for a in res.answers] == [f"peer-{i}" for i in range(1, 6)]
    assert [a.temperature for a in res.answers] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [a.model for a in res.answers] == ["sim-small", "sim-large"] * 2 + ["sim-small"]
    for a in res.answers:  # every peer's whole structured answer is kept
        t = Triage.model_validate(a.answer)
        assert t.category == "card_issue" and t.urgency == "normal" and t.confidence > 0.8
    assert [c.workflow_id for c in res.children] == [f"{res.workflow_id}/peer-{i}" for i in range(1, 6)]
    assert desc.parent_id == res.workflow_id  # real child workflows: the UI shows them under the parent
    assert peer_input["dry_run"] is True and peer_input["approval_mode"] == "escalate"  # peers cannot act
    # Each peer's one call ran on its own model, tagged with its tenant and its parent.
    assert [(r.model, r.tenant) for r in rows] == [(a.model, "C-1001") for a in res.answers]
    assert human == []


async def test_a_split_swarm_goes_to_a_human_with_every_answer(client: Client, tmp_path: Path) -> None:
    # Greedy peers (T=0) on two models read the message apart: three small ones card_issue, two large
    # ones refund_request. 3 of 5 is not more than the quorum 0.6.
    inp = swarm_of(SPLIT, temperatures=[0.0])
    async with agent_environment(triage, client=client, home=tmp_path) as env:
        res = await vote(env, inp)
        human = queued(env, res.workflow_id)
        check_books(env, res)
        # Deterministic: the parent's and a peer's histories replay against today's code.
        replayer = Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter,
                            workflow_runner=STRICT_SANDBOX)
        for wid in (res.workflow_id, res.children[1].workflow_id):
            await replayer.replay_workflow(await client.get_workflow_handle(wid).fetch_history())
    assert candidate_categories(SPLIT) == ["refund_request", "card_issue"]
    assert {a.name: a.value for a in res.answers} == {
        "peer-1": "card_issue", "peer-2": "refund_request", "peer-3": "card_issue", "peer-4": "refund_request",
        "peer-5": "card_issue"}
    assert res.votes == {'"card_issue"': 3, '"refund_request"': 2}
    assert res.status == "escalated" and res.value is None and res.agreement == pytest.approx(0.6)
    assert "no agreement on category" in res.reason and "not more than the quorum 60%" in res.reason
    assert len(human) == 1 and "no agreement on category" in human[0]
    assert all(not a.problem and a.answer is not None for a in res.answers)  # nobody dropped


async def test_the_swarm_budget_bounds_the_peers(client: Client, tmp_path: Path) -> None:
    async with agent_environment(triage, client=client, home=tmp_path) as env:
        # 5 peers of 2,000 tokens do not fit 6,000: each gets an equal share, and the family stays in it.
        shrunk = await vote(env, swarm_of(CLEAR, budget=keel.Budget(max_tokens=6_000, max_usd=None)))
        check_books(env, shrunk)
        # 600 tokens each cannot hold one classification call: the kill switch refuses every call
        # before it is made, nothing is spent, and no vote is taken.
        starved = await vote(env, swarm_of(CLEAR, budget=keel.Budget(max_tokens=3_000, max_usd=None)))
        check_books(env, starved)
        # Below 500 tokens a peer is not started at all.
        unstarted = await vote(env, swarm_of(CLEAR, budget=keel.Budget(max_tokens=2_000, max_usd=None)))
    assert [c.budget_tokens for c in shrunk.children] == [1_200] * 5
    assert shrunk.status == "completed" and shrunk.value == "card_issue" and shrunk.usage.tokens <= 6_000
    assert starved.status == "budget_exceeded" and starved.usage.llm_calls == 0, starved.reason
    assert all(a.status == "budget_exceeded" and a.problem for a in starved.answers)
    assert unstarted.status in ("escalated", "budget_exceeded") and unstarted.usage.llm_calls == 0
    assert all(c.status == "not_started" for c in unstarted.children) and len(unstarted.answers) == 5


async def test_invalid_answers_are_abstentions_not_votes(client: Client, tmp_path: Path) -> None:
    # Every sim answer is broken: wrapped in chatter (the agent reads the JSON out of it) or truncated
    # (invalid; sent back once, then the peer gives up). Under this key peers 4 and 5 stay invalid.
    inp = swarm_of(CLEAR, key="bad-2", sim=keel.SimConfig(invalid_json_rate=1.0))
    async with agent_environment(triage, client=client, home=tmp_path) as env:
        res = await vote(env, inp)
        human = queued(env, res.workflow_id)
        check_books(env, res)
    assert len(res.answers) == 5  # nobody dropped
    abstained = [a for a in res.answers if a.problem]
    assert [a.name for a in abstained] == ["peer-4", "peer-5"]
    for a in abstained:
        assert a.status == "escalated" and a.value is None and "no valid answer after 2 invalid outputs" in a.problem
    assert [c.usage.llm_calls for c in res.children][3:] == [2, 2]  # the answer, and one retry of it
    # Abstentions count against agreement: 3 agreeing of 5 is 0.6, not more than the quorum.
    assert res.votes == {'"card_issue"': 3} and res.agreement == pytest.approx(0.6)
    assert res.status == "escalated" and len(human) == 1


async def test_keel_swarm_on_the_command_line(client: Client, tmp_path: Path) -> None:
    async with agent_environment(triage, client=client, home=tmp_path) as env:
        cli = cli_env(env, tmp_path)
        out = await keel_cli(cli, "swarm", SPLIT, "--tenant", "C-1001", "--peers", "3", "--json")
        table = await keel_cli(cli, "swarm", CLEAR, "--tenant", "C-1001", "--peers", "4", "--key", "cli-1")
        shown = await keel_cli(cli, "result", "swarm-cli-1")
        split = await keel_cli(cli, "swarm", SPLIT, "--peers", "5", "--models", "sim:sim-large,sim:sim-small",
                               "--key", "cli-2")
        bad = await keel_cli(cli, "swarm", "  ")
        nobody = await keel_cli(cli, "swarm", CLEAR, "--agent", "nobody")
    assert out.exit_code == 0, out.output
    doc = SwarmResult.model_validate_json(out.output.strip().splitlines()[-1])
    assert len(doc.answers) == 3 and doc.status in ("completed", "escalated")
    assert table.exit_code == 0, table.output
    assert "started swarm-cli-1" in table.output and "/workflows/swarm-cli-1" in table.output
    assert all(f"peer-{i}" in table.output for i in range(1, 5)) and "card_issue 4" in table.output
    assert "agreed" in table.output and "agreement 1.00" in table.output and "no human needed" in table.output
    assert "urgency" in table.output and "confidence" in table.output and "LLM calls" in table.output
    assert shown.exit_code == 0 and "agreement 1.00" in shown.output, shown.output
    # Large, small, large, small, large at T 0..1: the greedy ones (T=0) and the cold ones split it.
    assert split.exit_code == 0, split.output
    assert ("a human decides" in split.output) == ("agreed" not in split.output), split.output
    assert bad.exit_code == 2 and "the text is empty" in bad.output
    assert nobody.exit_code == 2 and "no agent 'nobody'" in nobody.output


# --- the sim peers: a statistical check (pure, no server) -----------------------------------------
def peer(text: str, model: str, temperature: float, key: str) -> str:
    return str(classify(text, model, temperature, random.Random(key))["category"])


def agreement(text: str, temperatures: list[float], models: list[str], key: str) -> float:
    votes = [peer(text, models[i % len(models)], t, f"{key}-peer-{i + 1}") for i, t in enumerate(temperatures)]
    return max(votes.count(v) for v in set(votes)) / len(votes)


CLEAR_MESSAGES = {
    "card_issue": CLEAR,
    "refund_request": "I was charged twice for the same order, I want my money back.",
    "account_access": "I cannot log in since yesterday, my password is not accepted.",
    "billing_question": "Why is there an overdraft on my statement this month?",
    "fraud_report": "There are payments on my account I do not recognise. Someone stole my details.",
    "general_inquiry": "What are your opening hours on Saturday?",
}


def test_sim_peers_agree_on_clear_messages_and_split_on_ambiguous_ones() -> None:
    temps = spread(5)
    for category, msg in CLEAR_MESSAGES.items():
        assert candidate_categories(msg) == [category], msg
        for run in range(20):
            assert agreement(msg, temps, ["sim-small", "sim-large"], f"clear-{run}") == 1.0

    # Two clear messages in one, the one a large model would put first mentioned second.
    pairs = [("card_issue", "refund_request"), ("billing_question", "account_access"),
             ("refund_request", "account_access"), ("card_issue", "billing_question")]
    runs = 40
    agreements = []
    for a, b in pairs:
        msg = f"{CLEAR_MESSAGES[a]} Also: {CLEAR_MESSAGES[b]}"
        cands = candidate_categories(msg)
        assert len(cands) >= 2 and cands == [c for c in PRIORITY if c in cands], msg
        for run in range(runs):
            votes = [peer(msg, ["sim-small", "sim-large"][i % 2], t, f"amb-{run}-peer-{i}") for i, t in
                     enumerate(temps)]
            assert set(votes) <= set(cands)  # peers only pick among the readings the text supports
            agreements.append(max(votes.count(v) for v in set(votes)) / 5)
        # Greedy peers (T=0) of one model agree whatever their seeds; the two tiers read it apart.
        assert {peer(msg, "sim-large", 0.0, f"g{s}") for s in range(10)} == {cands[0]}
        assert {peer(msg, "sim-small", 0.0, f"g{s}") for s in range(10)} == {first_mentioned(msg, cands)}
    assert len(set(agreements)) > 1 and statistics.mean(agreements) < 0.8
    assert sum(a <= 0.6 for a in agreements) > len(agreements) / 2  # most ambiguous runs go to a human

    # Hotter swarms disagree more (one model, the same seeds, one ambiguous message).
    mean_at = {t: statistics.mean(agreement(SPLIT, [t] * 5, ["sim-large"], f"hot-{r}") for r in range(runs))
               for t in (0.1, 0.5, 0.9)}
    assert mean_at[0.1] > mean_at[0.5] > mean_at[0.9], mean_at


def test_sim_peers_are_deterministic_and_monotone_in_temperature() -> None:
    for key, t, u in itertools.product(["a", "b", "c", "d"], [0.2, 0.5], [0.6, 0.9]):
        first = classify(SPLIT, "sim-large", t, random.Random(key))
        assert classify(SPLIT, "sim-large", t, random.Random(key)) == first
        if first["category"] != "refund_request":  # left the greedy reading at T: so it does at T' > T
            assert classify(SPLIT, "sim-large", u, random.Random(key))["category"] == first["category"]
    for category, msg in CLEAR_MESSAGES.items():  # every sim answer is a valid structured answer
        assert Triage.model_validate(classify(msg, "sim-small", 1.0, random.Random(category))).category == category


def test_the_prompt_lists_every_category() -> None:
    prompt = (triage.prompt_dir / "triage.v1.md").read_text()
    assert all(f'"{c}"' in prompt for c in PRIORITY)
    assert set(PRIORITY) == set(Triage.model_json_schema()["properties"]["category"]["enum"])
    assert names.SWARM_AGENTS_WORKFLOW == "KeelSwarm"
