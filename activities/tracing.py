"""OpenTelemetry tracing: one trace per task, a span per model call and per tool call.

Temporal's TracingInterceptor (on the client, hence on the workers made from it) gives the task's
skeleton: StartWorkflow (the starter) -> RunWorkflow -> StartActivity -> RunActivity, propagated
through Temporal headers, so child workflows join their parent's trace. Inside the activities Keel
adds the GenAI spans (semantic conventions `gen_ai.*`, plus `keel.*` for cost, budget and prompt
version) and, on the routing call's span (a generic task: its `finish` span), the task's decisions as
span events with their reasons.

Export: OTLP over HTTP when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set, else a local
span store, `<KEEL_HOME>/spans.jsonl` (one JSON object per span). Prompt and completion text are
recorded only with KEEL_TRACE_CONTENT=1: they may hold personal data.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from keel.settings import KeelSettings, otlp_endpoint
from keel.types import Decision, LlmRequest, LlmResponse, ToolRequest, ToolResult

TRACER_NAME = "keel"
SPANS_FILE = "spans.jsonl"


class JsonlSpanExporter(SpanExporter):
    """The local span store: appends finished spans to a JSON Lines file (read by nothing but you and
    `jq`; `keel trace` draws a task from its Temporal history and the ledger)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [span.to_json(indent=None) for span in spans]
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS


def make_provider(settings: KeelSettings, service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """A tracer provider exporting over OTLP/HTTP if an endpoint is set, else to the local span store."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is None:
        if otlp_endpoint():
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = JsonlSpanExporter(settings.home / SPANS_FILE)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


_PROCESS: dict[str, TracerProvider] = {}


def process_tracer(settings: KeelSettings, service: str | None = None) -> Tracer:
    """This process's tracer (one provider per process, made on first use); `shutdown` flushes it."""
    if "provider" not in _PROCESS:
        name = service or os.environ.get("OTEL_SERVICE_NAME") or "keel"
        _PROCESS["provider"] = make_provider(settings, name)
    return _PROCESS["provider"].get_tracer(TRACER_NAME)


def shutdown() -> None:
    """Export what is buffered; call before a process exits (the CLI ends with os._exit)."""
    provider = _PROCESS.pop("provider", None)
    if provider is not None:
        provider.shutdown()


class Tracing:
    """What activities need to trace: a tracer (None: tracing off) and whether to record text."""

    def __init__(self, tracer: Tracer | None, capture_content: bool = False) -> None:
        self.tracer = tracer
        self.capture_content = capture_content

    @classmethod
    def off(cls) -> Tracing:
        return cls(None)

    @classmethod
    def from_settings(cls, settings: KeelSettings) -> Tracing:
        return cls(process_tracer(settings) if settings.tracing_enabled else None, settings.trace_content)

    @contextmanager
    def llm_span(self, req: LlmRequest) -> Iterator[Span | None]:
        if self.tracer is None:
            yield None
            return
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": req.model.provider,
            "gen_ai.request.model": req.model.model,
            "gen_ai.request.max_tokens": req.max_output_tokens,
            "gen_ai.request.temperature": req.temperature,
            **_task_attrs(req.task, req.step),
            "keel.step_kind": req.kind,
            "keel.tier": req.tier,
            "keel.prompt.name": req.prompt,
            "keel.prompt.version": req.task.prompt_version,
            "keel.budget.max_output_tokens": req.max_output_tokens,
        }
        if req.max_input_tokens is not None:
            attrs["keel.budget.max_input_tokens"] = req.max_input_tokens
        if req.model.provider == "sim":
            attrs["keel.model.simulated"] = True
        if self.capture_content:
            attrs["gen_ai.input.messages"] = json.dumps([m.model_dump(exclude_defaults=True) for m in req.messages])
        with self.tracer.start_as_current_span(f"chat {req.model.model}", kind=trace.SpanKind.CLIENT,
                                               attributes=attrs, record_exception=True) as span:
            yield span

    def llm_result(self, span: Span | None, resp: LlmResponse) -> None:
        if span is None:
            return
        span.set_attributes({
            "gen_ai.response.model": resp.model,
            "gen_ai.response.finish_reasons": [resp.finish_reason],
            "gen_ai.usage.input_tokens": resp.usage.input_tokens,
            "gen_ai.usage.output_tokens": resp.usage.output_tokens,
            "keel.usage.cached_input_tokens": resp.usage.cached_input_tokens,
            "keel.cost_usd": resp.cost_usd,
            "keel.latency_ms": resp.latency_ms,
            "keel.prompt.version": resp.prompt_version,
            "keel.prompt.hash": resp.prompt_hash,
            "keel.tool_calls": [c.name for c in resp.tool_calls],
        })
        if self.capture_content:
            span.set_attribute("gen_ai.output.messages", json.dumps(
                [{"role": "assistant", "content": resp.text,
                  "tool_calls": [c.model_dump() for c in resp.tool_calls]}]))

    @contextmanager
    def tool_span(self, name: str, req: ToolRequest) -> Iterator[Span | None]:
        if self.tracer is None:
            yield None
            return
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.call.id": req.call_id,
            **_task_attrs(req.task, req.step),
        }
        if self.capture_content:
            attrs["gen_ai.tool.call.arguments"] = json.dumps(req.arguments, default=str)
        with self.tracer.start_as_current_span(f"execute_tool {name}", kind=trace.SpanKind.INTERNAL,
                                               attributes=attrs, record_exception=True) as span:
            yield span

    def tool_result(self, span: Span | None, req: ToolRequest, result: ToolResult) -> None:
        if span is None:
            return
        span.set_attributes({"keel.tool.ok": result.ok, "keel.latency_ms": result.latency_ms})
        if not result.ok:
            span.set_status(Status(StatusCode.ERROR, result.error or "tool failed"))
        if req.outcome is not None:
            o = req.outcome
            span.set_attributes({
                "keel.outcome.status": o.status, "keel.outcome.route": o.route, "keel.outcome.reason": o.reason,
                "keel.usage.total_tokens": o.input_tokens + o.output_tokens, "keel.cost_usd.total": o.cost_usd,
            })
            add_decisions(span, req.decisions)


    @contextmanager
    def finish_span(self, task: Any, step: int, outcome: Any, decisions: Sequence[Decision]) -> Iterator[Span | None]:
        """A generic task's last step (`keel.finish`): its outcome and its decisions as events, as the
        decisions, once, at the end."""
        if self.tracer is None:
            yield None
            return
        attrs: dict[str, Any] = {
            **_task_attrs(task, step),
            "keel.outcome.status": outcome.status, "keel.outcome.route": outcome.route,
            "keel.outcome.reason": outcome.reason,
            "keel.usage.total_tokens": outcome.input_tokens + outcome.output_tokens,
            "keel.cost_usd.total": outcome.cost_usd,
        }
        with self.tracer.start_as_current_span(f"finish {task.task_type}", kind=trace.SpanKind.INTERNAL,
                                               attributes=attrs, record_exception=True) as span:
            add_decisions(span, decisions)
            yield span


def add_decisions(span: Span, decisions: Sequence[Decision]) -> None:
    """The task's decision points (route, escalate, block, wrap up, ...) as span events."""
    for d in decisions:
        attrs: dict[str, str | int] = {"keel.decision.kind": d.kind, "keel.decision.reason": d.reason,
                                       "keel.step": d.step}
        ts = int(d.at.timestamp() * 1e9) if d.at is not None else None
        span.add_event(f"decision {d.kind}", attributes=attrs, timestamp=ts)


def _task_attrs(task: Any, step: int) -> dict[str, Any]:
    return {
        "keel.workflow_id": task.workflow_id,
        "keel.task_key": task.key,
        "keel.tenant": task.tenant,
        "keel.feature": task.feature,
        "keel.task_type": task.task_type,
        "keel.step": step,
    }
