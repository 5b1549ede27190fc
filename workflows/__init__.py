"""Deterministic orchestration only. Imports `core` through the sandbox's pass-through."""

from workflows.support_ticket import SupportTicketWorkflow

WORKFLOWS = [SupportTicketWorkflow]

__all__ = ["WORKFLOWS", "SupportTicketWorkflow"]
