"""Pydantic models that cross the workflow/activity/client boundaries.

They are durable contracts: they are stored in Temporal histories, so fields are only ever added,
always with a default.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel.breaker import AdmitDecision, AdmitRequest
from keel.chaos import Chaos

Role = Literal["system", "user", "assistant", "tool"]
Permission = Literal["read_only", "confirm", "autonomous"]
StepKind = Literal["classify", "route", "extract", "plan", "reason", "draft", "synthesize", "review"]
Tier = Literal["small", "large"]
ProviderName = Literal["sim", "openai", "anthropic", "scripted"]
"""scripted: keel.testing.ScriptedModel, a test double that answers from a script."""

SIM_LABEL = "sim (offline simulator)"


class ToolCall(BaseModel):
    """A tool call as the model produced it. Arguments stay a JSON string: the model may emit
    invalid JSON, and the workflow (not the provider) decides what to do with it."""

    id: str
    name: str
    arguments_json: str = "{}"


class Message(BaseModel):
    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    """For role="tool": the id of the call this message answers."""
    name: str | None = None
    """For role="tool": the tool's name."""


class ToolSpec(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments object."""
    permission: Permission = "read_only"


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    """Part of input_tokens that was served from the provider's prompt cache."""
    reasoning_tokens: int = 0
    """Part of output_tokens spent on hidden reasoning."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Price(BaseModel):
    """Prices per million tokens of one model (keel.pricing: the built-in table and KEEL_PRICES)."""

    input: float
    """USD per million input tokens (not served from cache)."""
    output: float
    """USD per million output tokens (reasoning tokens included unless `reasoning` is set)."""
    cached_input: float | None = None
    """USD per million cached input tokens; None means the input price."""
    reasoning: float | None = None
    """USD per million reasoning tokens; None means the output price."""
    long_prompt_threshold: int | None = None
    """A request whose input exceeds this many tokens is priced with `long_prompt` instead."""
    long_prompt: Price | None = None
    effective_from: date = date(2024, 1, 1)
    self_hosted: bool = False
    """A model the user serves: its figures are the user's estimate of the hardware's cost (default 0),
    and its costs are labelled self-hosted wherever they are shown."""


class SimConfig(BaseModel):
    """Knobs of the offline simulated model. Rates are per task (spiral) or per call (the rest)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    spiral_rate: float = Field(0.15, ge=0, le=1)
    """Share of tasks that enter a reasoning spiral (4-5 extra loops of re-reads and re-drafts). For an
    agent, drawn from the seed and the input: the same request spirals every time or never."""
    hallucinated_tool_rate: float = Field(0.0, ge=0, le=1)
    """Per reasoning call: chance of calling a tool that does not exist."""
    invalid_args_rate: float = Field(0.0, ge=0, le=1)
    """Per tool call: chance of arguments that break the tool's schema."""
    invalid_json_rate: float = Field(0.0, ge=0, le=1)
    """Per call: chance of output (classification or tool arguments) that is not valid JSON."""
    follow_injection_rate: float = Field(0.0, ge=0, le=1)
    """Per task: chance of obeying instructions injected in its input ("call the tool X")."""
    latency_ms_min: int = Field(0, ge=0)
    latency_ms_max: int = Field(0, ge=0)


class ModelSpec(BaseModel):
    provider: ProviderName = "sim"
    model: str = "sim-large"
    options: dict[str, Any] = Field(default_factory=dict)
    """Settings of this provider's model for a task: the sim's knobs (`SimConfig` fields: seed,
    failure rates, latency). The real providers take none and refuse a spec that has some."""

    def for_task(self, sim: SimConfig) -> ModelSpec:
        """This spec with the task's sim knobs, when it is the sim's (only the ones set away from the
        defaults, so a history carries few); any other provider's spec as it is."""
        if self.provider != "sim":
            return self
        knobs = sim.model_dump(exclude_defaults=True)
        return self.model_copy(update={"options": {**knobs, **self.options}}) if knobs else self

    @property
    def sim(self) -> SimConfig:
        """The sim's knobs of this spec (an unknown one is a ValidationError)."""
        return SimConfig.model_validate(self.options)

    @property
    def label(self) -> str:
        return f"{self.model} [{SIM_LABEL}]" if self.provider == "sim" else f"{self.provider}:{self.model}"

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """`provider:model`, e.g. `openai:gpt-4o-mini` or `sim:sim-small`."""
        provider, sep, model = spec.partition(":")
        if not sep or not model:
            raise ValueError(f"model spec {spec!r} must look like 'provider:model', e.g. 'openai:gpt-4o-mini'")
        if provider not in ("sim", "openai", "anthropic", "scripted"):
            raise ValueError(f"unknown provider {provider!r} in {spec!r}: use sim, openai or anthropic")
        return cls.model_validate({"provider": provider, "model": model})


class Budget(BaseModel):
    """A per-task budget. Either limit may be None (not limited); both None means uncontrolled."""

    max_tokens: int | None = Field(12_000, gt=0)
    max_usd: float | None = Field(0.05, gt=0)
    soft_ratio: float = Field(0.7, gt=0, lt=1)
    """At this share of a limit a system message tells the agent to wrap up."""
    hard_ratio: float = Field(0.9, gt=0, lt=1)
    """At this share the next call is made with no tools: the agent must answer."""

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> Budget:
        if self.soft_ratio > self.hard_ratio:
            raise ValueError(f"soft_ratio {self.soft_ratio} must not exceed hard_ratio {self.hard_ratio}")
        return self

    @property
    def limited(self) -> bool:
        return self.max_tokens is not None or self.max_usd is not None


BudgetState = Literal["ok", "soft", "hard", "killed"]
LimitKind = Literal["tokens", "usd", "steps", "breaker", "tenant"]


class BudgetReport(BaseModel):
    """Where a task stands against its budget; in the progress query, the result and search attributes."""

    max_tokens: int | None = None
    max_usd: float | None = None
    used_tokens: int = 0
    used_usd: float = 0.0
    reserved_tokens: int = 0
    """Held for child tasks running now (their caps), not yet spent."""
    reserved_usd: float = 0.0
    state: BudgetState = "ok"
    soft_at_step: int | None = None
    hard_at_step: int | None = None
    limit_hit: LimitKind | None = None
    detail: str = ""


class Decision(BaseModel):
    """A decision the workflow took, with its reason: the trace's decision points."""

    step: int
    kind: str
    """route | escalate | block | repeat | wrap_up | answer_now | kill | fallback | breaker | tenant_budget"""
    reason: str
    at: datetime | None = None
    """When (workflow time); absent in histories recorded before it was kept."""


class TaskContext(BaseModel):
    """Tags carried by every call of a task: chargeback, tracing and idempotency keys."""

    workflow_id: str
    tenant: str
    """Who the task is done for (chargeback): the ledger's `tenant` column."""
    key: str = ""
    """The business key of the task; the sim model seeds on it so a task replays the same path."""
    feature: str = "default"
    task_type: str = "default"
    prompt_version: str = "v1"
    input_hash: str = ""
    """sha256 of the tenant and the input, 16 hex (keel.metrics.input_hash): groups repeated
    submissions of the same input (outcome consistency). Empty in histories recorded before it existed."""
    parent_workflow_id: str = ""
    """The parent pattern's workflow (orchestrator, supervisor, swarm, shadow) of a child task, else
    empty: the ledger's `parent_workflow_id`, so a parent's spend is the sum of its children's rows."""
    chaos: Chaos | None = None
    """Faults the worker's activities inject into this task's calls (keel.chaos; chaos runs only)."""


class LlmRequest(BaseModel):
    task: TaskContext
    step: int
    """Step number within the task; with workflow_id the idempotency key of the ledger row."""
    kind: StepKind
    tier: Tier = "large"
    prompt: str
    """Prompt name under prompts/ (e.g. "support/classify"); the activity prepends it as the system message."""
    messages: list[Message]
    tools: list[ToolSpec] = Field(default_factory=list)
    tool_names: list[str] = Field(default_factory=list)
    """The agent's tools, by name: the activity expands them to specs, so the
    2-3 KB of schemas is not carried in every request of the history."""
    max_output_tokens: int = 1024
    max_input_tokens: int | None = None
    """Budget guard: the activity refuses the call (BudgetWouldExceed, non-retryable) if the prompt,
    system prompt included, is estimated above this many tokens."""
    json_output: bool = False
    """Ask for a JSON object as the whole answer."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    temperature: float = 0.0
    admit: AdmitRequest | None = None
    """On a task's first model call: ask the task type's cost circuit breaker first (see
    activities.llm). Refused: the call fails with BreakerOpen before any model is called."""
    agent: str = ""
    """The registered agent's name (keel.Agent): `prompt` and `tool_names` are that agent's, and the sim
    plays that agent. A call without one is refused."""
    require_tool: bool = False
    """The step must call a tool: providers send `tool_choice` "required" (OpenAI) / "any" (Anthropic)
    instead of "auto" whenever tools are offered."""
    output_schema: dict[str, Any] | None = None
    """The JSON schema the answer must follow (an agent's `output_type`), when the step asks for one."""
    price: Price | None = None
    """The model's price pinned in the task's input (KEEL_PRICES at its start), when it has one: the
    activity prices the call with it."""


class ProviderResult(BaseModel):
    """What a provider returns for one request (the LLM activity prices and records it)."""

    text: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str = "stop"
    model: str
    """The model that answered, as the provider reports it."""


class LlmResponse(BaseModel):
    text: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    finish_reason: str = "stop"
    provider: str = "sim"
    model: str = "sim-large"
    prompt_version: str = "v1"
    prompt_hash: str = ""
    admission: AdmitDecision | None = None
    """The breaker's answer when the request carried `admit`."""
    repaired: str = ""
    """How the model's output was repaired, when it was (e.g. "2 tool calls written as text (hermes)"):
    `text` then keeps the raw output, and `tool_calls` hold what was read from it."""


class ToolRequest(BaseModel):
    task: TaskContext
    step: int
    call_id: str
    arguments: dict[str, Any]
    """Already validated against the tool's schema by the workflow."""
    outcome: TaskOutcome | None = None
    """Set on the final routing call (send_reply / escalate_to_human): the task's outcome row is
    written in the same activity, so recording it costs no extra round trip."""
    guardrails: list[GuardrailEvent] = Field(default_factory=list)
    """On the routing call: the task's guardrail events, written to the ledger with its outcome."""
    decisions: list[Decision] = Field(default_factory=list)
    """On the routing call: the task's decisions, recorded as events of its span (tracing)."""
    report_to: str | None = None
    """Set on the routing call of a task its cost circuit breaker admitted (not as a probe): the
    breaker's workflow id. The worker reports the task's usage to it, batched with other tasks'."""
    dry_run: bool = False
    """A write of a shadow (candidate) run: the activity validates and records it, never executes it."""

    @property
    def idempotency_key(self) -> str:
        return f"{self.task.workflow_id}/{self.step}"


class GuardrailEvent(BaseModel):
    """A guardrail decision, written to the ledger with the task's outcome (kind "guardrail")."""

    step: int
    kind: str
    """blocked | approval | redaction | output_check"""
    tool: str | None = None
    detail: str
    ok: bool = False
    """True for an event that let something through (an accepted approval)."""


class ToolResult(BaseModel):
    ok: bool
    content: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    """A business-level failure the agent should see (e.g. "no such record")."""
    latency_ms: float = 0.0


TaskStatus = Literal[
    "running", "resolved", "escalated", "rejected", "failed", "budget_exceeded", "awaiting_approval",
    "awaiting_human", "resolved_by_human",
]
Route = Literal["reply", "human", "report"]


class TaskOutcome(BaseModel):
    status: TaskStatus
    route: Route
    reason: str = ""
    category: str | None = None
    urgency: str | None = None
    confidence: float | None = None
    steps: int = 0
    llm_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    tools: list[str] = Field(default_factory=list)
    """Tools executed, in order; the routing call (send_reply / escalate_to_human) last."""
    reasoning_loops: int = 0
    repeated_calls: int = 0
    answer_tokens: int = 0
    """Output tokens of the draft call (the final answer); 0 when no reply was drafted."""
    input_hash: str = ""
    """The task's TaskContext.input_hash."""
    limit_hit: str | None = None
    """BudgetReport.limit_hit at the end (tokens, usd, steps, breaker, tenant)."""


ApprovalMode = Literal["wait", "escalate"]
ApprovalVerdict = Literal["approve", "reject", "edit"]


class ApprovalPolicy(BaseModel):
    """Who may approve which `confirm` tool, and how long a task waits. Pinned into the task's input
    at submit, so a later policy change never alters a running task (or its replay)."""

    approvers: dict[str, list[str]] = Field(default_factory=dict)
    """Tool name -> the people whose decision counts. A tool with no list cannot be approved."""
    timeout_s: float = Field(86_400, gt=0)
    """A proposal nobody decides within this time escalates the task to the human queue."""
    mode: ApprovalMode = "wait"
    """wait: the task pauses for a decision. escalate: the proposal is recorded and the task goes to
    the human queue at once (no one is waiting at a console: benchmarks, bulk runs)."""


class PendingAction(BaseModel):
    """A write the agent proposed that needs a human's approval (permission `confirm`)."""

    action_id: str
    tool: str
    arguments: dict[str, Any]
    arguments_digest: str
    """sha256 of the canonical JSON of `arguments`: a decision can bind to exactly what was shown."""
    reason: str = ""
    """The agent's reason for the action."""
    step: int
    approvers: list[str] = Field(default_factory=list)
    requested_at: datetime | None = None
    expires_at: datetime | None = None


class ApprovalDecision(BaseModel):
    """Signal `approval` / update `decide`: one approver's decision on one pending action."""

    action_id: str
    approver: str
    decision: ApprovalVerdict
    comment: str = ""
    arguments: dict[str, Any] | None = None
    """With decision "edit": the arguments to execute instead (validated again before they run)."""
    arguments_digest: str | None = None
    """If given, must match the pending action's digest (the approver saw exactly these arguments)."""


class ApprovalRecord(BaseModel):
    """Every decision that reached the task, counted or not, with why."""

    action_id: str
    approver: str
    decision: str
    accepted: bool
    note: str = ""
    comment: str = ""
    at: datetime | None = None


class BlockedAction(BaseModel):
    step: int
    tool: str
    arguments_json: str
    reason: str


class Progress(BaseModel):
    status: TaskStatus = "running"
    step: int = 0
    action: str = "starting"
    tokens: int = 0
    cost_usd: float = 0.0
    llm_calls: int = 0
    category: str | None = None
    tools_executed: list[str] = Field(default_factory=list)
    budget: BudgetReport | None = None
    pending_action: PendingAction | None = None
    """The write waiting for a human's approval (status awaiting_approval)."""
    acknowledgement: str | None = None
    """Set after the first step (the small tier's classification): what the requester can be told now."""
    triage: dict[str, Any] | None = None
    """An agent task's triage (its `keel.Triage.output_type`), once it succeeded."""


ToolRequest.model_rebuild()


# --- multi-agent patterns ----------------------------------------------------------------------


class TaskUsage(BaseModel):
    """Model usage of a task (or of a part of one)."""

    llm_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def plus(self, other: TaskUsage) -> TaskUsage:
        return TaskUsage(llm_calls=self.llm_calls + other.llm_calls,
                         input_tokens=self.input_tokens + other.input_tokens,
                         output_tokens=self.output_tokens + other.output_tokens,
                         cost_usd=round(self.cost_usd + other.cost_usd, 8))

    def minus(self, other: TaskUsage) -> TaskUsage:
        """What was used beyond `other` (an earlier reading, or a part of this usage)."""
        return TaskUsage(llm_calls=self.llm_calls - other.llm_calls,
                         input_tokens=self.input_tokens - other.input_tokens,
                         output_tokens=self.output_tokens - other.output_tokens,
                         cost_usd=round(self.cost_usd - other.cost_usd, 8))


ChildStatus = Literal[
    "pending", "running", "completed", "escalated", "budget_exceeded", "rejected", "failed", "not_started",
]


class ChildRecord(BaseModel):
    """A parent's record of one of its children, over all its attempts."""

    name: str
    role: str = "worker"
    workflow_id: str = ""
    """The latest attempt's workflow id (attempt n > 1 is `<parent>/<name>~n`)."""
    model: str = ""
    status: ChildStatus = "pending"
    attempts: int = 0
    failures: list[str] = Field(default_factory=list)
    """Why each failed attempt failed."""
    usage: TaskUsage = Field(default_factory=TaskUsage)
    """All attempts' usage, failed ones included (their tokens were spent)."""
    budget_tokens: int | None = None
    budget_usd: float | None = None
    reason: str = ""


class PatternProgress(BaseModel):
    """The `progress` query of a pattern's parent workflow: its phase and every child's state."""

    status: str = "running"
    phase: str = "starting"
    children: list[ChildRecord] = Field(default_factory=list)
    tokens: int = 0
    """Parent's own calls plus every child's (all attempts)."""
    cost_usd: float = 0.0
    budget: BudgetReport | None = None


# --- the generic agent workflow (any registered keel.Agent) --------------------------------------


class AgentInput(BaseModel):
    """Input of the generic agent workflow (`keel run AGENT "input"`). Everything but `agent` and
    `input` overrides the agent's own definition for this one task."""

    agent: str
    """The registered agent's name."""
    input: str
    """The request, sent as the first user message."""
    context: list[str] = Field(default_factory=list)
    """More user messages after the input (`Context: ...`), e.g. a parent's findings."""
    key: str = ""
    """The task's business key (the sim seeds on it; tools see it in ToolContext)."""
    tenant: str = "default"
    """Chargeback tag: who the task is done for (the ledger's tenant column)."""
    feature: str = ""
    """Chargeback tag; default the agent's `feature` (its name)."""
    prompt_version: str | None = None
    """Another version of the agent's prompt file; default the agent's."""
    models: dict[Tier, ModelSpec] | None = None
    budget: Budget | None = None
    """`Budget(max_tokens=None, max_usd=None)` runs without a budget."""
    max_steps: int | None = Field(None, ge=1, le=100)
    approval_mode: ApprovalMode = "wait"
    """wait: a `confirm` call pauses the task for a listed approver; escalate: it is recorded and the
    task goes to the human queue at once."""
    approval_timeout_s: float | None = Field(None, gt=0)
    breaker: bool = True
    """Ask the agent's cost circuit breaker before the first model call."""
    dry_run: bool = False
    """Every write is recorded, never executed (shadow runs)."""
    temperature: float = Field(0.0, ge=0, le=2)
    sim: SimConfig = Field(default_factory=SimConfig)
    prices: dict[str, Price] = Field(default_factory=dict)
    """The user's prices (KEEL_PRICES), by "provider:model", pinned by the task's starter: the task prices
    its models with them first (keel.pricing), so a replay sees the prices the task ran with."""
    chaos: Chaos | None = None
    """Fault injection into this task's tool and model calls (`keel chaos run`); None: none."""
    llm_heartbeat_timeout_s: float | None = Field(None, gt=0)
    """How long the server waits for a heartbeat of this task's model and tool calls before retrying them on another
    worker (KEEL_LLM_HEARTBEAT_TIMEOUT_S, pinned by the starter); None: names.LLM_HEARTBEAT_TIMEOUT."""


AgentStatus = Literal["completed", "escalated", "budget_exceeded", "rejected"]


class AgentResult(BaseModel):
    workflow_id: str
    agent: str
    status: AgentStatus
    output: str = ""
    """The final answer, redacted, as it left (empty when held back)."""
    structured: dict[str, Any] | None = None
    """The final answer as the agent's `output_type`, when it declares one."""
    triage: dict[str, Any] | None = None
    """The agent's triage (its `keel.Triage.output_type`), when it declares one and it succeeded."""
    reason: str = ""
    """Why the task ended as it did (for escalated: what a human must look at)."""
    partial_output: str | None = None
    """When a limit stopped the task or a check held the answer back: the best output it had."""
    prompt_version: str = ""
    tools_executed: list[str] = Field(default_factory=list)
    tools_blocked: list[BlockedAction] = Field(default_factory=list)
    dry_run_actions: list[BlockedAction] = Field(default_factory=list)
    observations: list[str] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    guardrails: list[GuardrailEvent] = Field(default_factory=list)
    redactions: dict[str, int] = Field(default_factory=dict)
    steps: int = 0
    llm_calls: int = 0
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    models: list[str] = Field(default_factory=list)
    budget: BudgetReport = Field(default_factory=BudgetReport)
    invalid_outputs: int = 0
    validation_failures: int = 0


class FinishRequest(BaseModel):
    """The generic workflow's last activity: the task's outcome and guardrail rows and, when it goes to
    a human, its human-queue item, written once (idempotent on the workflow id)."""

    task: TaskContext
    step: int
    outcome: TaskOutcome
    guardrails: list[GuardrailEvent] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)
    human_reason: str | None = None
    """Set when the task goes to the human queue."""
    report_to: str | None = None
    """The cost circuit breaker to report this task's usage to (an admitted, non-probe task)."""
