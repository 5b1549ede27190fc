"""How the offline sim plays the on-call agent: status first; a restart proposed for a service that
is not healthy; then an answer from what the tools returned (never a restart that did not run)."""

from __future__ import annotations

import re

from keel import SimReply, SimTurn

_NAME = r"\b([a-z][a-z0-9]*(?:-[a-z0-9]+)*)\s+"
_NAMED = re.compile(_NAME + r"service\b")
_SERVICE = re.compile(_NAME + r"(?:is|looks|seems|keeps|has)\b")
_QUESTION = {"how", "what", "why", "who", "which", "where", "when", "it", "that", "this", "everything"}


def service_in(text: str) -> str:
    """The service a request is about: the word before "service", else a subject ("payments is down")."""
    low = text.lower()
    for pattern in (_NAMED, _SERVICE):
        for m in pattern.finditer(low):
            if m.group(1) not in _QUESTION and m.group(1) != "the":
                return m.group(1)
    return "api"


def oncall_sim(turn: SimTurn) -> SimReply:
    service = service_in(turn.input)
    status = next((c for c in turn.called("service_status") if c.ok), None)
    restarts = turn.called("restart_service")
    if not turn.answer_now:
        if not turn.called("service_status"):
            return SimReply.call("service_status", service=service)
        if (status is not None and status.result and status.result.get("status") == "down" and not restarts
                and turn.offered("restart_service") and not turn.wrap_up):
            why = f"{service} is {status.result.get('status')} (error rate {status.result.get('error_rate')})"
            return SimReply.call("restart_service", service=service, reason=why)
    if status is None or status.result is None:
        error = next((c.error for c in turn.called("service_status") if c.error), "no status was read")
        return SimReply.answer(f"I could not read the status of {service}: {error}.")
    s = status.result
    lines = [f"{service} is {s.get('status')} (version {s.get('version')}, error rate {s.get('error_rate')})."]
    if s.get("status") == "degraded":
        lines.append("Degraded but serving: no restart; keep watching its error rate.")
    last = restarts[-1] if restarts else None
    if last is not None and last.ok and not last.pending:
        lines.append(f"Restart {last.result.get('restart_id') if last.result else ''} of {service} done.")
    elif last is not None:
        lines.append(f"A restart of {service} was proposed but not carried out "
                     f"({(last.result or {}).get('status') or last.error}).")
    return SimReply.answer(" ".join(lines))
