"""Tools of the research agents: retrieval over the document corpus, analysis over transactions and the
cost ledger. Each runs inside the tool activity's transaction (activities.tools); business failures are
`ToolResult(ok=False)` results the agent sees and can act on.

Analysis tools return aggregates only: no customer id, name, account or transaction id ever leaves
them, whatever the agent asks for.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlmodel import Session, col

from activities.db import DocumentRow, TransactionRow, utcnow
from activities.ledger import GROUP_COLUMNS, Ledger
from keel.corpus import normalize_term, search_terms
from keel.tools import LedgerCostsArgs, ReadDocumentArgs, SearchDocumentsArgs, TransactionStatsArgs
from keel.types import ToolRequest, ToolResult

TITLE_WEIGHT = 3
TAG_WEIGHT = 2
BODY_CAP = 4
"""A term counts at most this many times in a body: one long document must not win on repetition."""
SNIPPET_CHARS = 240
MAX_GROUPS = 20

LEDGER_GROUPS = tuple(g for g in GROUP_COLUMNS if g != "parent_workflow_id")
"""Ledger columns the analysis agent may group by (a workflow id says nothing useful to it)."""


def _counts(text: str) -> Counter[str]:
    return Counter(normalize_term(w) for w in re.findall(r"[A-Za-z0-9]+", text))


def score_document(terms: list[str], title: str, tags: str, body: str) -> int:
    """Term overlap: a query term in the title weighs 3, in the tags 2, in the body once per
    occurrence up to 4."""
    title_t, tag_t, body_c = _counts(title), set(search_terms(tags)) | set(_counts(tags)), _counts(body)
    return sum(TITLE_WEIGHT * (t in title_t) + TAG_WEIGHT * (t in tag_t) + min(body_c[t], BODY_CAP) for t in terms)


def snippet(terms: list[str], body: str) -> str:
    """The body's sentence with the most query terms (the first on a tie), trimmed."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", body) if s.strip()]
    if not sentences:
        return ""
    best = max(sentences, key=lambda s: (len(set(terms) & set(_counts(s))), -sentences.index(s)))
    return best if len(best) <= SNIPPET_CHARS else best[: SNIPPET_CHARS - 3].rstrip() + "..."


def search_documents(s: Session, req: ToolRequest, args: SearchDocumentsArgs) -> ToolResult:
    terms = search_terms(args.query)
    if not terms:
        return ToolResult(ok=False, error=f"the query {args.query!r} has no searchable words; name a subject, "
                                          "e.g. 'duplicate charges refunds'")
    docs = list(s.scalars(select(DocumentRow).order_by(col(DocumentRow.id))))
    scored = [(score_document(terms, d.title, d.tags, d.body), d) for d in docs]
    hits = sorted(((sc, d) for sc, d in scored if sc > 0), key=lambda x: (-x[0], x[1].id))[: args.limit]
    if not hits:
        tags = sorted({t for d in docs for t in d.tags.split()})
        return ToolResult(ok=False, error=f"no document matches {args.query!r} (searched {len(docs)} documents); "
                                          f"try other words, e.g. {', '.join(tags[:12])}")
    return ToolResult(ok=True, content={
        "query": args.query,
        "results": [{"doc_id": d.id, "title": d.title, "score": sc, "snippet": snippet(terms, d.body)}
                    for sc, d in hits],
    })


def read_document(s: Session, req: ToolRequest, args: ReadDocumentArgs) -> ToolResult:
    doc = s.get(DocumentRow, args.doc_id.strip().upper())
    if doc is None:
        known = s.scalars(select(col(DocumentRow.id)).order_by(col(DocumentRow.id))).all()
        return ToolResult(ok=False, error=f"no document {args.doc_id!r}; known ids: {', '.join(known)} "
                                          "(search_documents finds the right one)")
    return ToolResult(ok=True, content={"doc_id": doc.id, "title": doc.title, "tags": doc.tags, "body": doc.body})


def transaction_stats(s: Session, req: ToolRequest, args: TransactionStatsArgs) -> ToolResult:
    """Counts and totals over all customers' transactions. The only columns read are the group's (kind or
    merchant) and the figures: nothing that identifies a customer can reach the result."""
    t = TransactionRow
    figures = (
        func.count().label("count"),
        func.coalesce(func.sum(col(t.amount)), 0.0).label("total_amount"),
        func.coalesce(func.sum(case((col(t.disputed).is_(True), 1), else_=0)), 0).label("disputed"),
        func.coalesce(func.sum(case((col(t.duplicate_of).is_not(None), 1), else_=0)), 0).label("duplicates"),
    )
    where = [col(t.days_ago) <= args.days]
    if args.kind is not None:
        where.append(col(t.kind) == args.kind)
    total = s.execute(select(*figures).where(*where)).mappings().one()
    groups: list[dict[str, Any]] = []
    if args.group_by != "none":
        key = col(t.kind) if args.group_by == "kind" else col(t.merchant)
        stmt = (select(key.label(args.group_by), *figures).where(*where).group_by(key)
                .order_by(func.count().desc(), key))
        groups = [_figures(dict(r)) for r in s.execute(stmt).mappings()]
    if not total["count"]:
        kinds = s.scalars(select(col(t.kind)).distinct().order_by(col(t.kind))).all()
        return ToolResult(ok=False, error=f"no transactions in the last {args.days} days"
                                          + (f" of kind {args.kind!r}; kinds: {', '.join(kinds)}" if args.kind else ""))
    return ToolResult(ok=True, content={
        "scope": "all customers (aggregates only)",
        "days": args.days,
        "kind": args.kind,
        "group_by": args.group_by,
        "currency": "EUR",
        "totals": _figures(dict(total)),
        "groups": groups[:MAX_GROUPS],
        "groups_total": len(groups),
    })


def _figures(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "total_amount": round(float(row["total_amount"]), 2), "disputed": int(row["disputed"]),
            "duplicates": int(row["duplicates"])}


def ledger_costs(s: Session, req: ToolRequest, args: LedgerCostsArgs) -> ToolResult:
    bad = [g for g in args.group_by if g not in LEDGER_GROUPS]
    if bad:
        return ToolResult(ok=False, error=f"cannot group costs by {bad!r}; ledger columns: {', '.join(LEDGER_GROUPS)}")
    # In this tool's own transaction: a second connection would wait for the write lock it holds.
    rows = Ledger(s.get_bind().engine).costs(args.group_by, since=utcnow() - timedelta(days=args.days), session=s)
    if not rows:
        return ToolResult(ok=False, error=f"no LLM calls in the ledger in the last {args.days} days")
    out = [{**{g: r[g] for g in dict.fromkeys(args.group_by)}, "calls": r["calls"],
            "tokens": int(r["input_tokens"]) + int(r["output_tokens"]), "cost_usd": round(float(r["cost_usd"]), 6)}
           for r in rows]
    return ToolResult(ok=True, content={
        "days": args.days,
        "group_by": list(dict.fromkeys(args.group_by)),
        "totals": {"calls": sum(r["calls"] for r in out), "tokens": sum(r["tokens"] for r in out),
                   "cost_usd": round(sum(float(r["cost_usd"]) for r in rows), 6)},
        "groups": out[:MAX_GROUPS],
        "groups_total": len(out),
    })
