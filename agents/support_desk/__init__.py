"""Keel Bank's support desk: answers a customer's questions from its account, transactions and policies,
and refunds a charge after a support lead approves it. Written only against `keel`'s public API;
`keel worker --agents agents.support_desk` serves it.
"""

from agents.support_desk.agent import AGENTS, support_desk
from agents.support_desk.tools import get_account, get_transactions, issue_refund, lookup_policy

__all__ = ["AGENTS", "get_account", "get_transactions", "issue_refund", "lookup_policy", "support_desk"]
