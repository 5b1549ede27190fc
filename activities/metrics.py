"""Task metrics: OpenTelemetry instruments recorded in the worker when a task's outcome is written,
exposed on a Prometheus endpoint (`KEEL_METRICS_PORT`), next to the Temporal SDK's own metrics on the
Runtime's Prometheus endpoint (`KEEL_SDK_METRICS_PORT`).

| Prometheus name | kind | labels |
|---|---|---|
| keel_task_steps | histogram | task_type |
| keel_task_reasoning_loops | histogram | task_type |
| keel_task_token_efficiency | histogram (answer tokens / all tokens) | task_type |
| keel_tool_calls_total | counter | task_type, tool |
| keel_task_outcomes_total | counter | task_type, status, category |
| keel_task_tokens_total, keel_task_cost_usd_total | counter | task_type |

Abandonment is the budget_exceeded share of keel_task_outcomes_total, escalation the escalated one.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, start_http_server
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from keel.metrics import token_efficiency
from keel.settings import KeelSettings
from keel.types import TaskContext, TaskOutcome

log = logging.getLogger(__name__)

STEP_BUCKETS = (2, 4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100)
LOOP_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20)
EFFICIENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class KeelMetrics:
    """The instruments, on a MeterProvider of their own read by Prometheus (a registry of its own, so
    several can live in one process, e.g. in tests). Recording is thread-safe and takes microseconds."""

    _shared: KeelMetrics | None = None
    _shared_lock = threading.Lock()

    def __init__(self, service: str = "keel-worker") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._reader = PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)
        self.provider = MeterProvider(resource=Resource.create({"service.name": service}),
                                      metric_readers=[self._reader])
        meter = self.provider.get_meter("keel")
        self.steps = meter.create_histogram("keel.task.steps", description="Steps per task (model and tool calls)",
                                            explicit_bucket_boundaries_advisory=STEP_BUCKETS)
        self.reasoning_loops = meter.create_histogram(
            "keel.task.reasoning_loops", description="Times a task went back to a tool it had left for another",
            explicit_bucket_boundaries_advisory=LOOP_BUCKETS)
        self.token_efficiency = meter.create_histogram(
            "keel.task.token_efficiency", description="Output tokens of the final answer / all tokens of the task",
            explicit_bucket_boundaries_advisory=EFFICIENCY_BUCKETS)
        self.tool_calls = meter.create_counter("keel.tool.calls", description="Tools executed by tasks")
        self.outcomes = meter.create_counter("keel.task.outcomes", description="Finished tasks by status and category")
        self.tokens = meter.create_counter("keel.task.tokens", description="Tokens of finished tasks")
        self.cost = meter.create_counter("keel.task.cost_usd", description="Dollars of finished tasks")
        self._server: WSGIServer | None = None
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> KeelMetrics:
        """The process's instruments (what a worker records unless it is given others)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def record(self, task: TaskContext, outcome: TaskOutcome) -> None:
        t = {"task_type": task.task_type}
        tokens = outcome.input_tokens + outcome.output_tokens
        self.steps.record(outcome.steps, t)
        self.reasoning_loops.record(outcome.reasoning_loops, t)
        eff = token_efficiency(outcome.answer_tokens, tokens)
        if eff is not None:
            self.token_efficiency.record(eff, t)
        for tool in outcome.tools:
            self.tool_calls.add(1, {**t, "tool": tool})
        self.outcomes.add(1, {**t, "status": outcome.status, "category": outcome.category or "none"})
        self.tokens.add(tokens, t)
        self.cost.add(outcome.cost_usd, t)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port) in a daemon thread; returns the port. Once."""
        with self._lock:
            if self._server is None:
                self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            return int(self._server.server_port)

    def shutdown(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
        self.provider.shutdown()


def serve_metrics(settings: KeelSettings, metrics: KeelMetrics) -> int | None:
    """Start the worker's Keel metrics endpoint (KEEL_METRICS_PORT; 0: off). A port already in use is
    logged, not fatal: a second worker on the same host keeps working without an endpoint."""
    if not settings.metrics_port:
        return None
    try:
        port = metrics.serve(settings.metrics_host, settings.metrics_port)
    except OSError as e:
        log.warning("Keel metrics endpoint not started on %s:%d: %s", settings.metrics_host, settings.metrics_port, e)
        return None
    log.info("Keel metrics (keel_*) on http://%s:%d/metrics", settings.metrics_host, port)
    return port


def sdk_runtime(settings: KeelSettings) -> Runtime | None:
    """A Temporal Runtime exposing the SDK's metrics on KEEL_SDK_METRICS_PORT (0: off, None returned:
    the default runtime). Give it to the worker's client (starter.client.connect)."""
    if not settings.sdk_metrics_port:
        return None
    address = f"{settings.metrics_host}:{settings.sdk_metrics_port}"
    try:
        runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address)))
    except Exception as e:  # the core's error type is not public; a taken port must not stop the worker
        log.warning("Temporal SDK metrics endpoint not started on %s: %s", address, e)
        return None
    log.info("Temporal SDK metrics (temporal_*) on http://%s/metrics", address)
    return runtime
