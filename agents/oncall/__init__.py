"""An IT on-call assistant: reads a service's status over HTTP, restarts it after an SRE lead approves.

Written only against `keel`'s public API; `keel worker --agents agents.oncall` serves it and its
second agent, incident_note (a structured incident note, no tools), which `keel orchestrate` runs
after on-call checks.
"""

from agents.oncall.agent import AGENTS, IncidentNote, incident_note, oncall, restart_service, service_status

__all__ = ["AGENTS", "IncidentNote", "incident_note", "oncall", "restart_service", "service_status"]
