"""Disaster-recovery planning under supervision: a planner agent (reads the services' status and the
runbook, answers a plan), a reviewer agent, and the runbooks' rules as named checks of the planner,
run by the generic supervisor (`keel plan "SCENARIO"`, agents.dr_plan.cli).

Written only against `keel`'s public API; `keel worker --agents agents.dr_plan` serves both agents.
"""

from agents.dr_plan.agent import AGENTS, Plan, dr_planner, dr_reviewer, supervision

__all__ = ["AGENTS", "Plan", "dr_planner", "dr_reviewer", "supervision"]
