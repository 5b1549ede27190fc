"""How the offline sim plays one triage peer: keyword rules, and disagreement where a reader could
honestly hesitate.

- CLEAR message (the rules leave one candidate category): every peer, whatever its seed, temperature or
  model, answers that category with a high confidence. Peers agree on what is not in doubt.
- AMBIGUOUS message (several categories match with the same strength, e.g. "my card is declined ...
  and I was charged twice"): each model has its greedy reading (temperature 0): a large model takes
  the category that decides who handles it first (PRIORITY, as the prompt asks); a small model (its
  name contains "small") anchors on the issue the customer mentions first. At temperature T > 0 a peer
  samples with probability min(1, T): then it picks uniformly among all the candidates. So
  P(another answer than its greedy one) = min(1, T) * (n - 1) / n for n candidates: the hotter the
  swarm, the lower its agreement. An ambiguous answer carries a low confidence (0.30-0.55).

Deterministic given the turn: its rng is seeded by the provider on the sim seed, the task's key (a
swarm peer's is `<key>-peer-<i>`), the step and the kind. The draws are made in a fixed order (explore,
pick, confidence), so with one seed a peer that samples at temperature T samples the same pick at any
higher one. A peer asked again after an invalid answer answers the same way.
"""

from __future__ import annotations

import json
import random
import re

from keel import SimReply, SimTurn

# (pattern, weight): weight 1 marks a weak word that loses to any category with a strong match.
RULES: dict[str, list[tuple[str, int]]] = {
    "fraud_report": [(r"fraud", 2), (r"\bstole(n)?\b", 2), (r"\bnot recogni[sz]e", 2), (r"\bdon'?t recogni[sz]e", 2),
                     (r"\bnot authori[sz]e", 2), (r"\bunauthori[sz]ed\b", 2), (r"\bscam", 2), (r"\bhacked\b", 2)],
    "refund_request": [(r"charged twice", 2), (r"double[- ]charged", 2), (r"\bduplicate", 2),
                       (r"money back", 2), (r"\brefund", 1)],
    "account_access": [(r"\blog ?in\b", 2), (r"\blocked\b", 2), (r"\bpassword", 2), (r"\bsign in\b", 2),
                       (r"one-time code", 2)],
    "billing_question": [(r"charged a fee", 2), (r"\bstatement\b", 2), (r"\boverdraft\b", 2), (r"\bfees?\b", 1)],
    "card_issue": [(r"\bdeclined\b", 2), (r"\bpin\b", 2), (r"\batm\b", 2), (r"\bcards?\b", 1)],
    "general_inquiry": [(r"\baddress\b", 2), (r"\b(support|opening) hours\b", 2), (r"\bhow do i\b", 1),
                        (r"\bwhat are your\b", 1)],
}
PRIORITY = ["fraud_report", "account_access", "refund_request", "billing_question", "card_issue", "general_inquiry"]
"""Who should handle a message first, when it fits several categories."""
_DOMINATES = {"fraud_report": {"card_issue", "refund_request"}}
"""A match of the key makes a match of these incidental ("someone stole my card" is fraud)."""


def candidate_categories(text: str) -> list[str]:
    """The categories the keyword rules cannot choose between, in PRIORITY order: one for a clear
    message, several for an ambiguous one; general_inquiry when nothing matches. A general inquiry
    loses to any other match, a dominating category removes the ones it makes incidental, a strong
    match beats weak ones."""
    low = text.lower()
    matched = {cat: ws for cat, rules in RULES.items() if (ws := [w for p, w in rules if re.search(p, low)])}
    if len(matched) > 1:
        matched.pop("general_inquiry", None)
    for cat, losers in _DOMINATES.items():
        if cat in matched:
            for loser in losers:
                matched.pop(loser, None)
    if any(max(ws) > 1 for ws in matched.values()):
        matched = {cat: ws for cat, ws in matched.items() if max(ws) > 1}
    return [c for c in PRIORITY if c in matched] or ["general_inquiry"]


def first_mentioned(text: str, candidates: list[str]) -> str:
    """The candidate whose keywords appear earliest in the text (a small model's greedy reading)."""
    low = text.lower()

    def first_at(cat: str) -> int:
        found = [m.start() for p, _ in RULES.get(cat, []) if (m := re.search(p, low))]
        return min(found, default=len(low))

    return min(candidates, key=lambda c: (first_at(c), candidates.index(c)))


def urgency_of(category: str, text: str) -> str:
    if category == "fraud_report":
        return "urgent"
    if re.search(r"\b(locked|urgent|asap|immediately)\b", text.lower()):
        return "high"
    return "low" if category == "general_inquiry" else "normal"


def classify(text: str, model: str, temperature: float, rng: random.Random) -> dict[str, object]:
    """One peer's answer: {"category", "urgency", "confidence"} (see the module docstring)."""
    u_explore, u_pick, u_conf = rng.random(), rng.random(), rng.random()
    candidates = candidate_categories(text)
    if len(candidates) == 1:
        category, confidence = candidates[0], 0.86 + 0.1 * u_conf
    else:
        category = first_mentioned(text, candidates) if "small" in model else candidates[0]
        if u_explore < min(1.0, temperature):
            category = candidates[min(int(u_pick * len(candidates)), len(candidates) - 1)]
        confidence = 0.3 + 0.25 * u_conf
    return {"category": category, "urgency": urgency_of(category, text), "confidence": round(confidence, 2)}


def triage_sim(turn: SimTurn) -> SimReply:
    return SimReply.answer(json.dumps(classify(turn.input, turn.model, turn.temperature, turn.rng)))
