"""AnthropicProvider through the real `anthropic` SDK, against a scripted local server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import anthropic
import pytest
from temporalio.exceptions import ApplicationError

from activities.providers.anthropic_provider import JSON_INSTRUCTION, AnthropicProvider
from keel.pricing import cost_usd
from keel.types import LlmRequest, Message, ModelSpec, TaskContext, ToolCall, ToolSpec, Usage

from .fake_servers import (
    FakeServer,
    Reply,
    anthropic_error,
    anthropic_message,
    closed_port,
    text_block,
    tool_use_block,
)

SYSTEM = "You are a support agent."
LOOKUP = ToolSpec(
    name="lookup_customer",
    description="Find a customer by id.",
    parameters={"type": "object", "properties": {"customer_id": {"type": "string"}}, "required": ["customer_id"]},
)
ASK = [Message(role="user", content="Where is my order?")]


def make_req(messages: list[Message], *, model: str = "claude-haiku-4-5", **kw: object) -> LlmRequest:
    return LlmRequest(
        task=TaskContext(workflow_id="wf-1", tenant="acme"),
        step=1,
        kind="reason",
        prompt="support/reason",
        messages=messages,
        model=ModelSpec(provider="anthropic", model=model),
        max_output_tokens=256,
        **kw,  # type: ignore[arg-type]
    )


def api_key_sent(headers: dict[str, str]) -> str | None:
    # Older SDKs send x-api-key; 2.x sends the key as a bearer token.
    return headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ") or None


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as s:
        yield s
        s.assert_script_done()


@pytest.fixture
async def provider(server: FakeServer) -> AsyncIterator[AnthropicProvider]:
    p = AnthropicProvider(api_key="test-key", base_url=server.url, timeout_s=5)
    yield p
    await p.aclose()


async def test_tool_call_round_trip(server: FakeServer, provider: AnthropicProvider) -> None:
    server.script(
        Reply(
            body=anthropic_message(
                text_block("Let me look that up."),
                tool_use_block("toolu_01", "lookup_customer", {"customer_id": "C-1"}),
                stop_reason="tool_use",
            )
        ),
        Reply(body=anthropic_message(text_block("Your order "), text_block("ships today."))),
    )

    first = await provider.complete(make_req(ASK, tools=[LOOKUP]), SYSTEM)

    assert first.text == "Let me look that up."
    assert first.tool_calls == [
        ToolCall(id="toolu_01", name="lookup_customer", arguments_json='{"customer_id": "C-1"}')
    ]
    assert first.finish_reason == "tool_use"
    assert first.model == "claude-haiku-4-5-20251001"
    sent = server.last
    assert sent.path == "/v1/messages"
    assert api_key_sent(sent.headers) == "test-key"
    assert sent.body["model"] == "claude-haiku-4-5"
    assert sent.body["max_tokens"] == 256
    assert sent.body["system"] == SYSTEM
    assert sent.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Where is my order?"}]}]
    assert sent.body["tools"] == [
        {"name": "lookup_customer", "description": LOOKUP.description, "input_schema": LOOKUP.parameters}
    ]
    assert sent.body["tool_choice"] == {"type": "auto"}

    convo = [
        *ASK,
        Message(role="assistant", content=first.text, tool_calls=first.tool_calls),
        Message(role="tool", tool_call_id="toolu_01", name="lookup_customer", content='{"name": "Ada"}'),
        Message(role="system", content="Budget nearly spent: wrap up."),
    ]
    second = await provider.complete(make_req(convo, tools=[LOOKUP]), SYSTEM)

    assert second.text == "Your order ships today."
    assert second.tool_calls == []
    assert server.last.body["system"] == SYSTEM  # the notice did not rewrite the system prompt
    assert server.last.body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look that up."},
                {"type": "tool_use", "id": "toolu_01", "name": "lookup_customer", "input": {"customer_id": "C-1"}},
            ],
        },
        # Tool result and system notice share one user turn, tool result first.
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": '{"name": "Ada"}'},
                {"type": "text", "text": "[system notice] Budget nearly spent: wrap up."},
            ],
        },
    ]


async def test_parallel_tool_results_merge_into_one_turn(server: FakeServer, provider: AnthropicProvider) -> None:
    server.script(Reply(body=anthropic_message(text_block("done"))))
    calls = [ToolCall(id="t1", name="a", arguments_json="{}"), ToolCall(id="t2", name="b", arguments_json="not json")]
    convo = [
        *ASK,
        Message(role="assistant", tool_calls=calls),
        Message(role="tool", tool_call_id="t1", content="r1"),
        Message(role="tool", tool_call_id="t2", content="r2"),
    ]

    await provider.complete(make_req(convo), SYSTEM)

    assistant, results = server.last.body["messages"][1:]
    # Unparseable arguments: an empty input, and the raw text kept where the model can see it.
    assert assistant["content"][0]["type"] == "text"
    assert "not json" in assistant["content"][0]["text"]
    assert [b["input"] for b in assistant["content"][1:]] == [{}, {}]
    assert results == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "r1"},
            {"type": "tool_result", "tool_use_id": "t2", "content": "r2"},
        ],
    }


async def test_json_output_is_asked_in_the_system_prompt(server: FakeServer, provider: AnthropicProvider) -> None:
    server.script(Reply(body=anthropic_message(text_block('{"category": "billing"}'))))

    result = await provider.complete(make_req(ASK, json_output=True), SYSTEM)

    assert json.loads(result.text) == {"category": "billing"}
    assert server.last.body["system"] == f"{SYSTEM}\n\n{JSON_INSTRUCTION}"
    assert "tools" not in server.last.body


async def test_usage_counts_cache_tokens_as_input_and_is_priced(
    server: FakeServer, provider: AnthropicProvider
) -> None:
    server.script(
        Reply(
            body=anthropic_message(
                text_block("ok"), input_tokens=50, cache_read=1000, cache_creation=200, output_tokens=300
            )
        )
    )

    result = await provider.complete(make_req(ASK), SYSTEM)

    assert result.usage == Usage(input_tokens=1250, output_tokens=300, cached_input_tokens=1000)
    assert result.finish_reason == "end_turn"
    # claude-haiku-4-5: 250 fresh input x $1, 1000 cached x $0.10, 300 output x $5, per million.
    assert cost_usd("anthropic", "claude-haiku-4-5", result.usage) == pytest.approx(
        (250 * 1.00 + 1000 * 0.10 + 300 * 5.00) / 1e6
    )


async def test_429_honours_retry_after_and_sdk_does_not_retry(server: FakeServer, provider: AnthropicProvider) -> None:
    server.script(
        Reply(
            429,
            anthropic_error("rate_limit_error", "Number of request tokens has exceeded your rate limit"),
            {"retry-after": "2", "request-id": "req_011CSHoEeqs5"},
        ),
        Reply(body=anthropic_message(text_block("back"))),
    )

    with pytest.raises(ApplicationError) as info:
        await provider.complete(make_req(ASK), SYSTEM)

    err = info.value
    assert err.type == "ProviderRateLimited"
    assert err.non_retryable is False
    assert err.next_retry_delay == timedelta(seconds=2)
    assert "exceeded your rate limit" in err.message
    assert "req_011CSHoEeqs5" in err.message
    assert isinstance(err.__cause__, anthropic.RateLimitError)
    assert len(server.requests) == 1, "the SDK retried on its own"

    assert (await provider.complete(make_req(ASK), SYSTEM)).text == "back"
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("status", "api_type", "error_type", "non_retryable"),
    [
        (500, "api_error", "ProviderUnavailable", False),
        (529, "overloaded_error", "ProviderUnavailable", False),
        (401, "authentication_error", "ProviderAuthError", True),
        (403, "permission_error", "ProviderAuthError", True),
        (400, "invalid_request_error", "ProviderBadRequest", True),
        (404, "not_found_error", "ProviderBadRequest", True),
    ],
)
async def test_http_errors_are_classified(
    server: FakeServer, provider: AnthropicProvider, status: int, api_type: str, error_type: str, non_retryable: bool
) -> None:
    server.script(Reply(status, anthropic_error(api_type, f"failure {status}")))

    with pytest.raises(ApplicationError) as info:
        await provider.complete(make_req(ASK), SYSTEM)

    assert (info.value.type, info.value.non_retryable) == (error_type, non_retryable)
    assert f"failure {status}" in info.value.message
    assert len(server.requests) == 1


async def test_auth_error_names_provider_and_env_var(server: FakeServer, provider: AnthropicProvider) -> None:
    server.script(Reply(401, anthropic_error("authentication_error", "invalid x-api-key")))

    with pytest.raises(ApplicationError) as info:
        await provider.complete(make_req(ASK), SYSTEM)

    assert info.value.message.startswith("anthropic:")
    assert "ANTHROPIC_API_KEY" in info.value.message


async def test_connection_refused_is_retryable() -> None:
    provider = AnthropicProvider(api_key="test-key", base_url=f"http://127.0.0.1:{closed_port()}", timeout_s=5)

    with pytest.raises(ApplicationError) as info:
        await provider.complete(make_req(ASK), SYSTEM)

    assert info.value.type == "ProviderUnavailable"
    assert info.value.non_retryable is False
    assert isinstance(info.value.__cause__, anthropic.APIConnectionError)
    await provider.aclose()


async def test_reads_key_and_base_url_from_env_at_first_call(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = AnthropicProvider()  # constructing needs no key: sim-only workers start without one
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    server.script(Reply(body=anthropic_message(text_block("hi"))))

    assert (await provider.complete(make_req(ASK), SYSTEM)).text == "hi"
    assert api_key_sent(server.last.headers) == "env-key"
    await provider.aclose()


async def test_missing_key_is_a_non_retryable_auth_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)

    with pytest.raises(ApplicationError) as info:
        await AnthropicProvider().complete(make_req(ASK), SYSTEM)

    assert info.value.type == "ProviderAuthError"
    assert info.value.non_retryable is True
    assert "ANTHROPIC_API_KEY" in info.value.message


async def test_a_step_that_must_call_a_tool_sends_tool_choice_any(server: FakeServer,
                                                                   provider: AnthropicProvider) -> None:
    server.script(Reply(body=anthropic_message(tool_use_block("toolu_1", "lookup_customer", {}),
                                               stop_reason="tool_use")))
    await provider.complete(make_req(ASK, tools=[LOOKUP]).model_copy(update={"require_tool": True}), SYSTEM)
    assert server.last.body["tool_choice"] == {"type": "any"}
