"""Policies: what the support agent may do and when a ticket goes to a human."""

from __future__ import annotations

from pydantic import BaseModel, Field

from keel.types import ApprovalPolicy, Budget, StepKind, Tier

CATEGORIES = [
    "refund_request",
    "billing_question",
    "account_access",
    "card_issue",
    "fraud_report",
    "general_inquiry",
]

MAX_TICKET_CHARS = 20_000

DEFAULT_TIERS: dict[StepKind, Tier] = {
    "classify": "small",
    "route": "small",
    "extract": "small",
    "plan": "large",
    "reason": "large",
    "draft": "large",
    "synthesize": "large",
    "review": "large",
}


UNLIMITED = Budget(max_tokens=None, max_usd=None)

BUDGETS: dict[str, Budget] = {
    # Tuned with bench/cost.py (1,000 tickets, 15% spirals): at most ~2x the median ticket (4,778
    # tokens), and a wrap-up early enough that a spiral has room to finish instead of being killed.
    "support_ticket": Budget(max_tokens=10_000, max_usd=0.03, soft_ratio=0.45, hard_ratio=0.9),
}
"""Default budget per task type; a task may override it."""

EXPECTED_TOKENS: dict[str, int] = {"support_ticket": 5_000}
"""Tokens a task of each type is expected to use: the circuit breaker trips at 2x this on average."""


APPROVALS = ApprovalPolicy(
    approvers={"issue_refund": ["alice", "bob", "support-lead"]},
    timeout_s=24 * 3600,
)
"""Who may approve each `confirm` tool (KEEL_APPROVERS overrides the lists: see keel.settings)."""


ACKNOWLEDGEMENTS: dict[str, str] = {
    "refund_request": "we have your refund request and are checking the transaction now",
    "billing_question": "we have your question about a charge and are looking at your account now",
    "account_access": "we have your access problem and are checking your account now",
    "card_issue": "we have your card question and are checking your card now",
    "fraud_report": "we have your report; a specialist from our fraud team is taking it now",
    "general_inquiry": "we have your message and are looking into it now",
}
"""The fast acknowledgement: composed from the small tier's classification (the first step), readable
by the `progress` query seconds before the full answer."""


def acknowledgement(category: str, urgency: str) -> str:
    text = ACKNOWLEDGEMENTS.get(category, ACKNOWLEDGEMENTS["general_inquiry"])
    soon = " We will answer as a priority." if urgency in ("high", "urgent") else ""
    return f"Thank you for contacting Keel Bank: {text}.{soon}"


def budget_for(task_type: str) -> Budget:
    return BUDGETS.get(task_type, Budget())


class SupportPolicy(BaseModel):
    loop_kind: StepKind = "route"
    """Step kind of the agent loop's calls: choosing the next lookup (or stopping) is routing, so
    with tiering it runs on the small model; the customer-facing draft stays on the large one."""
    max_steps: int = 14
    """Cap on agent-loop iterations (LLM calls in the loop)."""
    min_confidence: float = 0.6
    """A classification below this goes to the human queue."""
    human_categories: list[str] = Field(default_factory=lambda: ["fraud_report"])
    """Categories that always go to a human."""
    max_invalid_outputs: int = 3
    """Invalid model outputs (bad JSON, unknown tools, bad arguments) and tool calls the guardrails
    refused, tolerated before the task escalates to a human."""
    max_refund: float = 500.0
    """Largest refund the agent may propose (the refunds policy); above it, disputes team."""
    classify_attempts: int = 2
    max_output_tokens: int = 800
    tiers: dict[StepKind, Tier] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    """Which model tier serves each step kind."""


DEFAULT_POLICY = SupportPolicy()


def ticket_problems(customer_id: str, text: str) -> list[str]:
    """Why a ticket cannot be worked on, or [] when it can. Used by the CLI and the workflow."""
    problems = []
    if not customer_id.strip():
        problems.append("customer id is empty")
    if not text.strip():
        problems.append("ticket text is empty")
    elif len(text) > MAX_TICKET_CHARS:
        problems.append(f"ticket text is {len(text):,} characters; the limit is {MAX_TICKET_CHARS:,}")
    return problems
