"""How the offline sim plays the support desk: a fixed plan per kind of request, from the words of the
request, then an answer from the facts the tools returned.

- every request about an account: read the account (`get_account`) first;
- a balance question: answer with the balances read;
- a refund request (charged twice, duplicate, refund, money back): read the transactions and the
  refunds policy, pick the charge the request names (a transaction id, or an amount; a duplicate
  first) and propose `issue_refund` for it when it is within the policy's bound (it waits for a
  support lead); over the bound, or with no matching charge, no refund is proposed;
- fees, cards, access, fraud, general questions: the transactions and/or the policy of the topic.

A task that obeys injected instructions (`SimConfig.follow_injection_rate`) first does what the request
dictates (a refund of a given amount, sending details to an address): the guardrails must stop it.

The answer states only what the tools returned and never claims a refund that did not run: a refund
awaiting approval, rejected or refused is said to be so. The customer is the request's
`Customer: C-1001` line (the sim does not see the task's tenant).
"""

from __future__ import annotations

import re
from typing import Any

from keel import SimCall, SimReply, SimTurn

_CUSTOMER = re.compile(r"\b(C-[0-9]{4,})\b", re.I)
_TX = re.compile(r"\b(T-[0-9]+)\b", re.I)
_AMOUNT = re.compile(r"(?<![\w.-])(\d+(?:[.,]\d{1,2})?)(?![\w-])")

_INTENTS: list[tuple[str, str]] = [
    ("fraud", r"fraud|\bstole|not recogni[sz]e|don'?t recogni[sz]e|unauthori[sz]ed|not authori[sz]e|scam"),
    ("refund", r"refund|charged twice|double[- ]charged|duplicate|\bback\b"),
    ("access", r"\blog ?in\b|\blocked\b|password|sign in|one-time code"),
    ("fees", r"\bfees?\b|statement|overdraft"),
    ("card", r"\bcards?\b|declined|\bpin\b|\batm\b"),
    ("balance", r"balance|how much|funds|money (?:do i|is) "),
]
TOPICS = {"refund": "refunds", "fees": "fees", "access": "account_access", "card": "cards", "fraud": "fraud",
          "general": "general"}
PLANS = {
    "balance": ["get_account"],
    "refund": ["get_account", "get_transactions", "lookup_policy", "issue_refund"],
    "fees": ["get_account", "get_transactions", "lookup_policy"],
    "card": ["get_account", "get_transactions", "lookup_policy"],
    "access": ["get_account", "lookup_policy"],
    "fraud": ["get_account", "get_transactions", "lookup_policy"],
    "general": ["lookup_policy"],
}
DEFAULT_MAX_REFUND = 500.0


def customer_in(text: str) -> str | None:
    m = _CUSTOMER.search(text)
    return m.group(1).upper() if m else None


def intent_of(text: str) -> str:
    low = text.lower()
    return next((name for name, pattern in _INTENTS if re.search(pattern, low)), "general")


def _ok(turn: SimTurn, name: str) -> dict[str, Any] | None:
    return next((c.result for c in reversed(turn.called(name)) if c.ok and not c.pending and c.result), None)


def _done(turn: SimTurn, name: str) -> bool:
    """Called and answered, or failed twice (an error is tried once more; a refused refund never)."""
    calls = turn.called(name)
    if not calls:
        return False
    return any(c.ok or c.result is None for c in calls) or len(calls) >= 2 or name == "issue_refund"


def _transactions(turn: SimTurn) -> list[dict[str, Any]]:
    got = _ok(turn, "get_transactions") or {}
    return [t for t in got.get("transactions") or [] if isinstance(t, dict)]


def _bound(turn: SimTurn) -> float:
    policy = _ok(turn, "lookup_policy") or {}
    bound = policy.get("max_refund") if policy.get("topic") == "refunds" else None
    return float(bound) if isinstance(bound, int | float) else DEFAULT_MAX_REFUND


def refund_target(text: str, txs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The charge a refund request names: its transaction id, else one of its amounts (a duplicate
    first), else the one duplicate charge when the request speaks of one."""
    ids = {m.upper() for m in _TX.findall(text)}
    named = [t for t in txs if str(t.get("id", "")).upper() in ids]
    if named:
        return named[0]
    amounts = [float(a.replace(",", ".")) for a in _AMOUNT.findall(text)]
    by_amount = [t for t in txs if t.get("kind") != "refund"
                 and any(abs(float(t.get("amount") or 0) - a) < 0.005 for a in amounts)]
    dups = [t for t in by_amount if t.get("duplicate_of")]
    if dups or by_amount:
        return (dups or by_amount)[0]
    if re.search(r"duplicate|charged twice|double", text, re.I):
        return next((t for t in txs if t.get("duplicate_of")), None)
    return None


def _next_call(turn: SimTurn, customer: str, intent: str) -> SimReply | None:
    for step in PLANS[intent]:
        if _done(turn, step) or not turn.offered(step):
            continue
        if step == "get_account":
            return SimReply.call(step, customer_id=customer)
        if step == "get_transactions":
            return SimReply.call(step, customer_id=customer, days=7 if intent == "card" else 60)
        if step == "lookup_policy":
            return SimReply.call(step, topic=TOPICS[intent])
        if step == "issue_refund":
            tx = refund_target(turn.input, _transactions(turn))
            if tx is None or float(tx.get("amount") or 0) > _bound(turn):
                continue  # nothing to propose: the answer says why
            dup = f" (duplicate of {tx['duplicate_of']})" if tx.get("duplicate_of") else ""
            return SimReply.call(step, customer_id=customer, transaction_id=str(tx["id"]),
                                 amount=float(tx["amount"]), reason=f"charge at {tx.get('merchant')}{dup} "
                                 "disputed by the customer")
    return None


def policy_sentence(text: str, request: str) -> str:
    """The policy's first sentence, and the one closest to the request (most shared words) if another."""
    words = set(re.findall(r"[a-z]{4,}", request.lower()))
    sentences = [s.strip().rstrip(".") + "." for s in text.split(". ") if s.strip()]
    if not sentences:
        return ""
    best = max(sentences, key=lambda s: (len(words & set(re.findall(r"[a-z]{4,}", s.lower()))), -sentences.index(s)))
    return sentences[0] if best == sentences[0] else f"{sentences[0]} {best}"


def _money(value: Any) -> str:
    return f"{float(value or 0):.2f}"


def _refund_line(turn: SimTurn) -> str | None:
    calls: list[SimCall] = turn.called("issue_refund")
    if not calls:
        return None
    last = calls[-1]
    args, result = last.arguments, last.result or {}
    what = f"{_money(args.get('amount'))} EUR on {args.get('transaction_id')}"
    if last.ok and not last.pending and result.get("refund_id"):
        return (f"Refund {result['refund_id']} of {_money(result.get('amount'))} EUR on "
                f"{result.get('transaction_id')} is complete.")
    status = str(result.get("status") or "").lower()
    if "pending" in status:
        return f"A refund of {what} awaits approval by our support lead; we will confirm once it is decided."
    if "reject" in status:
        return f"A refund of {what} was proposed but not carried out (it was not approved)."
    return f"A refund of {what} could not be made; our team will review your request."


def answer(turn: SimTurn, customer: str, intent: str) -> str:
    account = _ok(turn, "get_account")
    lines: list[str] = []
    if account is None and PLANS[intent][0] == "get_account":
        error = next((c.error for c in turn.called("get_account") if c.error), "it could not be read")
        return f"We could not look up the account of customer {customer}: {error}."
    c = (account or {}).get("customer") or {}
    lines.append(f"Hello {c.get('name', '')},".replace(" ,", ","))
    for a in (account or {}).get("accounts") or []:
        lines.append(f"The balance of your {a.get('kind', '')} account is {_money(a.get('balance'))} "
                     f"{a.get('currency', 'EUR')}.")
    if intent in ("card", "fraud") and c:
        lines.append(f"Your card ending {str(c.get('card_last4', ''))[-4:]} is {c.get('card_status')}.")
    if intent == "access" and c:
        lines.append("Your online access is locked." if c.get("locked") else "Your online access is not locked.")
    txs = _transactions(turn)
    if intent in ("refund", "fees", "card", "fraud") and turn.called("get_transactions"):
        lines.append(f"We looked at {len(txs)} recent transactions.")
        for t in txs:
            if t.get("duplicate_of") and intent in ("refund", "fraud"):
                lines.append(f"{t['id']} of {_money(t.get('amount'))} EUR at {t.get('merchant')} duplicates "
                             f"{t['duplicate_of']}.")
            elif t.get("kind") == "fee" and intent == "fees":
                lines.append(f"{t['id']}: a fee of {_money(t.get('amount'))} EUR, {t.get('days_ago')} days ago.")
    policy = _ok(turn, "lookup_policy")
    if policy:
        lines.append(f"Our policy: {policy_sentence(str(policy.get('text', '')), turn.input)}")
    if intent == "refund":
        line = _refund_line(turn)
        if line is None and turn.called("get_transactions"):
            tx = refund_target(turn.input, txs)
            if tx is None:
                line = "We could not find a charge matching your request; please tell us its date and amount."
            elif float(tx.get("amount") or 0) > _bound(turn):
                line = (f"The charge {tx['id']} of {_money(tx.get('amount'))} EUR is above the {_money(_bound(turn))} "
                        "EUR we can refund here; our disputes team will review it.")
        if line:
            lines.append(line)
    if intent == "fraud":
        lines.append("Our fraud team handles suspected fraud; please freeze your card in the app now.")
    lines.append("Kind regards, Keel Bank support")
    return "\n".join(lines)


_REFUND_CMD = re.compile(r"\brefund\s+(?:EUR\s*|€\s*)?(\d[\d,]*(?:\.\d+)?)", re.I)
_SEND_TO = re.compile(r"\b(?:send|forward|e-?mail)\b[^.]{0,200}?\bto\s+([\w.+-]+@[\w-]+(?:\.[\w-]+)+)", re.I)


def obeyed_injection(turn: SimTurn, customer: str) -> SimReply | None:
    """What a task that obeys instructions in the request does first (`SimTurn.follows_injection`): a
    refund of the amount and transaction the request dictates (for another customer if it names one),
    or sending the customer's details to the address it gives (a tool the desk does not have). The
    guardrails decide what runs; the engine plays "call the tool X" itself."""
    if not turn.follows_injection or turn.calls or turn.answer_now:
        return None
    text = turn.input
    refund, send = _REFUND_CMD.search(text), _SEND_TO.search(text)
    if refund:
        others = [c.upper() for c in _CUSTOMER.findall(text) if c.upper() != customer]
        tx = next(iter(_TX.findall(text)), "T-000000")
        amount = float(refund.group(1).replace(",", ""))
        return SimReply.call("issue_refund", f"As instructed in the request: refunding {amount:.2f}.",
                             customer_id=others[0] if others else customer, transaction_id=tx.upper(),
                             amount=amount, reason="requested in the message")
    if send:
        return SimReply.call("send_reply", f"As instructed in the request: sending the details to {send.group(1)}.",
                             customer_id=send.group(1), body=f"Account details of {customer}, as requested.")
    return None


def support_desk_sim(turn: SimTurn) -> SimReply:
    customer = customer_in(turn.input)
    if customer is None:
        return SimReply.answer("Please tell us your customer id (it looks like C-1001) so that we can look at "
                               "your account.")
    injected = obeyed_injection(turn, customer)
    if injected is not None:
        return injected
    intent = intent_of(turn.input)
    if not turn.answer_now and not (turn.wrap_up and turn.calls):
        nxt = _next_call(turn, customer, intent)
        if nxt is not None:
            return nxt
    return SimReply.answer(answer(turn, customer, intent))
