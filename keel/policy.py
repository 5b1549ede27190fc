"""Platform defaults: which tier each kind of step runs on, and the budget that means "none"."""

from __future__ import annotations

from keel.types import Budget, StepKind, Tier

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
"""The tier a step kind runs on when an agent names no model for it."""

UNLIMITED = Budget(max_tokens=None, max_usd=None)
