"""Provider rate limits (KEEL_RATE_LIMITS): requests and tokens per minute per provider:model, shared by
every worker of a Temporal namespace.

Enforced by one limiter entity workflow per provider:model (workflows.ratelimit): before calling a
limited model, the LLM activity reserves a slot with an update (activities.ratelimit) and waits,
heartbeating, until its slot comes. Slots are spaced evenly (a leaky bucket with no burst): a request
every 60/rpm seconds, and a call reserving T tokens holds the next one back by T*60/tpm seconds. A call
counts its estimated input tokens plus its max output tokens, as providers count them against a limit.
A slot further away than the horizon is not reserved: the call fails as rate limited (retryable, the
retry delayed until about then), like a provider's 429, and the workflow waits rate limits out
(names.RATE_LIMIT_PATIENCE) instead of failing the task.

The decision is a plain function of (state, request, now), tested without Temporal.
"""

from __future__ import annotations

import json
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RATE_LIMITER_WORKFLOW = "ProviderRateLimiter"
RATE_LIMIT_ACQUIRE_UPDATE = "acquire"
RATE_LIMIT_STATE_QUERY = "state"

_KEY = re.compile(r"^[a-z][a-z0-9_-]*:\S+$")


class RateLimitsError(ValueError):
    """KEEL_RATE_LIMITS cannot be used: the message names the entry at fault."""


class RateLimit(BaseModel):
    """One provider:model's limits in KEEL_RATE_LIMITS (either or both)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: float | None = Field(None, gt=0)
    """Requests per minute."""
    tpm: float | None = Field(None, gt=0)
    """Tokens per minute (input + output, reserved as estimated input + max output tokens)."""

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimit:
        if self.rpm is None and self.tpm is None:
            raise ValueError('give "rpm" (requests per minute), "tpm" (tokens per minute) or both')
        return self


def parse_rate_limits(raw: str | None) -> dict[str, RateLimit]:
    """KEEL_RATE_LIMITS, inline JSON: {"provider:model": {"rpm": 500, "tpm": 200000}, ...}."""
    if raw is None or not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RateLimitsError(f"KEEL_RATE_LIMITS: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RateLimitsError('KEEL_RATE_LIMITS must map "provider:model" to {"rpm": ..., "tpm": ...}')
    limits: dict[str, RateLimit] = {}
    for key, value in data.items():
        if not _KEY.match(key):
            raise RateLimitsError(f"KEEL_RATE_LIMITS entry {key!r}: the key must be provider:model "
                                  "(e.g. openai:gpt-4o-mini)")
        try:
            limits[key] = RateLimit.model_validate(value)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
            raise RateLimitsError(f"KEEL_RATE_LIMITS entry {key!r}: {problems}") from None
    return limits


def limiter_workflow_id(key: str, scope: str = "") -> str:
    """One limiter per provider:model (and scope: the task queue of the workers that share it)."""
    return f"keel-rate-limit/{scope}/{key}" if scope else f"keel-rate-limit/{key}"


class AcquireRequest(BaseModel):
    key: str
    """provider:model."""
    limit: RateLimit
    """The caller's configured limit (the latest caller's wins: workers share one configuration)."""
    tokens: int = Field(0, ge=0)
    """Tokens this call reserves (estimated input + max output)."""
    horizon_s: float = Field(30.0, gt=0)
    """Reserve only a slot at most this far away; further, refuse with the delay."""


class Grant(BaseModel):
    granted: bool
    wait_s: float
    """Granted: wait this long, then call. Refused: ask again after about this long."""


class LimiterState(BaseModel):
    next_request_at: float = 0.0
    """Epoch seconds of the next free request slot."""
    next_token_at: float = 0.0
    """Epoch seconds at which the reserved tokens have drained."""
    granted: int = 0
    refused: int = 0
    tokens_reserved: int = 0
    """Of the granted calls (estimated input + max output tokens)."""
    max_events_before_continue: int = 1000


def decide(state: LimiterState, req: AcquireRequest, now: float) -> Grant:
    """Reserve the next slot for `req` at `now` (epoch seconds), in place; deterministic."""
    at = max(now, state.next_request_at, state.next_token_at)
    wait = at - now
    if wait > req.horizon_s:
        state.refused += 1
        return Grant(granted=False, wait_s=round(wait - req.horizon_s / 2, 3))
    if req.limit.rpm is not None:
        state.next_request_at = at + 60.0 / req.limit.rpm
    if req.limit.tpm is not None:
        state.next_token_at = at + req.tokens * 60.0 / req.limit.tpm
    state.granted += 1
    state.tokens_reserved += req.tokens
    return Grant(granted=True, wait_s=round(wait, 3))
