"""Tool calls written as text (keel.toolcalls): the forms small and self-hosted models use, read back
into tool calls; an agent's structured answer never taken for a call; unreadable calls kept so the loop
refuses them as invalid output."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from keel.toolcalls import read_text_tool_calls

OFFERED = frozenset({"get_account", "issue_refund"})


def calls(text: str) -> tuple[list[tuple[str, Any]], str]:
    found, form = read_text_tool_calls(text, OFFERED)
    return [(c.name, json.loads(c.arguments_json)) for c in found], form


def test_hermes_calls_one_or_more() -> None:
    text = ('I will look.\n<tool_call>\n{"name": "get_account", "arguments": {"customer_id": "C-1001"}}\n</tool_call>'
            '<tool_call>{"name": "issue_refund", "arguments": {"amount": 5}}</tool_call>')
    assert calls(text) == ([("get_account", {"customer_id": "C-1001"}), ("issue_refund", {"amount": 5})], "hermes")


def test_functions_form_with_a_colon_or_parentheses() -> None:
    assert calls('functions.issue_refund: {"amount": 5000, "transaction_id": "T-1"}') == (
        [("issue_refund", {"amount": 5000, "transaction_id": "T-1"})], "functions")
    assert calls('functions.get_account({"customer_id": "C-1"})') == ([("get_account", {"customer_id": "C-1"})],
                                                                      "functions")


def test_a_bare_json_call_only_when_its_name_is_offered() -> None:
    assert calls('{"name": "get_account", "parameters": {"customer_id": "C-1"}}') == (
        [("get_account", {"customer_id": "C-1"})], "json")
    assert calls('```json\n{"name": "get_account", "arguments": "{\\"customer_id\\": \\"C-1\\"}"}\n```') == (
        [("get_account", {"customer_id": "C-1"})], "json")
    # A structured answer that happens to have a name is an answer, not a call.
    assert calls('{"name": "Ana Silva", "arguments": ["a", "b"]}') == ([], "")
    assert calls('{"category": "card_issue", "confidence": 0.9}') == ([], "")
    assert calls("Your balance is 1,200 EUR.") == ([], "")


def test_an_unreadable_call_is_kept_for_the_loop_to_refuse() -> None:
    found, form = read_text_tool_calls('<tool_call>{"name": "get_account", "arguments": {"customer_id": </tool_call>',
                                       OFFERED)
    assert form == "hermes" and len(found) == 1
    assert found[0].name == "<unreadable tool_call>"  # an unknown tool: refused, counted, the model told
    found, _ = read_text_tool_calls("functions.issue_refund: {amount: five}", OFFERED)
    assert found[0].name == "issue_refund" and found[0].arguments_json == "{amount: five}"  # invalid JSON


ARGS = st.dictionaries(st.text(st.characters(codec="ascii", categories=["L"]), min_size=1, max_size=8),
                       st.one_of(st.integers(), st.text(max_size=10), st.booleans()), max_size=4)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(OFFERED)), args=ARGS, form=st.sampled_from(["hermes", "functions", "json"]),
       before=st.sampled_from(["", "Let me check. ", "Sure!\n"]))
def test_property_every_form_round_trips(name: str, args: dict[str, Any], form: str, before: str) -> None:
    payload = json.dumps({"name": name, "arguments": args})
    text = {"hermes": f"{before}<tool_call>{payload}</tool_call>",
            "functions": f"{before}\nfunctions.{name}: {json.dumps(args)}",
            "json": payload}[form]
    assert calls(text) == ([(name, args)], form)


def test_several_bare_calls_with_doubled_braces_are_read() -> None:
    # Qwen2.5-Coder-1.5B on llama.cpp's server, a billing question (recorded 2026-12-06).
    text = ('{{"name": "get_account", "arguments": {"customer_id": "C-1011"}}}}\n'
            '{{"name": "lookup_policy", "arguments": {"topic": "fees"}}}}')
    calls, form = read_text_tool_calls(text, frozenset({"get_account", "lookup_policy"}))
    assert form == "json" and [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("get_account", {"customer_id": "C-1011"}), ("lookup_policy", {"topic": "fees"})]
    # A name not offered, in the exact shape of a call: still a call (the loop refuses it as an unknown tool
    # and it counts), as an injected `delete_account` written by the same model.
    injected = '{{"name": "delete_account", "arguments": {"customer_id": "C-1002"}}}}'
    assert [c.name for c in read_text_tool_calls(injected, frozenset({"get_account"}))[0]] == ["delete_account"]
    # Another shape with an unknown name: an answer, not a call.
    assert read_text_tool_calls('{"name": "Ana", "role": "x"}', frozenset({"get_account"})) == ([], "")


def test_calls_inside_the_templates_tools_tag_are_read() -> None:
    text = ('<tools>\n{"name": "get_account", "arguments": {"customer_id": "C-1027"}}\n'
            '{"name": "get_transactions", "arguments": {"customer_id": "C-1027", "days": 30}}\n</tools>')
    calls, form = read_text_tool_calls(text, frozenset({"get_account", "get_transactions"}))
    assert form == "tools_tag" and [c.name for c in calls] == ["get_account", "get_transactions"]


def test_calls_in_several_fences_are_read() -> None:
    text = ('```json\n{"name": "get_transactions", "arguments": {"customer_id": "C-1028", "days": 30}}\n```\n'
            '```json\n{"name": "lookup_policy", "arguments": {"topic": "refunds"}}\n```')
    calls, form = read_text_tool_calls(text, frozenset({"get_transactions", "lookup_policy"}))
    assert form == "json" and [c.name for c in calls] == ["get_transactions", "lookup_policy"]
    # Prose around a fence: an answer that quotes JSON, not a call.
    offered = frozenset({"get_transactions", "lookup_policy"})
    assert read_text_tool_calls("Here is what I found:\n" + text, offered)[0] == []
