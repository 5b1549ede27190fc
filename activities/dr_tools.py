"""Tools of the disaster-recovery planner. PLACEHOLDER: filled in by issue #6 work."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from core.types import ToolRequest, ToolResult


def get_service_status(s: Session, req: ToolRequest, args: Any) -> ToolResult:
    raise NotImplementedError


def lookup_runbook(s: Session, req: ToolRequest, args: Any) -> ToolResult:
    raise NotImplementedError
