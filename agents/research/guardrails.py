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
    body = str(action.arguments.get("body", ""))
    problems = _uncited(cited(body), _context_ids(action.context), "the report")
    invented = sorted(figures(body) - figures(action.input) - {f for c in action.context for f in figures(c)})
    if invented:
        problems.append(f"the report states figures no worker found: {', '.join(invented[:8])}")
    return "; ".join(problems) or None


def report_cites_its_context(out: keel.FinalOutput) -> list[str]:
    """The writer's answer (its text and its `sources`) cites only documents the workers found."""
    allowed = _context_ids(out.context)
    sources = getattr(out.structured, "sources", None) or []
    return _uncited([*cited(out.text), *sources], allowed, "the report")


# --- evidence (keel.Agent(evidence=...)): what an answer must rest on -----------------------------
_FIGURE = re.compile(r"(?<![\w.-])\d[\d,]*(?:\.\d+)?")


def figures(text: str) -> set[str]:
    """The figures a text states (1,234.50 -> 1234.50), citation ids and single digits left out."""
    found = set()
    for m in _FIGURE.finditer(CITATION.sub(" ", text)):
        value = m.group().rstrip(",.").replace(",", "")
        if value and not (value.isdigit() and len(value) == 1):
            found.add(value)
    return found


def retrieval_found_documents(out: keel.FinalOutput) -> str | None:
    """A retrieval answer rests on documents this task read, and cites at least one of them."""
    seen = {str(o.content.get("doc_id", "")) for o in out.executed if o.tool == "read_document"}
    seen |= {str(r.get("doc_id", "")) for o in out.executed if o.tool == "search_documents"
             for r in o.content.get("results", []) if isinstance(r, dict)}
    seen.discard("")
    if not seen:
        return "no document was retrieved: search the documents and read the relevant ones first"
    if not set(cited(out.text)) & seen:
        return "the findings cite no document: cite the id of each document a finding comes from, e.g. [D-002]"
    return None


def analysis_used_data(out: keel.FinalOutput) -> str | None:
    """An analysis answer rests on a data result this task obtained."""
    if not any(o.tool == "transaction_stats" and o.content.get("totals") for o in out.executed):
        return "no figures were computed: call transaction_stats and report only what it returned"
    return None


def report_figures_found(out: keel.FinalOutput) -> str | None:
    """Every figure of the report comes from the workers' answers (or the question): none invented."""
    body = "\n".join([out.text, str(getattr(out.structured, "report", "") or "")])
    allowed = figures(out.input) | {f for c in out.context for f in figures(c)}
    invented = sorted(figures(body) - allowed)
    if invented:
        return f"the report states figures no worker found: {', '.join(invented[:8])}"
    return None
