"""The sim model's answers for the 'swarm/*' prompts: one swarm peer classifying a ticket.

The peer reads the ticket from the `Context:` message (`Customer: ..\\nTicket: ..\\n\\n<text>`, see
keel.swarm.peer_context) and classifies it with the support sim's keyword rules
(activities.providers.sim.classify_text). What makes peers differ:

- CLEAR ticket (the rules leave one candidate category): every peer, whatever its seed, temperature or
  model, answers that category. Peers agree on what is not in doubt.
- AMBIGUOUS ticket (several categories match with the same strength, e.g. "charged twice ... and now
  my card is declined"): the candidates are the categories classify_text weighs before it falls back
  on its priority order (`candidate_categories`). Each model has its greedy reading (temperature 0):
  a large model follows the prompt and takes the category that decides who handles the ticket first
  (classify_text's priority order: its own answer); a small model (a model name containing "small")
  anchors on the issue the customer mentions first in the text. At temperature T > 0 a peer samples
  with probability min(1, T): then it picks uniformly among ALL the candidates (at T >= 1 any
  reading is as likely as another). So P(another answer than its greedy one) = min(1, T) * (n - 1) / n
  for n candidates, and the hotter the swarm the lower its agreement. With the default spread (K=5,
  sim-small/sim-large alternating, T = 0, .25, .5, .75, 1) a two-way ticket whose two readings the
  models see differently splits below the 0.7 threshold about 3 times in 4; one both models read
  the same way, about 1 time in 3 (4 of 5 agree by chance otherwise). tests/test_swarm.py checks
  these properties over many seeds.
  An ambiguous answer carries a low confidence (0.30-0.55), as classify_text gives it.

Deterministic given the request: the rng the provider passes is seeded on the sim seed, the ticket
key, the step and the kind; a peer's seed is its `sim.seed`. The draws are made in a fixed order
whatever the rates (invalid JSON, sample, pick), so one setting never shifts another's outcome; with
the same seed, a peer that samples at temperature T samples (the same pick) at every higher one.
`sim.invalid_json_rate` makes the answer invalid JSON (truncated, or wrapped in chatter).

Output: the JSON object `{"category", "urgency", "confidence"}` (prompts/swarm/classify.v1.md).
"""

from __future__ import annotations

import json
import random
import re

from activities.providers.sim import _PRIORITY, _RULES, _broken_json, classify_text, keyword_matches, parse_ticket
from keel.types import LlmRequest, Message, ToolCall


def candidate_categories(text: str) -> list[str]:
    """The categories the keyword rules cannot choose between (sim.keyword_matches), in classify_text's
    priority order: one for a clear ticket, several for an ambiguous one; with no match at all,
    general_inquiry."""
    matched = keyword_matches(text)
    return [c for c in _PRIORITY if c in matched] or ["general_inquiry"]


def _urgency(category: str, text: str) -> str:
    # classify_text's rule, for a category a peer chose over classify_text's own.
    if category == "fraud_report":
        return "urgent"
    if re.search(r"\b(locked|urgent|asap|immediately)\b", text.lower()):
        return "high"
    return "low" if category == "general_inquiry" else "normal"


def ticket_text(messages: list[Message]) -> str:
    """The text the peer classifies: the first `Context:` message's ticket, else the task itself."""
    ctx = next((m.content for m in messages if m.role == "user" and m.content.startswith("Context:")), None)
    if ctx is None:
        task = next((m.content for m in messages if m.role == "user"), "")
        return task.removeprefix("Task:").strip()
    return parse_ticket([Message(role="user", content=ctx.removeprefix("Context:").strip())]).text


def first_mentioned(text: str, candidates: list[str]) -> str:
    """The candidate whose keywords appear earliest in the text (a small model's greedy reading)."""
    low = text.lower()

    def first_at(cat: str) -> int:
        found = [m.start() for p, _ in _RULES.get(cat, []) if (m := re.search(p, low))]
        return min(found, default=len(low))

    return min(candidates, key=lambda c: (first_at(c), candidates.index(c)))


def greedy_reading(text: str, model: str, candidates: list[str]) -> str:
    return first_mentioned(text, candidates) if "small" in model else candidates[0]


def classify_peer(text: str, model: str, temperature: float, rng: random.Random) -> dict[str, object]:
    """A peer's classification (see the module docstring)."""
    u_explore, u_pick = rng.random(), rng.random()
    answer = classify_text(text, rng)
    candidates = candidate_categories(text)
    if len(candidates) > 1:
        chosen = greedy_reading(text, model, candidates)
        if u_explore < min(1.0, temperature):
            chosen = candidates[min(int(u_pick * len(candidates)), len(candidates) - 1)]
        if chosen != answer["category"]:
            answer = {"category": chosen, "urgency": _urgency(chosen, text), "confidence": answer["confidence"]}
    return answer


def respond(req: LlmRequest, rng: random.Random) -> tuple[str, list[ToolCall]]:
    u_json = rng.random()
    text = json.dumps(classify_peer(ticket_text(req.messages), req.model.model, req.temperature, rng))
    if u_json < req.model.sim.invalid_json_rate:
        text = _broken_json(rng, text)
    return text, []
