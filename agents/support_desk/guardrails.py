"""The support desk's domain guardrails, as keel hooks. Pure (only `re`): they run in workflow code.

Ported from the legacy platform code, only the banking rules (the platform already redacts generic
personal data - Luhn-valid card numbers, valid IBANs, e-mails, phones, account ids - and holds back
placeholders and claims of actions that were never executed, for every agent):

- action validators (keel.ProposedAction -> a refusal or None), from keel/guardrails.py `check_action`:
  every call names the task's own customer; a refund is at most the refunds policy's bound, of a
  transaction this task read from the customer's own transactions, and at most what is left to refund
  on it;
- output checks (keel.FinalOutput -> problems), from keel/redaction.py: no full card number and no
  IBAN in any form the platform's redaction missed (other separators, a wrong checksum), no refund
  promised or stated as done unless one was executed, no raw tool names in a customer's answer.

The task's customer: the task's tenant when it is a customer id (`keel run support_desk ... --tenant
C-1001`: the trusted field, set by the caller), else a `Customer: C-1001` line in the input's header
(the lines before the first blank line).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import keel
from agents.support_desk.data import MAX_REFUND

CUSTOMER_ID = re.compile(r"^C-[0-9]{4,}$")
_HEADER_CUSTOMER = re.compile(r"^\s*customer(?:[ _]id)?\s*:\s*(C-[0-9]{4,})\s*$", re.I)


def task_customer(tenant: str, text: str) -> str | None:
    """The customer a task is done for: its tenant if that is a customer id, else the input header's."""
    if CUSTOMER_ID.match(tenant.strip()):
        return tenant.strip()
    head = text.strip().split("\n\n", 1)[0]
    for line in head.splitlines():
        m = _HEADER_CUSTOMER.match(line)
        if m is not None:
            return m.group(1).upper()
    return None


def _outcomes(executed: Iterable[keel.ToolOutcome], tool: str) -> list[keel.ToolOutcome]:
    return [o for o in executed if o.tool == tool]


def transactions_read(executed: Iterable[keel.ToolOutcome], customer: str) -> dict[str, float]:
    """The customer's transactions this task read (get_transactions results): id -> amount."""
    out: dict[str, float] = {}
    for o in _outcomes(executed, "get_transactions"):
        if o.arguments.get("customer_id") != customer:
            continue
        for t in o.content.get("transactions") or []:
            if isinstance(t, Mapping) and isinstance(t.get("id"), str) and isinstance(t.get("amount"), int | float):
                out[t["id"]] = float(t["amount"])
    return out


def refunded_in_task(executed: Iterable[keel.ToolOutcome]) -> dict[str, float]:
    """Refunds this task executed: transaction id -> amount."""
    out: dict[str, float] = {}
    for o in _outcomes(executed, "issue_refund"):
        tx = o.content.get("transaction_id")
        if isinstance(tx, str):
            out[tx] = out.get(tx, 0.0) + float(o.content.get("amount") or 0.0)
    return out


def refund_bound(executed: Iterable[keel.ToolOutcome]) -> float:
    """The refunds policy's bound as this task read it (lookup_policy "refunds"), else the default."""
    for o in reversed(_outcomes(executed, "lookup_policy")):
        bound = o.content.get("max_refund")
        if o.content.get("topic") == "refunds" and isinstance(bound, int | float) and bound > 0:
            return float(bound)
    return MAX_REFUND


# --- action validators -----------------------------------------------------------------------------
def own_customer_only(action: keel.ProposedAction) -> str | None:
    """Every call that names a customer names the task's own (reads included: another customer's data
    is never the answer)."""
    cid = action.arguments.get("customer_id")
    if cid is None:
        return None
    customer = task_customer(action.tenant, action.input)
    if customer is None:
        return ("this task names no customer: run it for one (tenant = the customer id, or a "
                "'Customer: C-1001' line heading the request)")
    if cid != customer:
        return (f"customer_id {cid!r} is not this task's customer {customer!r}; "
                "tools may only act on the task's own customer")
    return None


def refund_within_bounds(action: keel.ProposedAction) -> str | None:
    """A refund: at most the policy's bound, of a transaction read from the customer's own in this task,
    and at most what is left to refund on it."""
    if action.tool != "issue_refund":
        return None
    customer = task_customer(action.tenant, action.input) or str(action.arguments.get("customer_id", ""))
    tx = str(action.arguments.get("transaction_id", ""))
    amount = float(action.arguments.get("amount") or 0.0)
    bound = refund_bound(action.executed)
    if amount > bound:
        return (f"refund of {amount:.2f} exceeds the policy maximum of {bound:.2f}; "
                "larger refunds go to the disputes team")
    read = transactions_read(action.executed, customer)
    if tx not in read:
        return (f"transaction {tx!r} is not among the customer's transactions retrieved in this task; "
                "call get_transactions for the customer and refund one of those")
    remaining = round(read[tx] - refunded_in_task(action.executed).get(tx, 0.0), 2)
    if amount > remaining:
        return f"refund of {amount:.2f} exceeds what is left to refund on {tx} ({remaining:.2f})"
    return None


VALIDATORS = [own_customer_only, refund_within_bounds]


# --- output checks -----------------------------------------------------------------------------------
# 13 to 19 digits with at most one separator of any common kind between two digits: what the platform's
# redaction leaves (it takes Luhn-valid numbers split by spaces or dashes) is still a card number.
_CARD = re.compile(r"(?<![0-9A-Za-z])[0-9](?:[ ./_-]?[0-9]){12,18}(?![0-9A-Za-z])")
# An IBAN in any grouping: country, check digits, then 11-30 letters or digits (at least 8 of them digits).
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?:[ ./-]?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])")

_WE = r"\b(?:we|i)"
_HAVE = r"(?:'ve|\u2019ve| have)?"
_WILL = r"(?:'ll|\u2019ll| will| are going to| am going to| shall)"
_AMOUNT_OF = r"(?: of (?:[^.;!?\n]|\.(?=[0-9])){1,40}?)?"
_REFUND_PROMISES = [re.compile(p, re.I) for p in (
    rf"{_WE}{_HAVE}(?: already| now| just)? (?:fully |partially )?(?:refunded|reimbursed)\b",
    rf"{_WE}{_WILL}(?: now| also| then)? (?:fully |partially )?(?:refund|reimburse)\b",
    rf"{_WE}{_HAVE}(?: already| now| just)? (?:issued|processed|approved|initiated|sent|credited|made)"
    r" (?:you )?(?:a|the|your) (?:full |partial )?refund\b",
    r"\byou(?:'ll|\u2019ll| will)(?: now| soon| shortly)? (?:receive|get|see) (?:a|the|your)"
    r"(?: full| partial)? refund\b",
    rf"\brefund{_AMOUNT_OF} (?:has been|have been|was|is now|will be) (?:fully )?"
    r"(?:issued|processed|approved|completed|credited|sent|paid|made|executed|granted|initiated|transferred)\b",
    r"\b(?:has been|have been|was|were) (?:fully )?refunded\b",
    r"\brefund is on (?:its|the) way\b",
)]
"""A refund stated or promised as done or certain (keel/redaction.py). Not: proposed, awaiting approval."""

REFUND_CLAIMS = ["has been refunded", "have been refunded", "was refunded", "we refunded", "we have refunded",
                 "we've refunded", "refund has been issued", "refund was issued", "refund has been processed",
                 "refund was processed", "refund is complete", "refund is on its way"]
"""`claims` of issue_refund: the platform holds back an answer saying one of them when no refund ran."""

TOOL_NAMES = ("get_account", "get_transactions", "lookup_policy", "issue_refund")
_TOOL_NAME = re.compile(r"(?<![A-Za-z0-9_])(?:" + "|".join(TOOL_NAMES) + r")(?![A-Za-z0-9_])", re.I)


def _quote(fragment: str, limit: int = 60) -> str:
    fragment = " ".join(fragment.split())
    return '"' + (fragment[:limit] + "..." if len(fragment) > limit else fragment) + '"'


def _masked(fragment: str) -> str:
    """A number quoted in a problem without repeating it: all but its last four characters starred."""
    compact = re.sub(r"[^0-9A-Za-z]", "", fragment)
    return "*" * max(0, len(compact) - 4) + compact[-4:]


def no_card_number(out: keel.FinalOutput) -> str | None:
    m = _CARD.search(out.text)
    if m is None:
        return None
    return f"the answer contains a full card number ({_masked(m.group())}); show at most its last four digits"


def no_iban(out: keel.FinalOutput) -> str | None:
    for m in _IBAN.finditer(out.text):
        if sum(ch.isdigit() for ch in m.group()) >= 10:
            return f"the answer contains an IBAN ({_masked(m.group())}); name the account by its kind instead"
    return None


def no_unexecuted_refund(out: keel.FinalOutput) -> list[str]:
    if any(o.tool == "issue_refund" for o in out.executed):
        return []
    found: list[str] = []
    for rule in _REFUND_PROMISES:
        for m in rule.finditer(out.text):
            problem = f"promises a refund that was not executed: {_quote(m.group())}"
            if problem not in found:
                found.append(problem)
    return found


def no_tool_names(out: keel.FinalOutput) -> str | None:
    m = _TOOL_NAME.search(out.text)
    return None if m is None else f"raw tool name in the answer: {_quote(m.group())}"


OUTPUT_CHECKS = [no_card_number, no_iban, no_unexecuted_refund, no_tool_names]



# --- evidence (keel.Agent(evidence=...)) -------------------------------------------------------------
ABOUT_THE_ACCOUNT = ("refund_request", "billing_question", "account_access", "card_issue")
"""Triage categories whose answer rests on the customer's own account or transactions."""


def account_was_read(out: keel.FinalOutput) -> str | None:
    """A ticket about the account or its transactions is answered only once they were read."""
    category = getattr(out.triage, "category", None)
    if category not in ABOUT_THE_ACCOUNT:
        return None
    customer = task_customer(out.tenant, out.input)
    for o in out.executed:
        if o.tool in ("get_account", "get_transactions") and (customer is None
                                                               or o.arguments.get("customer_id") == customer):
            return None
    whose = f"customer {customer}" if customer else "the customer"
    return (f"the request is a {category.replace('_', ' ')}, but the account and transactions of {whose} were "
            "not read: read them, then answer from what they show")


EVIDENCE = [account_was_read]
