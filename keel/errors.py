"""One error hierarchy, and every `ApplicationError` type Keel raises, named once.

`KeelError` is the base of what user code may catch. The `*_ERROR` strings are the `type` of the
Temporal `ApplicationError`s that cross the workflow/activity boundary: they are stored in histories,
so they never change once deployed. `NON_RETRYABLE` is what every retry policy declares.
"""

from __future__ import annotations


class KeelError(Exception):
    """Base of Keel's errors."""


class AgentDefinitionError(KeelError, ValueError):
    """An agent or tool declared wrongly (unknown tool, bad model spec, missing prompt file...):
    raised when the definition loads, before any task runs."""


class AgentNotRegistered(KeelError, LookupError):
    """A task names an agent this worker has not registered."""


class ToolError(KeelError):
    """Raised by a tool for a business failure the model should see ("service not found"): the call
    ends `ok=False` with this message, is recorded, and is not retried."""


class ScriptExhausted(KeelError, AssertionError):
    """`keel.testing.ScriptedModel` was asked for a step its script does not have."""


# --- ApplicationError types (stored in histories: never rename) ------------------------------
PROVIDER_AUTH_ERROR = "ProviderAuthError"
PROVIDER_BAD_REQUEST = "ProviderBadRequest"
PROVIDER_RATE_LIMITED = "ProviderRateLimited"
PROVIDER_UNAVAILABLE = "ProviderUnavailable"
TOOL_ARGUMENT_ERROR = "ToolArgumentError"
UNKNOWN_TOOL = "UnknownTool"
UNPRICED_MODEL = "UnpricedModel"
BUDGET_WOULD_EXCEED = "BudgetWouldExceed"
PROMPT_NOT_FOUND = "PromptNotFound"
BREAKER_OPEN = "BreakerOpen"
TENANT_BUDGET_EXCEEDED = "TenantBudgetExceeded"
"""A tenant budget (KEEL_TENANT_BUDGETS) refused a model call: the task goes to the human queue."""
AGENT_NOT_REGISTERED = "AgentNotRegistered"
AGENT_CONFIG_ERROR = "AgentConfigError"
SHADOW_INPUT_ERROR = "ShadowInputError"
"""A task whose configuration cannot run (an override naming an unknown tool, an invalid model...)."""
SCRIPT_EXHAUSTED = "ScriptExhausted"
RECORDING_MISSING = "RecordingMissing"
CHAOS_FAULT = "ChaosFault"
"""Retryable: a fault a chaos run injected into a tool call (keel.chaos)."""
"""A replayed provider request (KEEL_REPLAY) that the recording has no answer for."""

NON_RETRYABLE = [
    PROVIDER_AUTH_ERROR,
    PROVIDER_BAD_REQUEST,
    TOOL_ARGUMENT_ERROR,
    UNKNOWN_TOOL,
    UNPRICED_MODEL,
    BUDGET_WOULD_EXCEED,
    PROMPT_NOT_FOUND,
    AGENT_NOT_REGISTERED,
    AGENT_CONFIG_ERROR,
    SCRIPT_EXHAUSTED,
    RECORDING_MISSING,
]
"""Error types Temporal must never retry (declared, not discovered)."""
