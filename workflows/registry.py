"""The workflows a Keel worker registers."""

from workflows.agent import AgentWorkflow
from workflows.breaker import CostCircuitBreakerWorkflow
from workflows.orchestrator import OrchestratorWorkflow, SwarmAgentsWorkflow
from workflows.ratelimit import ProviderRateLimiterWorkflow
from workflows.shadow import ShadowWorkflow
from workflows.supervision import SupervisorWorkflow

WORKFLOWS = [
    AgentWorkflow,
    OrchestratorWorkflow,
    SupervisorWorkflow,
    SwarmAgentsWorkflow,
    CostCircuitBreakerWorkflow,
    ShadowWorkflow,
    ProviderRateLimiterWorkflow,
]

__all__ = [
    "WORKFLOWS",
    "AgentWorkflow",
    "CostCircuitBreakerWorkflow",
    "OrchestratorWorkflow",
    "ProviderRateLimiterWorkflow",
    "ShadowWorkflow",
    "SupervisorWorkflow",
    "SwarmAgentsWorkflow",
]
