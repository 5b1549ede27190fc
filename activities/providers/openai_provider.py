"""OpenAI Chat Completions provider; also serves any OpenAI-compatible server (vLLM, Ollama, LiteLLM)
through `base_url`."""

from __future__ import annotations

import os
import re
from typing import Any

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall
from temporalio.exceptions import ApplicationError

from activities.providers import recording
from activities.providers.base import ProviderResult, error_body_message, provider_error, retry_after_seconds
from keel.types import LlmRequest, Message, ToolCall, ToolSpec, Usage

NAME = "openai"
API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = "OPENAI_BASE_URL"

# Reasoning models reject any temperature but the default.
_FIXED_TEMPERATURE = re.compile(r"^(o\d|gpt-5)")


class OpenAIProvider:
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
        self._client: AsyncOpenAI | None = None

    def _get_client(self) -> AsyncOpenAI:
        if self._client is None:
            api_key = self._api_key or os.environ.get(API_KEY_ENV) or (self._traffic.api_key if self._traffic else None)
            if not api_key:
                raise provider_error(
                    NAME,
                    status=401,
                    message=f"no API key: set {API_KEY_ENV} (any placeholder for a local server that needs none)",
                )
            self._client = AsyncOpenAI(
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
        return self._traffic.client_options(NAME, configured, openai.DefaultAsyncHttpxClient)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
        client = self._get_client()
        params: dict[str, Any] = {
            "model": req.model.model,
            "messages": to_openai_messages(system, req.messages),
        }
        # OpenAI deprecated max_tokens and its reasoning models refuse it, while compatible servers
        # (Ollama, older vLLM) only honour max_tokens and would silently ignore the new name.
        if _is_openai_api(client.base_url.host):
            params["max_completion_tokens"] = req.max_output_tokens
        else:
            params["max_tokens"] = req.max_output_tokens
        if not _FIXED_TEMPERATURE.match(req.model.model):
            params["temperature"] = req.temperature
        if req.tools:
            params["tools"] = [to_openai_tool(t) for t in req.tools]
            # Sent every time: some OpenAI-compatible servers (llama.cpp's) leave the tools out of the
            # prompt without a word when it is missing.
            params["tool_choice"] = "required" if req.require_tool else "auto"
        if req.json_output:
            params["response_format"] = {"type": "json_object"}
        try:
            completion = await client.chat.completions.create(**params)
        except recording.RecordingMissing as e:  # KEEL_REPLAY: the recording has no answer to this request
            raise e.application_error() from None
        except openai.APIError as e:
            raise recording.missing_error(e) or classify_openai_error(e) from e
        return from_openai_completion(completion, req.model.model)


def _is_openai_api(host: str) -> bool:
    return host == "api.openai.com" or host.endswith(".openai.com")


def to_openai_messages(system: str, messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            out.append(
                {
                    "role": "assistant",
                    # null, not "", is the documented shape of a tool-call-only turn.
                    "content": m.content or None,
                    "tool_calls": [
                        {
                            "id": tc.id,
                            "type": "function",
                            "function": {"name": tc.name, "arguments": tc.arguments_json},
                        }
                        for tc in m.tool_calls
                    ],
                }
            )
        elif m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id or "", "content": m.content})
        else:
            # The Chat API takes system messages anywhere, so mid-conversation notices stay in place.
            out.append({"role": m.role, "content": m.content})
    return out


def to_openai_tool(spec: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": spec.name, "description": spec.description, "parameters": spec.parameters},
    }


def from_openai_completion(completion: ChatCompletion, requested_model: str) -> ProviderResult:
    if not completion.choices:
        # Seen from overloaded compatible servers answering 200 with nothing in it: transient.
        raise provider_error(NAME, status=None, message="response had no choices")
    choice = completion.choices[0]
    tool_calls: list[ToolCall] = []
    for tc in choice.message.tool_calls or []:
        if isinstance(tc, ChatCompletionMessageFunctionToolCall):
            # Arguments stay raw, even when not valid JSON: the workflow decides what to do.
            tool_calls.append(ToolCall(id=tc.id, name=tc.function.name, arguments_json=tc.function.arguments))
        else:
            tool_calls.append(ToolCall(id=tc.id, name=tc.custom.name, arguments_json=tc.custom.input))
    return ProviderResult(
        text=choice.message.content or "",
        tool_calls=tool_calls,
        usage=_usage(completion),
        finish_reason=choice.finish_reason or "stop",
        model=completion.model or requested_model,
    )


def _usage(completion: ChatCompletion) -> Usage:
    u = completion.usage
    if u is None:
        return Usage()
    prompt_details = u.prompt_tokens_details
    completion_details = u.completion_tokens_details
    return Usage(
        input_tokens=u.prompt_tokens or 0,
        output_tokens=u.completion_tokens or 0,
        cached_input_tokens=(prompt_details.cached_tokens or 0) if prompt_details else 0,
        reasoning_tokens=(completion_details.reasoning_tokens or 0) if completion_details else 0,
    )


def classify_openai_error(exc: openai.APIError) -> ApplicationError:
    """The one mapping from an OpenAI SDK failure to a Temporal error (see `provider_error`)."""
    if isinstance(exc, openai.APIStatusError):
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
