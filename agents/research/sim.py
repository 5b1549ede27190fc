"""How the offline sim plays the research agents (deterministic given the request).

- research_planner: a `keel.Plan` of a retrieval and an analysis task, each input starting with the
  research question; the analysis input names the statistics the question needs.
- research_retrieval: searches with the question's content words (once more with fewer words if nothing
  matched), reads the top two hits, then answers with the facts of each that carry figures and the
  question's words, citing each document id.
- research_analysis: makes the transaction_stats calls its input names, then answers with the figures.
- research_writer: writes the report from its context (the workers' answers and `Missing:` notes),
  publishes it once, then answers the structured `Report`.
Each follows "wrap up" (no new calls after one more) and "answer now" (no calls).
"""

from __future__ import annotations

import json
import re
from typing import Any

from agents.research.corpus import search_terms
from keel import SimCall, SimReply, SimTurn

MONEY_WORDS = {"refund", "charge", "duplicate", "dispute", "chargeback", "transaction", "fee", "payment", "fraud",
               "merchant", "purchase", "card", "amount", "overdraft", "cost"}
MAX_READS = 2
QUESTION = "Research question:"


def question_of(text: str) -> str:
    first = text.strip().split("\n")[0]
    return first.removeprefix(QUESTION).strip() if first.startswith(QUESTION) else text.strip()


def title_of(question: str) -> str:
    t = " ".join(question.split()).rstrip("?.! ")
    return (t[:1].upper() + t[1:])[:120] or "Research report"


# --- planner ---------------------------------------------------------------------------------
def plan(question: str) -> dict[str, Any]:
    terms = search_terms(question)
    by = "merchant" if "merchant" in terms else "kind"
    subject = " ".join(terms[:8]) or question[:120]
    tasks: list[dict[str, Any]] = [{"agent": "research_retrieval", "name": "retrieval", "input": (
        f"{QUESTION} {question}\n\nSearch the internal documents about: {subject}. Read the one or two most "
        "relevant and summarize their facts and figures, citing each document id.")}]
    if set(terms) & MONEY_WORDS or not terms:
        tasks.append({"agent": "research_analysis", "name": "analysis", "input": (
            f"{QUESTION} {question}\n\nCompute the current figures with transaction_stats grouped by {by} over "
            "the last 90 days. Report each figure with its scope.")})
    return {"tasks": tasks}


def planner_sim(turn: SimTurn) -> SimReply:
    return SimReply.answer(json.dumps(plan(question_of(turn.input))))


# --- retrieval -------------------------------------------------------------------------------
def _hits(calls: list[SimCall]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for c in calls:
        if c.name == "search_documents" and c.ok and c.result is not None:
            out += [r for r in c.result.get("results", []) if isinstance(r, dict) and r.get("doc_id")]
    return out


def _retrieval_next(question: str, calls: list[SimCall]) -> tuple[str, dict[str, Any]] | None:
    searches = [c for c in calls if c.name == "search_documents"]
    terms = search_terms(question)
    if not searches:
        return "search_documents", {"query": " ".join(terms[:8]) or question[:200] or "report", "limit": 5}
    hits = _hits(calls)
    if not hits:
        if len(searches) >= 2 or len(terms) < 2:
            return None
        return "search_documents", {"query": " ".join(terms[:2]), "limit": 5}
    tried = {str(c.arguments.get("doc_id", "")).upper() for c in calls if c.name == "read_document"}
    if len([c for c in calls if c.name == "read_document" and c.ok]) >= MAX_READS:
        return None
    nxt = next((h["doc_id"] for h in hits[:MAX_READS] if str(h["doc_id"]).upper() not in tried), None)
    return None if nxt is None else ("read_document", {"doc_id": nxt})


def _sentences(body: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", body) if s.strip()]


def key_facts(question: str, body: str, n: int = 2) -> list[str]:
    """The `n` sentences with figures that share the most words with the question, in document order."""
    terms = set(search_terms(question))
    sents = _sentences(body)
    ranked = sorted(range(len(sents)), key=lambda i: (-(len(terms & set(search_terms(sents[i])))
                                                       + (2 if re.search(r"\d", sents[i]) else 0)), i))
    return [sents[i] for i in sorted(ranked[:n])]


def retrieval_summary(question: str, calls: list[SimCall]) -> str:
    docs = [c.result for c in calls if c.name == "read_document" and c.ok and c.result is not None]
    if docs:
        lines = ["Findings from the internal documents:"]
        for d in docs:
            facts = " ".join(key_facts(question, str(d.get("body", ""))))
            lines.append(f"- [{d.get('doc_id')}] {d.get('title')}: {facts}")
        return "\n".join(lines)
    hits = _hits(calls)
    if hits:
        return "\n".join(["Documents found but not read (snippets only):",
                          *(f"- [{h['doc_id']}] {h.get('title')}: {h.get('snippet')}" for h in hits[:3])])
    queries = "; ".join(repr(c.arguments.get("query")) for c in calls if c.name == "search_documents")
    return f"No internal document matched the question (searched: {queries or 'nothing'})."


def _stop(turn: SimTurn) -> bool:
    """No more tool calls: answer now, or a wrap-up notice after which a call was already made."""
    return turn.answer_now or (turn.wrap_up and bool(turn.calls))


def retrieval_sim(turn: SimTurn) -> SimReply:
    question = question_of(turn.input)
    action = None if _stop(turn) else _retrieval_next(question, turn.calls)
    if action is not None and turn.offered(action[0]):
        return SimReply.call(action[0], **action[1])
    return SimReply.answer(retrieval_summary(question, turn.calls))


# --- analysis --------------------------------------------------------------------------------
def analysis_calls(question: str, instructions: str) -> list[dict[str, Any]]:
    """The transaction_stats calls the analysis needs: by merchant when asked about merchants, else by kind."""
    by = "merchant" if "merchant" in instructions.lower() or "merchant" in search_terms(question) else "kind"
    return [{"days": 90, "group_by": by}]


def analysis_summary(calls: list[SimCall]) -> str:
    lines = ["Figures:"]
    for c in calls:
        r = c.result or {}
        if c.name == "transaction_stats" and c.ok:
            t = r.get("totals", {})
            count = int(t.get("count", 0))
            dup_share = f" ({100 * int(t.get('duplicates', 0)) / count:.1f}%)" if count else ""
            lines.append(f"- Transactions, all customers, last {r.get('days')} days: {count:,} totalling "
                         f"{float(t.get('total_amount', 0)):,.2f} {r.get('currency', 'EUR')}; "
                         f"{int(t.get('disputed', 0)):,} disputed, {int(t.get('duplicates', 0)):,} duplicate "
                         f"charges{dup_share}.")
            by = r.get("group_by")
            parts = [f"{g.get(by)} {int(g['count']):,} ({float(g['total_amount']):,.2f}, "
                     f"{int(g['duplicates'])} duplicates)" for g in r.get("groups", [])[:5]]
            if parts:
                lines.append(f"- By {by}: " + "; ".join(parts) + ".")
        elif c.error:
            lines.append(f"- {c.name} gave no figures: {c.error}")
    if len(lines) == 1:
        return "No figures: no analysis tool returned data."
    return "\n".join(lines)


def analysis_sim(turn: SimTurn) -> SimReply:
    if not _stop(turn):
        made = {json.dumps(c.arguments, sort_keys=True) for c in turn.called("transaction_stats")}
        for args in analysis_calls(question_of(turn.input), turn.input):
            if json.dumps(args, sort_keys=True) not in made and turn.offered("transaction_stats"):
                return SimReply.call("transaction_stats", **args)
    return SimReply.answer(analysis_summary(turn.calls))


# --- writer ----------------------------------------------------------------------------------
def _bullets(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("- ")]


def _lead(bullet: str) -> str:
    """A finding's first sentence with a figure, its source id kept: the summary's material."""
    text = bullet.removeprefix("- ").strip()
    source = re.match(r"\[(D-\d{3})\][^:]*:\s*", text)
    body = text[source.end():] if source else text
    first = next((s for s in _sentences(body) if re.search(r"\d", s)), body)
    return f"{first} [{source.group(1)}]" if source else first


def report(question: str, context: list[str]) -> tuple[str, str, list[str], list[str]]:
    """(title, body, sources, gaps) of the report over the workers' answers and missing notes."""
    title = title_of(question)
    found = [c for c in context if not c.startswith("Missing:")]
    gaps = [c.removeprefix("Missing:").strip() for c in context if c.startswith("Missing:")]
    docs = [b for c in found if "(research_retrieval)" in c.split("\n")[0] for b in _bullets(c)]
    data = [b for c in found if "(research_analysis)" in c.split("\n")[0] for b in _bullets(c)]
    other = [b for c in found for b in _bullets(c) if b not in docs and b not in data]
    sources = sorted(set(re.findall(r"\[(D-\d{3})\]", "\n".join(found))))
    lines = [f"# {title}", "", "## Summary", ""]
    leads = [*docs[:1], *data[:1]] or (docs + data + other)[:1]
    lines.append(" ".join(_lead(b) for b in leads) if leads else
                 "No worker delivered findings; this report cannot answer the question.")
    lines += ["", "## Findings", ""]
    if docs:
        lines += ["What our documents say:", *docs[:4], ""]
    if data:
        lines += ["What the data shows now:", *data[:6], ""]
    if other:
        lines += [*other[:6], ""]
    if sources:
        lines += ["## Sources", "", *(f"- {s}" for s in sources), ""]
    if gaps:
        lines += ["## Gaps", "", *(f"- {g}" for g in gaps), ""]
    return title, "\n".join(lines).strip(), sources, gaps


def writer_sim(turn: SimTurn) -> SimReply:
    title, body, sources, gaps = report(turn.input.strip(), turn.context)
    published = turn.called("publish_report")
    if not published and not turn.answer_now and turn.offered("publish_report"):
        return SimReply.call("publish_report", title=title, body=body)
    done = next((c for c in published if c.ok), None)
    report_id = str(done.result.get("report_id")) if done is not None and done.result else None
    return SimReply.answer(json.dumps({"title": title, "report": body, "sources": sources, "gaps": gaps,
                                       "report_id": report_id}))
