"""The research agents' guardrails: a report cites only real sources.

- The retrieval worker may cite only documents its own searches and reads returned.
- The writer may cite only document ids its context (the workers' answers) carries, and each of them
  must exist in the corpus: checked before `publish_report` runs (an action validator) and on its
  final answer (an output check), text and `sources` alike.
Pure and deterministic (they run in workflow code).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import keel
from agents.research.corpus import CORPUS

CITATION = re.compile(r"\bD-\d{3}\b")
KNOWN = frozenset(d.id for d in CORPUS)


def cited(text: str) -> list[str]:
    return sorted(set(CITATION.findall(text)))


def _uncited(ids: Iterable[str], allowed: set[str], where: str) -> list[str]:
    problems = []
    for doc in sorted(set(ids)):
        if doc not in KNOWN:
            problems.append(f"{where} cites {doc}, which is not a document of the corpus")
        elif doc not in allowed:
            problems.append(f"{where} cites {doc}, which no worker found")
    return problems


def retrieval_cites_what_it_read(out: keel.FinalOutput) -> list[str]:
    """The retrieval worker's answer cites only documents its own tool calls returned."""
    seen: set[str] = set()
    for o in out.executed:
        if o.tool == "read_document":
            seen.add(str(o.content.get("doc_id", "")))
        elif o.tool == "search_documents":
            seen.update(str(r.get("doc_id", "")) for r in o.content.get("results", []) if isinstance(r, dict))
    return _uncited(cited(out.text), seen, "the answer")


def _context_ids(context: Iterable[str]) -> set[str]:
    return {doc for c in context for doc in cited(c)}


def publish_cites_its_context(action: keel.ProposedAction) -> str | None:
    """A report is published only if every document it cites came from the workers."""
    if action.tool != "publish_report":
        return None
    problems = _uncited(cited(str(action.arguments.get("body", ""))), _context_ids(action.context), "the report")
    return "; ".join(problems) or None


def report_cites_its_context(out: keel.FinalOutput) -> list[str]:
    """The writer's answer (its text and its `sources`) cites only documents the workers found."""
    allowed = _context_ids(out.context)
    sources = getattr(out.structured, "sources", None) or []
    return _uncited([*cited(out.text), *sources], allowed, "the report")
