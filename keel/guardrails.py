"""Layer 2 of the guardrails: deterministic checks of every tool call before any tool activity runs.

No model is asked and nothing is read from outside the workflow: the checks use the task's own
customer, the policy, and the facts the task's earlier tool results established (which
transactions belong to the customer, and their amounts). A refusal is a reason string; the agent
loop returns it to the model as an observation, records it, and counts it toward escalation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def canonical_json(arguments: Mapping[str, Any]) -> str:
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """What an approval binds to: the exact arguments, independent of key order."""
    return hashlib.sha256(canonical_json(arguments).encode()).hexdigest()


@dataclass
class TaskFacts:
    """What the task has established from its own tool results."""

    customer_id: str
    max_refund: float
    transactions: dict[str, float] = field(default_factory=dict)
    """The customer's transactions seen in get_transactions results: id -> amount."""
    refunded: dict[str, float] = field(default_factory=dict)
    """Refunds executed in this task: transaction id -> amount."""
    email: str | None = None
    phone: str | None = None
    account_ids: list[str] = field(default_factory=list)
    ibans: list[str] = field(default_factory=list)

    def learn(self, tool: str, arguments: Mapping[str, Any], content: Mapping[str, Any]) -> None:
        """Take facts from a successful tool result of this task's own customer."""
        if arguments.get("customer_id") != self.customer_id:
            return
        if tool == "get_transactions":
            for t in content.get("transactions") or []:
                if isinstance(t, dict) and isinstance(t.get("id"), str) and isinstance(t.get("amount"), int | float):
                    self.transactions[t["id"]] = float(t["amount"])
        elif tool == "get_account":
            customer = content.get("customer") or {}
            if isinstance(customer, dict):
                self.email = customer.get("email") or self.email
                self.phone = customer.get("phone") or self.phone
            for a in content.get("accounts") or []:
                if isinstance(a, dict):
                    if a.get("id") and a["id"] not in self.account_ids:
                        self.account_ids.append(str(a["id"]))
                    if a.get("iban") and a["iban"] not in self.ibans:
                        self.ibans.append(str(a["iban"]))
        elif tool == "issue_refund" and content.get("transaction_id"):
            tx = str(content["transaction_id"])
            self.refunded[tx] = self.refunded.get(tx, 0.0) + float(content.get("amount") or 0.0)


def check_action(tool: str, arguments: Mapping[str, Any], facts: TaskFacts) -> str | None:
    """Why this (schema-valid) call must not run, or None. Bounds and business rules per tool."""
    cid = arguments.get("customer_id")
    if cid is not None and cid != facts.customer_id:
        # Reads included: another customer's data is never the answer to this customer's ticket.
        return (f"customer_id {cid!r} is not this ticket's customer {facts.customer_id!r}; "
                "tools may only act on the ticket's own customer")
    if tool == "issue_refund":
        tx, amount = str(arguments.get("transaction_id", "")), float(arguments.get("amount", 0.0))
        if amount > facts.max_refund:
            return (f"refund of {amount:.2f} exceeds the policy maximum of {facts.max_refund:.2f}; "
                    "larger refunds go to the disputes team (escalate)")
        if tx not in facts.transactions:
            return (f"transaction {tx!r} is not among the customer's transactions retrieved in this task; "
                    "call get_transactions for the customer and refund one of those")
        remaining = round(facts.transactions[tx] - facts.refunded.get(tx, 0.0), 2)
        if amount > remaining:
            return f"refund of {amount:.2f} exceeds what is left to refund on {tx} ({remaining:.2f})"
    if tool == "send_reply" and not str(arguments.get("body", "")).strip():
        return "the reply is empty"
    return None
