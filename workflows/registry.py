"""The workflows a Keel worker registers."""

from workflows.agent import AgentWorkflow
from workflows.breaker import CostCircuitBreakerWorkflow
from workflows.orchestrator import OrchestratorWorkflow, SwarmAgentsWorkflow
from workflows.shadow import ShadowWorkflow
from workflows.supervision import SupervisorWorkflow
from workflows.support_ticket import SupportTicketWorkflow

WORKFLOWS = [
    AgentWorkflow,
    OrchestratorWorkflow,
    SupervisorWorkflow,
    SwarmAgentsWorkflow,
    SupportTicketWorkflow,
    CostCircuitBreakerWorkflow,
    ShadowWorkflow,
]

__all__ = [
    "WORKFLOWS",
    "AgentWorkflow",
    "CostCircuitBreakerWorkflow",
    "OrchestratorWorkflow",
    "ShadowWorkflow",
    "SupervisorWorkflow",
    "SupportTicketWorkflow",
    "SwarmAgentsWorkflow",
]
