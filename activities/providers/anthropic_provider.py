"""Anthropic Messages API provider."""

from __future__ import annotations

import json
import os
from typing import Any

import anthropic
from anthropic import AsyncAnthropic
from anthropic.types import Message as AnthropicMessage
from anthropic.types import TextBlock, ToolUseBlock
from temporalio.exceptions import ApplicationError

from activities.providers import recording
from activities.providers.base import ProviderResult, error_body_message, provider_error, retry_after_seconds
from keel.types import LlmRequest, Message, ToolCall, ToolSpec, Usage

NAME = "anthropic"
API_KEY_ENV = "ANTHROPIC_API_KEY"
DEFAULT_BASE_URL = "https://api.anthropic.com"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"

# The Messages API has no JSON mode.
JSON_INSTRUCTION = "Answer with a single JSON object and nothing else: no prose, no code fences, no text after it."
SYSTEM_NOTICE_PREFIX = "[system notice] "


class AnthropicProvider:
    name = NAME

    def __init__(self, api_key: str | None = None, base_url: str | None = None, timeout_s: float = 60.0,
                 traffic: recording.Traffic | None = None) -> None:
        # Environment is read at the first call, not here: a worker that only runs the sim model
        # must start without any key.
        self._api_key = api_key
        self._base_url = base_url
        self._timeout_s = timeout_s
        self._traffic = traffic
        """KEEL_RECORD / KEEL_REPLAY: the SDK's HTTP under a recording or replaying transport."""
        self._client: AsyncAnthropic | None = None

    def _get_client(self) -> AsyncAnthropic:
        if self._client is None:
            # Checked here rather than left to the SDK's own credential discovery (profiles, token
            # files): the failure then names the one variable this project documents.
            api_key = self._api_key or os.environ.get(API_KEY_ENV) or (self._traffic.api_key if self._traffic else None)
            if not api_key:
                raise provider_error(NAME, status=401, message=f"no API key: set {API_KEY_ENV}")
            self._client = AsyncAnthropic(
                api_key=api_key,
                **{"base_url": self._base_url or os.environ.get(BASE_URL_ENV) or None, **self._traffic_options()},
                timeout=self._timeout_s,
                # Temporal's retry policy owns retries; SDK retries would hide attempts and stack delays.
                max_retries=0,
            )
        return self._client

    def _traffic_options(self) -> dict[str, Any]:
        """Recording or replaying (KEEL_RECORD / KEEL_REPLAY): the SDK's HTTP client on the transport that
        does it, and, for a replay, the base URL the requests were recorded against."""
        if self._traffic is None:
            return {}
        configured = self._base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        return self._traffic.client_options(NAME, configured, anthropic.DefaultAsyncHttpxClient)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
        client = self._get_client()
        if req.json_output:
            system = f"{system}\n\n{JSON_INSTRUCTION}" if system else JSON_INSTRUCTION
        params: dict[str, Any] = {
            "model": req.model.model,
            "max_tokens": req.max_output_tokens,
            "messages": to_anthropic_messages(req.messages),
        }
        # req.temperature is not sent: the installed SDK no longer exposes the parameter and recent
        # models fix their sampling.
        if system:
            params["system"] = system
        if req.tools:
            params["tools"] = [to_anthropic_tool(t) for t in req.tools]
            params["tool_choice"] = {"type": "any" if req.require_tool else "auto"}
        try:
            message = await client.messages.create(**params)
        except recording.RecordingMissing as e:  # KEEL_REPLAY: the recording has no answer to this request
            raise e.application_error() from None
        except anthropic.APIError as e:
            raise recording.missing_error(e) or classify_anthropic_error(e) from e
        return from_anthropic_message(message, req.model.model)


def to_anthropic_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Our messages as Messages API turns. Consecutive user-side messages (user text, tool results,
    system notices) merge into one user turn, since the API wants user and assistant to alternate.

    A system-role message in the conversation (e.g. a "wrap up" notice injected mid-task) becomes
    a tagged user text block where it occurred, rather than being appended to `system=`: the notice
    is about *this point* of the task, and editing the system prompt would also invalidate the
    provider's prompt cache for every later call of the task."""
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return  # the API rejects empty turns and empty text blocks
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": list(blocks)})

    for m in messages:
        if m.role == "assistant":
            add("assistant", _assistant_blocks(m))
        elif m.role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": m.content}])
        elif m.role == "system":
            add("user", _text(SYSTEM_NOTICE_PREFIX + m.content) if m.content else [])
        else:
            add("user", _text(m.content))
    for turn in turns:
        if turn["role"] == "user":
            # In a user turn, tool results must come before any text. The sort is stable.
            turn["content"].sort(key=lambda b: b["type"] != "tool_result")
    return turns


def _text(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text}] if text else []


def _assistant_blocks(m: Message) -> list[dict[str, Any]]:
    texts = _text(m.content)
    uses: list[dict[str, Any]] = []
    for tc in m.tool_calls:
        try:
            parsed = json.loads(tc.arguments_json)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            # tool_use.input must be an object; keep what the model really wrote in plain text so
            # it can see (and fix) its own mistake in the tool result that follows.
            parsed = {}
            texts += _text(f"(arguments sent to {tc.name} were not a JSON object: {tc.arguments_json})")
        uses.append({"type": "tool_use", "id": tc.id, "name": tc.name, "input": parsed})
    return texts + uses


def to_anthropic_tool(spec: ToolSpec) -> dict[str, Any]:
    return {"name": spec.name, "description": spec.description, "input_schema": spec.parameters}


def from_anthropic_message(message: AnthropicMessage, requested_model: str) -> ProviderResult:
    texts: list[str] = []
    tool_calls: list[ToolCall] = []
    for block in message.content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            tool_calls.append(ToolCall(id=block.id, name=block.name, arguments_json=json.dumps(block.input)))
    return ProviderResult(
        # Joined without separator: citations split one sentence over several text blocks.
        text="".join(texts),
        tool_calls=tool_calls,
        usage=_usage(message),
        finish_reason=message.stop_reason or "end_turn",
        model=message.model or requested_model,
    )


def _usage(message: AnthropicMessage) -> Usage:
    u = message.usage
    cache_read = u.cache_read_input_tokens or 0
    # Anthropic's input_tokens excludes cached and cache-written tokens; ours counts every input
    # token, with the cache-read part also in cached_input_tokens. Cache writes are priced at the
    # plain input rate here, a slight underestimate of Anthropic's surcharge.
    details = u.output_tokens_details
    return Usage(
        input_tokens=(u.input_tokens or 0) + cache_read + (u.cache_creation_input_tokens or 0),
        output_tokens=u.output_tokens or 0,
        cached_input_tokens=cache_read,
        reasoning_tokens=details.thinking_tokens if details is not None else 0,
    )


def classify_anthropic_error(exc: anthropic.APIError) -> ApplicationError:
    """The one mapping from an Anthropic SDK failure to a Temporal error (see `provider_error`)."""
    if isinstance(exc, anthropic.APIStatusError):
        message = error_body_message(exc.body) or exc.message
        if exc.request_id:
            message += f" (request id {exc.request_id})"
        return provider_error(
            NAME,
            status=exc.status_code,
            message=message,
            retry_after_s=retry_after_seconds(exc.response.headers),
        )
    # Timeouts and connection errors (APITimeoutError is an APIConnectionError) had no answer.
    # Any other APIError (e.g. a 200 whose body does not parse) is treated the same: transient.
    return provider_error(NAME, status=None, message=exc.message)
