"""One way to connect to Temporal, for the CLI and the worker."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import Runtime

from activities.tracing import process_tracer
from keel.codec import data_converter
from keel.settings import KeelSettings


async def connect(settings: KeelSettings, *, tracing: bool | None = None, runtime: Runtime | None = None) -> Client:
    """`tracing` (default: KEEL_TRACING) adds Temporal's OpenTelemetry interceptor: the starter's span
    is the root of the task's trace, and workers made from this client trace workflows and activities.
    `runtime`: a Temporal Runtime of its own (the worker's, with the SDK's Prometheus metrics); default: the SDK's."""
    tracer = process_tracer(settings) if (settings.tracing_enabled if tracing is None else tracing) else None
    return await Client.connect(
        settings.temporal_address,
        interceptors=[TracingInterceptor(tracer)] if tracer is not None else [],
        namespace=settings.temporal_namespace,
        api_key=settings.temporal_api_key,
        tls=settings.temporal_tls or bool(settings.temporal_api_key),
        data_converter=data_converter(settings),
        runtime=runtime,
    )
