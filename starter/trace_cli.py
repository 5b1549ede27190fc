"""`keel trace ID`: a task's execution tree in the terminal, from its Temporal history.

Works with or without OpenTelemetry: the history is the trace of record. Every model call (step,
kind, model, tokens, cost, latency, the tools it asked for), every tool call (ok or its error,
latency), the waits for a human (approval timers, signals, updates) and the workflow's decisions with
their reasons (from the result, once the task is done) are drawn in order. Payloads are decoded with
the client's data converter, so an encrypted history reads the same with the keys at hand.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from pydantic import BaseModel, Field
from rich.markup import escape
from rich.tree import Tree
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from core.names import LLM_ACTIVITY
from core.types import Decision, LlmRequest, LlmResponse, ModelSpec, TicketResult, ToolRequest, ToolResult
from starter.console import client_or_exit, console, err, load_settings


class TraceNode(BaseModel):
    kind: str
    """llm | tool | wait | signal | update | decision"""
    step: int | None = None
    name: str
    detail: str = ""
    ok: bool = True
    tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float | None = None
    model: str | None = None


class TaskTrace(BaseModel):
    workflow_id: str
    workflow_type: str
    status: str
    """Temporal's execution status (RUNNING, COMPLETED, ...)."""
    result: TicketResult | None = None
    nodes: list[TraceNode] = Field(default_factory=list)
    duration_s: float | None = None


class TraceError(Exception):
    pass


async def _decode(client: Client, payloads: Sequence[Payload], t: type[BaseModel]) -> Any:
    values = await client.data_converter.decode(list(payloads), [t])
    return values[0] if values else None


async def task_trace(client: Client, workflow_id: str) -> TaskTrace:
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
    for ev in events:
        t = ev.event_type
        if t == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            a = ev.activity_task_scheduled_event_attributes
            name = a.activity_type.name
            model: type[BaseModel] = LlmRequest if name == LLM_ACTIVITY else ToolRequest
            try:
                req = await _decode(client, a.input.payloads, model)
            except Exception:
                req = None
            scheduled[ev.event_id] = (name, req)
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            a2 = ev.activity_task_completed_event_attributes
            name, req = scheduled.get(a2.scheduled_event_id, ("?", None))
            trace.nodes.append(await _completed(client, name, req, a2.result.payloads))
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
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            try:
                trace.result = await _decode(client, ev.workflow_execution_completed_event_attributes.result.payloads,
                                             TicketResult)
            except Exception:
                trace.result = None
    if events:
        trace.duration_s = (events[-1].event_time.ToDatetime() - events[0].event_time.ToDatetime()).total_seconds()
    if trace.result is not None:
        trace.nodes = _with_decisions(trace.nodes, trace.result.decisions)
    return trace


async def _completed(client: Client, name: str, req: Any, payloads: Sequence[Payload]) -> TraceNode:
    if name == LLM_ACTIVITY:
        resp: LlmResponse | None = None
        try:
            resp = await _decode(client, payloads, LlmResponse)
        except Exception:
            resp = None
        label = ModelSpec.model_validate({"provider": resp.provider, "model": resp.model}).label if resp else None
        asked = ", ".join(c.name for c in resp.tool_calls) if resp and resp.tool_calls else ""
        detail = f"{req.kind} ({req.tier}), prompt {req.prompt}@{resp.prompt_version}" if req and resp else ""
        if asked:
            detail += f" -> asks for {asked}"
        return TraceNode(kind="llm", step=getattr(req, "step", None), name=getattr(req, "kind", "llm"),
                         detail=detail, model=label, tokens=resp.usage.total_tokens if resp else 0,
                         cost_usd=resp.cost_usd if resp else 0.0, latency_ms=resp.latency_ms if resp else None)
    result: ToolResult | None = None
    try:
        result = await _decode(client, payloads, ToolResult)
    except Exception:
        result = None
    args = json.dumps(req.arguments, sort_keys=True) if isinstance(req, ToolRequest) else ""
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


def render(t: TaskTrace) -> Tree:
    head = f"[bold]{t.workflow_id}[/bold]  {t.workflow_type}  {t.status}"
    if t.result is not None:
        r = t.result
        head += (f"  {r.status} -> {r.route}  {r.tokens:,} tokens  ${r.cost_usd:.5f}"
                 f"  {r.llm_calls} LLM calls, {len(r.tools_executed)} tools")
    if t.duration_s is not None:
        head += f"  {t.duration_s:.2f} s"
    tree = Tree(head)
    for n in t.nodes:
        step = f"step {n.step:>2}  " if n.step is not None else "         "
        lat = f"  {n.latency_ms:,.0f} ms" if n.latency_ms is not None else ""
        if n.kind == "llm":
            line = (f"{step}[cyan]llm[/cyan] {escape(n.name)}  {escape(n.model or '')}  {n.tokens:,} tokens"
                    f"  ${n.cost_usd:.5f}{lat}  [dim]{escape(n.detail)}[/dim]")
        elif n.kind == "tool":
            mark = "[green]ok[/green]" if n.ok else "[red]failed[/red]"
            line = f"{step}[magenta]tool[/magenta] {escape(n.name)} {mark}{lat}  [dim]{escape(n.detail)}[/dim]"
        elif n.kind == "decision":
            line = f"{step}[yellow]decision[/yellow] {escape(n.name)}: {escape(n.detail)}"
        else:
            line = f"{step}[blue]{n.kind}[/blue] {escape(n.name)} {escape(n.detail)}"
        tree.add(line)
    if t.result is None and t.status == "RUNNING":
        tree.add("[dim](running: decisions appear when the task completes; `keel status ID` shows progress)[/dim]")
    return tree


def trace_cmd(
    workflow_id: Annotated[str, typer.Argument(help="The task's workflow id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the tree as JSON.")] = False,
) -> None:
    """Draw a task's execution tree: steps, model and tool calls, waits, decisions and their reasons."""
    settings = load_settings()

    async def run() -> TaskTrace:
        return await task_trace(await client_or_exit(settings), workflow_id)

    try:
        t = asyncio.run(run())
    except TraceError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e
    if as_json:
        print(t.model_dump_json(indent=2))
    else:
        console.print(render(t))
