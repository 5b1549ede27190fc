"""Approvals of a `confirm` tool on the generic agent workflow (KeelAgent), with the support desk's refunds,
on the real Temporal dev server: a decision binds an approver, an action and its exact arguments (the
update's validator refuses the rest at once; signals that cannot be refused are recorded and ignored); a
rejection never writes; an edit runs the edited arguments once, an edit past the agent's own rules never
runs; silence past the approval timeout hands the task to a person; and a hypothesis property drives
arbitrary model output and approval traffic through the workflow: no refund ever runs without a listed
approver's approval of that action, nothing is written for another customer, no foreign PII leaves, and
every example's history replays. (The agent-path twin of tests/test_guardrails.py's ticket tests.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import Engine
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

import keel
from activities.providers.base import ProviderResult
from agents.support_desk import store, support_desk
from agents.support_desk.data import build_seed
from keel import names
from keel.testing import AgentEnvironment, agent_environment
from keel.types import ApprovalDecision, LlmRequest, PendingAction, ToolCall, Usage
from starter.approvals_cli import ApprovalError, decide, pending_action
from tests.agents.conftest import rows
from tests.conftest import assert_eventually
from workers.worker import STRICT_SANDBOX
from workflows.registry import WORKFLOWS

SEED = build_seed()
APPROVERS = support_desk.approvers["issue_refund"]
RECENT_DUPLICATES = [t for t in SEED["transactions"] if t["duplicate_of"] and t["days_ago"] <= 20]
"""One duplicate charge per test task, each of another customer, seen by get_transactions' default window."""


def ask(customer: str, body: str) -> str:
    return f"Customer: {customer}\n\n{body}"


def refund_request(i: int) -> tuple[str, dict[str, Any]]:
    t = RECENT_DUPLICATES[i]
    return t["customer_id"], t


def refunds(engine: Engine, workflow_id: str | None = None) -> list[dict[str, Any]]:
    store.engine_for()  # the agent's tables exist even when no tool of this test ran
    if workflow_id is None:
        return rows(engine, "SELECT * FROM support_desk_refunds ORDER BY id")
    return rows(engine, "SELECT * FROM support_desk_refunds WHERE idempotency_key LIKE :k ORDER BY id",
                k=f"{workflow_id}/%")


def guardrail_rows(engine: Engine, workflow_id: str) -> list[dict[str, Any]]:
    return rows(engine, "SELECT tool, status, reason FROM ledger WHERE workflow_id = :w AND kind = 'guardrail'",
                w=workflow_id)


@contextlib.asynccontextmanager
async def desk(client: Client, db_url: str, **kw: Any) -> AsyncIterator[AgentEnvironment]:
    async with agent_environment(support_desk, client=client, db_url=db_url, **kw) as env:
        yield env


async def start_refund(env: AgentEnvironment, i: int, **fields: Any) -> tuple[WorkflowHandle[Any, Any], PendingAction]:
    """A refund request on the sim: it reads, then proposes issue_refund of the duplicate, and waits."""
    customer, t = refund_request(i)
    body = f"I was charged twice at {t['merchant']} for {t['amount']:.2f} EUR. Please refund the duplicate charge."
    handle = await env.start("support_desk", ask(customer, body), tenant=customer, **fields)
    action = await assert_eventually(lambda: pending_action(env.client, handle.id), lambda a: a is not None)
    assert action is not None and action.tool == "issue_refund", action
    assert action.arguments["transaction_id"] == t["id"]
    return handle, action


async def test_a_decision_binds_the_approver_the_action_and_its_arguments(client: Client, db_url: str) -> None:
    async with desk(client, db_url) as env:
        handle, action = await start_refund(env, 0)
        assert action.approvers == APPROVERS and action.arguments_digest
        assert refunds(env.engine, handle.id) == []
        # The update's validator refuses at once; nothing reaches the history.
        with pytest.raises(ApprovalError, match="'mallory' is not an approver of issue_refund"):
            await decide(client, handle.id, "mallory", "approve")
        # Signals cannot be refused: recorded with the reason, and ignored.
        for bad in (ApprovalDecision(action_id=action.action_id, approver="mallory", decision="approve"),
                    ApprovalDecision(action_id="issue_refund#9", approver="alice", decision="approve"),
                    ApprovalDecision(action_id=action.action_id, approver="alice", decision="approve",
                                     arguments_digest="0" * 64)):
            await handle.signal(names.APPROVAL_SIGNAL, bad)
        _, record = await decide(client, handle.id, "alice", "approve", comment="duplicate charge confirmed")
        assert record.accepted
        with pytest.raises(ApprovalError):  # a second decision on the same action
            await decide(client, handle.id, "bob", "approve")
        res = await handle.result()
        made = refunds(env.engine, handle.id)
        guard = guardrail_rows(env.engine, handle.id)
        events = [e async for e in handle.fetch_history_events()]
    assert res.status == "completed", res.reason
    assert [(r["transaction_id"], r["amount"]) for r in made] == [
        (action.arguments["transaction_id"], action.arguments["amount"])]
    assert [(a.approver, a.accepted) for a in res.approvals] == [
        ("mallory", False), ("alice", False), ("alice", False), ("alice", True)]
    assert [a.note.split(" (")[0] for a in res.approvals[:3]] == [
        "'mallory' is not an approver of issue_refund",
        f"action 'issue_refund#9' is not pending; the pending action is '{action.action_id}'",
        f"the decision was made on other arguments than those of {action.action_id}"]
    assert sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED for e in events) == 1
    assert sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED for e in events) == 3
    assert sum(g["status"] == "approval" for g in guard) == 4


async def test_rejected_edited_and_out_of_policy_edits(client: Client, db_url: str) -> None:
    async with desk(client, db_url) as env:
        rejected, _ = await start_refund(env, 1)
        await decide(client, rejected.id, "bob", "reject", comment="not a duplicate")
        edited, action = await start_refund(env, 2)
        with pytest.raises(WorkflowUpdateFailedError, match="update failed"):  # an edit without arguments
            await edited.execute_update(names.DECIDE_UPDATE, ApprovalDecision(
                action_id=action.action_id, approver="alice", decision="edit"))
        half = round(float(action.arguments["amount"]) / 2, 2)
        await decide(client, edited.id, "alice", "edit", arguments={**action.arguments, "amount": half})
        too_much, action3 = await start_refund(env, 3)
        await decide(client, too_much.id, "alice", "edit", arguments={**action3.arguments, "amount": 9_999.0})
        r1, r2, r3 = await rejected.result(), await edited.result(), await too_much.result()
        made = {h.id: refunds(env.engine, h.id) for h in (rejected, edited, too_much)}
    assert made[rejected.id] == [] and "issue_refund" not in r1.tools_executed
    assert any(d.kind == "rejected" and "bob" in d.reason for d in r1.decisions), r1.decisions
    assert "refunded" not in r1.output.lower() or r1.status != "completed"
    assert [r["amount"] for r in made[edited.id]] == [half], (r2.decisions, r2.tools_blocked)
    assert r2.approvals[-1].decision == "edit" and r2.approvals[-1].accepted
    assert made[too_much.id] == []
    assert any("exceeds the policy maximum" in b.reason for b in r3.tools_blocked), r3.tools_blocked


async def test_silence_past_the_approval_timeout_hands_the_task_to_a_person(client: Client, db_url: str) -> None:
    async with desk(client, db_url) as env:
        handle, action = await start_refund(env, 4, approval_timeout_s=1.0)
        res = await handle.result()
        made = refunds(env.engine, handle.id)
    assert res.status == "escalated", res.reason
    assert f"no decision on {action.action_id} (issue_refund) within the approval timeout" in res.reason
    assert made == []


# -- the property: any model output, any approval traffic -----------------------------------------------
OWN = "C-1001"
OWN_TX = [t for t in SEED["transactions"] if t["customer_id"] == OWN]
OWN_RECENT = sorted((t for t in OWN_TX if t["days_ago"] <= 30), key=lambda t: t["days_ago"])[:20]
OTHER = "C-1002"
OTHER_TX = [t for t in SEED["transactions"] if t["customer_id"] == OTHER]
FOREIGN_PII = ("bob@evil.example", "7946 0958")


@dataclass
class Script:
    turns: list[list[tuple[str, str]]]
    """Per loop call: the tool calls (name, arguments JSON) the model answers with."""
    final: str
    decisions: list[tuple[str, str, str]]
    """Per approval request, in order: (approver, verdict, "right" | "wrong" action id)."""
    sent: list[tuple[str, ApprovalDecision]] = field(default_factory=list)


class KeyedModel:
    """A provider playing one script per task (by its key); the triage says a confident refund_request."""

    name = "scripted"

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}

    async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
        usage = Usage(input_tokens=50, output_tokens=20)
        if req.kind == "classify":
            return ProviderResult(text=json.dumps({"category": "refund_request", "urgency": "normal",
                                                   "confidence": 0.9}), usage=usage, model="scripted")
        script = self.scripts[req.task.key]
        turn = sum(m.role == "assistant" and bool(m.tool_calls) for m in req.messages)
        if turn >= len(script.turns) or not req.tools:
            return ProviderResult(text=script.final, usage=usage, model="scripted")
        calls = [ToolCall(id=f"c{turn}-{i}", name=n, arguments_json=a) for i, (n, a) in enumerate(script.turns[turn])]
        return ProviderResult(tool_calls=calls, usage=usage, model="scripted", finish_reason="tool_calls")


@st.composite
def tool_calls(draw: st.DrawFn) -> tuple[str, str]:
    who = draw(st.sampled_from([OWN, OWN, OTHER, "C-9999"]))
    kind = draw(st.sampled_from(["refund", "refund", "read", "read", "unknown", "bad_json"]))
    if kind == "refund":
        if draw(st.integers(0, 3)):
            t = draw(st.sampled_from(OWN_RECENT))
            tx, amount = t["id"], draw(st.sampled_from([1.0, round(min(t["amount"], 500.0) / 2, 2), 10_000.0]))
            who = draw(st.sampled_from([OWN, OWN, OWN, OTHER]))
        else:
            tx = draw(st.sampled_from([t["id"] for t in OWN_TX] + [OTHER_TX[0]["id"], "T-000000"]))
            amount = draw(st.sampled_from([1.0, 49.99, 499.0, 501.0, 10_000.0]))
        return "issue_refund", json.dumps({"customer_id": who, "transaction_id": tx, "amount": amount,
                                           "reason": "customer asked"})
    if kind == "read":
        return draw(st.sampled_from(["get_account", "get_transactions"])), json.dumps({"customer_id": who})
    if kind == "bad_json":
        return "issue_refund", '{"customer_id": "C-1001", "amount": '
    return draw(st.sampled_from(["delete_account", "transfer_funds", "Issue_Refund", "send_reply"])), "{}"


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    # Most scripts read the transactions first, so refunds can pass the validators and reach an approver.
    first = [[("get_transactions", json.dumps({"customer_id": OWN}))]] if draw(st.integers(0, 4)) else []
    turns = first + draw(st.lists(st.lists(tool_calls(), min_size=1, max_size=2), min_size=1, max_size=3))
    decisions = draw(st.lists(st.tuples(st.sampled_from([*APPROVERS, "mallory"]),
                                        st.sampled_from(["approve", "approve", "reject", "edit", "none"]),
                                        st.sampled_from(["right", "right", "right", "wrong"])), max_size=4))
    final = draw(st.sampled_from(["Thanks, we looked into it.", "We have refunded your payment.",
                                  "Write to bob@evil.example or call +44 20 7946 0958."]))
    return Script(turns=turns, final=final, decisions=decisions)


APPROVED = Script(
    turns=[[("get_transactions", json.dumps({"customer_id": OWN}))],
           [("issue_refund", json.dumps({"customer_id": OWN, "transaction_id": OWN_RECENT[0]["id"], "amount": 1.0,
                                         "reason": "customer asked"}))]],
    final="We have refunded your payment.", decisions=[("alice", "approve", "right")])
"""Examples always played: an approved refund within the rules, and one approved by someone not listed
(the strategy reaches either only by luck)."""


async def play_approver(client: Client, handle: WorkflowHandle[Any, Any], script: Script) -> None:
    """Answer each approval request with the script's next decision (or stay silent: it times out)."""
    seen: set[str] = set()
    queue = list(script.decisions)
    while True:
        try:
            desc = await handle.describe()
        except Exception:
            await asyncio.sleep(0.05)
            continue
        if desc.status is not None and desc.status.name != "RUNNING":
            return
        try:
            action = await pending_action(client, handle.id)
        except Exception:
            await asyncio.sleep(0.05)
            continue
        if action is None or action.action_id in seen:
            await asyncio.sleep(0.05)
            continue
        seen.add(action.action_id)
        if not queue:
            continue
        approver, verdict, which = queue.pop(0)
        if verdict == "none":
            continue
        d = ApprovalDecision(
            action_id=action.action_id if which == "right" else action.action_id + "x", approver=approver,
            decision=verdict,
            arguments={**action.arguments, "amount": 1.0} if verdict == "edit" else None,
        )
        script.sent.append((action.action_id, d))
        await handle.signal(names.APPROVAL_SIGNAL, d)


def check_property(engine: Engine, script: Script, res: keel.AgentResult) -> None:
    made = refunds(engine, res.workflow_id)
    valid = [d for a, d in script.sent if d.action_id == a and d.approver in APPROVERS
             and d.decision in ("approve", "edit")]
    # A confirm tool never runs without an approve (or edit) from a listed approver for that action...
    assert len(made) <= len(valid), (made, script.sent)
    accepted = [r for r in res.approvals if r.accepted]
    assert all(r.approver in APPROVERS for r in accepted)
    assert len(made) <= sum(r.decision in ("approve", "edit") for r in accepted)
    # ...and only ever for this task's customer, a transaction of theirs, within the policy.
    for r in made:
        assert r["customer_id"] == OWN and r["transaction_id"] in {t["id"] for t in OWN_TX} and r["amount"] <= 500.0
    # Foreign PII never leaves in the answer; a refund claimed without one is never the answer.
    for needle in FOREIGN_PII:
        assert needle not in res.output
    if "refunded" in script.final and not made:
        assert "We have refunded" not in res.output or res.status != "completed", res


async def test_no_refund_without_a_listed_approvers_decision_for_any_model_output(
        client: Client, db_url: str) -> None:
    model = KeyedModel()
    loop = asyncio.get_running_loop()
    counter = iter(range(10_000))
    spec = keel.ModelSpec(provider="scripted", model="scripted")
    seen: Counter[str] = Counter()

    async with desk(client, db_url, providers={"scripted": model}) as env:
        async def run(script: Script) -> keel.AgentResult:
            key = f"prop-{next(counter)}"
            model.scripts[key] = script
            handle = await env.start("support_desk", ask(OWN, "Please refund the double charge."), tenant=OWN,
                                     key=key, models={"small": spec, "large": spec}, approval_timeout_s=1.0)
            approver = asyncio.create_task(play_approver(client, handle, script))
            try:
                res: keel.AgentResult = await handle.result()
            finally:
                await approver
            # Every example's history replays against the code (signals, timers, approvals included).
            await Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter,
                           workflow_runner=STRICT_SANDBOX).replay_workflow(await handle.fetch_history())
            return res

        # Derandomized: the same examples every run, so the coverage check below is stable.
        @hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(script=scripts())
        @hypothesis.example(script=APPROVED)
        @hypothesis.example(script=Script(turns=APPROVED.turns, final="Thanks, we looked into it.",
                                          decisions=[("mallory", "approve", "right")]))
        def prop(script: Script) -> None:
            res = asyncio.run_coroutine_threadsafe(run(script), loop).result(timeout=60)
            check_property(env.engine, script, res)
            seen["refunds"] += len(refunds(env.engine, res.workflow_id))
            seen["ignored"] += sum(not a.accepted for a in res.approvals)
            seen["blocked"] += len(res.tools_blocked)
            seen["escalated"] += res.status == "escalated"

        await asyncio.to_thread(prop)
    # Not vacuous: the examples reached approved writes, ignored decisions, blocks and hand-offs.
    assert all(seen[k] >= 1 for k in ("refunds", "ignored", "blocked", "escalated")), seen


async def test_on_the_time_skipping_server_the_default_approval_timeout_hands_the_task_over(
        own_ts_env: Any, db_url: str) -> None:
    """No decision for the agent's default approval timeout (hours): the time-skipping server jumps it."""
    async with desk(own_ts_env.client, db_url) as env:
        customer, t = refund_request(5)
        body = f"I was charged twice at {t['merchant']} for {t['amount']:.2f} EUR. Please refund the duplicate charge."
        res = await env.run("support_desk", ask(customer, body), tenant=customer)
        made = refunds(env.engine)
    assert res.status == "escalated" and "within the approval timeout" in res.reason, res.reason
    assert made == [] and res.tools_executed == ["get_account", "get_transactions", "lookup_policy"]
