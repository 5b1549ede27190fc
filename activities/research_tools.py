"""Tools of the research agents (retrieval and analysis). PLACEHOLDER: filled in by issue #6 work."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from core.types import ToolRequest, ToolResult


def search_documents(s: Session, req: ToolRequest, args: Any) -> ToolResult:
    raise NotImplementedError


def read_document(s: Session, req: ToolRequest, args: Any) -> ToolResult:
    raise NotImplementedError


def transaction_stats(s: Session, req: ToolRequest, args: Any) -> ToolResult:
    raise NotImplementedError


def ledger_costs(s: Session, req: ToolRequest, args: Any) -> ToolResult:
    raise NotImplementedError
