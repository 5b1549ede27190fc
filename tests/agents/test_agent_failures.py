"""What a generic agent task does with bad input and bad model output, on the dev server with the support
desk (the agent-path twin of tests/test_ticket_workflow.py): empty input is rejected with its reason and
an outcome row (nothing lost); a huge input is stopped by the budget before any call; hallucinated tools,
schema-invalid arguments and broken JSON never reach a tool, are recorded, and past the agent's limit hand
the task to a person; the progress query answers while the task runs, with the triage's acknowledgement;
an unpriced model fails the task with a message that says what to do."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text
from temporalio.client import Client, WorkflowFailureError

import keel
from agents.support_desk import support_desk
from keel import names
from keel.testing import AgentEnvironment, agent_environment
from keel.types import Progress
from tests.conftest import assert_eventually

FEE = "Customer: C-1003\n\nWhy was I charged a fee on my statement?"


def rows(env: AgentEnvironment, sql: str, **params: Any) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def tool_rows(env: AgentEnvironment, workflow_id: str) -> list[dict[str, Any]]:
    return rows(env, "SELECT tool, status FROM ledger WHERE workflow_id = :w AND kind = 'tool'", w=workflow_id)


async def test_bad_input_is_refused_with_its_reason_and_never_lost(client: Client, db_url: str) -> None:
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        empty = await env.run("support_desk", "", tenant="C-1001")
        blank = await env.run("support_desk", " \n\t ", tenant="C-1001")
        huge = await env.run("support_desk", "x" * 1_000_001, tenant="C-1001")
        outcomes = {r["workflow_id"]: r for r in rows(env, "SELECT workflow_id, status, reason FROM ledger "
                                                          "WHERE kind = 'outcome'")}
    for r in (empty, blank):
        assert r.status == "rejected" and r.reason == "the input is empty" and r.llm_calls == 0
    assert huge.status == "budget_exceeded" and "kill switch" in huge.reason and huge.llm_calls == 0
    assert set(outcomes) == {empty.workflow_id, blank.workflow_id, huge.workflow_id}  # one row each


@pytest.mark.parametrize("knob", ["hallucinated_tool_rate", "invalid_args_rate", "invalid_json_rate"])
async def test_bad_tool_calls_never_reach_a_tool(client: Client, db_url: str, knob: str) -> None:
    sim = keel.SimConfig(spiral_rate=0.0, **{knob: 1.0})
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        res = await env.run("support_desk", FEE, tenant="C-1003", sim=sim)
        ran = tool_rows(env, res.workflow_id)
        guard = rows(env, "SELECT status FROM ledger WHERE workflow_id = :w AND kind = 'guardrail'", w=res.workflow_id)
    assert res.tools_executed == [] and ran == [], ran
    if res.reason.startswith("the request could not be triaged"):
        # Broken JSON can break the triage's own answer too (the breakage is drawn per call: some broken
        # answers still hold a readable object): then a person takes the task before any tool.
        assert knob == "invalid_json_rate" and res.status == "escalated", res.reason
        assert [d.kind for d in res.decisions].count("invalid_output") == support_desk.triage.attempts  # type: ignore[union-attr]
        return
    assert res.tools_blocked and res.invalid_outputs >= support_desk.max_invalid_outputs
    assert res.status == "escalated" and "invalid" in res.reason, res.reason
    assert len(guard) >= len(res.tools_blocked) and all(g["status"] == "blocked" for g in guard)
    expected = {"hallucinated_tool_rate": "unknown tool", "invalid_args_rate": "invalid arguments",
                "invalid_json_rate": "not valid JSON"}[knob]
    assert any(expected in b.reason for b in res.tools_blocked), res.tools_blocked


async def test_progress_while_running_with_the_triages_acknowledgement(client: Client, db_url: str) -> None:
    slow = keel.SimConfig(spiral_rate=0.0, latency_ms_min=300, latency_ms_max=300)
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        handle = await env.start("support_desk", FEE, tenant="C-1003", sim=slow)

        async def progress() -> Progress:
            p: Progress = await handle.query(names.PROGRESS_QUERY, result_type=Progress)
            return p

        p = await assert_eventually(progress, lambda p: p.acknowledgement is not None)
        res = await handle.result()
    assert p.status == "running" and p.llm_calls < res.llm_calls
    assert p.acknowledgement is not None and "Keel Bank" in p.acknowledgement


async def test_an_unpriced_model_fails_the_task_saying_what_to_do(client: Client, db_url: str) -> None:
    unpriced = keel.ModelSpec(provider="openai", model="gpt-9-unpriced")
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        handle = await env.start("support_desk", FEE, tenant="C-1003", models={"large": unpriced})
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), 60)
    message = str(failed.value.cause)
    assert "no price for openai:gpt-9-unpriced" in message and "PRICES" in message, message


async def test_tool_calls_written_as_text_run_and_an_empty_answer_is_never_final(client: Client, db_url: str) -> None:
    """A self-hosted model's habits: the call spelled out in the text (read back, run, recorded as a
    repair), and an empty answer (sent back to the model and counted, never the task's answer)."""
    from keel.testing import SCRIPTED, ScriptedModel, answer

    model = ScriptedModel([
        answer('{"category": "billing_question", "urgency": "normal", "confidence": 0.9}'),  # the triage
        answer('<tool_call>{"name": "get_account", "arguments": {"customer_id": "C-1003"}}</tool_call>'),
        answer('functions.lookup_policy: {"topic": "fees"}'),
        answer(""),
        answer("Your account is active; the fee is the monthly card fee of our fees policy."),
    ])
    async with agent_environment(support_desk, client=client, db_url=db_url, model=model) as env:
        res = await env.run("support_desk", FEE, tenant="C-1003", models={"small": SCRIPTED, "large": SCRIPTED})
        ran = tool_rows(env, res.workflow_id)
        raw = rows(env, "SELECT step, repaired, raw_output FROM ledger WHERE workflow_id = :w AND kind = 'llm' "
                        "AND repaired IS NOT NULL ORDER BY step", w=res.workflow_id)
    model.assert_all_used()
    assert [r["repaired"] for r in raw] == ["1 tool call(s) written as text (hermes)",
                                            "1 tool call(s) written as text (functions)"]
    assert raw[0]["raw_output"].startswith("<tool_call>") and raw[1]["raw_output"].startswith("functions.")
    assert res.status == "completed", res.reason
    assert res.tools_executed == ["get_account", "lookup_policy"] and [r["tool"] for r in ran] == res.tools_executed
    repairs = [d.reason for d in res.decisions if d.kind == "repaired_output"]
    assert repairs == ["1 tool call(s) written as text (hermes)", "1 tool call(s) written as text (functions)"]
    assert res.invalid_outputs == 1 and "the monthly card fee" in res.output
    assert any(d.kind == "invalid_output" and "empty" in d.reason for d in res.decisions), res.decisions


async def test_a_refused_outputs_raw_text_is_in_its_ledger_row_and_the_trace(client: Client, db_url: str) -> None:
    """Every output the workflow refuses as invalid (a triage that is not JSON, a tool call whose
    arguments are not, an empty answer) keeps its raw text in its ledger row with why; `keel trace
    --content` shows it under the call, with the workflow's reason. The outputs it took keep no text
    in the ledger (they stay in the history)."""
    from rich.console import Console

    from keel.testing import SCRIPTED, ScriptedModel, answer, call, raw_call
    from starter.trace_cli import render, task_trace

    model = ScriptedModel([
        answer("This looks like a billing question to me."),  # the triage, not JSON: sent back
        answer('{"category": "billing_question", "urgency": "normal", "confidence": 0.9}'),
        raw_call("get_account", '{"customer_id": "C-1003"'),  # unreadable: never reaches the tool
        call("get_account", customer_id="C-1003"),
        answer(""),
        answer("Your account is active; the fee is the monthly card fee."),
    ])
    async with agent_environment(support_desk, client=client, db_url=db_url, model=model) as env:
        res = await env.run("support_desk", FEE, tenant="C-1003", models={"small": SCRIPTED, "large": SCRIPTED})
        llm_rows = rows(env, "SELECT step, step_kind, raw_output, error FROM ledger WHERE workflow_id = :w "
                             "AND kind = 'llm' ORDER BY step", w=res.workflow_id)
        trace = await task_trace(client, res.workflow_id, content=True)
    model.assert_all_used()
    assert res.status == "completed" and res.tools_executed == ["get_account"], res.reason

    refused = [r for r in llm_rows if r["error"] is not None]
    assert [(r["step_kind"], r["raw_output"], r["error"]) for r in refused] == [
        ("classify", "This looks like a billing question to me.", "invalid output: the answer holds no JSON object"),
        ("reason", 'get_account {"customer_id": "C-1003"',
         "invalid output: get_account: arguments are not valid JSON (Expecting ',' delimiter at position 24)"),
        ("reason", "", "invalid output: the answer is empty"),
    ]
    assert all(r["raw_output"] is None for r in llm_rows if r["error"] is None) and len(llm_rows) == 6

    calls = {n.step: n.content for n in trace.nodes if n.kind == "llm"}
    assert all(c is not None for c in calls.values())
    by_text = {c.text: c for c in calls.values() if c is not None}
    assert by_text["This looks like a billing question to me."].refused == [
        "invalid_output: triage: the answer holds no JSON object"]
    [bad_call] = [c for c in calls.values() if c is not None and c.tool_calls and c.refused]
    assert bad_call.tool_calls[0].arguments == '{"customer_id": "C-1003"'
    assert bad_call.refused == ["block: get_account: arguments are not valid JSON (Expecting ',' delimiter at "
                                "position 24)"]
    assert by_text[""].refused == ["invalid_output: the answer is empty"]
    assert by_text["Your account is active; the fee is the monthly card fee."].refused == []

    shown = Console(width=200, record=True)
    shown.print(render(trace))
    out = shown.export_text()
    assert "said (41 characters): This looks like a billing question to me." in out
    assert "refused invalid_output: triage: the answer holds no JSON object" in out
    assert 'calls get_account {"customer_id": "C-1003"' in out and "refused block: get_account" in out
    assert "said nothing (empty text)" in out and "refused invalid_output: the answer is empty" in out
