"""The swarm pattern's contract and decisions: K peers answer the same classification question, the
answers are counted, agreement becomes the confidence, and below the threshold a human decides.

Pure (pydantic + stdlib): the workflow (workflows.swarm) calls these functions, the tests call them
directly (hypothesis properties of the aggregation).

Aggregation (`aggregate`):
- each peer's output is parsed (`parse_output`): a JSON object `{category, urgency, confidence}` with a
  category of keel.policy.CATEGORIES. Anything else (invalid JSON, an unknown category, a peer that
  failed, ran out of budget or never started) is an ABSTENTION, recorded with why, never dropped;
- votes = valid answers per category; the majority label is the category with the most votes; a tie
  goes to the label whose voters' confidences sum highest (math.fsum: exact, so the order of the peers
  never matters), then to the first in alphabetical order;
- agreement = majority votes / K, over ALL K peers: an abstention counts against agreement;
- confidence = agreement. The peers' own confidences are reported beside it (`mean_peer_confidence`,
  the mean over the majority's voters) but do not enter it: a model's self-reported confidence is
  poorly calibrated, while K peers converging on one answer is evidence the swarm can measure;
- the answer is accepted iff agreement >= threshold (0 < threshold <= 1); otherwise it goes to the
  human queue with every peer's answer in the reason (`escalation_reason`, at most 1000 characters).
"""

from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from keel.policy import CATEGORIES
from keel.types import (
    Budget,
    BudgetReport,
    ChildRecord,
    Classification,
    Decision,
    InjectedFailure,
    ModelSpec,
    SimConfig,
    TaskUsage,
)

URGENCY_ORDER = ["low", "normal", "high", "urgent"]
MAX_PEERS = 12
QUEUE_REASON_CHARS = 1000
"""EscalateArgs.reason's limit: every peer's answer must fit in it."""

DEFAULT_QUESTION = ("Classify the customer-support ticket given as context into exactly one category, and answer "
                    "with the JSON object described in your instructions.")


class SwarmPolicy(BaseModel):
    threshold: float = Field(0.7, gt=0, le=1)
    """Agreement at or above which the swarm's answer is accepted; below it a human decides."""
    peers: int = Field(5, ge=1, le=MAX_PEERS)
    peer_budget: Budget = Field(default_factory=lambda: Budget(max_tokens=2_000, max_usd=0.01))
    """Each peer's own cap (one classification call: ~600 tokens of prompt, a short JSON answer)."""
    peer_max_output_tokens: int = 200
    peer_attempts: int = Field(1, ge=1, le=3)
    """A failed peer is an abstention; >1 retries it alone first (as a new child workflow)."""


SWARM_POLICY = SwarmPolicy()
TASK_TYPE = "swarm"
PEER_TASK_TYPE = "swarm_peer"
PROMPT = "swarm/classify"


class PeerSpec(BaseModel):
    """One peer: its model, sampling temperature and sim seed (plus test knobs)."""

    name: str = ""
    """Default `peer-<i>` (1-based); part of the child's workflow id."""
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(provider="sim", model="sim-large"))
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int = 0
    sim: SimConfig | None = None
    """Override of the swarm's sim settings for this peer (its seed is still `seed`)."""
    budget: Budget | None = None
    """Override of the policy's per-peer budget."""
    inject_failure: InjectedFailure | None = None
    """Fault injection: the peer's child workflow fails (see AgentTaskInput.inject_failure)."""


class SwarmInput(BaseModel):
    """Input of SwarmWorkflow. Lenient on purpose: problems are reported by the workflow (`problems`)."""

    text: str
    """The ticket text (or whatever the question is about)."""
    customer_id: str = ""
    """Chargeback tag and queue owner; empty: "internal"."""
    ticket_id: str = ""
    """Business key: the sim peers seed on it, so the same ticket replays the same votes."""
    question: str = ""
    """What each peer is asked; empty: DEFAULT_QUESTION. The answer is always a category, so it can be counted."""
    peers: int = Field(SWARM_POLICY.peers, ge=1, le=MAX_PEERS)
    """K, when `peer_specs` is empty."""
    peer_specs: list[PeerSpec] = Field(default_factory=list)
    """Explicit peers (K = their number); empty: `default_peers(peers, models)`."""
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(provider="sim", model="sim-small"),
                                                             ModelSpec(provider="sim", model="sim-large")])
    """Models the default spread alternates over."""
    threshold: float | None = Field(None, gt=0, le=1)
    """None: the policy's (SWARM_POLICY.threshold)."""
    sim: SimConfig = Field(default_factory=SimConfig)
    """Base sim settings of every peer (each peer's seed replaces `seed`)."""
    prompt_version: str = "v1"
    budget: Budget | None = None
    """The whole swarm's budget (the sum of its peers'); None: keel.policy.BUDGETS["swarm"]."""
    peer_budget: Budget | None = None
    """Every peer's cap; None: SWARM_POLICY.peer_budget."""
    peer_attempts: int = Field(SWARM_POLICY.peer_attempts, ge=1, le=3)
    feature: str = "support"


SwarmStatus = Literal["accepted", "escalated", "rejected"]


class PeerAnswer(BaseModel):
    """One peer's answer, or its abstention with why."""

    peer: str
    workflow_id: str = ""
    model: str = ""
    temperature: float = 0.0
    seed: int = 0
    status: str = ""
    """The child's status (completed, budget_exceeded, failed, not_started)."""
    label: str | None = None
    """The category it voted for; None: abstained."""
    urgency: str | None = None
    confidence: float | None = None
    raw: str = ""
    """Its output as given (cut at 500 characters)."""
    valid: bool = False
    error: str = ""
    """Why it abstained."""
    usage: TaskUsage = Field(default_factory=TaskUsage)


class Aggregate(BaseModel):
    answer: str | None = None
    urgency: str | None = None
    """The most common urgency among the majority's voters (ties: the more urgent)."""
    agreement: float = 0.0
    confidence: float = 0.0
    mean_peer_confidence: float | None = None
    votes: dict[str, int] = Field(default_factory=dict)
    abstentions: int = 0
    k: int = 0
    threshold: float = SWARM_POLICY.threshold
    accepted: bool = False


class SwarmResult(BaseModel):
    workflow_id: str
    ticket_id: str = ""
    customer_id: str = ""
    status: SwarmStatus
    reason: str = ""
    answer: str | None = None
    urgency: str | None = None
    agreement: float = 0.0
    confidence: float = 0.0
    mean_peer_confidence: float | None = None
    threshold: float = SWARM_POLICY.threshold
    votes: dict[str, int] = Field(default_factory=dict)
    abstentions: int = 0
    peers: list[PeerAnswer] = Field(default_factory=list)
    children: list[ChildRecord] = Field(default_factory=list)
    usage: TaskUsage = Field(default_factory=TaskUsage)
    """The whole family's: the parent's own calls plus every peer's (the ledger's family_totals)."""
    own_usage: TaskUsage = Field(default_factory=TaskUsage)
    """The parent's own model calls (none: it aggregates deterministically)."""
    budget: BudgetReport = Field(default_factory=BudgetReport)
    decisions: list[Decision] = Field(default_factory=list)
    report_id: str = ""
    """Accepted: the published swarm_answer (reports table)."""
    queue_item_id: str = ""
    """Escalated: the human queue item."""
    queue_reason: str = ""


# --- peers ---------------------------------------------------------------------------------
def default_peers(k: int, models: list[ModelSpec]) -> list[PeerSpec]:
    """The default spread: models alternating (sim-small, sim-large, ...), temperatures evenly from 0.0
    to 1.0, seeds 1..K."""
    models = models or [ModelSpec()]
    return [PeerSpec(name=f"peer-{i + 1}", model=models[i % len(models)],
                     temperature=round(i / (k - 1), 4) if k > 1 else 0.0, seed=i + 1) for i in range(k)]


def resolve_peers(inp: SwarmInput) -> list[PeerSpec]:
    specs = inp.peer_specs or default_peers(inp.peers, inp.models)
    return [s if s.name else s.model_copy(update={"name": f"peer-{i + 1}"}) for i, s in enumerate(specs)]


def threshold_of(inp: SwarmInput) -> float:
    return SWARM_POLICY.threshold if inp.threshold is None else inp.threshold


def problems(inp: SwarmInput) -> list[str]:
    """Why the swarm cannot run, or []."""
    out = []
    if not inp.text.strip():
        out.append("text is empty")
    elif len(inp.text) > 20_000:
        out.append(f"text is {len(inp.text):,} characters; the limit is 20,000")
    specs = resolve_peers(inp)
    if len(specs) > MAX_PEERS:
        out.append(f"{len(specs)} peers; at most {MAX_PEERS}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        out.append(f"peer names are not unique: {names}")
    return out


def peer_context(inp: SwarmInput) -> str:
    """The context message every peer gets (the sim model reads the ticket text after the blank line)."""
    return f"Customer: {inp.customer_id or 'internal'}\nTicket: {inp.ticket_id or '-'}\n\n{inp.text}"


# --- parsing and counting ------------------------------------------------------------------
def parse_output(text: str) -> tuple[Classification | None, str]:
    """A peer's classification, or None and why it is not one. The whole output must be one JSON object
    (a Markdown code fence around it is tolerated); chatter around it makes it invalid."""
    s = text.strip()
    if s.startswith("```") and s.endswith("```"):
        s = s[3:-3].removeprefix("json").strip()
    if not s:
        return None, "empty output"
    try:
        value = json.loads(s)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at character {e.pos})"
    if not isinstance(value, dict):
        return None, f"not a JSON object but {type(value).__name__}"
    if value.get("category") not in CATEGORIES:
        return None, f"unknown category {value.get('category')!r}"
    try:
        return Classification.model_validate(value), ""
    except ValidationError as e:
        return None, "invalid answer: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())


def peer_answer(spec: PeerSpec, output: str | None, *, workflow_id: str = "", model: str = "", status: str = "",
                error: str = "", usage: TaskUsage | None = None) -> PeerAnswer:
    """A peer's answer from its child's output; `output` None (no result) or a non-completed status is an
    abstention whose error says why."""
    base = PeerAnswer(peer=spec.name, workflow_id=workflow_id, model=model or spec.model.label,
                      temperature=spec.temperature, seed=spec.seed, status=status, raw=(output or "")[:500],
                      usage=usage or TaskUsage())
    if output is None or status not in ("", "completed"):
        return base.model_copy(update={"error": error or f"peer {status or 'gave no answer'}"})
    cls, why = parse_output(output)
    if cls is None:
        return base.model_copy(update={"error": why})
    return base.model_copy(update={"valid": True, "label": cls.category, "urgency": cls.urgency,
                                   "confidence": cls.confidence})


def aggregate(answers: list[PeerAnswer], threshold: float) -> Aggregate:
    """Majority vote over K answers; see the module docstring for every rule."""
    k = len(answers)
    valid = [a for a in answers if a.valid and a.label is not None]
    votes: dict[str, int] = {}
    for a in valid:
        votes[a.label or ""] = votes.get(a.label or "", 0) + 1
    votes = dict(sorted(votes.items(), key=lambda kv: (-kv[1], kv[0])))
    if not valid or k == 0:
        return Aggregate(votes=votes, abstentions=k - len(valid), k=k, threshold=threshold)

    def conf_sum(label: str) -> float:
        return math.fsum(a.confidence or 0.0 for a in valid if a.label == label)

    answer = min(votes, key=lambda lb: (-votes[lb], -conf_sum(lb), lb))
    voters = [a for a in valid if a.label == answer]
    urgencies: dict[str, int] = {}
    for a in voters:
        u = a.urgency or "normal"
        urgencies[u] = urgencies.get(u, 0) + 1
    urgency = max(urgencies, key=lambda u: (urgencies[u], URGENCY_ORDER.index(u) if u in URGENCY_ORDER else -1))
    agreement = votes[answer] / k
    return Aggregate(answer=answer, urgency=urgency, agreement=agreement, confidence=agreement,
                     mean_peer_confidence=round(conf_sum(answer) / len(voters), 4), votes=votes,
                     abstentions=k - len(valid), k=k, threshold=threshold, accepted=agreement >= threshold)


def queue_priority(answers: list[PeerAnswer]) -> str:
    """The most urgent urgency any valid peer saw: a human triaging the queue should not miss it."""
    seen = [URGENCY_ORDER.index(a.urgency) for a in answers if a.valid and a.urgency in URGENCY_ORDER]
    return URGENCY_ORDER[max(seen)] if seen else "normal"


def _peer_line(a: PeerAnswer, detail: bool, err_chars: int) -> str:
    who = f"{a.peer} ({a.model.split(' ')[0]} T={a.temperature:g} seed={a.seed})" if detail else a.peer
    if a.valid:
        return f"{who}: {a.label} {a.confidence:.2f}"
    return f"{who}: ABSTAINED ({a.error[:err_chars]})" if err_chars else f"{who}: ABSTAINED"


def escalation_reason(agg: Aggregate, answers: list[PeerAnswer], limit: int = QUEUE_REASON_CHARS) -> str:
    """Why the swarm escalated, with every peer's answer, in at most `limit` characters: less detail per
    peer (model, seed, temperature, the abstention's error) is given before any peer is left out."""
    votes = ", ".join(f"{lb} {n}" for lb, n in agg.votes.items()) or "none"
    head = (f"Swarm disagreement: agreement {agg.agreement:.2f} < threshold {agg.threshold:.2f} "
            f"(majority {agg.answer or '-'}; votes: {votes}; abstained {agg.abstentions} of {agg.k}). Peers: ")
    for detail, err_chars in ((True, 80), (True, 30), (False, 30), (False, 0)):
        text = head + "; ".join(_peer_line(a, detail, err_chars) for a in answers)
        if len(text) <= limit:
            return text
    return text[: limit - 1] + "…"


def answer_body(agg: Aggregate, answers: list[PeerAnswer]) -> str:
    """The published swarm_answer: the answer, its agreement and every peer's answer, as JSON."""
    return json.dumps({
        "answer": agg.answer, "urgency": agg.urgency, "agreement": agg.agreement, "confidence": agg.confidence,
        "mean_peer_confidence": agg.mean_peer_confidence, "threshold": agg.threshold, "votes": agg.votes,
        "abstentions": agg.abstentions,
        "peers": [{"peer": a.peer, "model": a.model, "temperature": a.temperature, "seed": a.seed,
                   "label": a.label, "confidence": a.confidence, "error": a.error or None} for a in answers],
    }, indent=1)
