"""The sim model's answers for the 'research/*' prompts: every role of the orchestrator pattern.

- `research/plan` (the parent): reads `Question: ...` and answers a JSON plan (keel.research.ResearchPlan):
  a retrieval, an analysis and a writing sub-task; the analysis instructions name the tools the question
  needs (transaction_stats for money questions, ledger_costs for cost and AI questions, both otherwise).
  `sim.invalid_json_rate` breaks the JSON (the workflow then uses its default plan).
- `research/retrieval` (a child with search_documents / read_document): searches with the question's
  content words (once more with fewer words if nothing matched), reads the top two hits, then answers
  with the facts of each document that carry figures and the question's words, citing its id.
- `research/analysis` (a child with transaction_stats / ledger_costs): makes the calls its instructions
  name (or the question suggests), then answers with the figures.
- `research/writing` (a child with no tools): writes the findings section from its `Context:` messages.
- `research/synthesize` (the parent): the final report from the `Context:` messages: summary, the
  writer's section (or the raw findings), sources, gaps.

Like the support sim it follows "wrap up" (at most one more tool call) and "answer now" (no more tool
calls) system messages, and reads tool results from the tool messages. Deterministic given the request.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from activities.providers.sim import Call, _broken_json, _system_index, parse_calls
from keel.corpus import search_terms
from keel.types import LlmRequest, Message, ToolCall

COST_WORDS = {"cost", "spend", "spending", "llm", "token", "model", "budget", "ai", "agent", "usd", "dollar",
              "price", "tier", "automation"}
MONEY_WORDS = {"refund", "charge", "duplicate", "dispute", "chargeback", "transaction", "fee", "payment", "fraud",
               "merchant", "purchase", "card", "amount", "overdraft"}
MAX_READS = 2


def respond(req: LlmRequest, rng: random.Random) -> tuple[str, list[ToolCall]]:
    role = req.prompt.partition("/")[2]
    if role == "plan":
        text = json.dumps(plan(question_of(req.messages)))
        if rng.random() < req.model.sim.invalid_json_rate:
            text = _broken_json(rng, text)
        return text, []
    if role in ("retrieval", "analysis"):
        action = None if _answer_now(req) else _next_call(role, req)
        if action is not None:
            name, args = action
            return "", [ToolCall(id=f"call_{req.step}_0", name=name, arguments_json=json.dumps(args))]
        calls = parse_calls(req.messages)
        question = question_of(req.messages)
        return (retrieval_summary(question, calls) if role == "retrieval" else analysis_summary(calls)), []
    if role == "writing":
        return write_section(question_of(req.messages), contexts(req.messages)), []
    if role == "synthesize":
        return synthesize(req.messages), []
    return f"(sim) no behaviour for prompt {req.prompt!r}", []


# --- reading the conversation --------------------------------------------------------------
def question_of(messages: list[Message]) -> str:
    for m in messages:
        if m.role != "user":
            continue
        for prefix in ("Question:", "Context: Research question:"):
            if m.content.startswith(prefix):
                return m.content[len(prefix):].strip().split("\n")[0]
    first = next((m.content for m in messages if m.role == "user"), "")
    return first.removeprefix("Task:").strip()


def task_text(messages: list[Message]) -> str:
    return next((m.content.removeprefix("Task:").strip() for m in messages
                 if m.role == "user" and m.content.startswith("Task:")), "")


def contexts(messages: list[Message]) -> list[str]:
    """The `Context:` messages, without the research question."""
    return [m.content.removeprefix("Context:").strip() for m in messages
            if m.role == "user" and m.content.startswith("Context:") and "Research question:" not in m.content[:30]]


def _answer_now(req: LlmRequest) -> bool:
    return not req.tools or _system_index(req.messages, "answer now") is not None


def _next_call(role: str, req: LlmRequest) -> tuple[str, dict[str, Any]] | None:
    calls = parse_calls(req.messages)
    wrap = _system_index(req.messages, "wrap up")
    if wrap is not None and any(c.msg_index > wrap for c in calls):
        return None
    offered = {t.name for t in req.tools}
    question = question_of(req.messages)
    action = _retrieval_next(question, calls) if role == "retrieval" else _analysis_next(
        question, task_text(req.messages), calls)
    return action if action is not None and action[0] in offered else None


def topics(text: str) -> tuple[bool, bool]:
    """(money, cost): whether the text is about transactions and refunds, about LLM spend; neither -> both."""
    terms = set(search_terms(text))
    money, cost = bool(terms & MONEY_WORDS), bool(terms & COST_WORDS)
    return (True, True) if not (money or cost) else (money, cost)


# --- plan ----------------------------------------------------------------------------------
def plan(question: str) -> dict[str, Any]:
    money, cost = topics(question)
    tools = []
    if money:
        by = "merchant" if "merchant" in search_terms(question) else "kind"
        tools.append(f"transaction_stats grouped by {by} over the last 90 days")
    if cost:
        tools.append("ledger_costs grouped by feature and model over the last 30 days")
    subject = " ".join(search_terms(question)[:8]) or question[:120]
    title = " ".join(question.split()).rstrip("?.! ")
    return {
        "title": (title[:1].upper() + title[1:])[:120] or "Research report",
        "subtasks": [
            {"name": "retrieval", "role": "retrieval", "instructions": (
                f"Search the internal documents about: {subject}. Read the one or two most relevant and "
                "summarize their facts and figures, citing each document id.")},
            {"name": "analysis", "role": "analysis", "instructions": (
                f"Compute the current figures with {' and '.join(tools)}. Report each figure with its scope.")},
            {"name": "writing", "role": "writing", "instructions": (
                "Write the findings section that answers the question from the retrieval and analysis findings "
                "given as context. Keep the document ids; say what is missing.")},
        ],
    }


# --- retrieval -----------------------------------------------------------------------------
def _results(calls: list[Call]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for c in calls:
        if c.name == "search_documents" and c.ok and c.result is not None:
            out += [r for r in c.result.get("results", []) if isinstance(r, dict) and r.get("doc_id")]
    return out


def _retrieval_next(question: str, calls: list[Call]) -> tuple[str, dict[str, Any]] | None:
    searches = [c for c in calls if c.name == "search_documents"]
    terms = search_terms(question)
    if not searches:
        return "search_documents", {"query": " ".join(terms[:8]) or question[:200] or "report", "limit": 5}
    hits = _results(calls)
    if not hits:
        if len(searches) >= 2 or len(terms) < 2:
            return None
        return "search_documents", {"query": " ".join(terms[:2]), "limit": 5}
    tried = {str(c.args.get("doc_id", "")).upper() for c in calls if c.name == "read_document"}
    reads = [c for c in calls if c.name == "read_document" and c.ok]
    if len(reads) >= MAX_READS:
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


def retrieval_summary(question: str, calls: list[Call]) -> str:
    docs = [c.result for c in calls if c.name == "read_document" and c.ok and c.result is not None]
    if docs:
        lines = ["Findings from the internal documents:"]
        for d in docs:
            facts = " ".join(key_facts(question, str(d.get("body", ""))))
            lines.append(f"- [{d.get('doc_id')}] {d.get('title')}: {facts}")
        return "\n".join(lines)
    hits = _results(calls)
    if hits:
        return "\n".join(["Documents found but not read (snippets only):",
                          *(f"- [{h['doc_id']}] {h.get('title')}: {h.get('snippet')}" for h in hits[:3])])
    queries = "; ".join(repr(c.args.get("query")) for c in calls if c.name == "search_documents")
    return f"No internal document matched the question (searched: {queries or 'nothing'})."


# --- analysis ------------------------------------------------------------------------------
def analysis_plan(question: str, instructions: str) -> list[tuple[str, dict[str, Any]]]:
    """The calls the analysis needs: those its instructions name, else those the question suggests."""
    low = instructions.lower()
    named_tx, named_cost = "transaction_stats" in low, "ledger_costs" in low
    if not (named_tx or named_cost):
        named_tx, named_cost = topics(question)
    out: list[tuple[str, dict[str, Any]]] = []
    if named_tx:
        by = "merchant" if "merchant" in low or "merchant" in search_terms(question) else "kind"
        out.append(("transaction_stats", {"days": 90, "group_by": by}))
    if named_cost:
        out.append(("ledger_costs", {"group_by": ["feature", "model"], "days": 30}))
    return out


def _analysis_next(question: str, instructions: str, calls: list[Call]) -> tuple[str, dict[str, Any]] | None:
    made = {(c.name, json.dumps(c.args, sort_keys=True)) for c in calls}
    for name, args in analysis_plan(question, instructions):
        if (name, json.dumps(args, sort_keys=True)) not in made:
            return name, args
    return None


def analysis_summary(calls: list[Call]) -> str:
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
        elif c.name == "ledger_costs" and c.ok:
            t = r.get("totals", {})
            total = float(t.get("cost_usd", 0))
            lines.append(f"- LLM spend, ledger, last {r.get('days')} days: ${total:.4f} over "
                         f"{int(t.get('calls', 0)):,} calls and {int(t.get('tokens', 0)):,} tokens.")
            keys = r.get("group_by", [])
            for g in r.get("groups", [])[:3]:
                share = f" ({100 * float(g['cost_usd']) / total:.0f}%)" if total else ""
                label = ", ".join(f"{k}={g.get(k)}" for k in keys)
                lines.append(f"  - {label}: ${float(g['cost_usd']):.4f}{share}, {int(g['calls']):,} calls.")
        elif c.result is not None and not c.ok:
            lines.append(f"- {c.name} gave no figures: {c.error}")
    if len(lines) == 1:
        return "No figures: no analysis tool returned data."
    return "\n".join(lines)


# --- writing and synthesis -----------------------------------------------------------------
def _bullets(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("- ")]


def write_section(question: str, ctx: list[str]) -> str:
    found = [c for c in ctx if c.startswith(("Findings of", "Partial findings of"))]
    missing = [c.removeprefix("Missing:").strip() for c in ctx if c.startswith("Missing:")]
    docs = [b for c in found if "retrieval" in c.split("\n")[0] for b in _bullets(c)]
    data = [b for c in found if "analysis" in c.split("\n")[0] for b in _bullets(c)]
    lines = ["## Findings", "", f"This section answers: {question}", ""]
    if docs:
        lines += ["What our documents say:", *docs[:4], ""]
    if data:
        lines += ["What the data shows now:", *data[:6], ""]
    if not (docs or data):
        lines += ["No findings were delivered, so no answer can be given from our sources.", ""]
    partial = [c.split("\n")[0].removeprefix("Partial findings of ").rstrip(":") for c in found
               if c.startswith("Partial")]
    gaps = missing + [f"{p} (partial)" for p in partial]
    if gaps:
        lines += ["Gaps: " + "; ".join(gaps)]
    return "\n".join(lines).strip()


def _lead(bullet: str) -> str:
    """A finding's first sentence with a figure, its source id kept: the summary's material."""
    text = bullet.removeprefix("- ").strip()
    source = re.match(r"\[(D-\d{3})\][^:]*:\s*", text)
    body = text[source.end():] if source else text
    first = next((s for s in _sentences(body) if re.search(r"\d", s)), body)
    return f"{first} [{source.group(1)}]" if source else first


def synthesize(messages: list[Message]) -> str:
    question = question_of(messages)
    title = next((m.content.removeprefix("Title:").strip() for m in messages
                  if m.role == "user" and m.content.startswith("Title:")), "") or question
    ctx = contexts(messages)
    section = next((c.split("\n", 1)[1] for c in ctx if c.startswith("Findings of") and "(writing)" in c.split("\n")[0]
                    and "\n" in c), "")
    found = [c for c in ctx if c.startswith(("Findings of", "Partial findings of")) and "(writing)" not in c[:80]]
    missing = [c.removeprefix("Missing:").strip() for c in ctx if c.startswith("Missing:")]
    bullets = [b for c in found for b in _bullets(c)]
    docs = [b for c in found if "(retrieval)" in c.split("\n")[0] for b in _bullets(c)]
    data = [b for c in found if "(analysis)" in c.split("\n")[0] for b in _bullets(c)]
    sources = sorted(set(re.findall(r"\[(D-\d{3})\]", "\n".join(ctx))))
    lines = [f"# {title}", "", "## Summary", ""]
    if bullets:
        lines.append(" ".join(_lead(b) for b in [*docs[:1], *data[:1]] or bullets[:1]))
    else:
        lines.append("No sub-task delivered findings; this report cannot answer the question.")
    lines.append("")
    if section:
        # The gaps get their own section below.
        lines += ["\n".join(ln for ln in section.strip().splitlines() if not ln.startswith("Gaps:")).strip(), ""]
    elif found:
        lines += ["## Findings", "", *bullets[:8], ""]
    if sources:
        lines += ["## Sources", "", *(f"- {s}" for s in sources), ""]
    if missing:
        lines += ["## Gaps", "", *(f"- {m}" for m in missing), ""]
    return "\n".join(lines).strip()
