"""Tool calls a model wrote as text instead of calling the tool, read back into tool calls.

Small and self-hosted models often answer a step that offers tools with the call spelled out in the
text, in one of a few common forms, and a server that does not parse them passes the text on as the
model's answer. Taken as the final answer, the task would end without the tool ever running. The LLM
activity reads these forms back (`read_text_tool_calls`) and records the output as repaired:

- Hermes/Qwen: `<tool_call>{"name": "get_account", "arguments": {...}}</tool_call>` (one or more), and
  the same objects inside the `<tools>...</tools>` tag the template lists the tools in;
- OpenAI-style text: `functions.get_account: {...}` or `functions.get_account({...})`, one per line;
- a bare JSON object (alone, or in markdown fences) `{"name": "get_account", "arguments": {...}}`
  (also `"parameters"`), or several one after another (one per line), read only when every name is an
  offered tool or the object is exactly `{"name", "arguments"}` (then an unknown tool is refused as such):
  an agent's structured answer is never taken for a call. Braces doubled as in a prompt
  template (`{{"name": ..., "arguments": {...}}}}`, seen from Qwen2.5-Coder-1.5B) are read as single.

A call in one of the explicit forms whose arguments cannot be read is kept with its raw arguments, so the
agent loop refuses it as invalid JSON: the model is told, and it counts toward escalation, never a final
answer. Pure functions: no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any

from keel.types import ToolCall

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FUNCTIONS = re.compile(r"(?m)^\s*functions\.([A-Za-z_][\w.-]*)\s*(?::|\()\s*(.*?)\)?\s*$")
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)
_TOOLS_TAG = re.compile(r"^\s*<tools>\s*(.*?)\s*(?:</tools>\s*)?$", re.S)


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def _from_object(obj: Any) -> tuple[str, str] | None:
    """(name, arguments JSON) of `{"name": ..., "arguments"|"parameters": {...} or "..."}`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        return obj["name"], args
    return obj["name"], json.dumps(args if args is not None else {})


def _objects(raw: str) -> list[Any] | None:
    """One JSON value, or several written one after another; None if `raw` is not only JSON."""
    one = _loads(raw)
    if one is not None:
        return one if isinstance(one, list) else [one]
    decoder, out, at = json.JSONDecoder(), [], 0
    while at < len(raw):
        try:
            value, at = decoder.raw_decode(raw, at)
        except json.JSONDecodeError:
            return None
        out.append(value)
        while at < len(raw) and raw[at] in " \t\r\n,":
            at += 1
    return out or None


def _call_shaped(obj: Any) -> bool:
    """Exactly `{"name": str, "arguments": {...}}`: a call, even of a tool that is not offered (the loop
    refuses it as an unknown tool, and it counts), never an agent's structured answer."""
    return (isinstance(obj, dict) and set(obj) == {"name", "arguments"} and isinstance(obj["name"], str)
            and isinstance(obj["arguments"], dict))


def _bare_calls(raw: str, offered: set[str] | frozenset[str]) -> list[tuple[str, str]]:
    for candidate in (raw, raw.replace("{{", "{").replace("}}", "}") if raw.startswith("{{") else None):
        items = _objects(candidate) if candidate else None
        if not items:
            continue
        found = [_from_object(o) for o in items]
        if all(f is not None and (f[0] in offered or _call_shaped(o)) for f, o in zip(found, items, strict=True)):
            return [f for f in found if f is not None]
    return []


def read_text_tool_calls(text: str, offered: set[str] | frozenset[str]) -> tuple[list[ToolCall], str]:
    """The tool calls written in `text`, and the form they were written in ("" when none)."""
    calls: list[tuple[str, str]] = []
    form = ""
    if "<tool_call>" in text:
        form = "hermes"
        for raw in _HERMES.findall(text):
            found = _from_object(_loads(raw))
            calls.append(found if found is not None else ("<unreadable tool_call>", raw))
    elif (tagged := _TOOLS_TAG.match(text)) is not None:
        # Qwen's template lists the tools in <tools>...</tools>; a small model answers in that tag.
        calls = _bare_calls(tagged.group(1), offered)
        form = "tools_tag" if calls else ""
    elif _FUNCTIONS.search(text):
        form = "functions"
        for name, raw in _FUNCTIONS.findall(text):
            calls.append((name, raw.strip() or "{}"))
    else:
        stripped = text.strip()
        blocks = _FENCE.findall(stripped)
        only_fences = bool(blocks) and not _FENCE.sub("", stripped).strip()
        calls = _bare_calls("\n".join(b.strip() for b in blocks) if only_fences else stripped, offered)
        form = "json" if calls else ""
    tool_calls = [ToolCall(id=f"text_call_{i}", name=name, arguments_json=args) for i, (name, args) in enumerate(calls)]
    return tool_calls, form if tool_calls else ""
