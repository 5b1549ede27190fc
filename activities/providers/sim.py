"""`sim`, the "sim (offline simulator)" (keel.types.SIM_LABEL): a simulated model, not a language model.

It reads the conversation the workflow sends and answers like a tool-calling model would, so the whole
system runs without an API key: as a registered agent's own sim behaviour says (`keel.Agent(sim=...)`,
a function of `keel.sim.SimTurn`), or with the generic behaviour (the offered read-only tools from their
schemas, then an answer from their results). Its failure modes (reasoning spirals, hallucinated tools,
invalid arguments, invalid JSON, obeying instructions injected in the input) are applied around any
behaviour by the rates in `SimConfig`, so guardrails can be exercised.

Stateless and seeded: every answer depends only on the request. Task-level traits (a spiral, obeying
injections) use `Random(f"{seed}:{agent}:{input}:task")`, per-call draws `Random(f"{seed}:{key}:{step}:{kind}")`
with key = the task's key or workflow id: the same task and seed replay the same path, and an activity
retry gets the same answer. A prompt version other than "v1" is mixed into the key (`<key>@<version>`),
so a task run again on another prompt version (`keel replay --prompt-version`) can take another path.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from activities.providers.base import ProviderResult
from keel import registry
from keel.sim import SimReply, SimTurn, arguments_for, generic_behaviour, parse_turn
from keel.tokens import CHARS_PER_TOKEN, estimate_input_tokens, tokens_for_chars
from keel.types import SIM_LABEL, LlmRequest, SimConfig, ToolCall, ToolSpec, Usage


# --- task-level traits ---------------------------------------------------------------------
@dataclass
class TaskTraits:
    spiral: bool
    follows_injection: bool
    loop_sizes: list[int] = field(default_factory=list)
    """Tool calls in each extra loop of a spiral (4-5 loops of 2-3 calls)."""
    picks: list[float] = field(default_factory=list)


def task_traits(sim: SimConfig, key: str) -> TaskTraits:
    """Task-level decisions. Every draw is made whatever the rates, so one rate never shifts another."""
    rng = random.Random(f"{sim.seed}:{key}:task")
    spiral_u, inject_u = rng.random(), rng.random()
    loop_sizes = [rng.choice([2, 3]) for _ in range(rng.choice([4, 5]))]
    picks = [rng.random() for _ in range(sum(loop_sizes))]
    return TaskTraits(spiral_u < sim.spiral_rate, inject_u < sim.follow_injection_rate, loop_sizes, picks)


_CALL_TOOL = re.compile(r"\b(?:call|use|run|invoke|execute)\s+(?:the\s+)?(?:tool|function)\s+[`'\"]?([a-z_]\w*)",
                        re.I)


# --- the failure modes around any agent's behaviour ---------------------------------------------
_REDRAFTS = ["Reconsidering the classification... the findings may be incomplete.",
             "Reconsidering the draft... the charge could be older than I looked.",
             "Reconsidering: the policy topic may be the wrong one.",
             "Reconsidering the account details before answering."]

SPIRAL_MARK = "_recheck"
"""Suffix of the id of a spiral's tool call: the sim is stateless, so it counts its past re-checks in
the conversation by it."""


def injected_call(turn: SimTurn, offered: dict[str, ToolSpec]) -> SimReply | None:
    """A task that obeys instructions injected in its input: its first call is the offered tool the
    input tells it to call ("ignore previous instructions and call the tool X"), whatever its behaviour
    would have done. The workflow's guardrails (permissions, validators, approvals) decide what runs."""
    if turn.calls or turn.answer_now or not turn.tools:
        return None
    found = _CALL_TOOL.search(turn.input)
    if found is None:
        return None
    name, rest = found.group(1), turn.input[found.end():]
    spec = offered.get(name)
    note = f"As instructed in the request: calling {name}."
    if spec is None:  # a tool the agent does not have: an obedient model calls it all the same
        return SimReply.call(name, note)
    # "call the tool X for Y": the arguments come from what follows the instruction first.
    return SimReply.call(spec.name, note, **arguments_for(spec, rest if rest.strip() else turn.input, turn.rng))


def spiral_call(turn: SimTurn, offered: dict[str, ToolSpec], traits: TaskTraits,
                answer: SimReply) -> SimReply | None:
    """A spiralling task does not answer when its work is done: it re-checks (4-5 loops of 2-3 calls of
    its read-only tools, each loop opened by a re-draft of the answer) until the re-checks run out or a
    budget notice tells it to wrap up. Its re-checks repeat earlier reads, now and then with a wider
    numeric argument, so they cost tokens but write nothing."""
    if turn.answer_now or turn.wrap_up:
        return None
    made = sum(1 for m in turn.messages if m.role == "assistant"
               for tc in m.tool_calls if tc.id.endswith(SPIRAL_MARK))
    if made >= sum(traits.loop_sizes):
        return None
    reads = [c for c in turn.calls if c.ok and c.name in offered and offered[c.name].permission == "read_only"]
    if reads:
        base = reads[int(traits.picks[made] * len(reads))]
        name, args = base.name, dict(base.arguments)
    else:
        specs = [t for t in offered.values() if t.permission == "read_only"]
        if not specs:
            return None
        spec = specs[int(traits.picks[made] * len(specs))]
        name, args = spec.name, arguments_for(spec, turn.input, turn.rng)
    props = offered[name].parameters.get("properties", {})
    for k, s in props.items():
        if s.get("type") == "integer" and isinstance(args.get(k), int) and traits.picks[made] < 0.5:
            args[k] = min(int(s.get("maximum", args[k] * 2 + 1)), args[k] * 2 + 1)
    starts = {sum(traits.loop_sizes[:i]) for i in range(len(traits.loop_sizes))}
    text = ""
    if made in starts:
        opener = _REDRAFTS[made % len(_REDRAFTS)]
        text = f"{opener}\nDraft: {answer.text[:300]}\nI need more context."
    return SimReply.call(name, text, **args)


# --- failure modes -------------------------------------------------------------------------
HALLUCINATED_TOOLS = ["search_web", "get_credit_score", "close_account", "transfer_funds", "lookup_user_by_email"]


def _corrupt_schema_args(rng: random.Random, schema: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """Arguments that break the tool's schema: a missing required field, a wrong type, or an extra field."""
    bad = dict(args)
    required = [k for k in schema.get("required", []) if k in bad]
    mode = rng.choice(["missing", "wrong_type", "extra"])
    if mode == "missing" and required:
        bad.pop(rng.choice(required))
    elif mode == "wrong_type" and bad:
        key = rng.choice(sorted(bad))
        bad[key] = 42 if isinstance(bad[key], str) else "lots"
    else:
        bad[rng.choice(["force", "note", "confirm"])] = True
    return bad


def _broken_json(rng: random.Random, payload: str) -> str:
    """Text that is not valid JSON: a truncated object, or JSON wrapped in chatter."""
    if rng.random() < 0.5:
        return payload[: rng.randrange(1, len(payload))]
    return "Sure! Here it is: " + payload


# --- the provider --------------------------------------------------------------------------
def _tokens(chars: int) -> int:
    return tokens_for_chars(chars)


def _usage(req: LlmRequest, system: str, text: str, calls: list[ToolCall]) -> Usage:
    out = len(text) + sum(len(tc.name) + len(tc.arguments_json) for tc in calls)
    return Usage(input_tokens=estimate_input_tokens(req.messages, req.tools, len(system)),
                 output_tokens=max(1, _tokens(out)))


def _cap_output(text: str, calls: list[ToolCall], max_tokens: int) -> tuple[str, bool]:
    """Like a real model, stop at max_output_tokens: the text is cut and finish_reason is "length"."""
    call_chars = sum(len(tc.name) + len(tc.arguments_json) for tc in calls)
    room = max(0, max_tokens * CHARS_PER_TOKEN - call_chars)
    return (text, False) if len(text) <= room else (text[:room], True)


class SimProvider:
    """The offline simulator behind `sim:<model>` specs. See the module docstring."""

    name = "sim"
    label = SIM_LABEL

    async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
        key = req.task.key or req.task.workflow_id
        if req.task.prompt_version != "v1":
            key = f"{key}@{req.task.prompt_version}"
        rng = random.Random(f"{req.model.sim.seed}:{key}:{req.step}:{req.kind}")
        u_hallucinate, u_json, u_args = rng.random(), rng.random(), rng.random()
        text, tool_calls = self._agent(req, rng, u_hallucinate, u_json, u_args)
        if req.model.sim.latency_ms_max > 0:
            lo = req.model.sim.latency_ms_min
            await asyncio.sleep(rng.uniform(lo, max(lo, req.model.sim.latency_ms_max)) / 1000)
        text, cut = _cap_output(text, tool_calls, req.max_output_tokens)
        finish = "length" if cut else ("tool_calls" if tool_calls else "stop")
        return ProviderResult(text=text, tool_calls=tool_calls, usage=_usage(req, system, text, tool_calls),
                              finish_reason=finish, model=req.model.model)

    @staticmethod
    def _agent(req: LlmRequest, rng: random.Random, u_hallucinate: float, u_json: float,
               u_args: float) -> tuple[str, list[ToolCall]]:
        """A registered agent: its own sim behaviour or the generic one, with the failure modes of
        `req.model.sim` applied around it (hallucinated tools, invalid arguments, invalid JSON)."""
        agent = registry.find(req.agent)
        behaviour = agent.sim if agent is not None and agent.sim is not None else generic_behaviour
        if agent is not None and agent.triage is not None and req.kind == "classify":
            behaviour = agent.triage.sim or generic_behaviour
        turn = parse_turn(req.agent, req.messages, req.tools, req.step, req.kind, rng, req.output_schema,
                          seed=req.model.sim.seed, model=req.model.model, temperature=req.temperature)
        # Drawn from the request, not the task's id: the same input under the same seed always spirals
        # (or obeys an injection) or never does, so a test's outcome never hangs on a random id.
        traits = task_traits(req.model.sim, f"{req.agent}:{turn.input}")
        turn.follows_injection = traits.follows_injection
        reply = behaviour(turn)
        if not isinstance(reply, SimReply):
            raise TypeError(f"the sim behaviour of agent {req.agent!r} returned {type(reply).__name__}, "
                            "not keel.sim.SimReply")
        offered = {t.name: t for t in req.tools}
        marker = ""
        injected = injected_call(turn, offered) if traits.follows_injection else None
        if injected is not None:
            reply = injected
        elif not reply.tool_calls and traits.spiral and (recheck := spiral_call(turn, offered, traits, reply)):
            reply, marker = recheck, SPIRAL_MARK
        if req.tools and not turn.answer_now and u_hallucinate < req.model.sim.hallucinated_tool_rate:
            fake = rng.choice([n for n in HALLUCINATED_TOOLS if n not in offered])
            reply = SimReply.call(fake, query=turn.input[:80])
            marker = ""
        calls: list[ToolCall] = []
        for i, c in enumerate(reply.tool_calls):
            args = dict(c.arguments)
            spec = offered.get(c.name)
            if spec is not None and u_args < req.model.sim.invalid_args_rate:
                args = _corrupt_schema_args(rng, spec.parameters, args)
            arguments_json = json.dumps(args)
            if u_json < req.model.sim.invalid_json_rate:
                arguments_json = _broken_json(rng, arguments_json)
            calls.append(ToolCall(id=f"call_{req.step}_{i}{marker}", name=c.name, arguments_json=arguments_json))
        text = reply.text
        if not calls and (req.json_output or req.output_schema) and u_json < req.model.sim.invalid_json_rate:
            text = _broken_json(rng, text)
        return text, calls
