"""Prices per million tokens, by provider and model, with effective dates and long-prompt bands.

A model with no price is refused (`UnpricedModelError`), never counted as $0. Models outside the
built-in table are priced in the setting KEEL_PRICES, without editing this file: a path to a JSON or
TOML file, or inline JSON, mapping "provider:model" to {"input": USD per 1M tokens, "output": ...,
optional "cached_input"}, or to {"self_hosted": true} (optionally with input/output figures, the
user's estimate of the hardware's cost; default 0) for a model the user serves. Its prices override
and extend the table. A self-hosted model is priced by its declared figures and labelled self-hosted
wherever its cost is shown, as the sim is labelled a simulator.

The user's prices are read once per process, outside workflow code: by the worker before it polls, by
the command line as it starts (and, if nothing read them yet, at the first lookup outside a workflow).
A task's starter pins them in the task's input (`AgentInput.prices`, the patterns' `prices`) and the
workflow prices with what its input carries first, so it sees the same prices on replay.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import date

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from temporalio import workflow

from keel.config_source import ConfigSourceError, read_table
from keel.types import ModelSpec, Price, Usage

__all__ = [
    "PRICES",
    "SELF_HOSTED_LABEL",
    "Price",
    "PricesError",
    "UnpricedModelError",
    "cost_usd",
    "is_self_hosted",
    "load_prices",
    "model_label",
    "parse_prices",
    "price_for",
    "use_prices",
    "user_prices",
]

SELF_HOSTED_LABEL = "self-hosted"
"""How a self-hosted model's costs are labelled (the declared estimate of its hardware, not a bill)."""


class UnpricedModelError(ValueError):
    pass


class PricesError(ValueError):
    """KEEL_PRICES cannot be used: the message names the file (or inline JSON) and the entries at fault."""


# (provider, model) -> prices, newest effective date last.
PRICES: dict[tuple[str, str], list[Price]] = {
    # The simulator is priced like a small and a large hosted model so that its costs are
    # realistic; the figures it produces are simulated.
    ("sim", "sim-small"): [Price(input=0.15, output=0.60, cached_input=0.075)],
    ("sim", "sim-large"): [Price(input=2.50, output=10.00, cached_input=1.25)],
    # keel.testing.ScriptedModel, priced like the large simulator so budgets behave as in production.
    ("scripted", "scripted"): [Price(input=2.50, output=10.00, cached_input=1.25)],
    # `keel up --model local`: a small instruction model served on this machine (llama.cpp's server).
    ("openai", "qwen2.5-coder-1.5b-instruct"): [Price(input=0.0, output=0.0, self_hosted=True)],
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


class PriceEntry(BaseModel):
    """One model's price in KEEL_PRICES."""

    model_config = ConfigDict(extra="forbid")

    input: float | None = Field(None, ge=0)
    """USD per million input tokens."""
    output: float | None = Field(None, ge=0)
    """USD per million output tokens."""
    cached_input: float | None = Field(None, ge=0)
    """USD per million cached input tokens (default: the input price)."""
    self_hosted: bool = False

    @model_validator(mode="after")
    def _priced(self) -> PriceEntry:
        if not self.self_hosted and (self.input is None or self.output is None):
            missing = " and ".join(f'"{k}"' for k in ("input", "output") if getattr(self, k) is None)
            raise ValueError(f"{missing} missing: give both (USD per million tokens), or \"self_hosted\": true "
                             "for a model you serve yourself")
        return self

    def price(self) -> Price:
        return Price(input=self.input or 0.0, output=self.output or 0.0, cached_input=self.cached_input,
                     self_hosted=self.self_hosted)


def _example(key: str = "openai:my-model") -> str:
    return (f"KEEL_PRICES='{{\"{key}\": {{\"input\": 0.15, \"output\": 0.60}}}}' (USD per million tokens), or "
            f"'{{\"{key}\": {{\"self_hosted\": true}}}}' for a model you serve yourself")


def _entry_problem(e: ValidationError) -> str:
    out = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{where}: {msg}" if where else msg)
    return "; ".join(out)


def parse_prices(source: str | None) -> dict[str, Price]:
    """The prices of KEEL_PRICES (a path to a .json or .toml file, or inline JSON starting with `{`), by
    "provider:model". Raises PricesError naming the file and every bad entry."""
    text = (source or "").strip()
    if not text:
        return {}
    try:
        raw, where = read_table("KEEL_PRICES", text)
    except ConfigSourceError as e:
        raise PricesError(str(e)) from None
    if not isinstance(raw, dict):
        raise PricesError(f'{where}: must map "provider:model" to a price, e.g. {_example()}')
    prices: dict[str, Price] = {}
    problems: list[str] = []
    for key, value in raw.items():
        try:
            spec = ModelSpec.parse(str(key))
        except ValueError as e:
            problems.append(f"entry {key!r}: {e}")
            continue
        try:
            prices[f"{spec.provider}:{spec.model}"] = PriceEntry.model_validate(value).price()
        except ValidationError as e:
            problems.append(f"entry {key!r}: {_entry_problem(e)}")
    if problems:
        raise PricesError(f"{where}: " + "; ".join(problems))
    return prices


_user: dict[str, Price] = {}
_loaded = False
_load_error = ""


def use_prices(prices: Mapping[str, Price]) -> None:
    """Make `prices` this process's user prices (over the built-in table)."""
    global _user, _loaded, _load_error
    _user, _loaded, _load_error = dict(prices), True, ""


def load_prices(source: str | None) -> dict[str, Price]:
    """Read KEEL_PRICES's value and make it this process's user prices; raises PricesError. Call it
    outside workflow code (the worker before it polls, the command line as it starts)."""
    prices = parse_prices(source)
    use_prices(prices)
    return prices


def _ensure_loaded() -> None:
    """Read KEEL_PRICES from the environment if nothing did yet, never inside a workflow (no I/O there:
    the worker reads it before it polls). A bad value leaves no user prices, and says why when a model
    is then found unpriced (the command line and the worker report it at start)."""
    global _loaded, _load_error
    if _loaded or workflow.in_workflow():
        return
    try:
        load_prices(os.environ.get("KEEL_PRICES"))
    except PricesError as e:
        _loaded, _load_error = True, str(e)


def user_prices() -> dict[str, Price]:
    """This process's user prices (KEEL_PRICES), by "provider:model": what a starter pins in a task."""
    _ensure_loaded()
    return dict(_user)


def price_for(provider: str, model: str, on: date | None = None, pinned: Mapping[str, Price] | None = None) -> Price:
    """The price of a model: the task's pinned prices first (its input's), then the user's (KEEL_PRICES),
    then the built-in table."""
    key = f"{provider}:{model}"
    found = pinned.get(key) if pinned else None
    if found is None:
        _ensure_loaded()
        found = _user.get(key)
    if found is not None:
        return found
    prices = PRICES.get((provider, model))
    if not prices:
        why = f" (KEEL_PRICES is not usable: {_load_error})" if _load_error else ""
        raise UnpricedModelError(
            f"no price for {provider}:{model}: a model with no price is never counted as free; price it in "
            f"KEEL_PRICES, e.g. {_example(key)}{why}"
        )
    if on is None:
        return prices[-1]
    valid = [p for p in prices if p.effective_from <= on]
    return valid[-1] if valid else prices[0]


def is_self_hosted(provider: str, model: str, pinned: Mapping[str, Price] | None = None) -> bool:
    try:
        return price_for(provider, model, pinned=pinned).self_hosted
    except UnpricedModelError:
        return False


def model_label(spec: ModelSpec, pinned: Mapping[str, Price] | None = None) -> str:
    """How a model is shown beside its costs: its label, marked self-hosted when it is."""
    if is_self_hosted(spec.provider, spec.model, pinned):
        return f"{spec.label} [{SELF_HOSTED_LABEL}]"
    return spec.label


def cost_usd(provider: str, model: str, usage: Usage, on: date | None = None,
             pinned: Mapping[str, Price] | None = None) -> float:
    price = price_for(provider, model, on, pinned)
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
