"""The research agents' tools: retrieval over the document corpus, statistics over the anonymised
transaction extract, and the writer's one write, `publish_report`.

Each runs as its own activity (`<agent>.<tool>`) on the research tables (store.py). A business
failure (no match, an unknown id) is a `keel.ToolError` the model sees and can act on.
`transaction_stats` returns aggregates only, over a table that holds no identifier at all.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from pydantic import Field
from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError

import keel
from agents.research import store
from agents.research.corpus import normalize_term, search_terms

TITLE_WEIGHT = 3
TAG_WEIGHT = 2
BODY_CAP = 4
"""A term counts at most this many times in a body: one long document must not win on repetition."""
SNIPPET_CHARS = 240
MAX_GROUPS = 20
CITATION = re.compile(r"\[(D-\d{3})\]")


class SearchArgs(keel.Args):
    query: str = Field(min_length=1, max_length=500, description="What to look for in the document corpus")
    limit: int = Field(5, ge=1, le=10, description="At most this many documents, best match first")


class ReadArgs(keel.Args):
    doc_id: str = Field(min_length=1, max_length=64, description="A document id from search_documents, e.g. D-004")


class StatsArgs(keel.Args):
    days: int = Field(90, ge=1, le=365, description="How many days back")
    group_by: str = Field("kind", pattern="^(kind|merchant|none)$", description="kind, merchant or none")
    kind: str | None = Field(None, max_length=32, description="Only transactions of this kind (e.g. purchase)")


class PublishArgs(keel.Args):
    title: str = Field(min_length=1, max_length=200)
    body: str = Field(min_length=1, max_length=20_000, description="The report in Markdown")


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


@keel.tool
def search_documents(ctx: keel.ToolContext, args: SearchArgs) -> dict[str, Any]:
    """Search the internal document corpus (reports, policies, incident notes); returns ids, titles and
    snippets, best match first."""
    terms = search_terms(args.query)
    if not terms:
        raise keel.ToolError(f"the query {args.query!r} has no searchable words; name a subject, "
                             "e.g. 'duplicate charges refunds'")
    with store.reading(store.engine_for()) as conn:
        docs = list(conn.execute(select(store.documents).order_by(store.documents.c.id)).mappings())
    scored = [(score_document(terms, d["title"], d["tags"], d["body"]), d) for d in docs]
    hits = sorted(((sc, d) for sc, d in scored if sc > 0), key=lambda x: (-x[0], x[1]["id"]))[: args.limit]
    if not hits:
        tags = sorted({t for d in docs for t in d["tags"].split()})
        raise keel.ToolError(f"no document matches {args.query!r} (searched {len(docs)} documents); "
                             f"try other words, e.g. {', '.join(tags[:12])}")
    return {"query": args.query,
            "results": [{"doc_id": d["id"], "title": d["title"], "score": sc, "snippet": snippet(terms, d["body"])}
                        for sc, d in hits]}


@keel.tool
def read_document(ctx: keel.ToolContext, args: ReadArgs) -> dict[str, Any]:
    """Read one document of the corpus in full."""
    doc_id = args.doc_id.strip().upper()
    with store.reading(store.engine_for()) as conn:
        doc = conn.execute(select(store.documents).where(store.documents.c.id == doc_id)).mappings().first()
        if doc is None:
            known = conn.execute(select(store.documents.c.id).order_by(store.documents.c.id)).scalars().all()
            raise keel.ToolError(f"no document {args.doc_id!r}; known ids: {', '.join(known)} "
                                 "(search_documents finds the right one)")
    return {"doc_id": doc["id"], "title": doc["title"], "tags": doc["tags"], "body": doc["body"]}


@keel.tool
def transaction_stats(ctx: keel.ToolContext, args: StatsArgs) -> dict[str, Any]:
    """Aggregate statistics over the transaction extract: counts, totals, disputes and duplicate charges,
    grouped by kind or merchant. No customer data."""
    t = store.transactions.c
    figures = (
        func.count().label("count"),
        func.coalesce(func.sum(t.amount), 0.0).label("total_amount"),
        func.coalesce(func.sum(case((t.disputed.is_(True), 1), else_=0)), 0).label("disputed"),
        func.coalesce(func.sum(case((t.duplicate.is_(True), 1), else_=0)), 0).label("duplicates"),
    )
    where = [t.days_ago <= args.days]
    if args.kind is not None:
        where.append(t.kind == args.kind)
    with store.reading(store.engine_for()) as conn:
        total = dict(conn.execute(select(*figures).where(*where)).mappings().one())
        groups: list[dict[str, Any]] = []
        if args.group_by != "none":
            key = t.kind if args.group_by == "kind" else t.merchant
            stmt = (select(key.label(args.group_by), *figures).where(*where).group_by(key)
                    .order_by(func.count().desc(), key))
            groups = [_figures(dict(r)) for r in conn.execute(stmt).mappings()]
        if not total["count"]:
            kinds = conn.execute(select(t.kind).distinct().order_by(t.kind)).scalars().all()
            raise keel.ToolError(f"no transactions in the last {args.days} days"
                                 + (f" of kind {args.kind!r}; kinds: {', '.join(kinds)}" if args.kind else ""))
    return {"scope": "all customers (aggregates only)", "days": args.days, "kind": args.kind,
            "group_by": args.group_by, "currency": "EUR", "totals": _figures(total), "groups": groups[:MAX_GROUPS],
            "groups_total": len(groups)}


def _figures(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "count": int(row["count"]), "total_amount": round(float(row["total_amount"]), 2),
            "disputed": int(row["disputed"]), "duplicates": int(row["duplicates"])}


@keel.tool(permission="autonomous", claims=["has been published", "report is published"])
def publish_report(ctx: keel.ToolContext, args: PublishArgs) -> dict[str, Any]:
    """Publish the finished report (once; a retried call finds the report it published)."""
    sources = sorted(set(CITATION.findall(args.body)))
    engine = store.engine_for()
    row = {"idempotency_key": ctx.idempotency_key, "workflow_id": ctx.workflow_id, "title": args.title,
           "body": args.body, "sources": json.dumps(sources), "created_at": datetime.now(UTC)}
    try:
        with engine.begin() as conn:
            conn.execute(store.reports.insert(), row)
    except IntegrityError:
        pass  # this call ran before (a retry): its report stands
    with store.reading(engine) as conn:  # published: by this attempt or an earlier one
        conn.execute(select(store.reports.c.id).where(
            store.reports.c.idempotency_key == ctx.idempotency_key)).scalar_one()
    # Its id from the call's key, not the row's number: the same however many runs publish at once or did before
    # (a keyed run's recorded traffic replays).
    report_id = f"RE-{hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()[:8].upper()}"
    return {"report_id": report_id, "title": args.title, "sources": sources, "status": "published"}
