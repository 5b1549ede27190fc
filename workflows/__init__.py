"""Deterministic orchestration only. Imports `core` through the sandbox's pass-through."""

from workflows.breaker import CostCircuitBreakerWorkflow
from workflows.support_ticket import SupportTicketWorkflow

WORKFLOWS = [SupportTicketWorkflow, CostCircuitBreakerWorkflow]

__all__ = ["WORKFLOWS", "CostCircuitBreakerWorkflow", "SupportTicketWorkflow"]
