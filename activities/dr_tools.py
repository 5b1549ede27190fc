"""Tools of the disaster-recovery planner (the supervisor pattern's worker): the production services'
status and the runbooks, over the shipped data in keel.runbooks (a fixed snapshot of a fictional
incident at Keel Bank). Read-only; handlers run inside the tool frame's transaction (activities.tools).
"""

from __future__ import annotations

from sqlmodel import Session

from keel.runbooks import (
    MAX_PROMOTE_LAG_S,
    RULES_BY_ID,
    RUNBOOKS,
    SERVICES,
    normalize_topic,
    service_status,
)
from keel.tools import GetServiceStatusArgs, LookupRunbookArgs
from keel.types import ToolRequest, ToolResult


def get_service_status(s: Session, req: ToolRequest, args: GetServiceStatusArgs) -> ToolResult:
    found = service_status(args.service)
    if found is None:
        known = sorted({x.name for x in SERVICES} | {x.cluster for x in SERVICES})
        return ToolResult(ok=False, error=f"unknown service {args.service!r}; known services and clusters: "
                                          f"{', '.join(known)}")
    return ToolResult(ok=True, content={
        "services": [x.model_dump(exclude_none=True) for x in found],
        "max_promote_lag_s": MAX_PROMOTE_LAG_S,
    })


def lookup_runbook(s: Session, req: ToolRequest, args: LookupRunbookArgs) -> ToolResult:
    book = RUNBOOKS.get(normalize_topic(args.topic))
    if book is None:
        return ToolResult(ok=False, error=f"no runbook on {args.topic!r}; known topics: {', '.join(sorted(RUNBOOKS))}")
    return ToolResult(ok=True, content={
        "topic": book.topic, "title": book.title, "summary": book.summary, "steps": book.steps,
        "rules": [{"id": r, "description": RULES_BY_ID[r].description} for r in book.rules],
    })
