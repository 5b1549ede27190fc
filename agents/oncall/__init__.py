"""An IT on-call assistant: reads a service's status over HTTP, restarts it after an SRE lead approves.

Written only against `keel`'s public API; `keel worker --agents agents.oncall` serves it.
"""

from agents.oncall.agent import AGENTS, oncall, restart_service, service_status

__all__ = ["AGENTS", "oncall", "restart_service", "service_status"]
