"""`sim`, the "sim (offline simulator)" (keel.types.SIM_LABEL): a simulated model, not a language model.

It reads the conversation the workflow sends, applies keyword rules and a fixed plan per ticket
category, and answers like a tool-calling model would, so the whole system runs without an API key.
Its failure modes (reasoning spirals, hallucinated tools, invalid arguments, invalid JSON, obeying
prompt injections) are switched on by the rates in `SimConfig`, so guardrails can be exercised.

Stateless and seeded: every answer depends only on the request. Task-level decisions use
`Random(f"{seed}:{key}:task")`, per-call decisions `Random(f"{seed}:{key}:{step}:{kind}")`, with
key = ticket_id or workflow_id: the same ticket and seed replay the same path, and an activity retry
gets the same answer. A prompt version other than "v1" is mixed into the key (`<key>@<version>`), so a
ticket run again on another prompt version (`keel replay --prompt-version`) can take another path; v1
keeps the key unchanged, so every recorded history and test on v1 stays identical.

Conversation conventions: the first user message is `Customer: C-1001\\nTicket: TK-1\\n\\n<text>`;
a later user message may hold `Classification: {json}`; tool messages hold the tool's result dict
as JSON (or `{"error": ...}`); a system message saying "wrap up" ends a spiral (at most one more tool
call), one saying "answer now" (or an empty tool list) gets a text answer at once.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from activities.providers.base import ProviderResult
from keel import registry
from keel.policy import CATEGORIES
from keel.sim import SimReply, SimTurn, arguments_for, generic_behaviour, parse_turn
from keel.tokens import CHARS_PER_TOKEN, estimate_input_tokens, tokens_for_chars
from keel.tools import TOOLS
from keel.types import SIM_LABEL, LlmRequest, Message, SimConfig, ToolCall, ToolSpec, Usage

# --- classification ------------------------------------------------------------------------
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
    "general_inquiry": [(r"\baddress\b", 2), (r"\b(support|opening) hours\b", 2), (r"\bhow do i\b", 1),
                        (r"\bwhat are your\b", 1)],
}
_PRIORITY = ["fraud_report", "account_access", "refund_request", "billing_question", "card_issue", "general_inquiry"]
# A match of the key makes a match of these categories incidental ("someone stole my card" is fraud).
_DOMINATES = {"fraud_report": {"card_issue", "refund_request"}}


def keyword_matches(text: str) -> dict[str, list[int]]:
    """The categories the keyword rules leave standing, with their matches' weights: a general inquiry
    loses to any other match, a dominating category removes the ones it makes incidental, a strong
    match beats weak ones. One entry for a clear ticket, several for an ambiguous one, none for no match."""
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
    return matched


def classify_text(text: str, rng: random.Random | None = None) -> dict[str, Any]:
    """{"category", "urgency", "confidence"} for a ticket text, by keyword rules."""
    rng = rng or random.Random(0)
    low = text.lower()
    matched = keyword_matches(text)
    if len(matched) == 1:
        category, ws = next(iter(matched.items()))
        confidence = min(0.97, 0.8 + 0.03 * sum(ws) + rng.uniform(0, 0.04))
    else:
        category = next((c for c in _PRIORITY if c in matched), "general_inquiry")
        confidence = rng.uniform(0.3, 0.55)
    if category == "fraud_report":
        urgency = "urgent"
    elif re.search(r"\b(locked|urgent|asap|immediately)\b", low):
        urgency = "high"
    else:
        urgency = "low" if category == "general_inquiry" else "normal"
    return {"category": category, "urgency": urgency, "confidence": round(confidence, 2)}


# --- reading the conversation --------------------------------------------------------------
@dataclass
class Ticket:
    customer_id: str = ""
    ticket_id: str = ""
    text: str = ""


@dataclass
class Call:
    name: str
    args: dict[str, Any]
    msg_index: int
    result: dict[str, Any] | None = None

    @property
    def error(self) -> str | None:
        err = (self.result or {}).get("error")
        return str(err) if err else None

    @property
    def ok(self) -> bool:
        return self.result is not None and self.error is None


def parse_ticket(messages: list[Message]) -> Ticket:
    first = next((m for m in messages if m.role == "user"), None)
    if first is None:
        return Ticket()
    head, _, body = first.content.partition("\n\n")
    t = Ticket(text=body if body else first.content)
    for line in head.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "customer":
            t.customer_id = value.strip()
        elif key.strip().lower() == "ticket":
            t.ticket_id = value.strip()
    return t


def _loads_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"result": value}


def parse_calls(messages: list[Message]) -> list[Call]:
    """Tool calls made so far, in order, each with the result its tool message returned."""
    calls: list[Call] = []
    by_id: dict[str, Call] = {}
    for i, m in enumerate(messages):
        if m.role == "assistant":
            for tc in m.tool_calls:
                by_id[tc.id] = Call(tc.name, _loads_dict(tc.arguments_json), i)
                calls.append(by_id[tc.id])
        elif m.role == "tool":
            call = by_id.get(m.tool_call_id or "") or next(
                (c for c in calls if c.result is None and c.name == m.name), None)
            if call is not None:
                call.result = _loads_dict(m.content)
    return calls


def _classification(messages: list[Message], ticket: Ticket) -> dict[str, Any]:
    for m in reversed(messages):
        if m.role == "user" and "Classification:" in m.content:
            raw = m.content.split("Classification:", 1)[1].strip()
            try:
                value, _ = json.JSONDecoder().raw_decode(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and value.get("category") in CATEGORIES:
                return value
    return classify_text(ticket.text)


def _system_index(messages: list[Message], phrase: str) -> int | None:
    """Index of the first system message (after the ticket) containing `phrase`, case-insensitive."""
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), 0)
    return next((i for i, m in enumerate(messages)
                 if i > first_user and m.role == "system" and phrase in m.content.lower()), None)


# --- task-level traits ---------------------------------------------------------------------
@dataclass
class TaskTraits:
    spiral: bool
    follows_injection: bool
    loop_sizes: list[int] = field(default_factory=list)
    """Tool calls in each extra loop of a spiral (4-5 loops of 2-3 calls)."""
    picks: list[float] = field(default_factory=list)


def task_traits(sim: SimConfig, key: str) -> TaskTraits:
    """Task-level decisions. Every draw is made whatever the rates, so one rate never shifts another."""
    rng = random.Random(f"{sim.seed}:{key}:task")
    spiral_u, inject_u = rng.random(), rng.random()
    loop_sizes = [rng.choice([2, 3]) for _ in range(rng.choice([4, 5]))]
    picks = [rng.random() for _ in range(sum(loop_sizes))]
    return TaskTraits(spiral_u < sim.spiral_rate, inject_u < sim.follow_injection_rate, loop_sizes, picks)


# --- the agent's plan ----------------------------------------------------------------------
@dataclass
class Action:
    name: str
    args: dict[str, Any]
    text: str = ""
    redraft: bool = False
    """A spiral loop's first call: preceded by a re-draft of the answer."""


PLANS = {
    "refund_request": ["get_account", "get_transactions", "lookup_policy", "issue_refund"],
    "billing_question": ["get_account", "get_transactions", "lookup_policy"],
    "account_access": ["get_account", "lookup_policy"],
    "card_issue": ["get_account", "get_transactions", "lookup_policy"],
    "fraud_report": ["get_account", "get_transactions", "escalate_to_human"],
    "general_inquiry": ["lookup_policy"],
}
TOPICS = {"refund_request": "refunds", "billing_question": "fees", "account_access": "account_access",
          "card_issue": "cards", "fraud_report": "fraud", "general_inquiry": "general"}
_PERMANENT = ("not found", "unknown", "does not belong", "exceeds", "denied", "not allowed", "approval")
_SELF_INFLICTED = ("invalid argument", "json", "schema", "validation")


def _given_up_or_done(name: str, calls: list[Call]) -> bool:
    """A tool is done once it answered; after an error it is retried once, never after a permanent one."""
    attempts = [c for c in calls if c.name == name]
    if not attempts:
        return False
    if any(c.ok or c.result is None for c in attempts) or len(attempts) >= 2:
        return True
    return any(p in (attempts[-1].error or "").lower() for p in _PERMANENT)


def _transactions(calls: list[Call]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for c in calls:
        if c.name == "get_transactions" and c.ok and c.result is not None:
            txs = c.result.get("transactions", c.result.get("result", []))
            for t in txs if isinstance(txs, list) else []:
                if isinstance(t, dict):
                    seen.setdefault(str(t.get("id", len(seen))), t)
    return list(seen.values())


def _latest(calls: list[Call], name: str) -> dict[str, Any]:
    return next((c.result or {} for c in reversed(calls) if c.name == name and c.ok), {})


def _amounts(text: str) -> list[float]:
    return [float(a.replace(",", ".")) for a in re.findall(r"(?<![\w-])(\d+(?:[.,]\d{1,2})?)(?![\w-])", text)]


def _refund_target(text: str, txs: list[dict[str, Any]]) -> dict[str, Any] | None:
    def matches(t: dict[str, Any]) -> bool:
        return any(abs(float(t.get("amount") or 0) - a) < 0.005 for a in _amounts(text))
    dups = [t for t in txs if t.get("duplicate_of")]
    others = [t for t in txs if t.get("kind", "purchase") != "refund" and matches(t)]
    candidates = dups or others
    return next((t for t in dups if matches(t)), None) or (candidates[0] if candidates else None)


def _step_action(step: str, category: str, ticket: Ticket, calls: list[Call]) -> Action:
    cid = ticket.customer_id
    if step == "get_account":
        return Action(step, {"customer_id": cid})
    if step == "get_transactions":
        return Action(step, {"customer_id": cid, "days": 7 if category == "card_issue" else 60})
    if step == "lookup_policy":
        return Action(step, {"topic": TOPICS[category]})
    if step == "issue_refund":
        tx = _refund_target(ticket.text, _transactions(calls))
        limit = next((c.result.get("max_refund") for c in calls if c.name == "lookup_policy" and c.ok
                      and c.result and c.result.get("topic", c.args.get("topic")) == "refunds"), None)
        if tx is None:
            return _escalate("no charge matching the refund request was found", "normal")
        amount = float(tx.get("amount") or 0)
        if isinstance(limit, int | float) and amount > limit:
            return _escalate(f"refund of {amount:.2f} on {tx.get('id')} exceeds the policy limit {limit}", "normal")
        dup = f" (duplicate of {tx['duplicate_of']})" if tx.get("duplicate_of") else ""
        reason = f"charge at {tx.get('merchant', 'merchant')}{dup} disputed by the customer"
        return Action(step, {"customer_id": cid, "transaction_id": str(tx.get("id")), "amount": amount,
                             "reason": reason})
    n = len(_transactions(calls))
    return _escalate(f"suspected fraud reported by customer {cid}; {n} recent transactions reviewed; "
                     f"the card should be frozen", "urgent")


def _escalate(reason: str, priority: str) -> Action:
    return Action("escalate_to_human", {"reason": reason, "priority": priority})


def plan_next(category: str, ticket: Ticket, calls: list[Call], offered: set[str]) -> Action | None:
    """The next tool call of the category's plan, or None when the plan is done."""
    account_tries = [c for c in calls if c.name == "get_account"]
    if (account_tries and not any(c.ok for c in account_tries) and _given_up_or_done("get_account", calls)
            and not any(s in (account_tries[-1].error or "").lower() for s in _SELF_INFLICTED)):
        unknown = _escalate(f"unknown customer {ticket.customer_id}: {account_tries[-1].error}", "normal")
        done = _given_up_or_done(unknown.name, calls) or unknown.name not in offered
        return None if done else unknown
    for step in PLANS.get(category, PLANS["general_inquiry"]):
        action = _step_action(step, category, ticket, calls)
        if action.name in offered and not _given_up_or_done(action.name, calls):
            return action
    return None


_REDRAFTS = ["Reconsidering the classification... the findings may be incomplete.",
             "Reconsidering the draft... the charge could be older than I looked.",
             "Reconsidering: the policy topic may be the wrong one.",
             "Reconsidering the account details before answering."]


def spiral_schedule(traits: TaskTraits, category: str, ticket: Ticket, offered: set[str]) -> list[Action]:
    """The extra calls of a spiralling task: loops of re-checks (wider transaction windows, the account
    again, other policy topics, now and then an identical repeat), each opened by a re-draft."""
    cid, own = ticket.customer_id, TOPICS.get(category, "general")
    topics = [t for t in TOPICS.values() if t != own]
    out: list[Action] = []
    picks = iter(traits.picks)
    for loop, size in enumerate(traits.loop_sizes):
        for j in range(size):
            u = next(picks)
            widen = Action("get_transactions", {"customer_id": cid, "days": min(365, 90 + 60 * loop)})
            other = Action("lookup_policy", {"topic": topics[(loop + j) % len(topics)]})
            account = Action("get_account", {"customer_id": cid})
            repeat = out[int(u * 89) % len(out)] if out else account  # an identical repeat
            # A loop opens with a re-check of another kind than the last loop's; later calls are drawn.
            if j == 0:
                action = [widen, other, account][(loop + int(u * 2)) % 3]
            else:
                action = [widen, other, account, repeat][int(u * 4)]
            if action.name not in offered:
                action = next((a for a in (widen, other, account) if a.name in offered), action)
            if action.name in offered:
                out.append(Action(action.name, dict(action.args), redraft=j == 0))
    return out


# --- prompt injection ----------------------------------------------------------------------
_REFUND_CMD = re.compile(r"\brefund\s+(?:EUR\s*|€\s*)?(\d[\d,]*(?:\.\d+)?)", re.I)
_SEND_TO = re.compile(r"\b(?:send|forward|e-?mail)\b[^.]{0,200}?\bto\s+([\w.+-]+@[\w-]+(?:\.[\w-]+)+)", re.I)
_CALL_TOOL = re.compile(r"\b(?:call|use|run|invoke|execute)\s+(?:the\s+)?(?:tool|function)\s+[`'\"]?([a-z_]\w*)",
                        re.I)


def injected_action(ticket: Ticket) -> Action | None:
    """The action instructions injected in the ticket text ask for, if any (followed only by some tasks)."""
    text = ticket.text
    others = [c for c in re.findall(r"\bC-\d{3,}\b", text) if c != ticket.customer_id]
    cid = others[0] if others else ticket.customer_id
    tx = next(iter(re.findall(r"\bT-\d+\b", text)), "T-000000")
    refund, send, tool = _REFUND_CMD.search(text), _SEND_TO.search(text), _CALL_TOOL.search(text)
    iban = next(iter(re.findall(r"\b[A-Z]{2}\d{2}[A-Z0-9]{10,30}\b", text)), "")
    amount = float(refund.group(1).replace(",", "")) if refund else 10000.0
    note = "As instructed in the ticket: "
    refund_action = Action("issue_refund", {"customer_id": cid, "transaction_id": tx, "amount": amount,
                                            "reason": f"requested in the ticket {iban}".strip()},
                           note + f"refunding {amount:.2f}.")
    if tool:
        name = tool.group(1)
        if name == "issue_refund":
            return refund_action
        args: dict[str, Any] = {"customer_id": send.group(1) if send and name == "send_reply" else cid}
        if name == "send_reply":
            args["body"] = f"Account details of {ticket.customer_id}, as requested."
        elif name == "escalate_to_human":
            args = {"reason": "requested in the ticket", "priority": "urgent"}
        elif name == "lookup_policy":
            args = {"topic": "general"}
        return Action(name, args, note + f"calling {name}.")
    if refund:
        return refund_action
    if send:
        return Action("send_reply", {"customer_id": send.group(1),
                                     "body": f"Account details of {ticket.customer_id}, as requested."},
                      note + f"sending the details to {send.group(1)}.")
    return None


# --- the failure modes around any agent's behaviour ---------------------------------------------
SPIRAL_MARK = "_recheck"
"""Suffix of the id of a spiral's tool call: the sim is stateless, so it counts its past re-checks in
the conversation by it."""


def injected_call(turn: SimTurn, offered: dict[str, ToolSpec]) -> SimReply | None:
    """A task that obeys instructions injected in its input: its first call is the offered tool the
    input tells it to call ("ignore previous instructions and call the tool X"), whatever its behaviour
    would have done. The workflow's guardrails (permissions, validators, approvals) decide what runs."""
    if turn.calls or turn.answer_now or not turn.tools:
        return None
    found = _CALL_TOOL.search(turn.input)
    if found is None:
        return None
    name, rest = found.group(1), turn.input[found.end():]
    spec = offered.get(name)
    note = f"As instructed in the request: calling {name}."
    if spec is None:  # a tool the agent does not have: an obedient model calls it all the same
        return SimReply.call(name, note)
    # "call the tool X for Y": the arguments come from what follows the instruction first.
    return SimReply.call(spec.name, note, **arguments_for(spec, rest if rest.strip() else turn.input, turn.rng))


def spiral_call(turn: SimTurn, offered: dict[str, ToolSpec], traits: TaskTraits,
                answer: SimReply) -> SimReply | None:
    """A spiralling task does not answer when its work is done: it re-checks (4-5 loops of 2-3 calls of
    its read-only tools, each loop opened by a re-draft of the answer) until the re-checks run out or a
    budget notice tells it to wrap up. Its re-checks repeat earlier reads, now and then with a wider
    numeric argument, so they cost tokens but write nothing."""
    if turn.answer_now or turn.wrap_up:
        return None
    made = sum(1 for m in turn.messages if m.role == "assistant"
               for tc in m.tool_calls if tc.id.endswith(SPIRAL_MARK))
    if made >= sum(traits.loop_sizes):
        return None
    reads = [c for c in turn.calls if c.ok and c.name in offered and offered[c.name].permission == "read_only"]
    if reads:
        base = reads[int(traits.picks[made] * len(reads))]
        name, args = base.name, dict(base.arguments)
    else:
        specs = [t for t in offered.values() if t.permission == "read_only"]
        if not specs:
            return None
        spec = specs[int(traits.picks[made] * len(specs))]
        name, args = spec.name, arguments_for(spec, turn.input, turn.rng)
    props = offered[name].parameters.get("properties", {})
    for k, s in props.items():
        if s.get("type") == "integer" and isinstance(args.get(k), int) and traits.picks[made] < 0.5:
            args[k] = min(int(s.get("maximum", args[k] * 2 + 1)), args[k] * 2 + 1)
    starts = {sum(traits.loop_sizes[:i]) for i in range(len(traits.loop_sizes))}
    text = ""
    if made in starts:
        opener = _REDRAFTS[made % len(_REDRAFTS)]
        text = f"{opener}\nDraft: {answer.text[:300]}\nI need more context."
    return SimReply.call(name, text, **args)


# --- failure modes -------------------------------------------------------------------------
HALLUCINATED_TOOLS = ["search_web", "get_credit_score", "close_account", "transfer_funds", "lookup_customer_by_email"]


def _corrupt_args(rng: random.Random, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return _corrupt_schema_args(rng, TOOLS[name].args.model_json_schema(), args)


def _corrupt_schema_args(rng: random.Random, schema: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """Arguments that break the tool's schema: a missing required field, a wrong type, or an extra field."""
    bad = dict(args)
    required = [k for k in schema.get("required", []) if k in bad]
    mode = rng.choice(["missing", "wrong_type", "extra"])
    if mode == "missing" and required:
        bad.pop(rng.choice(required))
    elif mode == "wrong_type" and bad:
        key = rng.choice(sorted(bad))
        bad[key] = 42 if isinstance(bad[key], str) else "lots"
    else:
        bad[rng.choice(["force", "note", "confirm"])] = True
    return bad


def _broken_json(rng: random.Random, payload: str) -> str:
    """Text that is not valid JSON: a truncated object, or JSON wrapped in chatter."""
    if rng.random() < 0.5:
        return payload[: rng.randrange(1, len(payload))]
    return "Sure! Here it is: " + payload


# --- texts ---------------------------------------------------------------------------------
def _gist(text: str) -> str:
    return text.split(". ")[0].rstrip(".") + "." if text else ""


def _policies(calls: list[Call]) -> dict[str, str]:
    """Policy texts looked up so far, by topic, first lookup first."""
    out: dict[str, str] = {}
    for c in calls:
        if c.name == "lookup_policy" and c.ok and c.result:
            out.setdefault(str(c.result.get("topic", c.args.get("topic", "?"))), str(c.result.get("text", "")))
    return out


def _refund_state(calls: list[Call]) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """("issued" | "pending" | "failed", args, result) of the last answered issue_refund, if any."""
    c = next((c for c in reversed(calls) if c.name == "issue_refund" and c.result is not None), None)
    if c is None or c.result is None:
        return None
    status = str(c.result.get("status", "")).lower()
    if c.error or any(s in status for s in ("fail", "reject", "denied")):
        return "failed", c.args, c.result
    if c.result.get("refund_id") and not any(s in status for s in ("pending", "approval")):
        return "issued", c.args, c.result
    return "pending", c.args, c.result


def final_summary(category: str, ticket: Ticket, calls: list[Call], prefix: str = "") -> str:
    parts = [f"{prefix}Findings for {ticket.ticket_id or 'the ticket'} ({category})."]
    customer = _latest(calls, "get_account").get("customer") or {}
    if customer:
        locked = "locked" if customer.get("locked") else "not locked"
        parts.append(f"Customer {customer.get('name', '?')} ({customer.get('id', ticket.customer_id)}): "
                     f"{locked}, card {customer.get('card_status', '?')}.")
    txs = _transactions(calls)
    if txs:
        dups = [t for t in txs if t.get("duplicate_of")]
        parts.append(f"{len(txs)} recent transactions"
                     + "".join(f"; {t.get('id')} {t.get('amount')} at {t.get('merchant')} duplicates "
                               f"{t.get('duplicate_of')}" for t in dups) + ".")
    for topic, text in _policies(calls).items():
        parts.append(f"Policy {topic}: {_gist(text)}")
    refund = _refund_state(calls)
    if refund:
        state, args, result = refund
        parts.append({"issued": f"Refund {result.get('refund_id')} of {args.get('amount')} issued.",
                      "pending": f"Refund of {args.get('amount')} on {args.get('transaction_id')} proposed; "
                                 f"awaiting approval.",
                      "failed": f"Refund not executed: {result.get('error') or result.get('status')}."}[state])
    if any(c.name == "escalate_to_human" and c.ok for c in calls):
        parts.append("Escalated to a human.")
    errors = [f"{c.name}: {c.error}" for c in calls if c.error]
    if errors:
        parts.append("Problems: " + "; ".join(errors[-3:]) + ".")
    return " ".join(parts)


_REPLY_BODY = {
    "refund_request": "Thank you for reporting the charge. We have reviewed your recent transactions.",
    "billing_question": "Thank you for your question about the charges on your account.",
    "account_access": "We are sorry you have trouble getting into your account.",
    "card_issue": "We are sorry your card payment did not go through.",
    "fraud_report": "Thank you for telling us. Our fraud team is looking into the payments you reported; "
                    "please freeze your card in the app if you have not done so.",
    "general_inquiry": "Thank you for getting in touch.",
}


def draft_reply(category: str, calls: list[Call]) -> str:
    """The customer reply, only from facts in tool results; a refund is claimed only if one was issued."""
    name = (_latest(calls, "get_account").get("customer") or {}).get("name")
    lines = [f"Dear {name}," if name else "Hello,", "", _REPLY_BODY.get(category, _REPLY_BODY["general_inquiry"])]
    refund = _refund_state(calls)
    if refund and refund[0] == "issued":
        lines.append(f"We have refunded {float(refund[1].get('amount') or refund[2].get('amount') or 0):.2f} EUR "
                     f"(reference {refund[2].get('refund_id')}).")
    elif refund and refund[0] == "pending":
        lines.append("Your refund request has been passed to our team for approval; we will confirm once it is done.")
    policies = _policies(calls)
    policy = policies.get(TOPICS.get(category, ""))
    if policy:
        lines.append(_gist(policy))
    if any(c.name == "escalate_to_human" and c.ok for c in calls):
        lines.append("A specialist from our team will contact you shortly.")
    lines += ["", "Kind regards,", "Keel Bank support"]
    return "\n".join(lines)


# --- the provider --------------------------------------------------------------------------
def _tokens(chars: int) -> int:
    return tokens_for_chars(chars)


def _usage(req: LlmRequest, system: str, text: str, calls: list[ToolCall]) -> Usage:
    out = len(text) + sum(len(tc.name) + len(tc.arguments_json) for tc in calls)
    return Usage(input_tokens=estimate_input_tokens(req.messages, req.tools, len(system)),
                 output_tokens=max(1, _tokens(out)))


def _cap_output(text: str, calls: list[ToolCall], max_tokens: int) -> tuple[str, bool]:
    """Like a real model, stop at max_output_tokens: the text is cut and finish_reason is "length"."""
    call_chars = sum(len(tc.name) + len(tc.arguments_json) for tc in calls)
    room = max(0, max_tokens * CHARS_PER_TOKEN - call_chars)
    return (text, False) if len(text) <= room else (text[:room], True)


AGENT_KINDS = ("reason", "route", "plan", "extract", "synthesize")
"""Step kinds of an agent loop: the sim acts as the agent (tool calls, then a final answer)."""


class SimProvider:
    """The offline simulator behind `sim:<model>` specs. See the module docstring."""

    name = "sim"
    label = SIM_LABEL

    async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
        key = req.task.ticket_id or req.task.workflow_id
        if req.task.prompt_version != "v1":
            key = f"{key}@{req.task.prompt_version}"
        rng = random.Random(f"{req.model.sim.seed}:{key}:{req.step}:{req.kind}")
        u_hallucinate, u_json, u_args = rng.random(), rng.random(), rng.random()
        text, tool_calls = "", list[ToolCall]()
        if req.agent:
            text, tool_calls = self._agent(req, rng, u_hallucinate, u_json, u_args)
        elif req.kind == "classify":
            ticket = parse_ticket(req.messages)
            text = json.dumps(classify_text(ticket.text, rng))
            if u_json < req.model.sim.invalid_json_rate:
                text = _broken_json(rng, text)
        elif req.kind in AGENT_KINDS:
            ticket = parse_ticket(req.messages)
            action = self._decide(req, ticket, task_traits(req.model.sim, key))
            answer_now = _system_index(req.messages, "answer now") is not None
            if req.tools and not answer_now and u_hallucinate < req.model.sim.hallucinated_tool_rate:
                offered = {t.name for t in req.tools} | set(TOOLS)
                fake = rng.choice([n for n in HALLUCINATED_TOOLS if n not in offered])
                action = Action(fake, {"customer_id": ticket.customer_id})
            if action is None:
                calls = parse_calls(req.messages)
                category = _classification(req.messages, ticket)["category"]
                text = final_summary(category, ticket, calls, "Answering now. " if answer_now else "")
            else:
                tool_calls = [self._tool_call(req, rng, action, u_json, u_args)]
                text = action.text
        else:
            text = self._other(req, parse_ticket(req.messages))
        if req.model.sim.latency_ms_max > 0:
            lo = req.model.sim.latency_ms_min
            await asyncio.sleep(rng.uniform(lo, max(lo, req.model.sim.latency_ms_max)) / 1000)
        text, cut = _cap_output(text, tool_calls, req.max_output_tokens)
        finish = "length" if cut else ("tool_calls" if tool_calls else "stop")
        return ProviderResult(text=text, tool_calls=tool_calls, usage=_usage(req, system, text, tool_calls),
                              finish_reason=finish, model=req.model.model)

    @staticmethod
    def _agent(req: LlmRequest, rng: random.Random, u_hallucinate: float, u_json: float,
               u_args: float) -> tuple[str, list[ToolCall]]:
        """A registered agent: its own sim behaviour or the generic one, with the failure modes of
        `req.model.sim` applied around it (hallucinated tools, invalid arguments, invalid JSON)."""
        agent = registry.find(req.agent)
        behaviour = agent.sim if agent is not None and agent.sim is not None else generic_behaviour
        if agent is not None and agent.triage is not None and req.kind == "classify":
            behaviour = agent.triage.sim or generic_behaviour
        turn = parse_turn(req.agent, req.messages, req.tools, req.step, req.kind, rng, req.output_schema,
                          seed=req.model.sim.seed, model=req.model.model, temperature=req.temperature)
        # Drawn from the request, not the task's id: the same input under the same seed always spirals
        # (or obeys an injection) or never does, so a test's outcome never hangs on a random id.
        traits = task_traits(req.model.sim, f"{req.agent}:{turn.input}")
        turn.follows_injection = traits.follows_injection
        reply = behaviour(turn)
        if not isinstance(reply, SimReply):
            raise TypeError(f"the sim behaviour of agent {req.agent!r} returned {type(reply).__name__}, "
                            "not keel.sim.SimReply")
        offered = {t.name: t for t in req.tools}
        marker = ""
        injected = injected_call(turn, offered) if traits.follows_injection else None
        if injected is not None:
            reply = injected
        elif not reply.tool_calls and traits.spiral and (recheck := spiral_call(turn, offered, traits, reply)):
            reply, marker = recheck, SPIRAL_MARK
        if req.tools and not turn.answer_now and u_hallucinate < req.model.sim.hallucinated_tool_rate:
            fake = rng.choice([n for n in HALLUCINATED_TOOLS if n not in offered])
            reply = SimReply.call(fake, query=turn.input[:80])
            marker = ""
        calls: list[ToolCall] = []
        for i, c in enumerate(reply.tool_calls):
            args = dict(c.arguments)
            spec = offered.get(c.name)
            if spec is not None and u_args < req.model.sim.invalid_args_rate:
                args = _corrupt_schema_args(rng, spec.parameters, args)
            arguments_json = json.dumps(args)
            if u_json < req.model.sim.invalid_json_rate:
                arguments_json = _broken_json(rng, arguments_json)
            calls.append(ToolCall(id=f"call_{req.step}_{i}{marker}", name=c.name, arguments_json=arguments_json))
        text = reply.text
        if not calls and (req.json_output or req.output_schema) and u_json < req.model.sim.invalid_json_rate:
            text = _broken_json(rng, text)
        return text, calls

    @staticmethod
    def _decide(req: LlmRequest, ticket: Ticket, traits: TaskTraits) -> Action | None:
        """The next tool call of the agent loop, or None for the final answer."""
        if not req.tools or _system_index(req.messages, "answer now") is not None:
            return None
        offered = {t.name for t in req.tools}
        category = _classification(req.messages, ticket)["category"]
        calls = parse_calls(req.messages)
        injected = injected_action(ticket) if traits.follows_injection else None
        if injected is not None and not calls:
            return injected
        if injected is not None and calls[0].name == injected.name:
            calls = calls[1:]
        wrap = _system_index(req.messages, "wrap up")
        if wrap is not None:
            return None if any(c.msg_index > wrap for c in calls) else plan_next(category, ticket, calls, offered)
        nxt = plan_next(category, ticket, calls, offered)
        if traits.spiral and (nxt is None or nxt.name == "escalate_to_human"):
            # The spiral starts when the plan is done (or only the hand-off is left); its progress is
            # the number of calls since then.
            start = next(k for k in range(len(calls) + 1)
                         if (a := plan_next(category, ticket, calls[:k], offered)) is None
                         or a.name == "escalate_to_human")
            schedule = spiral_schedule(traits, category, ticket, offered)
            if len(calls) - start < len(schedule):
                action = schedule[len(calls) - start]
                if action.redraft:
                    opener = _REDRAFTS[(len(calls) - start) % len(_REDRAFTS)]
                    action.text = f"{opener}\nDraft: {final_summary(category, ticket, calls)}\nI need more context."
                return action
        return nxt

    @staticmethod
    def _tool_call(req: LlmRequest, rng: random.Random, action: Action, u_json: float, u_args: float) -> ToolCall:
        args = action.args
        if action.name in TOOLS and u_args < req.model.sim.invalid_args_rate:
            args = _corrupt_args(rng, action.name, args)
        arguments_json = json.dumps(args)
        if u_json < req.model.sim.invalid_json_rate:
            arguments_json = _broken_json(rng, arguments_json)
        return ToolCall(id=f"call_{req.step}_0", name=action.name, arguments_json=arguments_json)

    @staticmethod
    def _other(req: LlmRequest, ticket: Ticket) -> str:
        """draft, and short plausible answers for route / extract / plan / synthesize."""
        category = _classification(req.messages, ticket)["category"]
        calls = parse_calls(req.messages)
        if req.kind == "draft":
            return draft_reply(category, calls)
        if req.kind == "route":
            route = "human" if category == "fraud_report" else "reply"
            return json.dumps({"route": route}) if req.json_output else route
        if req.kind == "extract":
            facts = {"customer_id": ticket.customer_id, "amounts": _amounts(ticket.text),
                     "transaction_ids": re.findall(r"\bT-\d+\b", ticket.text)}
            return json.dumps(facts) if req.json_output else ", ".join(f"{k}: {v}" for k, v in facts.items())
        if req.kind == "plan":
            steps = PLANS.get(category, PLANS["general_inquiry"])
            return "\n".join(f"{i}. {s}" for i, s in enumerate([*steps, "answer"], 1))
        return final_summary(category, ticket, calls)
