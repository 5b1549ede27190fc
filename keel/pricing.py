"""Prices per million tokens, by provider and model, with effective dates and long-prompt bands.

A model with no price is refused (`UnpricedModelError`), never counted as $0.
"""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel

from keel.types import Usage


class Price(BaseModel):
    input: float
    """USD per million input tokens (not served from cache)."""
    output: float
    """USD per million output tokens (reasoning tokens included unless `reasoning` is set)."""
    cached_input: float | None = None
    """USD per million cached input tokens; None means the input price."""
    reasoning: float | None = None
    """USD per million reasoning tokens; None means the output price."""
    long_prompt_threshold: int | None = None
    """A request whose input exceeds this many tokens is priced with `long_prompt` instead."""
    long_prompt: Price | None = None
    effective_from: date = date(2024, 1, 1)


class UnpricedModelError(ValueError):
    pass


# (provider, model) -> prices, newest effective date last.
PRICES: dict[tuple[str, str], list[Price]] = {
    # The simulator is priced like a small and a large hosted model so that its costs are
    # realistic; the figures it produces are simulated.
    ("sim", "sim-small"): [Price(input=0.15, output=0.60, cached_input=0.075)],
    ("sim", "sim-large"): [Price(input=2.50, output=10.00, cached_input=1.25)],
    # keel.testing.ScriptedModel, priced like the large simulator so budgets behave as in production.
    ("scripted", "scripted"): [Price(input=2.50, output=10.00, cached_input=1.25)],
    ("openai", "gpt-4o-mini"): [Price(input=0.15, output=0.60, cached_input=0.075)],
    ("openai", "gpt-4o"): [Price(input=2.50, output=10.00, cached_input=1.25)],
    ("openai", "gpt-4.1-mini"): [Price(input=0.40, output=1.60, cached_input=0.10, effective_from=date(2025, 4, 14))],
    ("openai", "gpt-4.1"): [Price(input=2.00, output=8.00, cached_input=0.50, effective_from=date(2025, 4, 14))],
    ("openai", "o4-mini"): [Price(input=1.10, output=4.40, cached_input=0.275, effective_from=date(2025, 4, 16))],
    ("anthropic", "claude-haiku-4-5"): [
        Price(input=1.00, output=5.00, cached_input=0.10, effective_from=date(2025, 10, 1))
    ],
    ("anthropic", "claude-sonnet-4-5"): [
        Price(
            input=3.00,
            output=15.00,
            cached_input=0.30,
            long_prompt_threshold=200_000,
            long_prompt=Price(input=6.00, output=22.50, cached_input=0.60),
            effective_from=date(2025, 9, 29),
        )
    ],
}


def price_for(provider: str, model: str, on: date | None = None) -> Price:
    prices = PRICES.get((provider, model))
    if not prices:
        raise UnpricedModelError(
            f"no price for {provider}:{model}; add it to keel/pricing.py PRICES before using it"
        )
    if on is None:
        return prices[-1]
    valid = [p for p in prices if p.effective_from <= on]
    return valid[-1] if valid else prices[0]


def cost_usd(provider: str, model: str, usage: Usage, on: date | None = None) -> float:
    price = price_for(provider, model, on)
    if price.long_prompt and price.long_prompt_threshold and usage.input_tokens > price.long_prompt_threshold:
        price = price.long_prompt
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    reasoning = min(usage.reasoning_tokens, usage.output_tokens)
    total = (
        (usage.input_tokens - cached) * price.input
        + cached * (price.cached_input if price.cached_input is not None else price.input)
        + (usage.output_tokens - reasoning) * price.output
        + reasoning * (price.reasoning if price.reasoning is not None else price.output)
    )
    return round(total / 1_000_000, 8)
