"""An agent declared wrongly fails when it loads, with a clear error, before any task runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import keel
from agents.oncall import oncall, restart_service, service_status
from keel import registry
from keel.sim import SimTurn, generic_behaviour, parse_turn

PROMPT = Path(oncall.prompt_dir) / "oncall.v1.md"


def make(**kw: Any) -> keel.Agent:
    return keel.Agent(**{"name": "probe", "prompt": PROMPT, "tools": [service_status, restart_service], **kw})


@pytest.mark.parametrize(("kw", "message"), [
    ({"approvers": {"reboot": ["x"]}}, "approvers name unknown tool 'reboot'"),
    ({"approvers": {"service_status": ["x"]}}, "which is read_only, not confirm"),
    ({"models": "gpt-4o"}, "must look like 'provider:model'"),
    ({"models": "openai:no-such-model"}, "no price for openai:no-such-model"),
    ({"models": {"medium": "sim:sim-large"}}, "must name the tiers"),
    ({"prompt": PROMPT.with_name("oncall.v9.md")}, "not found"),
    ({"prompt": "oncall.md"}, "must be named <name>.<version>.md"),
    ({"name": "Bad Name"}, "agent name 'Bad Name' must match"),
    ({"tools": [service_status, service_status]}, "two tools named 'service_status'"),
    ({"tools": [len]}, "is not a tool"),
    ({"checks": {"Bad Check": lambda out: None}}, "check 'Bad Check' must be named like"),
    ({"checks": {"fine": "not callable"}}, "check 'fine' must be named like"),
])
def test_bad_definitions_are_refused_at_load(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(keel.AgentDefinitionError, match=None) as e:
        make(**kw)
    assert message in str(e.value)


def test_a_tool_needs_an_arguments_model_and_a_description() -> None:
    with pytest.raises(keel.AgentDefinitionError, match="pydantic model"):
        @keel.tool
        def bad(ctx: keel.ToolContext, args: dict[str, Any]) -> None: ...
    with pytest.raises(keel.AgentDefinitionError, match="needs a description"):
        @keel.tool
        def silent(ctx: keel.ToolContext, args: keel.Args) -> None: ...


def test_relative_prompts_resolve_beside_the_declaring_module() -> None:
    assert oncall.prompt_versions() == ["v1", "v2"] and oncall.prompt_name == "oncall"


def test_another_agent_under_a_taken_name_is_refused() -> None:
    registry.register(oncall)
    registry.register(oncall)  # the same definition twice is fine
    with pytest.raises(keel.AgentDefinitionError, match="already registered"):
        registry.register(make(name="oncall"))


def test_the_generic_sim_reads_then_answers_without_writing() -> None:
    import random

    from keel.types import Message, ToolCall

    specs = [service_status.spec(), restart_service.spec()]
    turn = parse_turn("probe", [Message(role="user", content="Is the api-gw service up?")], specs, 1, "reason",
                      random.Random(0))
    first = generic_behaviour(turn)
    assert [c.name for c in first.tool_calls] == ["service_status"]
    assert first.tool_calls[0].arguments == {"service": "api-gw"}
    msgs = [Message(role="user", content="Is the api-gw service up?"),
            Message(role="assistant", tool_calls=[ToolCall(id="c1", name="service_status",
                                                           arguments_json='{"service": "api-gw"}')]),
            Message(role="tool", tool_call_id="c1", name="service_status", content='{"status": "healthy"}')]
    second: SimTurn = parse_turn("probe", msgs, specs, 2, "reason", random.Random(0))
    reply = generic_behaviour(second)
    assert not reply.tool_calls and "healthy" in reply.text and "Bank" not in reply.text
