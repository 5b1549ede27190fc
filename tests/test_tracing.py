"""Tracing: the loopback OTLP/HTTP collector the agent tracing tests use (tests/agents/test_agent_tracing.py:
an agent task's spans, decoded from protobuf); the local span store when no endpoint is set; the setting."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from activities.tracing import SPANS_FILE, JsonlSpanExporter, make_provider
from keel.settings import KeelSettings


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


def test_tracing_setting_auto_follows_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert KeelSettings(tracing="auto").tracing_enabled is False
    assert KeelSettings(tracing="true").tracing_enabled is True and KeelSettings(tracing="0").tracing == "off"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert KeelSettings(tracing="auto").tracing_enabled is True and KeelSettings(tracing="off").tracing_enabled is False
    with pytest.raises(ValueError):
        KeelSettings(tracing="sometimes")
