"""Settings, read once from the environment (prefix KEEL_, plus Temporal's own variables)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from keel.pricing import UnpricedModelError, parse_prices, price_for
from keel.ratelimits import RateLimit, parse_rate_limits
from keel.tenant_budgets import parse_tenant_budgets
from keel.types import ModelSpec


class KeelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KEEL_", extra="ignore")

    home: Path = Path(".keel")
    """Where the local stack keeps its files: Temporal's SQLite file, the ledger, logs, pids."""
    temporal_address: str = Field(
        "127.0.0.1:7233", validation_alias=AliasChoices("TEMPORAL_ADDRESS", "KEEL_TEMPORAL_ADDRESS")
    )
    temporal_namespace: str = Field(
        "default", validation_alias=AliasChoices("TEMPORAL_NAMESPACE", "KEEL_TEMPORAL_NAMESPACE")
    )
    temporal_api_key: str | None = Field(
        None, validation_alias=AliasChoices("TEMPORAL_API_KEY", "KEEL_TEMPORAL_API_KEY")
    )
    temporal_tls: bool = Field(False, validation_alias=AliasChoices("TEMPORAL_TLS", "KEEL_TEMPORAL_TLS"))
    temporal_wait_s: float = Field(120.0, ge=0)
    """KEEL_TEMPORAL_WAIT_S: how long a command rides out an unreachable Temporal (a server restarting),
    retrying with backoff and saying so, before it gives up."""
    temporal_rpc_timeout_s: float = Field(30.0, gt=0)
    """KEEL_TEMPORAL_RPC_TIMEOUT_S: the deadline of one call a command makes to Temporal."""
    ui_port: int = 8233
    """Port of the Temporal web UI started by `keel up`."""
    task_queue: str = "keel"
    agents: str = ""
    """Comma-separated modules whose agents a worker serves (`keel worker --agents my_pkg.agents`):
    a module's `AGENTS` list, or every keel.Agent at its top level."""
    database_url: str | None = None
    """SQLAlchemy URL of the ledger and tool database; default sqlite under `home`."""
    prices: str | None = None
    """Prices of models outside Keel's table (keel/pricing.py): the path of a .json or .toml file, or inline
    JSON, mapping "provider:model" to {"input": USD per 1M tokens, "output": ..., "cached_input": ...} or
    to {"self_hosted": true} (optionally with input/output: an estimate of the hardware's cost)."""
    rate_limits: str | None = None
    """Provider rate limits shared by the workers of a task queue (keel/ratelimits.py), inline JSON mapping
    "provider:model" to {"rpm": requests per minute, "tpm": tokens per minute} (either or both)."""
    model_small: str = "sim:sim-small"
    """provider:model for the small tier (classify, route, extract) of every task a command starts, every
    pattern's children included, when set (a command's --model wins); unset: each agent's own."""
    model_large: str = "sim:sim-large"
    """provider:model for the large tier (plan, reason, draft, synthesize), as `model_small`."""
    sim_seed: int = 0
    sim_spiral_rate: float = 0.15
    llm_timeout_s: float = 60.0
    llm_heartbeat_timeout_s: float = Field(20.0, gt=0)
    """How long the Temporal server waits for a heartbeat of a model or tool call (sent every 5 s, or a third
    of this when shorter) before it gives the call up and retries it on another worker: a dead worker's calls
    are retried after this. Pinned in each task's input by the process that starts it (like KEEL_PRICES)."""
    max_concurrent_activities: int = 200
    max_concurrent_workflow_tasks: int = 100
    workflow_sandbox: Literal["shared", "strict"] = "shared"
    """shared: Keel's workflow modules are imported once per worker and shared with every workflow run
    (about 10% less worker CPU); strict: Temporal's default isolation, the modules imported afresh in the
    sandbox for every run, so its restrictions check them too (the test suite runs this way; use it while
    writing a new workflow). See workers/worker.py."""
    worker_gc_threshold: int = Field(10_000, ge=0)
    """The worker (`python -m workers`) freezes what it loaded at start-up out of the garbage collector's
    reach (gc.freeze) and collects young objects after this many allocations instead of Python's 700, so
    a task's short-lived objects die before they are promoted; 0: Python's defaults. Measured: the
    collector's time in the worker fell from 0.2 to 0.02 ms per agent step (bench/throughput.py)."""
    encrypt: bool = False
    """Encrypt every payload in Temporal's history (AES-256-GCM, keel/codec.py); off for the local demo."""
    encryption_keys: str | None = None
    """`id1:<base64 32-byte key>,id2:<...>`; make one with `keel codec-server --new-key`."""
    encryption_key_id: str | None = None
    """The key id new payloads are encrypted with; default the first of `encryption_keys`."""
    codec_auth_token: str | None = None
    """When set, `keel codec-server` answers only requests with `Authorization: Bearer <token>`."""
    tracing: Literal["auto", "on", "off"] = "auto"
    """OpenTelemetry spans. auto: on when an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT, or
    the local stack's Phoenix); on: also without one, to the local span store `home`/spans.jsonl
    (measured: tracing adds about a tenth to the worker's CPU per step, see the README); off."""
    phoenix_port: int = 6006
    local_model_port: int = Field(8091, ge=1, le=65535)
    """Port of the local model's server when `keel up --model local` starts it (llama.cpp's llama-server)."""
    """Port of Arize Phoenix when `keel up --traces phoenix` starts it."""
    trace_content: bool = False
    """Record prompt and completion text on spans (they may hold personal data)."""
    breaker_admit_cache_s: float = 2.0
    """A worker reuses its cost circuit breaker's "closed" answer this long (0: ask for every task).
    A tripped breaker stops new tasks on every worker within this time."""
    breaker_report_flush_s: float = 0.5
    tenant_budgets: str | None = None
    """Spend limits per tenant (and per feature) over a day or a month (keel/tenant_budgets.py): the path of
    a .json or .toml file, or inline JSON, e.g. {"C-1001": {"period": "day", "max_usd": 1.0}, "*": {...}}."""
    tenant_budget_hold_s: float = Field(600.0, gt=0)
    """A model call's hold on its tenant budget stops counting after this long if never settled (its task
    died mid-call); keep it above KEEL_LLM_TIMEOUT_S."""
    tenant_budget_input_margin: float = Field(1.25, ge=1)
    """A call's hold reserves this multiple of its estimated input tokens (4 characters a token)."""
    """A worker sends the usage of its finished tasks to their breaker, batched, this often."""
    metrics_port: int = Field(9464, ge=0, le=65535)
    """The worker's Prometheus endpoint for Keel's task metrics (keel_*); 0: off."""
    sdk_metrics_port: int = Field(9465, ge=0, le=65535)
    """The worker's Prometheus endpoint for the Temporal SDK's own metrics (temporal_*); 0: off."""
    metrics_host: str = "127.0.0.1"
    """Address both metrics endpoints bind to; 0.0.0.0 for a Prometheus on another host."""
    alerts: bool = True
    """Evaluate behavioral alerts (keel.alerts) in the worker after every task."""
    alert_webhook_url: str | None = None
    """Where the worker POSTs each new alert as JSON (besides the log)."""
    record: Path | None = None
    """KEEL_RECORD=FILE: the worker records every openai/anthropic HTTP exchange to this JSON Lines file
    (activities/providers/recording.py); an existing file gets only the exchanges it lacks."""
    replay: Path | None = None
    """KEEL_REPLAY=FILE: the worker answers openai/anthropic calls from this recording, offline (no API key
    needed); a request the recording lacks fails the call, naming it."""

    @field_validator("home")
    @classmethod
    def _home_is_a_directory(cls, v: Path) -> Path:
        if v.exists() and not v.is_dir():
            raise ValueError(f"KEEL_HOME={v} is a file, not a directory: point it at a directory (default .keel)")
        return v

    @field_validator("temporal_address")
    @classmethod
    def _host_and_port(cls, v: str) -> str:
        host, _, port = v.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"TEMPORAL_ADDRESS={v!r}: give HOST:PORT, e.g. 127.0.0.1:7233")
        return v.strip()

    @field_validator("model_small", "model_large")
    @classmethod
    def _valid_model(cls, v: str, info: ValidationInfo) -> str:
        m = ModelSpec.parse(v)
        try:  # set by the user (a default is not validated): it must be priced, here or in KEEL_PRICES
            price_for(m.provider, m.model, pinned=parse_prices(info.data.get("prices")))
        except UnpricedModelError as e:
            raise ValueError(f"KEEL_{str(info.field_name).upper()}={v}: {e}") from None
        return v

    @field_validator("prices")
    @classmethod
    def _valid_prices(cls, v: str | None) -> str | None:
        parse_prices(v)
        return v

    @field_validator("rate_limits")
    @classmethod
    def _valid_rate_limits(cls, v: str | None) -> str | None:
        parse_rate_limits(v)
        return v

    @property
    def rate_limit_table(self) -> dict[str, RateLimit]:
        return parse_rate_limits(self.rate_limits)

    @field_validator("tenant_budgets")
    @classmethod
    def _valid_tenant_budgets(cls, v: str | None) -> str | None:
        parse_tenant_budgets(v)
        return v

    @field_validator("tenant_budget_hold_s")
    @classmethod
    def _hold_outlives_the_call(cls, v: float, info: ValidationInfo) -> float:
        timeout = info.data.get("llm_timeout_s")
        if timeout is not None and v <= timeout:
            raise ValueError(f"KEEL_TENANT_BUDGET_HOLD_S={v:g} must exceed KEEL_LLM_TIMEOUT_S={timeout:g}: a call's "
                             "hold on its tenant budget must outlive the call")
        return v

    @field_validator("tracing", mode="before")
    @classmethod
    def _tracing_words(cls, v: object) -> object:
        words = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}
        return words.get(str(v).strip().lower(), str(v).strip().lower()) if isinstance(v, str | bool) else v

    @field_validator("replay")
    @classmethod
    def _record_or_replay(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and info.data.get("record") is not None:
            raise ValueError(f"KEEL_RECORD ({info.data['record']}) and KEEL_REPLAY ({v}) are both set: a worker "
                             "records a run or replays one, not both")
        if v is not None and not v.is_file():
            raise ValueError(f"KEEL_REPLAY={v}: no such recording (make one with KEEL_RECORD)")
        return v

    @property
    def tracing_enabled(self) -> bool:
        if self.tracing == "auto":
            return otlp_endpoint() is not None
        return self.tracing == "on"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'keel.db').resolve()}"

    @property
    def temporal_host(self) -> str:
        return self.temporal_address.rsplit(":", 1)[0]

    @property
    def temporal_port(self) -> int:
        return int(self.temporal_address.rsplit(":", 1)[1])

    @property
    def ui_url(self) -> str:
        return f"http://{self.temporal_host}:{self.ui_port}"



def otlp_endpoint() -> str | None:
    """The OTLP endpoint for spans, as the OpenTelemetry exporter reads it from the environment."""
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
