"""Fault injection for chaos runs (`keel chaos run SUITE ...`, or `AgentInput.chaos`): the worker's tool
and model-call activities misbehave on purpose, at the rates given, so a run shows how the agents degrade.

Every draw is a hash of the chaos seed, the kind of fault, the call's key and its attempt: the same task
meets the same faults, and a retried attempt draws again (a transient fault may pass on retry).
- tools: `tool_error_rate` (a transient backend error: the activity fails and Temporal retries it),
  `tool_timeout_rate` (the call times out: also retried), `tool_garbage_rate` (the call "succeeds" with a
  payload of garbage, the tool not run), `tool_latency_ms` (added to every call);
- the model: `provider_429_rate` (rate limited, with Retry-After) and `provider_500_rate` (unavailable),
  per attempt, retried by the model call's retry policy.
Pure.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field


class Chaos(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tool_error_rate: float = Field(0.0, ge=0, le=1)
    tool_timeout_rate: float = Field(0.0, ge=0, le=1)
    tool_garbage_rate: float = Field(0.0, ge=0, le=1)
    tool_latency_ms: int = Field(0, ge=0, le=60_000)
    provider_429_rate: float = Field(0.0, ge=0, le=1)
    provider_500_rate: float = Field(0.0, ge=0, le=1)
    tool_error_rates: dict[str, float] = Field(default_factory=dict)
    """Per tool: its own error rate, in place of `tool_error_rate` (e.g. {"get_transactions": 0.5})."""
    seed: int = 0

    @property
    def active(self) -> bool:
        return any((self.tool_error_rate, self.tool_timeout_rate, self.tool_garbage_rate, self.tool_latency_ms,
                    self.provider_429_rate, self.provider_500_rate, any(self.tool_error_rates.values())))


def draw(chaos: Chaos, kind: str, key: str, attempt: int) -> float:
    """A uniform number in [0, 1) for this fault, call and attempt."""
    digest = hashlib.sha256(f"{chaos.seed}|{kind}|{key}|{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def hits(chaos: Chaos | None, kind: str, key: str, attempt: int, tool: str | None = None) -> bool:
    if chaos is None:
        return False
    if kind == "tool_error" and tool is not None and tool in chaos.tool_error_rates:
        rate = chaos.tool_error_rates[tool]
    else:
        rate = float(getattr(chaos, f"{kind}_rate", 0.0))
    return rate > 0 and draw(chaos, kind, key, attempt) < rate


GARBAGE: dict[str, object] = {"data": "\x00\ufffd<html><body>502 Bad Gateway</body></html>", "status": None,
                              "items": [None, "", {}]}
"""What a tool answers when chaos garbles it."""
