"""The executor around an agent's tool functions, and the generic workflow's finishing activity.

Each tool of a registered agent runs as its own activity, `<agent>.<tool>`. Around the user's function
the executor validates the arguments again (the workflow already did: a retried or hand-made request
is checked too), records a dry run instead of calling a write, hands the function a `ToolContext`
with the call's idempotency key, turns `keel.ToolError` into a result the model sees, writes the
call's ledger row (an upsert: a retried call rewrites its one row) and traces the call. Any other
exception is retried by Temporal with the tool retry policy; the workflow sees the last failure.

A tool may do any I/O (HTTP, its own database): the ledger row is written after it returns, so a
write tool must be idempotent on `ctx.idempotency_key` itself (as every write in Keel's agents is).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.alerts import TaskObserver
from activities.breaker import UsageReporter
from activities.db import HumanQueueRow, table_of, utcnow
from activities.ledger import Ledger
from activities.llm import with_heartbeats
from activities.tracing import Tracing
from keel import errors
from keel.agent import Agent, Tool, ToolContext
from keel.breaker import UsageReport
from keel.chaos import GARBAGE, hits
from keel.errors import ToolError
from keel.names import FINISH_ACTIVITY
from keel.types import FinishRequest, ToolRequest, ToolResult

_QUEUE = table_of(HumanQueueRow)


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _content(value: Any) -> dict[str, Any]:
    """What a tool returned, as the JSON object the model observes."""
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    return {"result": value}


class AgentToolActivities:
    def __init__(self, ledger: Ledger, tracing: Tracing | None = None) -> None:
        self.ledger = ledger
        self.tracing = tracing or Tracing.off()

    def for_agent(self, agent: Agent) -> list[Callable[..., Any]]:
        return [self._activity(agent, t) for t in agent.tool_map.values()]

    def _activity(self, agent: Agent, t: Tool) -> Callable[..., Any]:
        name = agent.activity_name(t.name)

        async def run(req: ToolRequest) -> ToolResult:
            with self.tracing.tool_span(t.name, req) as span:
                # Heartbeating (when the workflow gave the call a heartbeat timeout): a worker that dies
                # mid-call, or right after a write, has the call retried within seconds, not 30 s.
                result = await with_heartbeats(self.execute(agent, t, req))
                self.tracing.tool_result(span, req, result)
            return result

        run.__name__ = name.replace(".", "__")
        return activity.defn(name=name)(run)

    async def execute(self, agent: Agent, t: Tool, req: ToolRequest) -> ToolResult:
        start = time.perf_counter()
        attempt = activity.info().attempt
        try:
            args = t.args.model_validate(req.arguments)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(arguments)'}: {err['msg']}"
                                 for err in e.errors())
            result = ToolResult(ok=False, error=f"invalid arguments for {t.name}: {problems}",
                                latency_ms=_ms_since(start))
            await self._record(req, t.name, result, attempt)
            raise ApplicationError(result.error or "", type=errors.TOOL_ARGUMENT_ERROR, non_retryable=True) from None
        if req.dry_run and t.writes:
            result = ToolResult(ok=True, content={"dry_run": True, "status": "recorded, not executed (dry run)",
                                                  "tool": t.name, "arguments": args.model_dump(mode="json")},
                                latency_ms=_ms_since(start))
            await self._record(req, t.name, result, attempt)
            return result
        chaos = req.task.chaos
        if chaos is not None:  # a chaos run (keel.chaos): faults injected before the tool runs
            if chaos.tool_latency_ms:
                await asyncio.sleep(chaos.tool_latency_ms / 1000)
            for kind, what in (("tool_timeout", "timed out"), ("tool_error", "failed: backend error")):
                if hits(chaos, kind, req.idempotency_key, attempt, t.name):
                    failed = ToolResult(ok=False, error=f"{t.name} {what} (injected by chaos)",
                                        latency_ms=_ms_since(start))
                    await self._record(req, t.name, failed, attempt)
                    raise ApplicationError(failed.error or "", type=errors.CHAOS_FAULT)
            if hits(chaos, "tool_garbage", req.idempotency_key, attempt):
                garbled = ToolResult(ok=True, content=dict(GARBAGE), latency_ms=_ms_since(start))
                await self._record(req, t.name, garbled, attempt)
                return garbled
        ctx = ToolContext(agent=agent.name, tool=t.name, workflow_id=req.task.workflow_id, step=req.step,
                          idempotency_key=req.idempotency_key, attempt=attempt, tenant=req.task.tenant,
                          key=req.task.key)
        try:
            value = await t.fn(ctx, args) if t.is_async else await asyncio.to_thread(t.fn, ctx, args)
        except ToolError as e:
            result = ToolResult(ok=False, error=str(e) or type(e).__name__, latency_ms=_ms_since(start))
        else:
            result = ToolResult(ok=True, content=_content(value), latency_ms=_ms_since(start))
        await self._record(req, t.name, result, attempt)
        return result

    async def _record(self, req: ToolRequest, name: str, result: ToolResult, attempt: int) -> None:
        if self.ledger.engine.dialect.name == "sqlite":
            self.ledger.record_tool(req, name, result, attempt)  # sub-millisecond: no thread hand-off
        else:
            await asyncio.to_thread(self.ledger.record_tool, req, name, result, attempt)


class FinishActivities:
    """`keel.finish`: a generic task's outcome row, guardrail rows and human-queue item, in one
    transaction, once (the rows are keyed on the workflow id); then metrics, alerts and the breaker."""

    def __init__(self, engine: Engine, ledger: Ledger, reporter: UsageReporter | None = None,
                 observer: TaskObserver | None = None, tracing: Tracing | None = None) -> None:
        self.engine = engine
        self.ledger = ledger
        self.reporter = reporter
        self.observer = observer
        self.tracing = tracing or Tracing.off()

    @activity.defn(name=FINISH_ACTIVITY)
    async def finish(self, req: FinishRequest) -> str | None:
        """Returns the human-queue item's id when the task went to a human."""
        with self.tracing.finish_span(req.task, req.step, req.outcome, req.decisions):
            item = await asyncio.to_thread(self._write, req)
        if self.observer is not None:
            self.observer.task_finished(req.task, req.outcome)
        if req.report_to and self.reporter is not None:
            o = req.outcome
            self.reporter.add(req.report_to, UsageReport(workflow_id=req.task.workflow_id,
                                                         tokens=o.input_tokens + o.output_tokens, cost_usd=o.cost_usd))
        return item

    def _write(self, req: FinishRequest) -> str | None:
        key = f"{req.task.workflow_id}/finish"
        tool_req = ToolRequest(task=req.task, step=req.step, call_id=key, arguments={}, guardrails=req.guardrails,
                               decisions=req.decisions)
        for _ in range(2):
            try:
                with self.engine.begin() as conn:
                    self.ledger.record_outcome(req.task, req.outcome, conn=conn)
                    self.ledger.record_guardrails(tool_req, conn=conn)
                    if req.human_reason is None:
                        return None
                    row = conn.execute(select(_QUEUE.c.id).where(_QUEUE.c.idempotency_key == key)).first()
                    if row is None:
                        row = conn.execute(insert(_QUEUE).values(
                            idempotency_key=key, workflow_id=req.task.workflow_id, tenant=req.task.tenant,
                            reason=req.human_reason[:2000], priority="normal", status="open", created_at=utcnow(),
                        ).returning(_QUEUE.c.id)).first()
                    assert row is not None
                    return f"HQ-{row[0]}"
            except IntegrityError:
                continue  # another attempt of this activity inserted the item first: read it
        raise RuntimeError(f"could not write the outcome of {req.task.workflow_id}")
