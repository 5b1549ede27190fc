"""The one LLM activity: prompt, provider, price, ledger row — all in one round trip."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from pydantic import ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.breaker import BreakerActivities
from activities.ledger import Ledger
from activities.prompts import load_prompt_at
from activities.providers.base import Provider, provider_error
from activities.ratelimit import RateLimiter
from activities.tenant_budgets import TenantLimiter
from activities.tracing import Tracing
from keel import errors, registry
from keel.chaos import hits
from keel.names import LLM_ACTIVITY
from keel.output import output_problem
from keel.pricing import UnpricedModelError, cost_usd, price_for
from keel.tokens import estimate_input_tokens
from keel.toolcalls import read_text_tool_calls
from keel.types import LlmRequest, LlmResponse, ModelSpec

BREAKER_OPEN = "BreakerOpen"
"""Non-retryable: the task's cost circuit breaker refused it; the details carry its AdmitDecision."""


T = TypeVar("T")


class LlmActivities:
    def __init__(self, providers: dict[str, Provider], ledger: Ledger, breakers: BreakerActivities | None = None,
                 tracing: Tracing | None = None, limiter: RateLimiter | None = None,
                 tenants: TenantLimiter | None = None) -> None:
        self._providers = providers
        self._limiter = limiter
        """KEEL_RATE_LIMITS: a limited model's call waits for its slot (activities.ratelimit)."""
        self._ledger = ledger
        self._tracing = tracing or Tracing.off()
        self._breakers = breakers
        """Answers `LlmRequest.admit` (a task's first call): one activity instead of a separate admit."""
        self._tenants = tenants
        """The tenant budgets (KEEL_TENANT_BUDGETS): a hold on the call's worst case before it, settled after."""

    @activity.defn(name=LLM_ACTIVITY)
    async def llm_call(self, req: LlmRequest) -> LlmResponse:
        with self._tracing.llm_span(req) as span:
            resp = await self._call(req)
            self._tracing.llm_result(span, resp)
            return resp

    async def _call(self, req: LlmRequest) -> LlmResponse:
        provider = self._providers.get(req.model.provider)
        if provider is None:
            raise ApplicationError(
                f"provider {req.model.provider!r} is not configured on this worker "
                f"(configured: {sorted(self._providers)})",
                type=errors.PROVIDER_BAD_REQUEST,
                non_retryable=True,
            )
        problem = _options_problem(req.model)
        if problem:
            raise ApplicationError(problem, type=errors.PROVIDER_BAD_REQUEST, non_retryable=True)
        # The price pinned in the task's input (KEEL_PRICES at its start) first, then this worker's.
        pinned = {f"{req.model.provider}:{req.model.model}": req.price} if req.price is not None else None
        try:
            price_for(req.model.provider, req.model.model, pinned=pinned)
        except UnpricedModelError as e:
            raise ApplicationError(str(e), type=errors.UNPRICED_MODEL, non_retryable=True) from e
        agent = registry.find(req.agent) if req.agent else None
        if agent is None:
            raise ApplicationError(f"agent {req.agent!r} is not registered on this worker" if req.agent
                                   else "a model call must name its agent", type=errors.AGENT_NOT_REGISTERED,
                                   non_retryable=True)
        unknown = [n for n in req.tool_names if n not in agent.tool_map]
        if unknown:
            raise ApplicationError(f"agent {req.agent!r} has no tools {unknown!r}", type=errors.UNKNOWN_TOOL,
                                   non_retryable=True)
        req = req.model_copy(update={"tools": [*req.tools, *agent.tool_specs(req.tool_names)], "tool_names": []})
        admission = None
        if req.admit is not None and self._breakers is not None:
            admission = await self._breakers.decide(req.admit)
            if not admission.admitted:
                raise ApplicationError(admission.reason, admission, type=BREAKER_OPEN, non_retryable=True)
        prompt = load_prompt_at(agent.prompt_dir, req.prompt, req.task.prompt_version)
        if req.max_input_tokens is not None:
            # The workflow estimated without the system prompt's exact size; this is the exact check.
            est = estimate_input_tokens(req.messages, req.tools, len(prompt.text))
            if est > req.max_input_tokens:
                raise ApplicationError(
                    f"the prompt is about {est:,} tokens; the task's budget leaves {req.max_input_tokens:,}",
                    type=errors.BUDGET_WOULD_EXCEED,
                    non_retryable=True,
                )
        chaos = req.task.chaos
        if chaos is not None:  # a chaos run (keel.chaos): a 429 or 500 storm, per attempt
            key, attempt = f"{req.task.workflow_id}/{req.step}", activity.info().attempt
            if hits(chaos, "provider_429", key, attempt):
                raise provider_error(req.model.provider, status=429, message="rate limited (injected by chaos)",
                                     retry_after_s=1.0)
            if hits(chaos, "provider_500", key, attempt):
                raise provider_error(req.model.provider, status=500, message="server error (injected by chaos)")
        hold = None
        if self._tenants is not None:  # refused: TenantBudgetExceeded, before any model is called
            hold = await self._tenants.reserve(req, estimate_input_tokens(req.messages, req.tools, len(prompt.text)),
                                               pinned)
        try:
            if self._limiter is not None and self._limiter.limit_for(req.model.provider, req.model.model) is not None:
                reserve = estimate_input_tokens(req.messages, req.tools, len(prompt.text)) + req.max_output_tokens
                await with_heartbeats(self._limiter.acquire(req.model.provider, req.model.model, reserve))
            started = time.perf_counter()
            result = await with_heartbeats(provider.complete(req, prompt.text))
        except BaseException:
            if hold is not None and self._tenants is not None:
                await self._tenants.release(hold)
            raise
        latency_ms = (time.perf_counter() - started) * 1000
        tool_calls, repaired, finish = result.tool_calls, "", result.finish_reason
        if req.tools and not tool_calls and result.text:
            # Tool calls written as text (common with small and self-hosted models): read back, the raw
            # text kept, and the repair recorded; never taken for the final answer.
            tool_calls, form = read_text_tool_calls(result.text, frozenset(t.name for t in req.tools))
            if tool_calls:
                repaired, finish = f"{len(tool_calls)} tool call(s) written as text ({form})", "tool_calls"
        resp = LlmResponse(
            text=result.text,
            tool_calls=tool_calls,
            repaired=repaired,
            usage=result.usage,
            cost_usd=cost_usd(req.model.provider, req.model.model, result.usage, pinned=pinned),
            latency_ms=round(latency_ms, 3),
            finish_reason=finish,
            provider=req.model.provider,
            model=result.model or req.model.model,
            prompt_version=prompt.version,
            prompt_hash=prompt.short_hash,
            admission=admission,
        )
        if hold is not None and self._tenants is not None:  # the hold becomes the actual usage (the ledger row's)
            await self._tenants.settle(hold, resp.usage.total_tokens, resp.cost_usd)
        # Written in this activity, not a separate one: one round trip per step. The upsert on
        # (workflow id, step) keeps a retried call to one row. An output the workflow will refuse keeps
        # its raw text in the row, with why.
        invalid = output_problem(agent, req.kind, resp.text, resp.tool_calls, (t.name for t in req.tools))
        if self._ledger.engine.dialect.name == "sqlite":
            self._ledger.record_llm(req, resp, activity.info().attempt, invalid=invalid)  # sub-millisecond
        else:
            await asyncio.to_thread(self._ledger.record_llm, req, resp, activity.info().attempt, invalid=invalid)
        return resp


HEARTBEAT_EVERY_S = 5.0
"""A model call in flight heartbeats this often, or a third of its heartbeat timeout when that is shorter
(the task's KEEL_LLM_HEARTBEAT_TIMEOUT_S, default names.LLM_HEARTBEAT_TIMEOUT: the server's patience)."""


def heartbeat_every_s() -> float:
    timeout = activity.info().heartbeat_timeout
    return min(HEARTBEAT_EVERY_S, timeout.total_seconds() / 3) if timeout else HEARTBEAT_EVERY_S


async def with_heartbeats(call: Coroutine[Any, Any, T]) -> T:
    """Await a provider call (or a tool's, activities.agent_tools), heartbeating while it runs: a worker that
    dies mid-call is noticed within the heartbeat timeout and the call retried elsewhere, instead of waiting
    out the call's whole limit.
    The call's own limit is the provider's timeout (KEEL_LLM_TIMEOUT_S). A timer, not a task: a call that
    answers at once costs one scheduled callback, cancelled."""
    loop = asyncio.get_running_loop()
    handle: asyncio.TimerHandle | None = None
    every = heartbeat_every_s()

    def beat() -> None:  # runs in the activity's context (call_later copies it)
        nonlocal handle
        activity.heartbeat()
        handle = loop.call_later(every, beat)

    handle = loop.call_later(every, beat)
    try:
        return await call
    finally:
        handle.cancel()


def _options_problem(spec: ModelSpec) -> str | None:
    """Model options are the sim's knobs; a real provider given some would drop them unsaid."""
    if not spec.options:
        return None
    if spec.provider != "sim":
        return f"model {spec.provider}:{spec.model} takes no options (given {sorted(spec.options)})"
    try:
        spec.sim  # noqa: B018 - validates the knobs
    except ValidationError as e:
        return f"invalid sim options {spec.options}: {e.errors()[0]['msg']} ({e.errors()[0]['loc']})"
    return None
