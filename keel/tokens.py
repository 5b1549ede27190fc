"""Token estimates without a tokenizer (tiktoken downloads its tables at run time; none offline).

Four characters a token: the sim model counts exactly this way, so for it the estimate is exact;
for real models it is an approximation, and the budget keeps a margin (see workflows/budget.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from keel.types import Message, ToolSpec

CHARS_PER_TOKEN = 4
SYSTEM_PROMPT_ALLOWANCE_CHARS = 2_400
"""What the workflow reserves for the system prompt it does not see (the activity adds it); the LLM
activity re-checks with the real prompt."""


def tokens_for_chars(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


_SPEC_CHARS: dict[int, tuple[ToolSpec, int]] = {}
_SPEC_CHARS_MAX = 256


def _spec_chars(t: ToolSpec) -> int:
    """len(json.dumps(t.model_dump())), remembered per spec object: the specs a task sends are the
    same cached objects on every call (keel.tools.ToolDef.spec). The entry holds the object, so its id
    cannot be reused while the entry exists. Pure: the same number as computing it every time."""
    hit = _SPEC_CHARS.get(id(t))
    if hit is not None and hit[0] is t:
        return hit[1]
    n = len(json.dumps(t.model_dump()))
    if len(_SPEC_CHARS) >= _SPEC_CHARS_MAX:
        _SPEC_CHARS.clear()
    _SPEC_CHARS[id(t)] = (t, n)
    return n


def request_chars(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> int:
    chars = sum(len(m.content) + sum(len(tc.arguments_json) for tc in m.tool_calls) for m in messages)
    if tools:
        # == len(json.dumps([t.model_dump() for t in tools])): "[" + items joined by ", " + "]"
        chars += 2 + 2 * (len(tools) - 1) + sum(_spec_chars(t) for t in tools)
    return chars


def estimate_input_tokens(
    messages: Sequence[Message], tools: Sequence[ToolSpec], system_chars: int | None = None
) -> int:
    system = SYSTEM_PROMPT_ALLOWANCE_CHARS if system_chars is None else system_chars
    return tokens_for_chars(system + request_chars(messages, tools))
