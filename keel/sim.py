"""How the offline `sim` model plays an agent: the turn it is shown, the reply it gives, and the
generic behaviour every agent gets unless it registers its own (`keel.Agent(sim=...)`).

The sim is a simulator, not a language model, and says so wherever a user sees it. It is seeded and
stateless: a turn depends only on the request, so a retried call gets the same answer and a task
replays the same path. The failure modes (spirals, hallucinated tools, invalid arguments or JSON,
obeying injected instructions) are applied by the provider around any behaviour, by `SimConfig`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from keel.types import Message, StepKind, ToolSpec


@dataclass
class SimCall:
    """A tool call made earlier in the task, with the result its tool message returned."""

    name: str
    arguments: dict[str, Any]
    result: dict[str, Any] | None = None

    @property
    def error(self) -> str | None:
        err = (self.result or {}).get("error")
        return str(err) if err else None

    @property
    def ok(self) -> bool:
        return self.result is not None and self.error is None

    @property
    def pending(self) -> bool:
        """Recorded but not executed (awaiting or refused approval, a dry run)."""
        status = str((self.result or {}).get("status", "")).lower()
        return any(s in status for s in ("pending", "reject", "timed out", "recorded, not executed"))


@dataclass
class SimTurn:
    """One model call of an agent, as the sim sees it."""

    agent: str
    input: str
    """The task's input (the first user message)."""
    messages: list[Message]
    tools: list[ToolSpec]
    """The tools offered on this call (none when the agent must answer now)."""
    calls: list[SimCall]
    step: int
    kind: StepKind
    rng: random.Random
    wrap_up: bool = False
    """A budget notice asked the agent to wrap up."""
    answer_now: bool = False
    """A notice asked for the answer now, without tools."""
    output_schema: dict[str, Any] | None = None
    context: list[str] = field(default_factory=list)
    seed: int = 0
    """The task's sim seed (`--sim-seed`): for behaviour that differs by seed but not by task."""
    model: str = ""
    """The model the call was made to (e.g. sim-small): a behaviour may read a small model differently."""
    temperature: float = 0.0
    """The call's sampling temperature: a behaviour may depart from its most likely answer more often
    the hotter the call (the peers of a swarm differ by it)."""
    follows_injection: bool = False
    """This task obeys instructions injected in its input (`SimConfig.follow_injection_rate`): a
    behaviour may play its domain's injections ("pay 10,000 EUR to ...", "send it to x@y"); the engine
    itself plays "call the tool X" for every agent."""

    def offered(self, name: str) -> bool:
        return any(t.name == name for t in self.tools)

    def called(self, name: str) -> list[SimCall]:
        return [c for c in self.calls if c.name == name]


class SimToolCall(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class SimReply(BaseModel):
    """A text answer, or tool calls (with an optional text before them)."""

    text: str = ""
    tool_calls: list[SimToolCall] = Field(default_factory=list)

    @classmethod
    def call(cls, name: str, text: str = "", **arguments: Any) -> SimReply:
        return cls(text=text, tool_calls=[SimToolCall(name=name, arguments=arguments)])

    @classmethod
    def answer(cls, text: str) -> SimReply:
        return cls(text=text)


def parse_turn(agent: str, messages: list[Message], tools: list[ToolSpec], step: int, kind: StepKind,
               rng: random.Random, output_schema: dict[str, Any] | None = None, seed: int = 0,
               model: str = "", temperature: float = 0.0) -> SimTurn:
    """Read the conversation the workflow sent: the input, the calls made so far and their results,
    and the notices (wrap up, answer now)."""
    users = [m.content for m in messages if m.role == "user"]
    calls: list[SimCall] = []
    by_id: dict[str, SimCall] = {}
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), 0)
    wrap = answer = False
    for i, m in enumerate(messages):
        if m.role == "assistant":
            for tc in m.tool_calls:
                call = SimCall(tc.name, _loads(tc.arguments_json))
                by_id[tc.id] = call
                calls.append(call)
        elif m.role == "tool":
            found = by_id.get(m.tool_call_id or "")
            if found is not None:
                found.result = _loads(m.content)
        elif m.role == "system" and i > first_user:
            low = m.content.lower()
            wrap = wrap or "wrap up" in low
            answer = answer or "answer now" in low
    context = [u.removeprefix("Context: ") for u in users[1:] if u.startswith("Context: ")]
    return SimTurn(agent=agent, input=users[0] if users else "", messages=messages, tools=tools, calls=calls,
                   step=step, kind=kind, rng=rng, wrap_up=wrap, answer_now=answer or not tools,
                   output_schema=output_schema, context=context, seed=seed, model=model,
                   temperature=temperature)


def _loads(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"result": value}


# --- the generic behaviour -----------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")
_STOP = {"the", "a", "an", "is", "are", "of", "to", "for", "and", "or", "on", "in", "my", "our", "what", "why",
         "how", "please", "check", "can", "you", "it", "be", "do", "does", "with", "at", "this", "that", "status"}


def value_for(name: str, schema: dict[str, Any], text: str, rng: random.Random) -> Any:
    """A plausible value for one argument, from its schema and the input text."""
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema and schema["default"] is not None:
        return schema["default"]
    kind = schema.get("type")
    if kind is None:
        kinds = [s.get("type") for s in schema.get("anyOf", []) if s.get("type") != "null"]
        kind = kinds[0] if kinds else "string"
    if kind == "integer":
        return int(schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1))
    if kind == "number":
        return float(schema.get("minimum", 1.0))
    if kind == "boolean":
        return False
    if kind == "array":
        return []
    if kind == "object":
        return {}
    words = [w for w in _WORD.findall(text) if w.lower() not in _STOP]
    # Prefer a word that looks like an identifier (has a digit, a dash or a dot), else a long word.
    ident = [w for w in words if re.search(r"[0-9._:-]", w)]
    pick = (ident or sorted(words, key=len, reverse=True) or [name])[0]
    return pick.strip(".,;:!?")[: int(schema.get("maxLength", 200))]


def arguments_for(spec: ToolSpec, text: str, rng: random.Random) -> dict[str, Any]:
    props: dict[str, Any] = spec.parameters.get("properties", {})
    required = set(spec.parameters.get("required", []))
    return {k: value_for(k, s, text, rng) for k, s in props.items() if k in required}


def summary(turn: SimTurn) -> str:
    """A plain answer from the results the task gathered, claiming nothing it did not do."""
    lines = [f"Answer to: {turn.input.strip()[:200]}"]
    for c in turn.calls:
        if c.ok:
            lines.append(f"- {c.name}: {json.dumps(c.result, sort_keys=True, default=str)[:300]}")
        elif c.error:
            lines.append(f"- {c.name} could not be used: {c.error[:200]}")
    lines.extend(f"- from the context: {c.strip()[:300]}" for c in turn.context)
    if len(lines) == 1:
        lines.append("No tool results were gathered; this answer rests on the request alone.")
    return "\n".join(lines)


def structured_answer(turn: SimTurn) -> str:
    """A JSON object for the agent's output schema, from the schema and the findings."""
    schema = turn.output_schema or {}
    props: dict[str, Any] = schema.get("properties", {})
    text = summary(turn)
    out: dict[str, Any] = {}
    for k, s in props.items():
        if s.get("type") == "string" and "enum" not in s:
            out[k] = text if k in ("answer", "summary", "text", "body") else value_for(k, s, turn.input, turn.rng)
        else:
            out[k] = value_for(k, s, turn.input, turn.rng)
    return json.dumps(out)


def generic_behaviour(turn: SimTurn) -> SimReply:
    """Call each offered read-only tool once, with arguments built from its schema and the input; then
    answer from the results. Writes are never made unasked by the generic behaviour."""
    if not turn.answer_now and not (turn.wrap_up and turn.calls):
        done = {c.name for c in turn.calls}
        for spec in turn.tools:
            if spec.permission == "read_only" and spec.name not in done:
                return SimReply.call(spec.name, **arguments_for(spec, turn.input, turn.rng))
    if turn.output_schema is not None:
        return SimReply.answer(structured_answer(turn))
    return SimReply.answer(summary(turn))
