"""Tracing: a ticket's spans arrive over OTLP/HTTP on loopback; the protobuf is decoded and the tree
and the GenAI attributes checked. The local span store is used when no endpoint is set."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.tracing import SPANS_FILE, JsonlSpanExporter, Tracing, make_provider
from keel.dataset import sample_tickets
from keel.settings import KeelSettings
from tests.conftest import run_ticket, running_worker, ticket


class Collector:
    """A minimal OTLP/HTTP receiver: keeps every span of every POST /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.paths.append(self.path)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                for rs in req.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes
                                    if a.key == "service.name"), "")
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            collector.spans.append({
                                "name": sp.name, "trace_id": sp.trace_id.hex(), "span_id": sp.span_id.hex(),
                                "parent": sp.parent_span_id.hex() or None, "service": service,
                                "attrs": {a.key: _value(a.value) for a in sp.attributes},
                                "events": [(e.name, {a.key: _value(a.value) for a in e.attributes})
                                           for e in sp.events],
                            })
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def named(self, prefix: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["name"].startswith(prefix)]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


async def traced_ticket(client: Client, settings: KeelSettings, engine: Engine, collector: Collector,
                        capture: bool, text: str, customer: str) -> tuple[Any, list[dict[str, Any]]]:
    provider = TracerProvider(resource=Resource.create({"service.name": "keel-test"}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{collector.port}/v1/traces")))
    tracer = provider.get_tracer("keel")
    traced = Client(client.service_client, namespace=client.namespace, data_converter=pydantic_data_converter,
                    interceptors=[TracingInterceptor(tracer)])
    async with running_worker(traced, settings, engine, tracing=Tracing(tracer, capture_content=capture)):
        res = await run_ticket(traced, settings, ticket(customer, text))
    provider.force_flush()
    provider.shutdown()
    return res, [s for s in collector.spans if s["attrs"].get("keel.workflow_id", res.workflow_id) == res.workflow_id
                 or s["name"].endswith("SupportTicket")]


async def test_a_ticket_is_one_trace_with_genai_spans(
    client: Client, settings: KeelSettings, db_engine: Engine, collector: Collector
) -> None:
    refund = next(s for s in sample_tickets(40) if s.category == "refund_request")
    res, spans = await traced_ticket(client, settings, db_engine, collector, False, refund.text, refund.customer_id)
    assert set(collector.paths) == {"/v1/traces"}
    by_id = {s["span_id"]: s for s in spans}
    assert len({s["trace_id"] for s in spans}) == 1, "one trace per task"
    [root] = [s for s in spans if s["parent"] is None]
    assert root["name"] == "StartWorkflow:SupportTicket"
    [run] = collector.named("RunWorkflow:SupportTicket")
    assert by_id[run["parent"]] is root

    def ancestors(s: dict[str, Any]) -> list[str]:
        names = []
        while s["parent"] is not None:
            s = by_id[s["parent"]]
            names.append(s["name"])
        return names

    chats = collector.named("chat ")
    assert len(chats) == res.llm_calls
    for c in chats:
        a = c["attrs"]
        # Temporal's interceptor hangs the workflow's commands under the starter's span (its workflow
        # spans have no duration): StartWorkflow -> StartActivity -> RunActivity -> chat.
        assert ancestors(c) == ["RunActivity:llm_call", "StartActivity:llm_call", "StartWorkflow:SupportTicket"]
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "sim"
        assert a["gen_ai.request.model"] in ("sim-small", "sim-large") and a["gen_ai.response.model"]
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
        assert a["gen_ai.response.finish_reasons"] and a["keel.prompt.version"] == "v1"
        assert len(a["keel.prompt.hash"]) == 12 and a["keel.cost_usd"] > 0 and a["keel.model.simulated"] is True
        assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a
    assert sum(c["attrs"]["gen_ai.usage.input_tokens"] + c["attrs"]["gen_ai.usage.output_tokens"]
               for c in chats) == res.tokens
    assert round(sum(c["attrs"]["keel.cost_usd"] for c in chats), 8) == pytest.approx(res.cost_usd)

    tools = collector.named("execute_tool ")
    assert [t["attrs"]["gen_ai.tool.name"] for t in tools] == res.tools_executed
    assert all(ancestors(t)[0].startswith("RunActivity:") for t in tools)
    routing = tools[-1]
    kinds = [e[1]["keel.decision.kind"] for e in routing["events"]]
    assert kinds == [d.kind for d in res.decisions] and "route" in kinds
    assert all(e[1]["keel.decision.reason"] for e in routing["events"])
    assert routing["attrs"]["keel.outcome.status"] == res.status


async def test_prompt_text_only_when_enabled(
    client: Client, settings: KeelSettings, db_engine: Engine, collector: Collector
) -> None:
    _, spans = await traced_ticket(client, settings, db_engine, collector, True, "Why was I charged a fee?",
                                   "C-1003")
    chats = [s for s in spans if s["name"].startswith("chat ")]
    assert chats and all("Why was I charged a fee?" in s["attrs"]["gen_ai.input.messages"] for s in chats)
    assert all(json.loads(s["attrs"]["gen_ai.output.messages"])[0]["role"] == "assistant" for s in chats)


def test_local_span_store_without_an_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    settings = KeelSettings(home=tmp_path)
    provider = make_provider(settings, "keel-test")
    assert isinstance(provider._active_span_processor._span_processors[0].span_exporter,
                      JsonlSpanExporter)
    with provider.get_tracer("keel").start_as_current_span("chat sim-small", attributes={"keel.step": 1}):
        pass
    provider.shutdown()
    [line] = (tmp_path / SPANS_FILE).read_text().splitlines()
    assert json.loads(line)["name"] == "chat sim-small"


async def test_keel_trace_draws_the_tree_from_the_history(
    client: Client, settings: KeelSettings, worker_factory: Any
) -> None:
    from typer.testing import CliRunner

    from starter.cli import app
    from starter.trace_cli import render, task_trace

    refund = next(s for s in sample_tickets(40) if s.category == "refund_request")
    async with worker_factory(client):
        res = await run_ticket(client, settings, ticket(refund.customer_id, refund.text, spiral_rate=1.0))
    t = await task_trace(client, res.workflow_id)
    assert t.status == "COMPLETED" and t.result is not None and t.result.workflow_id == res.workflow_id
    llm = [n for n in t.nodes if n.kind == "llm"]
    tools = [n for n in t.nodes if n.kind == "tool"]
    decisions = [n for n in t.nodes if n.kind == "decision"]
    assert len(llm) == res.llm_calls and sum(n.tokens for n in llm) == res.tokens
    assert [n.name for n in tools] == res.tools_executed
    assert [(d.name, d.detail) for d in decisions] == [(d.kind, d.reason) for d in res.decisions]
    assert all("sim (offline simulator)" in (n.model or "") for n in llm)
    # Decisions come after the calls of their step.
    steps = [n.step for n in t.nodes if n.step is not None]
    assert steps == sorted(steps)
    assert "decision" in str(render(t).children[-1].label) or tools

    env = {"TEMPORAL_ADDRESS": client.service_client.config.target_host, "KEEL_TASK_QUEUE": settings.task_queue}
    out = await asyncio.to_thread(CliRunner().invoke, app, ["trace", res.workflow_id, "--json"], env=env)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["workflow_id"] == res.workflow_id and len(doc["nodes"]) == len(t.nodes)
    out = await asyncio.to_thread(CliRunner().invoke, app, ["trace", res.workflow_id], env=env)
    assert out.exit_code == 0 and "route" in out.output and "llm" in out.output
    out = await asyncio.to_thread(CliRunner().invoke, app, ["trace", "no-such-task"], env=env)
    assert out.exit_code == 1 and "no task" in out.output


async def test_fast_acknowledgement_and_keel_watch(client: Client, settings: KeelSettings, worker_factory: Any) -> None:
    """Tasks start asynchronously; the small tier's classification gives an acknowledgement readable by
    the progress query within the first step, long before the answer (the sim takes 200 ms a call)."""
    from typer.testing import CliRunner

    from starter import tickets as tk
    from starter.cli import app
    from tests.conftest import assert_eventually

    card = next(s for s in sample_tickets(40) if s.category == "card_issue")
    inp = ticket(card.customer_id, card.text, latency_ms_min=200, latency_ms_max=200)
    env = {"TEMPORAL_ADDRESS": client.service_client.config.target_host, "KEEL_TASK_QUEUE": settings.task_queue,
           "COLUMNS": "200"}
    async with worker_factory(client):
        handle = await tk.start_ticket(client, settings, inp)
        p = await assert_eventually(lambda: tk.progress(client, handle.id), lambda p: p.acknowledgement is not None)
        assert p.status == "running" and p.step <= 2, p
        assert p.acknowledgement is not None and "card" in p.acknowledgement
        out = await asyncio.to_thread(CliRunner().invoke, app, ["watch", handle.id], env=env)
        res = await handle.result()
    assert out.exit_code == 0, out.output
    assert "Thank you for contacting Keel Bank" in out.output and res.status in out.output
    assert res.acknowledgement == p.acknowledgement and res.llm_calls > p.llm_calls


def test_tracing_setting_auto_follows_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert KeelSettings(tracing="auto").tracing_enabled is False
    assert KeelSettings(tracing="true").tracing_enabled is True and KeelSettings(tracing="0").tracing == "off"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert KeelSettings(tracing="auto").tracing_enabled is True and KeelSettings(tracing="off").tracing_enabled is False
    with pytest.raises(ValueError):
        KeelSettings(tracing="sometimes")
