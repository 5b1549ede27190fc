"""OpenAIProvider through the real `openai` SDK, against a scripted local server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import openai
import pytest
from temporalio.exceptions import ApplicationError

from activities.providers.openai_provider import OpenAIProvider
from keel.pricing import cost_usd
from keel.types import LlmRequest, Message, ModelSpec, TaskContext, ToolCall, ToolSpec, Usage

from .fake_servers import FakeServer, Reply, closed_port, openai_completion, openai_error

SYSTEM = "You are a support agent."
LOOKUP = ToolSpec(
    name="lookup_customer",
    description="Find a customer by id.",
    parameters={"type": "object", "properties": {"customer_id": {"type": "string"}}, "required": ["customer_id"]},
)


def make_req(messages: list[Message], *, model: str = "gpt-4o-mini", **kw: object) -> LlmRequest:
    return LlmRequest(
        task=TaskContext(workflow_id="wf-1", tenant="acme"),
        step=1,
        kind="reason",
        prompt="support/reason",
        messages=messages,
        model=ModelSpec(provider="openai", model=model),
        max_output_tokens=256,
        **kw,  # type: ignore[arg-type]
    )


ASK = [Message(role="user", content="Where is my order?")]


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as s:
        yield s
        s.assert_script_done()


@pytest.fixture
async def provider(server: FakeServer) -> AsyncIterator[OpenAIProvider]:
    p = OpenAIProvider(api_key="test-key", base_url=f"{server.url}/v1", timeout_s=5)
    yield p
    await p.aclose()


async def test_tool_call_round_trip(server: FakeServer, provider: OpenAIProvider) -> None:
    args = '{"customer_id": "C-1"}'
    server.script(
        Reply(body=openai_completion(tool_calls=[("call_1", "lookup_customer", args)], finish_reason="tool_calls")),
        Reply(body=openai_completion(content="Your order ships today.")),
    )

    first = await provider.complete(make_req(ASK, tools=[LOOKUP]), SYSTEM)

    assert first.tool_calls == [ToolCall(id="call_1", name="lookup_customer", arguments_json=args)]
    assert first.finish_reason == "tool_calls"
    assert first.model == "gpt-4o-mini-2024-07-18"
    sent = server.last
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer test-key"
    assert sent.body["model"] == "gpt-4o-mini"
    assert sent.body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Where is my order?"},
    ]
    assert sent.body["tool_choice"] == "auto"  # always sent with tools: llama.cpp's server drops them without it
    assert sent.body["tools"] == [
        {
            "type": "function",
            "function": {"name": "lookup_customer", "description": LOOKUP.description, "parameters": LOOKUP.parameters},
        }
    ]
    # A custom base_url is a compatible server: the widely supported name for the output cap.
    assert sent.body["max_tokens"] == 256
    assert "max_completion_tokens" not in sent.body

    convo = [
        *ASK,
        Message(role="assistant", tool_calls=first.tool_calls),
        Message(role="tool", tool_call_id="call_1", name="lookup_customer", content='{"name": "Ada"}'),
        Message(role="system", content="Budget nearly spent: wrap up."),
    ]
    second = await provider.complete(make_req(convo, tools=[LOOKUP]), SYSTEM)

    assert second.text == "Your order ships today."
    assert second.tool_calls == []
    assert server.last.body["messages"][2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup_customer", "arguments": args}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"name": "Ada"}'},
        {"role": "system", "content": "Budget nearly spent: wrap up."},
    ]


async def test_plain_request_shape(server: FakeServer, provider: OpenAIProvider) -> None:
    server.script(Reply(body=openai_completion(content='{"category": "billing"}')), Reply(body=openai_completion()))

    result = await provider.complete(make_req(ASK, json_output=True), SYSTEM)

    assert result.text == '{"category": "billing"}'
    body = server.last.body
    assert "tools" not in body
    assert body["response_format"] == {"type": "json_object"}
    assert body["temperature"] == 0.0

    # Reasoning models refuse a non-default temperature.
    await provider.complete(make_req(ASK, model="o4-mini"), SYSTEM)
    assert "temperature" not in server.last.body


async def test_usage_with_cached_and_reasoning_tokens_is_priced(server: FakeServer, provider: OpenAIProvider) -> None:
    server.script(
        Reply(
            body=openai_completion(
                content="ok", prompt_tokens=1200, completion_tokens=300, cached_tokens=1000, reasoning_tokens=100
            )
        )
    )

    result = await provider.complete(make_req(ASK), SYSTEM)

    assert result.usage == Usage(input_tokens=1200, output_tokens=300, cached_input_tokens=1000, reasoning_tokens=100)
    # gpt-4o-mini: 200 fresh input x $0.15, 1000 cached x $0.075, 300 output x $0.60, per million.
    assert cost_usd("openai", "gpt-4o-mini", result.usage) == pytest.approx(
        (200 * 0.15 + 1000 * 0.075 + 300 * 0.60) / 1e6
    )


async def test_missing_usage_details_default_to_zero(server: FakeServer, provider: OpenAIProvider) -> None:
    body = openai_completion(content="ok", prompt_tokens=7, completion_tokens=3)
    del body["usage"]["prompt_tokens_details"], body["usage"]["completion_tokens_details"]
    server.script(Reply(body=body))

    result = await provider.complete(make_req(ASK), SYSTEM)

    assert result.usage == Usage(input_tokens=7, output_tokens=3)


async def test_invalid_json_arguments_pass_through(server: FakeServer, provider: OpenAIProvider) -> None:
    broken = '{"customer_id": "C-1",,'
    server.script(Reply(body=openai_completion(tool_calls=[("call_9", "lookup_customer", broken)])))

    result = await provider.complete(make_req(ASK, tools=[LOOKUP]), SYSTEM)

    assert result.tool_calls[0].arguments_json == broken


async def test_429_honours_retry_after_and_sdk_does_not_retry(server: FakeServer, provider: OpenAIProvider) -> None:
    server.script(
        Reply(
            429,
            openai_error("Rate limit reached for gpt-4o-mini", "requests", "rate_limit_exceeded"),
            {"retry-after": "2"},
        ),
        Reply(body=openai_completion(content="back")),
    )

    with pytest.raises(ApplicationError) as info:
        await provider.complete(make_req(ASK), SYSTEM)

    err = info.value
    assert err.type == "ProviderRateLimited"
    assert err.non_retryable is False
    assert err.next_retry_delay == timedelta(seconds=2)
    assert "Rate limit reached" in err.message
    assert isinstance(err.__cause__, openai.RateLimitError)
    assert len(server.requests) == 1, "the SDK retried on its own"

    assert (await provider.complete(make_req(ASK), SYSTEM)).text == "back"
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("status", "error_type", "non_retryable"),
    [
        (500, "ProviderUnavailable", False),
        (503, "ProviderUnavailable", False),
        (401, "ProviderAuthError", True),
        (403, "ProviderAuthError", True),
        (400, "ProviderBadRequest", True),
        (404, "ProviderBadRequest", True),
    ],
)
async def test_http_errors_are_classified(
    server: FakeServer, provider: OpenAIProvider, status: int, error_type: str, non_retryable: bool
) -> None:
    server.script(Reply(status, openai_error(f"failure {status}", "server_error")))

    with pytest.raises(ApplicationError) as info:
        await provider.complete(make_req(ASK), SYSTEM)

    assert (info.value.type, info.value.non_retryable) == (error_type, non_retryable)
    assert f"failure {status}" in info.value.message
    assert len(server.requests) == 1


async def test_auth_error_names_provider_and_env_var(server: FakeServer, provider: OpenAIProvider) -> None:
    server.script(
        Reply(401, openai_error("Incorrect API key provided: sk-***", "invalid_request_error", "invalid_api_key"))
    )

    with pytest.raises(ApplicationError) as info:
        await provider.complete(make_req(ASK), SYSTEM)

    assert info.value.message.startswith("openai:")
    assert "OPENAI_API_KEY" in info.value.message


async def test_connection_refused_is_retryable() -> None:
    provider = OpenAIProvider(api_key="test-key", base_url=f"http://127.0.0.1:{closed_port()}/v1", timeout_s=5)

    with pytest.raises(ApplicationError) as info:
        await provider.complete(make_req(ASK), SYSTEM)

    assert info.value.type == "ProviderUnavailable"
    assert info.value.non_retryable is False
    assert isinstance(info.value.__cause__, openai.APIConnectionError)
    await provider.aclose()


async def test_reads_key_and_base_url_from_env_at_first_call(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = OpenAIProvider()  # constructing needs no key: sim-only workers start without one
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")
    server.script(Reply(body=openai_completion(content="hi")))

    assert (await provider.complete(make_req(ASK), SYSTEM)).text == "hi"
    assert server.last.headers["authorization"] == "Bearer env-key"
    await provider.aclose()


async def test_missing_key_is_a_non_retryable_auth_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    with pytest.raises(ApplicationError) as info:
        await OpenAIProvider().complete(make_req(ASK), SYSTEM)

    assert info.value.type == "ProviderAuthError"
    assert info.value.non_retryable is True
    assert "OPENAI_API_KEY" in info.value.message


async def test_a_step_that_must_call_a_tool_sends_tool_choice_required(server: FakeServer,
                                                                        provider: OpenAIProvider) -> None:
    server.script(Reply(body=openai_completion(tool_calls=[("c1", "lookup_customer", "{}")],
                                               finish_reason="tool_calls")))
    await provider.complete(make_req(ASK, tools=[LOOKUP]).model_copy(update={"require_tool": True}), SYSTEM)
    assert server.last.body["tool_choice"] == "required"
