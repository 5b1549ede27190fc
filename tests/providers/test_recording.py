"""Provider traffic recorded under the real SDKs (KEEL_RECORD) and replayed offline (KEEL_REPLAY): the key,
the file, the dedup rules, and both providers round-tripping through a loopback server that is then gone."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from temporalio.exceptions import ApplicationError

from activities.providers.anthropic_provider import AnthropicProvider
from activities.providers.openai_provider import OpenAIProvider
from activities.providers.recording import (
    Exchange,
    Recorder,
    Traffic,
    _path_of,
    http_module,
    read_recording,
    request_key,
)
from keel import errors
from keel.settings import KeelSettings
from keel.types import LlmRequest, Message, ModelSpec, TaskContext, ToolSpec

from .fake_servers import (
    FakeServer,
    Reply,
    anthropic_message,
    openai_completion,
    openai_error,
    text_block,
    tool_use_block,
)

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                    max_leaves=20)


def _shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's keys in another order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@settings(max_examples=200, deadline=None)
@given(body=st.dictionaries(st.text(max_size=8), JSON, max_size=6), seed=st.integers(),
       indent=st.sampled_from([None, 2]))
def test_property_the_key_ignores_key_order_and_spacing(body: dict[str, Any], seed: int, indent: int | None) -> None:
    again = json.dumps(_shuffled(body, random.Random(seed)), indent=indent).encode()
    assert request_key("POST", "/v1/chat/completions", json.dumps(body).encode()) == \
        request_key("post", "/v1/chat/completions", again)


@settings(max_examples=100, deadline=None)
@given(body=st.dictionaries(st.text(max_size=8), JSON, min_size=1, max_size=6), extra=st.text(min_size=1, max_size=8))
def test_property_the_key_tells_different_requests_apart(body: dict[str, Any], extra: str) -> None:
    raw = json.dumps(body).encode()
    key = request_key("POST", "/v1/messages", raw)
    assert key != request_key("POST", "/v1/chat/completions", raw)
    assert key != request_key("GET", "/v1/messages", raw)
    changed = {**body, "\x00" + extra: True}
    assert key != request_key("POST", "/v1/messages", json.dumps(changed).encode())
    assert request_key("POST", "/v1/messages", b"not json") != request_key("POST", "/v1/messages", b"not json!")


@settings(max_examples=50, deadline=None)
@given(host=st.sampled_from(["127.0.0.1", "localhost", "api.openai.com", "llm.internal"]),
       port=st.integers(1, 65535), scheme=st.sampled_from(["http", "https"]))
def test_property_the_key_ignores_host_port_and_headers(host: str, port: int, scheme: str) -> None:
    import openai

    http = http_module(openai.DefaultAsyncHttpxClient)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    here = http.Request("POST", "http://127.0.0.1:8080/v1/chat/completions", content=body,
                        headers={"authorization": "Bearer a", "x-stainless-retry-count": "0"})
    there = http.Request("POST", f"{scheme}://{host}:{port}/v1/chat/completions", content=body,
                         headers={"authorization": "Bearer b", "x-stainless-retry-count": "3"})
    assert request_key(here.method, _path_of(here), here.content) == \
        request_key(there.method, _path_of(there), there.content)


def _ex(key_body: bytes, status: int = 200, answer: str = "hi") -> Exchange:
    from activities.providers.recording import _exchange

    return _exchange("openai", "http://127.0.0.1:1/v1", "POST", "/v1/chat/completions", key_body, status,
                     {"content-type": "application/json", "x-secret": "no"},
                     json.dumps({"answer": answer}).encode())


def test_a_retried_request_adds_no_line_and_a_different_answer_keeps_the_first(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.jsonl"
    rec = Recorder(path)
    rec.add(_ex(b'{"model": "m", "messages": [1]}'))
    rec.add(_ex(b'{"messages": [1], "model": "m"}'))  # the same request, retried
    rec.add(_ex(b'{"model": "m", "messages": [1]}', answer="other"))  # sampled again: first answer kept
    rec.add(_ex(b'{"model": "m", "messages": [2]}', status=503))  # transient: the retry is what counts
    rec.add(_ex(b'{"model": "m", "messages": [2]}', status=400, answer="bad"))
    assert (rec.added, rec.duplicates, rec.conflicts, rec.transient) == (2, 1, 1, 1)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["status"], x["response"]) for x in lines] == [(200, {"answer": "hi"}), (400, {"answer": "bad"})]
    assert lines[0]["request"] == {"model": "m", "messages": [1]} and lines[0]["model"] == "m"
    assert lines[0]["headers"] == {"content-type": "application/json"}  # only the headers a provider reads
    assert list(lines[0]) == ["key", "provider", "model", "method", "path", "base_url", "request", "status",
                              "headers", "response", "recorded_at"]
    # Recording into the file again adds only what it lacks.
    again = Recorder(path)
    again.add(_ex(b'{"model": "m", "messages": [1]}'))
    again.add(_ex(b'{"model": "m", "messages": [3]}'))
    assert (again.added, again.duplicates) == (1, 1) and len(list(read_recording(path))) == 3


def test_settings_refuse_record_and_replay_together_and_a_missing_recording(tmp_path: Path) -> None:
    made = tmp_path / "made.jsonl"
    made.write_text("")
    with pytest.raises(ValueError, match="both set"):
        KeelSettings(record=tmp_path / "x.jsonl", replay=made)
    with pytest.raises(ValueError, match="no such recording"):
        KeelSettings(replay=tmp_path / "absent.jsonl")
    assert KeelSettings().record is None and KeelSettings().replay is None


LOOKUP = ToolSpec(name="lookup", description="Find a thing.",
                  parameters={"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]})


def _req(provider: str, model: str, text: str) -> LlmRequest:
    return LlmRequest(task=TaskContext(workflow_id="wf-1", tenant="t"), step=1, kind="reason", prompt="p",
                      messages=[Message(role="user", content=text)], model=ModelSpec(provider=provider, model=model),
                      max_output_tokens=64, tools=[LOOKUP])


def _provider(kind: str, traffic: Traffic, base_url: str | None = None) -> Any:
    cls = OpenAIProvider if kind == "openai" else AnthropicProvider
    return cls(api_key="sk-test" if base_url else None, base_url=base_url, timeout_s=5, traffic=traffic)


REPLIES = {
    "openai": [Reply(body=openai_completion(tool_calls=[("call_9", "lookup", '{"id": "A-1"}')],
                                            finish_reason="tool_calls", prompt_tokens=31, completion_tokens=7)),
               # a small model's habit: the call written as text, repaired by the LLM activity, not here
               Reply(body=openai_completion(content='<tool_call>{"name": "lookup", "arguments": {}}</tool_call>'))],
    "anthropic": [Reply(body=anthropic_message(text_block("Looking."),
                                               tool_use_block("toolu_1", "lookup", {"id": "A-1"}),
                                               stop_reason="tool_use", input_tokens=40, output_tokens=9)),
                  Reply(body=anthropic_message(text_block("Done.")))],
}


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_recorded_exchange_replays_offline_and_a_new_request_fails_naming_it(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = "gpt-4o-mini" if kind == "openai" else "claude-haiku-4-5"
    path = tmp_path / "rec.jsonl"
    with FakeServer() as server:
        server.script(*REPLIES[kind])
        base = f"{server.url}/v1" if kind == "openai" else server.url
        live = _provider(kind, Traffic(recorder=Recorder(path)), base)
        first = await live.complete(_req(kind, model, "Find A-1."), "You find things.")
        second = await live.complete(_req(kind, model, "Find it again."), "You find things.")
        await live.aclose()
        server.assert_script_done()
    assert len(path.read_text().splitlines()) == 2

    # Offline: no server, no key, no base URL configured (the recorded one is used: same request built).
    for env in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(env, raising=False)
    replay = _provider(kind, Traffic.from_settings(None, path))  # type: ignore[arg-type]
    assert await replay.complete(_req(kind, model, "Find A-1."), "You find things.") == first
    assert await replay.complete(_req(kind, model, "Find it again."), "You find things.") == second

    with pytest.raises(ApplicationError) as missing:
        await replay.complete(_req(kind, model, "Find B-2 please."), "You find things.")
    await replay.aclose()
    e = missing.value
    assert e.type == errors.RECORDING_MISSING and e.non_retryable
    path_part = "/v1/chat/completions" if kind == "openai" else "/v1/messages"
    key = next(line for line in e.message.split() if len(line) == 64)
    assert f"{kind}:{model}, POST {path_part}" in e.message and str(path) in e.message
    assert "Find B-2 please." in e.message and f"KEEL_RECORD={path}" in e.message
    assert "messages[" in e.message and "now 'Find B-2 please.'" in e.message, e.message  # where it differs
    assert key not in path.read_text()


async def test_an_error_answer_is_recorded_and_replayed_as_the_same_failure(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    with FakeServer() as server:
        server.script(Reply(400, openai_error("model 'gpt-4o-mini' does not support tools", "invalid_request_error")))
        live = _provider("openai", Traffic(recorder=Recorder(path)), f"{server.url}/v1")
        with pytest.raises(ApplicationError) as live_err:
            await live.complete(_req("openai", "gpt-4o-mini", "Find A-1."), "sys")
        await live.aclose()
    replay = _provider("openai", Traffic.from_settings(None, path))  # type: ignore[arg-type]
    with pytest.raises(ApplicationError) as replay_err:
        await replay.complete(_req("openai", "gpt-4o-mini", "Find A-1."), "sys")
    await replay.aclose()
    assert replay_err.value.type == live_err.value.type == errors.PROVIDER_BAD_REQUEST
    assert replay_err.value.message == live_err.value.message
