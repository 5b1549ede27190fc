"""The workflows a Keel worker registers."""

from workflows.breaker import CostCircuitBreakerWorkflow
from workflows.support_ticket import SupportTicketWorkflow

WORKFLOWS = [SupportTicketWorkflow, CostCircuitBreakerWorkflow]

__all__ = ["WORKFLOWS", "CostCircuitBreakerWorkflow", "SupportTicketWorkflow"]
