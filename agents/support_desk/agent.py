"""The fintech support desk, as a `keel.Agent` on the public API only.

Its tools read and write its own tables (store.py: `support_desk_*`, created and seeded on first use
in the database of KEEL_DATABASE_URL), its guardrails are the bank's rules (guardrails.py), its
prompt is prompts/support_desk.v1.md and the offline sim plays it with sim.py.

Run it for a customer (the tenant is the customer: the ledger's chargeback tag and the customer the
guardrails hold every call to):

    KEEL_AGENTS=agents.support_desk keel up --detach
    keel run support_desk $'Customer: C-1001\\n\\nWhat is my balance?' --tenant C-1001
    keel approve support_desk-<id> --as support-lead     # a proposed refund runs once
"""

from __future__ import annotations

import keel
from agents.support_desk.guardrails import EVIDENCE, OUTPUT_CHECKS, VALIDATORS
from agents.support_desk.sim import support_desk_sim
from agents.support_desk.tools import escalate_to_human, get_account, get_transactions, issue_refund, lookup_policy
from agents.support_desk.triage import TicketTriage, acknowledge, route, triage_sim

support_desk = keel.Agent(
    name="support_desk",
    description="Keel Bank's customer support: accounts, transactions, policies, refunds after approval.",
    prompt="prompts/support_desk.v1.md",
    tools=[get_account, get_transactions, lookup_policy, issue_refund, escalate_to_human],
    # The small tier sorts the request first: fraud and unsure triages go to a person before any tool.
    triage=keel.Triage(prompt="prompts/support_desk_triage.v1.md", output_type=TicketTriage, route=route,
                       acknowledge=acknowledge, sim=triage_sim),
    models={"small": "sim:sim-small", "large": "sim:sim-large"},
    budget=keel.Budget(max_tokens=12_000, max_usd=0.05),
    max_steps=8,
    expected_tokens=5_000,
    approvers={"issue_refund": ["alice", "bob", "support-lead"]},
    validators=VALIDATORS,
    evidence=EVIDENCE,
    output_checks=OUTPUT_CHECKS,
    sim=support_desk_sim,
)

AGENTS = [support_desk]
