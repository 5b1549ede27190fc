"""Stable names. They are stored in workflow histories and must never change once deployed."""

from __future__ import annotations

from datetime import timedelta

TASK_QUEUE = "keel"

# Workflows
AGENT_WORKFLOW = "KeelAgent"
"""The generic agent workflow: runs any registered keel.Agent (`keel run AGENT "input"`)."""
ORCHESTRATOR_WORKFLOW = "KeelOrchestrator"
"""The orchestrator pattern over registered agents (`keel orchestrate`)."""
SWARM_AGENTS_WORKFLOW = "KeelSwarm"
"""The swarm pattern over any registered agent with a structured answer (`keel vote`)."""
SUPERVISOR_WORKFLOW = "KeelSupervisor"
"""The supervisor pattern over registered agents: a worker's answer checked by rules and a reviewer agent."""
SHADOW_WORKFLOW = "Shadow"

# Activities
LLM_ACTIVITY = "llm_call"
TASK_USAGE_ACTIVITY = "task_usage"
"""What a child task spent, from its ledger rows (a pattern's child that failed without saying)."""
FINISH_ACTIVITY = "keel.finish"
"""The generic agent workflow's last step: outcome, guardrail and human-queue rows (activities.agent_tools)."""

# Queries / signals / updates
PROGRESS_QUERY = "progress"
PENDING_ACTION_QUERY = "pending_action"
APPROVAL_SIGNAL = "approval"
DECIDE_UPDATE = "decide"

# Search attributes (name, Temporal type). Registered by `keel up` and by the test servers.
SA_CUSTOMER = "KeelCustomer"
SA_TASK_TYPE = "KeelTaskType"
SA_FEATURE = "KeelFeature"
SA_STATUS = "KeelStatus"
SA_TOKENS = "KeelTokens"
SA_COST_USD = "KeelCostUsd"
SA_AWAITING_APPROVAL = "KeelAwaitingApproval"
SA_BUDGET = "KeelBudget"

SEARCH_ATTRIBUTES: dict[str, str] = {
    SA_CUSTOMER: "Keyword",
    SA_TASK_TYPE: "Keyword",
    SA_FEATURE: "Keyword",
    SA_STATUS: "Keyword",
    SA_TOKENS: "Int",
    SA_COST_USD: "Double",
    SA_AWAITING_APPROVAL: "Bool",
    SA_BUDGET: "Keyword",
}

# Timeouts for activities, in one place.
LLM_START_TO_CLOSE = timedelta(hours=1)
"""A backstop: a model call's own limit is the provider's timeout (KEEL_LLM_TIMEOUT_S, the worker's)."""
LLM_HEARTBEAT_TIMEOUT = timedelta(seconds=20)
"""A model call heartbeats every 5 s (activities.llm): a dead worker's call is retried after this."""
TOOL_START_TO_CLOSE = timedelta(seconds=30)

# Error types that Temporal must never retry (declared, not discovered).
NON_RETRYABLE_ERRORS = [
    "ProviderAuthError",
    "ProviderBadRequest",
    "ToolArgumentError",
    "UnknownTool",
    "UnpricedModel",
    "BudgetWouldExceed",
    "PromptNotFound",
]
