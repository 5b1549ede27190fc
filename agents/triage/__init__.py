"""A customer-support triage classifier, written only against `keel`'s public API: one agent with a
structured answer (`Triage`: category, urgency, confidence). `keel swarm "message"` runs K peers of it
on the generic swarm pattern and puts their categories to a vote; no quorum goes to a human.
`keel worker --agents agents.triage` serves it."""

from agents.triage.agent import AGENTS, Triage, triage

__all__ = ["AGENTS", "Triage", "triage"]
