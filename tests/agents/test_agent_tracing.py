"""Tracing of a generic agent task (KeelAgent): its spans arrive over OTLP/HTTP on loopback (the
collector of tests/test_tracing.py decodes the protobuf): one trace from the starter's span, a GenAI
`chat` span per model call and an `execute_tool` span per tool run, under their activities, with tokens
and cost summing to the task's, and the task's decisions as events of its `finish` span; prompt text only
when enabled. `keel trace` draws the same task from its history."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from typer.testing import CliRunner

import keel
from activities.tracing import Tracing
from agents.support_desk import support_desk
from keel.testing import agent_environment
from starter.cli import app
from tests.test_tracing import Collector

REQUEST = "Customer: C-1003\n\nWhy was I charged a fee on my statement?"


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


async def traced_task(client: Client, db_url: str, collector: Collector, capture: bool
                      ) -> tuple[keel.AgentResult, list[dict[str, Any]], dict[str, str]]:
    provider = TracerProvider(resource=Resource.create({"service.name": "keel-test"}))
    # Exported from the processor's own thread: the workflow's spans end inside the (strict) sandbox.
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{collector.port}/v1/traces")))
    tracer = provider.get_tracer("keel")
    traced = Client(client.service_client, namespace=client.namespace, data_converter=pydantic_data_converter,
                    interceptors=[TracingInterceptor(tracer)])
    async with agent_environment(support_desk, client=traced, db_url=db_url,
                                 tracing=Tracing(tracer, capture_content=capture)) as env:
        res = await env.run("support_desk", REQUEST, tenant="C-1003")
        cli = {"TEMPORAL_ADDRESS": client.service_client.config.target_host,
               "KEEL_TASK_QUEUE": env.settings.task_queue, "COLUMNS": "200"}
    provider.force_flush()
    provider.shutdown()
    spans = [s for s in collector.spans if s["attrs"].get("keel.workflow_id", res.workflow_id) == res.workflow_id]
    return res, spans, cli


async def test_an_agent_task_is_one_trace_with_genai_spans_and_its_decisions(
        client: Client, db_url: str, collector: Collector) -> None:
    res, spans, cli = await traced_task(client, db_url, collector, False)
    assert res.status == "completed", res.reason
    by_id = {s["span_id"]: s for s in spans}
    assert len({s["trace_id"] for s in spans}) == 1, "one trace per task"
    [root] = [s for s in spans if s["parent"] is None]
    assert root["name"] == "StartWorkflow:KeelAgent"

    def ancestors(s: dict[str, Any]) -> list[str]:
        out = []
        while s["parent"] is not None:
            s = by_id[s["parent"]]
            out.append(s["name"])
        return out

    chats = [s for s in spans if s["name"].startswith("chat ")]
    assert len(chats) == res.llm_calls  # the triage's call included
    for c in chats:
        a = c["attrs"]
        assert ancestors(c)[:2] == ["RunActivity:llm_call", "StartActivity:llm_call"]
        assert ancestors(c)[-1] == "StartWorkflow:KeelAgent"
        assert a["gen_ai.provider.name"] == "sim" and a["keel.model.simulated"] is True
        assert a["keel.task_type"] == "support_desk" and a["keel.tenant"] == "C-1003"
        assert "gen_ai.input.messages" not in a
    assert sum(c["attrs"]["gen_ai.usage.input_tokens"] + c["attrs"]["gen_ai.usage.output_tokens"]
               for c in chats) == res.tokens
    assert round(sum(c["attrs"]["keel.cost_usd"] for c in chats), 8) == pytest.approx(res.cost_usd)

    tools = [s for s in spans if s["name"].startswith("execute_tool ")]
    assert [t["attrs"]["gen_ai.tool.name"] for t in tools] == res.tools_executed
    assert all(ancestors(t)[0] == f"RunActivity:support_desk.{t['attrs']['gen_ai.tool.name']}" for t in tools)

    [finish] = [s for s in spans if s["name"] == "finish support_desk"]
    assert ancestors(finish)[0] == "RunActivity:keel.finish"
    # The ledger's vocabulary of outcomes (a completed task is "resolved" there).
    assert finish["attrs"]["keel.outcome.status"] == {"completed": "resolved"}.get(res.status, res.status)
    assert finish["attrs"]["keel.usage.total_tokens"] == res.tokens
    assert [e[1]["keel.decision.kind"] for e in finish["events"]] == [d.kind for d in res.decisions]
    assert {"triage", "route"} <= {d.kind for d in res.decisions}

    # `keel trace` draws the same task from its history: the calls, the tools and the decisions.
    out = await asyncio.to_thread(CliRunner().invoke, app, ["trace", res.workflow_id, "--json"], env=cli)
    assert out.exit_code == 0, out.output
    nodes = json.loads(out.output)["nodes"]
    assert sum(n["kind"] == "llm" for n in nodes) == res.llm_calls
    # Tool nodes carry the activity's name (`<agent>.<tool>`, as in the UI).
    assert [n["name"] for n in nodes if n["kind"] == "tool"] == [f"support_desk.{t}" for t in res.tools_executed]
    assert [(n["name"], n["detail"]) for n in nodes if n["kind"] == "decision"] == [
        (d.kind, d.reason) for d in res.decisions]


async def test_prompt_text_only_when_enabled(client: Client, db_url: str, collector: Collector) -> None:
    _, spans, _ = await traced_task(client, db_url, collector, True)
    chats = [s for s in spans if s["name"].startswith("chat ")]
    assert chats and all("Why was I charged a fee" in s["attrs"]["gen_ai.input.messages"] for s in chats)
    assert all(json.loads(s["attrs"]["gen_ai.output.messages"])[0]["role"] == "assistant" for s in chats)
