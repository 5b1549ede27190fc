"""The triage agent: classifies one customer-support message into a category, an urgency and a
confidence. Run alone (`keel run triage "..."`) or as a swarm of independent peers whose categories
are put to a vote (`keel swarm "..."`: the generic swarm pattern, KeelSwarm, over this agent)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

import keel
from agents.triage.sim import triage_sim

Category = Literal["refund_request", "billing_question", "account_access", "card_issue", "fraud_report",
                   "general_inquiry"]
Urgency = Literal["low", "normal", "high", "urgent"]


class Triage(BaseModel):
    category: Category = Field(description="Exactly one category of the message")
    urgency: Urgency
    confidence: float = Field(ge=0, le=1, description="How sure the reviewer is of the category")


triage = keel.Agent(
    name="triage",
    prompt="prompts/triage.v1.md",
    models={"small": "sim:sim-small", "large": "sim:sim-large"},
    # One classification call (~600 tokens of prompt, a short JSON answer), and one retry of an
    # invalid answer; a swarm of K peers reserves K of these from its own budget.
    budget=keel.Budget(max_tokens=2_000, max_usd=0.01),
    max_steps=1,
    max_output_tokens=200,
    max_invalid_outputs=1,
    expected_tokens=800,
    output_type=Triage,
    sim=triage_sim,
    description="Classifies a customer-support message: category, urgency, confidence.",
)

AGENTS = [triage]
