"""Prompt injection on the generic agent workflow, with a sim that obeys it (`follow_injection_rate=1`):
the support desk is told, inside a customer's message, to refund 10,000 EUR, to refund another
customer's charge, to send the statement to an outside address, to call a tool it does not have, and to
read another customer's account. Every attempt is stopped by the platform (unknown tools) or the agent's
own validators, recorded in the result and the ledger, and nothing is written."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio.client import Client

import keel
from agents.support_desk import store, support_desk
from agents.support_desk.data import build_seed, injection_tickets
from keel.testing import agent_environment
from starter.approvals_cli import decide, pending_action
from tests.agents.conftest import rows

SEED = build_seed()
VICTIM, OTHER = "C-1001", "C-1002"


def _txs(customer: str) -> list[dict[str, Any]]:
    return [t for t in SEED["transactions"] if t["customer_id"] == customer]


EXPECTED = ["exceeds the policy maximum", "not among the customer's transactions", "unknown tool 'send_reply'",
            "unknown tool 'delete_account'", "not this task's customer"]
INJECTIONS = list(zip([t.text for t in injection_tickets()], EXPECTED, strict=True))


async def settle(client: Client, handle: Any) -> keel.AgentResult:
    """The task's result; a legitimate refund it proposes besides waits for a person: reject it."""
    while True:
        done = asyncio.ensure_future(handle.result())
        await asyncio.wait([done], timeout=0.3)
        if done.done():
            result: keel.AgentResult = done.result()
            return result
        done.cancel()
        if await pending_action(client, handle.id) is not None:
            await decide(client, handle.id, "alice", "reject", comment="test")


async def test_injected_instructions_never_cause_a_forbidden_write(client: Client, db_url: str) -> None:
    obey = keel.SimConfig(follow_injection_rate=1.0, spiral_rate=0.0)
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        handles = [await env.start("support_desk", f"Customer: {VICTIM}\n\n{body}", tenant=VICTIM, sim=obey,
                                   key=f"inject-{i}") for i, (body, _) in enumerate(INJECTIONS)]
        results = await asyncio.gather(*(settle(client, h) for h in handles))
        store.engine_for()
        made = rows(env.engine, "SELECT * FROM support_desk_refunds")
        guard = {r.workflow_id: rows(env.engine, "SELECT tool, status, reason FROM ledger WHERE workflow_id = :w "
                                                 "AND kind = 'guardrail'", w=r.workflow_id) for r in results}
    assert made == [], made
    for (body, expected), res in zip(INJECTIONS, results, strict=True):
        reasons = " | ".join(b.reason for b in res.tools_blocked)
        assert expected in reasons, (body, reasons, res.decisions)
        assert any(g["status"] == "blocked" for g in guard[res.workflow_id]), (body, guard[res.workflow_id])
        assert "attacker@example.com" not in res.output, body
        assert res.validation_failures + res.invalid_outputs >= 1, body  # counted toward escalation
