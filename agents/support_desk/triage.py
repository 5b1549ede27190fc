"""The support desk's triage (a `keel.Triage`): the category, urgency and confidence of a request, from
the small tier, before the desk works on it. Fraud reports and unsure triages go to a person at once;
every other request gets its acknowledgement (the progress query's) seconds before the answer.

The sim plays the triage with keyword rules: one category left standing is a confident triage, none or
several (an ambiguous request) an unsure one."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

from keel import SimReply, SimTurn

Category = Literal["refund_request", "billing_question", "account_access", "card_issue", "fraud_report",
                   "general_inquiry"]
MIN_CONFIDENCE = 0.6
HUMAN_CATEGORIES = ("fraud_report",)


class TicketTriage(BaseModel):
    category: Category
    urgency: Literal["low", "normal", "high", "urgent"] = "normal"
    confidence: float = Field(ge=0, le=1, description="How sure the category is, 0 to 1")


ACKNOWLEDGEMENTS: dict[str, str] = {
    "refund_request": "we have your refund request and are checking the transaction now",
    "billing_question": "we have your question about a charge and are looking at your account now",
    "account_access": "we have your access problem and are checking your account now",
    "card_issue": "we have your card question and are checking your card now",
    "fraud_report": "we have your report; a specialist from our fraud team is taking it now",
    "general_inquiry": "we have your message and are looking into it now",
}


def route(t: TicketTriage) -> str | None:
    if t.category in HUMAN_CATEGORIES:
        return f"category {t.category} is always handled by a person"
    if t.confidence < MIN_CONFIDENCE:
        return f"triage confidence {t.confidence:.2f} is under {MIN_CONFIDENCE}"
    return None


def acknowledge(t: TicketTriage) -> str:
    soon = " We will answer as a priority." if t.urgency in ("high", "urgent") else ""
    return f"Thank you for contacting Keel Bank: {ACKNOWLEDGEMENTS[t.category]}.{soon}"


# (pattern, weight): weight 1 marks a weak word that loses to any category with a strong match.
_RULES: dict[str, list[tuple[str, int]]] = {
    "fraud_report": [(r"fraud", 2), (r"\bstole(n)?\b", 2), (r"\bnot recogni[sz]e", 2), (r"\bdon'?t recogni[sz]e", 2),
                     (r"\bnot authori[sz]e", 2), (r"\bunauthori[sz]ed\b", 2), (r"\bscam", 2), (r"\bhacked\b", 2)],
    "refund_request": [(r"charged twice", 2), (r"double[- ]charged", 2), (r"\bduplicate", 2),
                       (r"money back", 2), (r"\brefund", 1)],
    "account_access": [(r"\blog ?in\b", 2), (r"\blocked\b", 2), (r"\bpassword", 2), (r"\bsign in\b", 2),
                       (r"one-time code", 2)],
    "billing_question": [(r"charged a fee", 2), (r"\bstatement\b", 2), (r"\boverdraft\b", 2), (r"\bfees?\b", 1)],
    "card_issue": [(r"\bdeclined\b", 2), (r"\bpin\b", 2), (r"\batm\b", 2), (r"\bcards?\b", 1)],
    "general_inquiry": [(r"\bbalance\b", 2), (r"\baddress\b", 2), (r"\b(support|opening) hours\b", 2),
                        (r"\bhow do i\b", 1), (r"\bwhat are your\b", 1)],
}
_PRIORITY = ["fraud_report", "account_access", "refund_request", "billing_question", "card_issue", "general_inquiry"]
_DOMINATES = {"fraud_report": {"card_issue", "refund_request"}}
"""A match of the key makes a match of these incidental ("someone stole my card" is fraud)."""


def classify(text: str) -> TicketTriage:
    """The keyword triage of a request (what the sim answers)."""
    low = text.lower()
    hits = {cat: [w for p, w in rules if re.search(p, low)] for cat, rules in _RULES.items()}
    matched = {cat: ws for cat, ws in hits.items() if ws}
    if len(matched) > 1:
        matched.pop("general_inquiry", None)
    for cat, losers in _DOMINATES.items():
        if cat in matched:
            for loser in losers:
                matched.pop(loser, None)
    if any(max(ws) > 1 for ws in matched.values()):
        matched = {cat: ws for cat, ws in matched.items() if max(ws) > 1}
    if len(matched) == 1:
        category, ws = next(iter(matched.items()))
        confidence = min(0.97, 0.8 + 0.03 * sum(ws))
    else:
        category = next((c for c in _PRIORITY if c in matched), "general_inquiry")
        confidence = 0.45
    if category == "fraud_report":
        urgency = "urgent"
    elif re.search(r"\b(locked|urgent|asap|immediately)\b", low):
        urgency = "high"
    else:
        urgency = "low" if category == "general_inquiry" else "normal"
    return TicketTriage.model_validate({"category": category, "urgency": urgency, "confidence": round(confidence, 2)})


def triage_sim(turn: SimTurn) -> SimReply:
    return SimReply.answer(classify(turn.input).model_dump_json())
