"""`keel trace ID`: a task's execution tree in the terminal, from its Temporal history.

Works with or without OpenTelemetry: the history is the trace of record. Every model call (step,
kind, model, tokens, cost, latency, the tools it asked for), every tool call (ok or its error,
latency), the waits for a human (approval timers, signals, updates) and the workflow's decisions with
their reasons (from the result, once the task is done) are drawn in order. Payloads are decoded with
the client's data converter, so an encrypted history reads the same with the keys at hand.

`--content` adds what each model call said (off by default: it may hold personal data): its text as it
came (the raw text, when its tool calls were read from it: the repair is named), its tool calls with
their arguments as written, and why the workflow refused it when it did (an invalid output, a blocked
call, an answer held back); `--full` does not cut long texts and adds the messages each call answered.
Child tasks (the patterns' agents) are drawn nested, their calls' content too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import typer
from pydantic import BaseModel, Field
from rich.markup import escape
from rich.tree import Tree
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from keel.codec import ENCODING, ENV_ENCRYPT, ENV_KEYS
from keel.names import FINISH_ACTIVITY, LLM_ACTIVITY
from keel.pricing import SELF_HOSTED_LABEL, is_self_hosted
from keel.types import (
    Decision,
    FinishRequest,
    LlmRequest,
    LlmResponse,
    ModelSpec,
    ToolRequest,
    ToolResult,
)
from starter.console import client_or_exit, console, err, load_settings

TEXT_SHOWN = 1_500
"""A model call's text (and each message it answered) is cut at this many characters, unless --full."""
REFUSALS = ("invalid_output", "block")
"""Decisions that refuse a model output: shown under the call they refused (with --content)."""
NO_KEYS = (f"content encrypted ({ENV_ENCRYPT}) and this process has no keys: set {ENV_ENCRYPT}=1 and "
           f"{ENV_KEYS} to the keys the workers write with to read it")


def cut(text: str, limit: int | None) -> str:
    """`text`, or its first `limit` characters with a visible marker giving the full length."""
    if limit is None or len(text) <= limit:
        return text
    return f"{text[:limit]}… [cut: {limit:,} of {len(text):,} characters]"


class ShownCall(BaseModel):
    name: str
    arguments: str
    """As the model wrote them (cut at ARGS_SHOWN unless --full; invalid JSON shown as it came)."""


class ShownMessage(BaseModel):
    role: str
    text: str
    """The message's content (cut at TEXT_SHOWN unless --full); a tool result's JSON."""
    chars: int


class CallContent(BaseModel):
    """What one model call said, from the history (`keel trace --content`, `keel replay --content`)."""

    text: str = ""
    """The text as it came (cut at TEXT_SHOWN unless --full): the raw text, repaired or not."""
    chars: int = 0
    """The text's full length."""
    tool_calls: list[ShownCall] = Field(default_factory=list)
    repaired: str = ""
    """How the output was repaired (LlmResponse.repaired): its tool calls were read from the text."""
    refused: list[str] = Field(default_factory=list)
    """The workflow's decisions refusing this output ("invalid_output: the answer is empty", "block: ...")."""
    sent: list[ShownMessage] | None = None
    """--full: the messages the call answered (those after the model's previous turn)."""
    unreadable: str = ""
    """Why the content cannot be shown (encrypted history and no keys, ...)."""


def call_content(req: LlmRequest | None, resp: LlmResponse, full: bool = False) -> CallContent:
    limit = None if full else TEXT_SHOWN
    args_limit = None if full else ARGS_SHOWN
    content = CallContent(text=cut(resp.text, limit), chars=len(resp.text), repaired=resp.repaired,
                          tool_calls=[ShownCall(name=c.name, arguments=cut(c.arguments_json, args_limit))
                                      for c in resp.tool_calls])
    if full and req is not None:
        turn = max((i for i, m in enumerate(req.messages) if m.role == "assistant"), default=-1)
        content.sent = [ShownMessage(role=m.role, text=m.content, chars=len(m.content))
                        for m in req.messages[turn + 1:]]
    return content


def attach_refusals(calls: Iterable[tuple[int | None, CallContent]], decisions: Iterable[Decision]) -> None:
    """Each refusing decision under the last model call at or before its step (a refused tool call or
    answer is decided at its model call's step, or after the calls of the same answer that ran)."""
    ordered = sorted(((s, c) for s, c in calls if s is not None), key=lambda sc: sc[0])
    for d in decisions:
        if d.kind not in REFUSALS:
            continue
        at = [c for s, c in ordered if s <= d.step]
        if at:
            at[-1].refused.append(f"{d.kind}: {d.reason}")


def _unreadable(client: Client, payloads: Sequence[Payload], error: Exception) -> str:
    if client.data_converter.payload_codec is None and any(
            p.metadata.get("encoding") == ENCODING for p in payloads):
        return NO_KEYS
    return f"content unreadable: {error}"


class TraceNode(BaseModel):
    kind: str
    """llm | tool | finish | wait | signal | update | decision | child"""
    step: int | None = None
    name: str
    detail: str = ""
    ok: bool = True
    tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float | None = None
    model: str | None = None
    child: TaskTrace | None = None
    """kind "child": the child workflow's own trace (a multi-agent pattern's agents)."""
    content: CallContent | None = Field(default=None, exclude_if=lambda v: v is None)
    """kind "llm", with --content: what the model said (absent otherwise, in the JSON too)."""


class TaskTrace(BaseModel):
    workflow_id: str
    workflow_type: str
    status: str
    """Temporal's execution status (RUNNING, COMPLETED, ...)."""
    summary: dict[str, Any] | None = None
    """The result's status, usage and decisions (an agent task's, a pattern parent's)."""
    nodes: list[TraceNode] = Field(default_factory=list)
    duration_s: float | None = None


CHILD_DEPTH = 3
ARGS_SHOWN = 300
"""A tool call's arguments are cut at this many characters (a published report is its whole text)."""


TraceNode.model_rebuild()


class TraceError(Exception):
    pass


async def _decode(client: Client, payloads: Sequence[Payload], t: type[BaseModel]) -> Any:
    values = await client.data_converter.decode(list(payloads), [t])
    return values[0] if values else None


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    usage = result.get("usage") or {}
    tokens = result.get("tokens", usage.get("input_tokens", 0) + usage.get("output_tokens", 0))
    out = {"status": result.get("status", "?"), "tokens": tokens,
           "cost_usd": result.get("cost_usd", usage.get("cost_usd", 0.0)),
           "decisions": result.get("decisions") or []}
    if result.get("agent"):  # a KeelAgent task (AgentResult)
        out |= {"agent": result["agent"], "llm_calls": result.get("llm_calls", 0),
                "tools_executed": result.get("tools_executed") or []}
    return out


async def task_trace(client: Client, workflow_id: str, depth: int = 0, *, content: bool = False,
                     full: bool = False) -> TaskTrace:
    """`content`: each model call's text and tool calls (CallContent); `full`: uncut, with the messages sent."""
    handle = client.get_workflow_handle(workflow_id)
    try:
        desc = await handle.describe()
        events = [e async for e in handle.fetch_history_events()]
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise TraceError(f"no task {workflow_id!r}") from e
        raise
    trace = TaskTrace(workflow_id=workflow_id, workflow_type=desc.workflow_type,
                      status=desc.status.name if desc.status else "UNKNOWN")
    scheduled: dict[int, tuple[str, Any]] = {}
    children: dict[int, TraceNode] = {}
    for ev in events:
        t = ev.event_type
        if t == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            a = ev.activity_task_scheduled_event_attributes
            name = a.activity_type.name
            model: type[BaseModel] = (LlmRequest if name == LLM_ACTIVITY else FinishRequest if name == FINISH_ACTIVITY
                                      else ToolRequest)
            try:
                req = await _decode(client, a.input.payloads, model)
            except Exception:
                req = None
            scheduled[ev.event_id] = (name, req)
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            a2 = ev.activity_task_completed_event_attributes
            name, req = scheduled.get(a2.scheduled_event_id, ("?", None))
            trace.nodes.append(await _completed(client, name, req, a2.result.payloads, content, full))
        elif t in (EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED, EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT):
            attrs = (ev.activity_task_failed_event_attributes if t == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
                     else ev.activity_task_timed_out_event_attributes)
            name, req = scheduled.get(attrs.scheduled_event_id, ("?", None))
            step = getattr(req, "step", None)
            msg = attrs.failure.message or "failed"
            trace.nodes.append(TraceNode(kind="llm" if name == LLM_ACTIVITY else "tool", step=step, name=name,
                                         detail=msg, ok=False))
        elif t == EventType.EVENT_TYPE_TIMER_STARTED:
            a3 = ev.timer_started_event_attributes
            secs = a3.start_to_fire_timeout.ToTimedelta().total_seconds()
            trace.nodes.append(TraceNode(kind="wait", name="timer", detail=f"up to {secs:,.0f} s"))
        elif t == EventType.EVENT_TYPE_TIMER_FIRED:
            trace.nodes.append(TraceNode(kind="wait", name="timer fired", ok=False))
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            a4 = ev.workflow_execution_signaled_event_attributes
            trace.nodes.append(TraceNode(kind="signal", name=a4.signal_name, detail=a4.identity))
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            a5 = ev.workflow_execution_update_accepted_event_attributes
            trace.nodes.append(TraceNode(kind="update", name=a5.accepted_request.input.name))
        elif t == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED:
            c = ev.child_workflow_execution_started_event_attributes
            node = TraceNode(kind="child", name=c.workflow_type.name, detail=c.workflow_execution.workflow_id)
            children[c.initiated_event_id] = node
            trace.nodes.append(node)
        elif t in (EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED,
                   EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT,
                   EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TERMINATED):
            f = (ev.child_workflow_execution_failed_event_attributes
                 if t == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED else None)
            initiated = (f.initiated_event_id if f is not None
                         else ev.child_workflow_execution_timed_out_event_attributes.initiated_event_id
                         if t == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT
                         else ev.child_workflow_execution_terminated_event_attributes.initiated_event_id)
            if (failed := children.get(initiated)) is not None:
                failed.ok = False
                failed.detail += f" -> {f.failure.message if f is not None else 'timed out or terminated'}"
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            payloads = ev.workflow_execution_completed_event_attributes.result.payloads
            try:
                decoded = (await client.data_converter.decode(list(payloads), [dict]))[0]
                trace.summary = _summary(decoded) if isinstance(decoded, dict) else None
            except Exception:
                trace.summary = None
    if events:
        trace.duration_s = (events[-1].event_time.ToDatetime() - events[0].event_time.ToDatetime()).total_seconds()
    if depth < CHILD_DEPTH:
        for node in children.values():
            with contextlib.suppress(TraceError, RPCError):
                node.child = await task_trace(client, node.detail.split(" -> ")[0], depth + 1, content=content,
                                              full=full)
    if trace.summary is not None:
        decisions = [Decision.model_validate(d) for d in trace.summary.get("decisions", [])]
        attach_refusals(((n.step, n.content) for n in trace.nodes if n.content is not None), decisions)
        trace.nodes = _with_decisions(trace.nodes, decisions)
    return trace


async def _completed(client: Client, name: str, req: Any, payloads: Sequence[Payload], content: bool = False,
                     full: bool = False) -> TraceNode:
    if name == FINISH_ACTIVITY:
        # A KeelAgent task's last step: its outcome row (and human-queue item) written to the ledger.
        detail = ""
        if isinstance(req, FinishRequest):
            o = req.outcome
            detail = f"outcome {o.status} -> {o.route}" + (
                f"; to the human queue: {req.human_reason}" if req.human_reason else "")
        return TraceNode(kind="finish", step=getattr(req, "step", None), name="finish", detail=detail)
    if name == LLM_ACTIVITY:
        resp: LlmResponse | None = None
        said: CallContent | None = None
        try:
            resp = await _decode(client, payloads, LlmResponse)
        except Exception as e:
            resp = None
            said = CallContent(unreadable=_unreadable(client, payloads, e))
        if content and resp is not None:
            said = call_content(req if isinstance(req, LlmRequest) else None, resp, full)
        label = None
        if resp is not None:  # marked self-hosted as the sim's label marks a simulator (the task's pinned price first)
            spec = ModelSpec.model_validate({"provider": resp.provider, "model": resp.model})
            pinned = getattr(req, "price", None)
            hosted = pinned.self_hosted if pinned is not None else is_self_hosted(spec.provider, spec.model)
            label = f"{spec.label} [{SELF_HOSTED_LABEL}]" if hosted else spec.label
        asked = ", ".join(c.name for c in resp.tool_calls) if resp and resp.tool_calls else ""
        detail = f"{req.kind} ({req.tier}), prompt {req.prompt}@{resp.prompt_version}" if req and resp else ""
        if asked:
            detail += f" -> asks for {asked}"
        return TraceNode(kind="llm", step=getattr(req, "step", None), name=getattr(req, "kind", "llm"),
                         detail=detail, model=label, tokens=resp.usage.total_tokens if resp else 0,
                         cost_usd=resp.cost_usd if resp else 0.0, latency_ms=resp.latency_ms if resp else None,
                         content=said if content else None)
    result: ToolResult | None = None
    try:
        result = await _decode(client, payloads, ToolResult)
    except Exception:
        result = None
    args = json.dumps(req.arguments, sort_keys=True) if isinstance(req, ToolRequest) else ""
    if len(args) > ARGS_SHOWN:
        args = args[:ARGS_SHOWN] + f"... ({len(args):,} characters)"
    ok = result.ok if result else True
    detail = args if ok else f"{args} -> {result.error if result else 'failed'}"
    return TraceNode(kind="tool", step=getattr(req, "step", None), name=name, detail=detail, ok=ok,
                     latency_ms=result.latency_ms if result else None)


def _with_decisions(nodes: list[TraceNode], decisions: Sequence[Decision]) -> list[TraceNode]:
    """Each decision right after the last call of its step (or of an earlier step)."""
    out: list[TraceNode] = []
    pending = sorted(decisions, key=lambda d: d.step)
    for n in nodes:
        if n.step is not None:
            while pending and pending[0].step < n.step:
                d = pending.pop(0)
                out.append(TraceNode(kind="decision", step=d.step, name=d.kind, detail=d.reason))
        out.append(n)
    out += [TraceNode(kind="decision", step=d.step, name=d.kind, detail=d.reason) for d in pending]
    return out


def _head(t: TaskTrace) -> str:
    head = f"[bold]{escape(t.workflow_id)}[/bold]  {t.workflow_type}  {t.status}"
    if t.summary is not None:
        s = t.summary
        if s.get("agent"):
            head += f"  agent {escape(str(s['agent']))}"
        head += f"  {s['status']}  {s['tokens']:,} tokens  ${s['cost_usd']:.5f}"
        if s.get("agent"):
            head += f"  {s.get('llm_calls', 0)} LLM calls, {len(s.get('tools_executed') or [])} tools"
    if t.duration_s is not None:
        head += f"  {t.duration_s:.2f} s"
    return head


def render(t: TaskTrace, tree: Tree | None = None) -> Tree:
    tree = Tree(_head(t)) if tree is None else tree
    for n in t.nodes:
        step = f"step {n.step:>2}  " if n.step is not None else "         "
        lat = f"  {n.latency_ms:,.0f} ms" if n.latency_ms is not None else ""
        if n.kind == "llm":
            line = (f"{step}[cyan]llm[/cyan] {escape(n.name)}  {escape(n.model or '')}  {n.tokens:,} tokens"
                    f"  ${n.cost_usd:.5f}{lat}  [dim]{escape(n.detail)}[/dim]")
            if n.content is not None:
                render_content(n.content, tree.add(line))
                continue
        elif n.kind == "tool":
            mark = "[green]ok[/green]" if n.ok else "[red]failed[/red]"
            line = f"{step}[magenta]tool[/magenta] {escape(n.name)} {mark}{lat}  [dim]{escape(n.detail)}[/dim]"
        elif n.kind == "decision":
            line = f"{step}[yellow]decision[/yellow] {escape(n.name)}: {escape(n.detail)}"
        elif n.kind == "finish":
            line = f"{step}[green]finish[/green]  [dim]{escape(n.detail)}[/dim]"
        elif n.kind == "child":
            mark = "" if n.ok else "  [red]failed[/red]"
            sub = tree.add(f"[green]child[/green] {escape(n.name)}{mark}  " + (
                _head(n.child) if n.child is not None else escape(n.detail)))
            if n.child is not None:
                render(n.child, sub)
            continue
        else:
            line = f"{step}[blue]{n.kind}[/blue] {escape(n.name)} {escape(n.detail)}"
        tree.add(line)
    if t.summary is None and t.status == "RUNNING":
        tree.add("[dim](running: decisions appear when the task completes; `keel status ID` shows progress)[/dim]")
    return tree


def content_lines(c: CallContent) -> list[str]:
    """A model call's content as markup lines (the trace's sub-tree, a what-if table's cell)."""
    if c.unreadable:
        return [f"[yellow]{escape(c.unreadable)}[/yellow]"]
    out = [f"[dim]sent ({escape(m.role)}, {m.chars:,} characters):[/dim] {escape(m.text)}" for m in c.sent or []]
    if c.repaired:
        out.append(f"[yellow]repaired:[/yellow] {escape(c.repaired)}; the raw text:")
    if c.text or not c.tool_calls:
        out.append(f"[green]said[/green] ({c.chars:,} characters): {escape(c.text)}" if c.text
                   else "[green]said[/green] nothing (empty text)")
    out += [f"[magenta]calls[/magenta] {escape(t.name)} {escape(t.arguments)}" for t in c.tool_calls]
    out += [f"[red]refused[/red] {escape(r)}" for r in c.refused]
    return out


def render_content(c: CallContent, node: Tree) -> None:
    for line in content_lines(c):
        node.add(line)


def trace_cmd(
    workflow_id: Annotated[str, typer.Argument(help="The task's workflow id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the tree as JSON.")] = False,
    content: Annotated[bool, typer.Option(
        "--content", help="Show what each model call said: its text (raw, as it came) and tool calls, and why "
                          "a refused one was refused. Off by default: it may hold personal data.")] = False,
    full: Annotated[bool, typer.Option(
        "--full", help=f"With --content: texts not cut (at {TEXT_SHOWN:,} characters), and the messages each "
                       "call answered.")] = False,
) -> None:
    """Draw a task's execution tree: steps, model and tool calls, waits, decisions and their reasons."""
    settings = load_settings()
    if full and not content:
        err.print("[red]--full shows more of the content: use it with --content[/red]")
        raise typer.Exit(2)

    async def run() -> TaskTrace:
        return await task_trace(await client_or_exit(settings), workflow_id, content=content, full=full)

    try:
        t = asyncio.run(run())
    except TraceError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e
    if as_json:
        print(t.model_dump_json(indent=2))
    else:
        console.print(render(t))
