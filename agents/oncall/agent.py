"""The on-call agent: the README's "Define your own agent" example is this file."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Literal

from pydantic import BaseModel, Field

import keel
from agents.oncall.sim import oncall_sim


class ServiceArgs(keel.Args):
    service: str = Field(pattern=r"^[a-z][a-z0-9-]{1,40}$", description="Service name, e.g. api")


class RestartArgs(ServiceArgs):
    reason: str = Field(min_length=3, max_length=300, description="Why the restart is needed")


def status_url() -> str:
    return os.environ.get("ONCALL_STATUS_URL", "http://127.0.0.1:8710")


def _http(method: str, path: str, body: dict[str, object] | None = None,
          headers: dict[str, str] | None = None) -> dict[str, object]:
    req = urllib.request.Request(status_url() + path, method=method, headers={"Content-Type": "application/json",
                                 **(headers or {})}, data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return dict(json.load(r))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise keel.ToolError(f"no service at {path!r}") from None
        raise  # anything else is retried by Temporal


@keel.tool
def service_status(ctx: keel.ToolContext, args: ServiceArgs) -> dict[str, object]:
    """Health, version and error rate of one production service."""
    return _http("GET", f"/services/{args.service}")


@keel.tool(permission="confirm", claims=["restarted", "has been restarted", "restart is complete"])
def restart_service(ctx: keel.ToolContext, args: RestartArgs) -> dict[str, object]:
    """Restart one service (rolling). Runs only after an SRE lead approves it."""
    # Keyed on the call's idempotency key: however often Temporal retries it, one restart happens.
    return _http("POST", f"/services/{args.service}/restart", {"reason": args.reason},
                 {"Idempotency-Key": ctx.idempotency_key})


def status_before_restart(action: keel.ProposedAction) -> str | None:
    """A restart is refused unless this task read that service's status first."""
    if action.tool == "restart_service" and not any(
            o.tool == "service_status" and o.arguments.get("service") == action.arguments["service"]
            for o in action.executed):
        return "read the service's status (service_status) before restarting it"
    return None


def no_credentials(out: keel.FinalOutput) -> str | None:
    if re.search(r"(?i)\b(password|api[_-]?key|secret|token)\s*[:=]\s*\S+", out.text):
        return "the answer contains a credential"
    return None


oncall = keel.Agent(
    name="oncall",
    prompt="prompts/oncall.v1.md",
    tools=[service_status, restart_service],
    models={"small": "sim:sim-small", "large": "sim:sim-large"},
    budget=keel.Budget(max_tokens=6_000, max_usd=0.03),
    approvers={"restart_service": ["sre-lead"]},
    validators=[status_before_restart],
    output_checks=[no_credentials],
    sim=oncall_sim,
)

class IncidentNote(BaseModel):
    summary: str = Field(description="What the checks found, in plain sentences")
    severity: Literal["none", "minor", "major"]
    follow_ups: list[str] = Field(default_factory=list, max_length=10)


incident_note = keel.Agent(
    name="incident_note",
    prompt="prompts/incident_note.v1.md",
    models={"small": "sim:sim-small", "large": "sim:sim-large"},
    budget=keel.Budget(max_tokens=3_000, max_usd=0.01),
    output_type=IncidentNote,
)
"""A second agent: no tools, a structured answer. `keel orchestrate` runs it after on-call checks."""

AGENTS = [oncall, incident_note]
