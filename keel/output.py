"""The generic output filter (layer 3) of every agent's final answer: personal data redacted, then
the checks that hold an answer back (the task goes to a human with the reasons): unfilled template
placeholders, actions claimed that no executed call backs (each write tool declares the claims it
backs, `@keel.tool(claims=...)`), and the agent's own output checks. Pure: runs in workflow code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError
from temporalio.exceptions import ApplicationError

from keel.agent import Agent, FinalOutput, ToolOutcome
from keel.errors import AGENT_CONFIG_ERROR
from keel.redaction import _PLACEHOLDER_RULES, _found, _quote, redact
from keel.types import ToolCall


@dataclass
class OutputReport:
    text: str
    redactions: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def placeholders(text: str) -> list[str]:
    """Unfilled templates in `text`: {name}, {{...}}, [CUSTOMER NAME], <insert ...>."""
    return _found(_PLACEHOLDER_RULES, text)


def unfounded_claims(agent: Agent, text: str, executed: Sequence[ToolOutcome]) -> list[str]:
    """Claims of an action whose tool this task never executed."""
    done = {o.tool for o in executed}
    problems: list[str] = []
    for t in agent.tool_map.values():
        if t.name in done or not t.claims:
            continue
        for claim in t.claims:
            m = re.search(rf"(?<![A-Za-z0-9_]){re.escape(claim)}(?![A-Za-z0-9_])", text, re.I)
            if m is not None:
                problems.append(f"claims an action that was not executed ({t.name}): {_quote(m.group(0))}")
                break
    return problems


def check_output(agent: Agent, text: str, structured: BaseModel | None, task_input: str, tenant: str,
                 executed: Sequence[ToolOutcome], context: Sequence[str] = ()) -> OutputReport:
    report = redact(text, None)
    counts = {k: v for k, v in report.counts.items() if v}
    out = OutputReport(text=report.text, redactions=counts)
    if not report.text.strip():
        out.problems.append("the answer is empty")
        return out
    out.problems += [f"unfilled template placeholder {_quote(f)}" for f in placeholders(report.text)]
    out.problems += unfounded_claims(agent, report.text, executed)
    final = FinalOutput(text=report.text, structured=structured, input=task_input, tenant=tenant,
                        executed=tuple(executed), context=tuple(context))
    for check in agent.output_checks:
        # A bug in the agent's hook, met in workflow code, fails the task with it: never a workflow task
        # retried forever (it would go wrong again on every attempt).
        hook = f"agent {agent.name!r}: output check {getattr(check, '__qualname__', None) or repr(check)}"
        try:
            found = check(final)
        except Exception as e:
            raise ApplicationError(f"{hook} raised {type(e).__name__}: {e}", type=AGENT_CONFIG_ERROR,
                                   non_retryable=True) from e
        if isinstance(found, str):
            out.problems.append(found)
        elif isinstance(found, Iterable):
            out.problems += [str(p) for p in found]
        elif found:
            raise ApplicationError(f"{hook} returned {type(found).__name__}: {found!r}, not a problem (str), a list "
                                   "of problems or None", type=AGENT_CONFIG_ERROR, non_retryable=True)
    return out


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def parse_structured(text: str, model: type[BaseModel]) -> tuple[BaseModel | None, str | None]:
    """The answer as `model`: the JSON object alone, in a markdown fence, or with prose around it.
    Returns (value, None) or (None, what is wrong, to tell the model)."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start:end + 1])
    candidates.append(text)
    problem = "the answer holds no JSON object"
    for raw in candidates:
        try:
            value = json.loads(raw.strip())
        except json.JSONDecodeError:
            continue
        if not isinstance(value, dict):
            problem = "the answer's JSON is not an object"
            continue
        try:
            return model.model_validate(value), None
        except ValidationError as e:
            problem = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'answer'}: {err['msg']}" for err in e.errors())
            return None, f"the answer does not match the required schema: {problem}"
    return None, problem


def output_problem(agent: Agent, kind: str, text: str, tool_calls: Sequence[ToolCall],
                   offered: Iterable[str]) -> str | None:
    """Why the agent workflow will refuse this model output as invalid, or None: a tool call it cannot
    read (an unknown tool, arguments that are not a JSON object), or, for an answer (no tool call, on
    the agent's step or its triage), an empty one or a structured one that does not parse. The LLM
    activity reads each output this way to keep the raw text of a refused one in its ledger row; the
    workflow's own checks (agent_loop, AgentWorkflow) go further (argument schemas, policies)."""
    names = set(offered)
    for c in tool_calls:
        if c.name not in names:
            return f"unknown tool {c.name!r}"
        try:
            args = json.loads(c.arguments_json or "{}")
        except json.JSONDecodeError as e:
            return f"{c.name}: arguments are not valid JSON ({e.msg} at position {e.pos})"
        if not isinstance(args, dict):
            return f"{c.name}: arguments must be a JSON object"
    triage = agent.triage if kind == "classify" else None
    if tool_calls or (triage is None and kind != agent.step_kind):
        return None
    if not text.strip():
        return "the answer is empty"
    output_type = triage.output_type if triage is not None else agent.output_type
    return parse_structured(text, output_type)[1] if output_type is not None else None
