"""Replay and inspection: `keel replay ID`, `keel history export ID`, `keel prompts list|diff`.

- Replay: a task's history, fetched from Temporal, replayed with the Replayer against today's workflow
  code (the worker's sandbox, the client's data converter, so an encrypted history replays with the
  keys at hand). A divergence is reported with the nondeterminism message and the first diverging
  event, found by replaying the history cut after each workflow task (a bisection). A KeelAgent (or
  orchestrator) history runs its agents' definitions: `--agents MODULES` (and KEEL_AGENTS) loads them
  into this process first, as `keel worker --agents` does; a replay that fails for want of one says so.
- Export: the history as JSON, exactly as tests/histories/ holds it (CI replays every file there).
- What-if (`keel replay ID --prompt-version V` / `--model provider:model`): the task run again in this
  process, without Temporal, on the same input with the prompt version or models replaced. A KeelAgent
  task (any registered agent: `--agents MODULES` or KEEL_AGENTS loads it, as for replay) goes through
  the agent workflow's own steps (AgentWorkflow.make_runner and run_task: triage, the tool loop, the
  answer and output checks). Model calls are real (the LLM
  activity, its ledger rows under a workflow id of their own, feature "what-if"); tool calls are served
  from the results recorded in the original history (same tool, same arguments), a `confirm` call gets
  the approval decision recorded for it, and a call that was never recorded is answered "not
  executed": a what-if never runs a tool, read or write. The report sets the old and new runs side by
  side (path, status, tools, tokens and cost, the answer) and lists the calls not executed; with
  `--content`, what the model said at each call of both runs, side by side (off by default: personal data).
- Prompts: the loaded agents' prompt versions with their content hashes (the ones stamped on every
  ledger row), and a unified diff between two of them.

The functions are testable without the command line; the commands only print.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import json
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cache, partial
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, Field
from rich import box
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.workflow import NondeterminismError

from keel import names, registry
from keel.agent import Agent
from keel.errors import AgentDefinitionError
from keel.pricing import UnpricedModelError, price_for, user_prices
from keel.settings import KeelSettings
from keel.types import (
    AgentInput,
    AgentResult,
    AgentStatus,
    ApprovalDecision,
    ApprovalRecord,
    LlmRequest,
    LlmResponse,
    ModelSpec,
    PendingAction,
    Tier,
    ToolRequest,
    ToolResult,
)
from starter.console import client_or_exit, console, err, load_settings
from starter.trace_cli import CallContent, attach_refusals, call_content, content_lines

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from temporalio.runtime import Runtime
    from temporalio.worker import Replayer

    from activities.llm import LlmActivities
    from activities.providers.base import Provider
    from workflows.agent_loop import AgentRunner

M = TypeVar("M", bound=BaseModel)
LlmFactory = Callable[[], contextlib.AbstractContextManager["LlmActivities"]]

NOT_RECORDED = "not recorded in the original run: not executed (what-if replay has no side effects)"
WHAT_IF_FEATURE = "what-if"


class InspectError(Exception):
    """A task or prompt that cannot be inspected (not found, its agent not loaded, bad arguments); says why."""


# -- history ----------------------------------------------------------------------------------------------


async def fetch_history(client: Client, workflow_id: str) -> WorkflowHistory:
    try:
        return await client.get_workflow_handle(workflow_id).fetch_history()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise InspectError(f"no workflow {workflow_id!r} in namespace {client.namespace!r}") from e
        raise


async def export_history(client: Client, workflow_id: str, out: Path | None = None) -> tuple[Path, int]:
    """Write the history as tests/histories/ holds it (`WorkflowHistory.to_json()`); (path, events)."""
    history = await fetch_history(client, workflow_id)
    path = out or Path(f"{workflow_id}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(history.to_json(), encoding="utf-8")
    return path, len(history.events)


def _event_type(e: HistoryEvent) -> str:
    """`ActivityTaskScheduled` for EVENT_TYPE_ACTIVITY_TASK_SCHEDULED."""
    raw = EventType.Name(e.event_type).removeprefix("EVENT_TYPE_")
    return "".join(w.capitalize() for w in raw.split("_"))


# -- replay -----------------------------------------------------------------------------------------------


class ReplayReport(BaseModel):
    workflow_id: str
    events: int
    ok: bool
    error: str | None = None
    """The replay failure (for a divergence, the nondeterminism message)."""
    error_type: str | None = None
    event_id: int | None = None
    """The first event the code no longer matches (or the first event of the diverging workflow task)."""
    event_type: str | None = None
    event_detail: str | None = None


@cache
def _quiet_runtime() -> Runtime:
    from temporalio.runtime import Runtime, TelemetryConfig

    return Runtime(telemetry=TelemetryConfig(logging=None))


def make_replayer(data_converter: DataConverter) -> Replayer:
    """The worker's workflows, in the strict sandbox (the modules imported afresh and checked, see
    workers.worker). On a runtime of its own without core logging: a divergence is reported here, once,
    instead of as a "Failing workflow task" warning per replay of the bisection."""
    from temporalio.worker import Replayer

    from workers.worker import STRICT_SANDBOX
    from workflows.registry import WORKFLOWS

    return Replayer(workflows=WORKFLOWS, data_converter=data_converter, workflow_runner=STRICT_SANDBOX,
                    runtime=_quiet_runtime())


def _failure_message(exc: BaseException) -> str:
    """The core's message inside a NondeterminismError ("[TMPRL1100] Nondeterminism error: ...")."""
    text = str(exc)
    m = re.search(r'message: "((?:[^"\\]|\\.)*)"', text)
    return m.group(1).replace('\\"', '"').replace("\\'", "'") if m else text


async def _fails(replayer: Replayer, history: WorkflowHistory, cut: int) -> bool:
    part = WorkflowHistory(history.workflow_id, list(history.events[:cut]))
    res = await replayer.replay_workflow(part, raise_on_replay_failure=False)
    return res.replay_failure is not None


def _event_detail(e: HistoryEvent) -> str:
    t = e.event_type
    if t == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
        return f"activity {e.activity_task_scheduled_event_attributes.activity_type.name}"
    if t == EventType.EVENT_TYPE_TIMER_STARTED:
        return f"timer {e.timer_started_event_attributes.timer_id}"
    if t == EventType.EVENT_TYPE_MARKER_RECORDED:
        return f"marker {e.marker_recorded_event_attributes.marker_name}"
    if t == EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED:
        return f"signal {e.signal_external_workflow_execution_initiated_event_attributes.signal_name}"
    return ""


async def _divergent_event(replayer: Replayer, history: WorkflowHistory, message: str) -> HistoryEvent | None:
    """The first event the code diverges from. Histories cut right after a workflow task started are
    what a worker is handed; the first such cut that fails replay holds the diverging workflow task,
    whose commands are the events after its WorkflowTaskCompleted. Bisection: log2(tasks) replays."""
    events = history.events
    cuts = [i + 1 for i, e in enumerate(events) if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED]
    lo, hi = 0, len(cuts)  # cuts[:lo] replay cleanly; cuts[hi:] fail (the whole history fails)
    while lo < hi:
        mid = (lo + hi) // 2
        if await _fails(replayer, history, cuts[mid]):
            hi = mid
        else:
            lo = mid + 1
    start = cuts[lo - 1] if lo > 0 else 0
    end = cuts[lo] if lo < len(cuts) else len(events)
    window = list(events[start:end])
    done = next((i for i, e in enumerate(window) if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED),
                None)
    commands = window[done + 1:] if done is not None else window
    named = set(re.findall(r"'([^']+)'", message))
    for e in commands:
        detail = _event_detail(e)
        if detail and detail.split(" ", 1)[1] in named:
            return e
    return next((e for e in commands if _event_detail(e)), commands[0] if commands else None)


def load_agents(settings: KeelSettings, modules: str = "") -> list[str]:
    """Register in this process the agents of KEEL_AGENTS and of `modules` (comma-separated), as
    `keel worker --agents` does; their names."""
    wanted = [m for m in [*settings.agents.split(","), *modules.split(",")] if m.strip()]
    try:
        return [a.name for a in registry.load(wanted)]
    except AgentDefinitionError as e:
        raise InspectError(str(e)) from e


async def agents_needed(history: WorkflowHistory, dc: DataConverter) -> list[str]:
    """The agents whose definitions replaying `history` runs: a KeelAgent task's agent, an orchestrator's
    planner, tasks and synthesizer ([] for other workflows, or an input that cannot be decoded)."""
    events = history.events
    if not events or events[0].event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
        return []
    started = events[0].workflow_execution_started_event_attributes
    kind = started.workflow_type.name
    if kind not in (names.AGENT_WORKFLOW, names.ORCHESTRATOR_WORKFLOW):
        return []
    try:
        inp = (await dc.decode(list(started.input.payloads), [dict]))[0]
    except Exception:
        return []  # the replay itself reports an input it cannot decode
    if not isinstance(inp, dict):
        return []
    found = [inp.get("agent"), inp.get("planner"), *(t.get("agent") for t in inp.get("tasks") or []
                                                      if isinstance(t, dict)), inp.get("synthesizer")]
    return list(dict.fromkeys(a for a in found if isinstance(a, str) and a))


async def replay_history(history: WorkflowHistory, data_converter: DataConverter) -> ReplayReport:
    """Replay against today's workflow code; on failure, the message and the first diverging event.
    A failure of a history whose agents are not registered in this process is an InspectError that
    names them (`--agents`), not a divergence."""
    replayer = make_replayer(data_converter)
    res = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    report = ReplayReport(workflow_id=history.workflow_id, events=len(history.events), ok=res.replay_failure is None)
    if res.replay_failure is None:
        return report
    missing = [a for a in await agents_needed(history, data_converter) if registry.find(a) is None]
    if missing:
        listed = ", ".join(repr(a) for a in missing)
        raise InspectError(f"{history.workflow_id!r} runs agent {listed}, not loaded in this process: replaying it "
                           "needs the agent's definition, as its worker has it; pass --agents MODULES (e.g. "
                           "--agents agents.oncall) or set KEEL_AGENTS")
    report.error = _failure_message(res.replay_failure)
    report.error_type = type(res.replay_failure).__name__
    if not isinstance(res.replay_failure, NondeterminismError):
        return report  # e.g. a payload that cannot be decoded: no event to point at
    event = await _divergent_event(replayer, history, report.error)
    if event is not None:
        report.event_id, report.event_type = event.event_id, _event_type(event)
        report.event_detail = _event_detail(event) or None
    return report


async def replay_workflow(client: Client, workflow_id: str) -> ReplayReport:
    return await replay_history(await fetch_history(client, workflow_id), client.data_converter)


# -- what-if ----------------------------------------------------------------------------------------------


class PathStep(BaseModel):
    step: int
    kind: str
    """The model call's step kind (classify, route, draft, reason, ...), or "tool"."""
    name: str
    """The step kind, or the tool's name."""
    model: str = ""
    tokens: int = 0
    tool_calls: list[str] = Field(default_factory=list)
    """The tools the model asked for."""
    ok: bool = True
    note: str = ""
    content: CallContent | None = Field(default=None, exclude=True)
    """A model call's: what the model said (shown with --content only)."""

    @property
    def label(self) -> str:
        if self.kind == "tool":
            return f"tool {self.name}"
        return self.name + (" -> " + ", ".join(self.tool_calls) if self.tool_calls else "")


class RunSummary(BaseModel):
    workflow_id: str
    status: str
    agent: str | None = None
    """The task's agent."""
    route: str | None = None
    category: str | None = None
    reason: str = ""
    answer: str = ""
    """The answer as it left the task (the agent's output), or the partial output of
    one that was stopped or held back."""
    tokens: int = 0
    cost_usd: float = 0.0
    prompt_version: str = "v1"
    models: list[str] = Field(default_factory=list)
    tools_executed: list[str] = Field(default_factory=list)
    steps: list[PathStep] = Field(default_factory=list)

    @property
    def path(self) -> list[str]:
        return [s.label for s in self.steps]


class WhatIfReport(BaseModel):
    workflow_id: str
    whatif_workflow_id: str
    changes: dict[str, tuple[str, str]]
    """What was replaced: {"prompt_version": (old, new), "small_model": ..., "large_model": ...}."""
    old: RunSummary
    new: RunSummary
    not_executed: list[str] = Field(default_factory=list)
    """Tool calls of the what-if run with no recorded result (not executed)."""
    notes: list[str] = Field(default_factory=list)

    @property
    def same_path(self) -> bool:
        return self.old.path == self.new.path

    @property
    def first_difference(self) -> int | None:
        """Index (0-based) of the first step where the paths differ, or None."""
        for i, (a, b) in enumerate(zip_longest(self.old.path, self.new.path)):
            if a != b:
                return i
        return None

    def to_json(self, content: bool = False) -> dict[str, Any]:
        """`content`: each model call's step with what the model said (`content`), as `keel trace --content`."""
        out = {**self.model_dump(mode="json"), "same_path": self.same_path}
        if content:
            for run, summary in (("old", self.old), ("new", self.new)):
                for step, s in zip(out[run]["steps"], summary.steps, strict=True):
                    if s.content is not None:
                        step["content"] = s.content.model_dump(mode="json")
        return out


def tool_key(name: str, arguments: dict[str, Any]) -> str:
    """A tool call's identity: its name and the canonical JSON of its arguments."""
    return f"{name}:{json.dumps(arguments, sort_keys=True, separators=(',', ':'), default=str)}"


class Recording(BaseModel):
    """What a task's history recorded (a KeelAgent task): its input, every model and tool
    call, approval decisions, the result."""

    workflow_id: str
    input: AgentInput
    tool_names: dict[str, str] = Field(default_factory=dict)
    """The task's tool activities: activity name -> tool name (`oncall.service_status` -> `service_status`)."""
    steps: list[PathStep] = Field(default_factory=list)
    tools: list[tuple[str, ToolResult]] = Field(default_factory=list)
    """(tool_key, result) of every completed tool call, in order."""
    decisions: list[ApprovalDecision] = Field(default_factory=list)
    """Approval decisions sent to the task (signals and accepted updates), in order."""
    result: AgentResult | None = None
    close_status: str = "Running"


async def _decode(dc: DataConverter, payloads: Sequence[Payload], t: type[M]) -> M:
    values = await dc.decode(list(payloads), [t])
    if not values or not isinstance(values[0], t):
        raise InspectError(f"the history holds no {t.__name__} where one was expected")
    return values[0]


def _not_loaded(workflow_id: str, agent: str) -> InspectError:
    return InspectError(f"{workflow_id!r} runs agent {agent!r}, not loaded in this process: a what-if re-runs the "
                        "agent's definition (its loop, tools and prompts), as its worker has it; pass --agents "
                        "MODULES (e.g. --agents agents.oncall) or set KEEL_AGENTS")


async def read_recording(history: WorkflowHistory, dc: DataConverter) -> Recording:
    """Decode a KeelAgent history (with the client's data converter: encrypted payloads need the keys).
    The task's agent must be registered in this process (its tools' names)."""
    events = list(history.events)
    if not events or events[0].event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
        raise InspectError(f"the history of {history.workflow_id!r} does not start with the workflow's start")
    started = events[0].workflow_execution_started_event_attributes
    kind = started.workflow_type.name
    if kind != names.AGENT_WORKFLOW:
        raise InspectError(f"{history.workflow_id!r} is a {kind} workflow; what-if replay runs "
                           f"{names.AGENT_WORKFLOW} tasks (any registered agent)")
    try:
        inp = await _decode(dc, started.input.payloads, AgentInput)
    except InspectError:
        raise
    except Exception as exc:
        raise InspectError(f"cannot decode the input of {history.workflow_id!r} ({exc}); an encrypted history "
                           "needs KEEL_ENCRYPT=1 and the keys it was written with") from exc
    agent = registry.find(inp.agent)
    if agent is None:
        raise _not_loaded(history.workflow_id, inp.agent)
    tool_names = {agent.activity_name(t): t for t in agent.tool_map}
    rec = Recording(workflow_id=history.workflow_id, input=inp, tool_names=tool_names)
    scheduled: dict[int, tuple[str, LlmRequest | ToolRequest]] = {}
    steps: dict[int, PathStep] = {}
    for e in events[1:]:
        t = e.event_type
        if t == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            a = e.activity_task_scheduled_event_attributes
            name = a.activity_type.name
            if name == names.LLM_ACTIVITY:
                llm_req = await _decode(dc, a.input.payloads, LlmRequest)
                scheduled[e.event_id] = (name, llm_req)
                steps[e.event_id] = PathStep(step=llm_req.step, kind=llm_req.kind, name=llm_req.kind,
                                             model=f"{llm_req.model.provider}:{llm_req.model.model}")
            elif name in tool_names:
                tool_req = await _decode(dc, a.input.payloads, ToolRequest)
                scheduled[e.event_id] = (tool_names[name], tool_req)
                steps[e.event_id] = PathStep(step=tool_req.step, kind="tool", name=tool_names[name])
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            c = e.activity_task_completed_event_attributes
            if c.scheduled_event_id not in scheduled:
                continue
            name, req = scheduled[c.scheduled_event_id]
            step = steps[c.scheduled_event_id]
            if isinstance(req, LlmRequest):
                resp = await _decode(dc, c.result.payloads, LlmResponse)
                step.tokens = resp.usage.total_tokens
                step.tool_calls = [tc.name for tc in resp.tool_calls]
                step.content = call_content(req, resp)
            else:
                res = await _decode(dc, c.result.payloads, ToolResult)
                rec.tools.append((tool_key(name, req.arguments), res))
                step.ok, step.note = res.ok, res.error or ""
        elif t in (EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED, EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
                   EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED):
            if t == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
                sched = e.activity_task_failed_event_attributes.scheduled_event_id
            elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
                sched = e.activity_task_timed_out_event_attributes.scheduled_event_id
            else:
                sched = e.activity_task_canceled_event_attributes.scheduled_event_id
            if sched in steps:
                steps[sched].ok, steps[sched].note = False, _event_type(e)
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            s = e.workflow_execution_signaled_event_attributes
            if s.signal_name == names.APPROVAL_SIGNAL:
                rec.decisions.append(await _decode(dc, s.input.payloads, ApprovalDecision))
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            u = e.workflow_execution_update_accepted_event_attributes.accepted_request.input
            if u.name == names.DECIDE_UPDATE:
                rec.decisions.append(await _decode(dc, u.args.payloads, ApprovalDecision))
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            rec.result = await _decode(dc, e.workflow_execution_completed_event_attributes.result.payloads,
                                       AgentResult)
            rec.close_status = "Completed"
        elif t in (EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
                   EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED):
            rec.close_status = _event_type(e).removeprefix("WorkflowExecution")
    rec.steps = sorted(steps.values(), key=lambda s: s.step)
    if rec.result is not None:
        attach_refusals(((s.step, s.content) for s in rec.steps if s.content is not None), rec.result.decisions)
    return rec


def _accepted(rec: Recording) -> dict[str, ApprovalDecision]:
    """The decisions that counted, by action id: those the result lists as accepted (or, for a task
    still running, the first per action)."""
    counted = {(a.action_id, a.approver, a.decision) for a in rec.result.approvals if a.accepted} if rec.result \
        else None
    out: dict[str, ApprovalDecision] = {}
    for d in rec.decisions:
        if d.action_id not in out and (counted is None or (d.action_id, d.approver, d.decision) in counted):
            out[d.action_id] = d
    return out


class RecordedApprovals:
    """The approval gate of a what-if run: a `confirm` call gets the decision the original task
    recorded for the same action (same action id, same arguments), or none (taken as timed out)."""

    def __init__(self, rec: Recording, notes: list[str], approvers: Mapping[str, Sequence[str]] | None = None) -> None:
        self._decisions = _accepted(rec)
        self._notes = notes
        self._approvers = approvers
        self.records: list[ApprovalRecord] = []
        """The recorded decisions the what-if applied (as the task's approval records)."""

    async def __call__(self, action: PendingAction) -> ApprovalDecision | None:
        d = self._decisions.get(action.action_id)
        if d is not None and d.arguments_digest not in (None, action.arguments_digest):
            self._notes.append(f"{action.action_id}: the recorded decision was on other arguments; treated as none")
            d = None
        if d is not None and self._approvers is not None and d.approver not in self._approvers.get(action.tool, ()):
            self._notes.append(f"{action.action_id}: the recorded decision's approver {d.approver!r} is no longer "
                               f"listed for {action.tool}; treated as none")
            d = None
        if d is None:
            self._notes.append(f"{action.action_id}: no recorded decision applies; treated as timed out")
            return None
        self.records.append(ApprovalRecord(action_id=d.action_id, approver=d.approver, decision=d.decision,
                                           accepted=True, note="recorded decision", comment=d.comment))
        return d


class WhatIfCalls:
    """The `Calls` protocol of a what-if run: real model calls through the LLM activity (its ledger
    rows under the what-if's own workflow id), tool results served from the original history."""

    def __init__(self, llm: LlmActivities, recorded: Sequence[tuple[str, ToolResult]],
                 tool_names: Mapping[str, str] | None = None) -> None:
        self._llm = llm
        self._tool_names = tool_names or {}
        self._recorded: dict[str, deque[ToolResult]] = {}
        for key, res in recorded:
            self._recorded.setdefault(key, deque()).append(res)
        self.steps: list[PathStep] = []
        self.not_executed: list[str] = []
        self.served: list[str] = []
        """The tools whose calls were answered from the recording, in order (what the run "executed")."""

    async def llm(self, req: LlmRequest) -> LlmResponse:
        from temporalio.testing import ActivityEnvironment

        # The activity reads activity.info() (the attempt number): ActivityEnvironment provides it.
        resp: LlmResponse = await ActivityEnvironment().run(self._llm.llm_call, req)
        self.steps.append(PathStep(step=req.step, kind=req.kind, name=req.kind,
                                   model=f"{req.model.provider}:{req.model.model}", tokens=resp.usage.total_tokens,
                                   tool_calls=[tc.name for tc in resp.tool_calls], content=call_content(req, resp)))
        return resp

    async def tool(self, name: str, req: ToolRequest) -> ToolResult:
        name = self._tool_names.get(name, name)  # an agent's tool runs as `<agent>.<tool>`
        key = tool_key(name, req.arguments)
        queue = self._recorded.get(key)
        if queue:
            # In recorded order; the last result of a key keeps answering repeats of it.
            res = queue.popleft() if len(queue) > 1 else queue[0]
            note = "recorded result" if res.ok else (res.error or "recorded error")
            self.served.append(name)
        else:
            res = ToolResult(ok=False, error=NOT_RECORDED)
            note = "not recorded: not executed"
            self.not_executed.append(f"step {req.step}: {key}")
        self.steps.append(PathStep(step=req.step, kind="tool", name=name, ok=res.ok, note=note))
        return res


def _summary(workflow_id: str, result: AgentResult | None, status: str, prompt_version: str,
             steps: list[PathStep], agent: str | None = None, served: list[str] | None = None) -> RunSummary:
    """`served`: a what-if's tool calls answered from the recording (its calls never recorded ran nothing,
    so they are not among the tools it executed)."""
    if result is None:
        return RunSummary(workflow_id=workflow_id, status=status.lower(), agent=agent, prompt_version=prompt_version,
                          steps=steps, tokens=sum(s.tokens for s in steps))
    common = {"workflow_id": workflow_id, "status": result.status, "reason": result.reason, "tokens": result.tokens,
              "cost_usd": result.cost_usd, "prompt_version": prompt_version, "models": result.models,
              "tools_executed": result.tools_executed if served is None else served, "steps": steps}
    if isinstance(result, AgentResult):
        return RunSummary(**common, agent=result.agent, answer=result.output or result.partial_output or "")
    return RunSummary(**common, route=result.route, category=result.category,
                      answer=result.reply or result.partial_output or "")


def _parse_model(spec: str, what: str) -> ModelSpec:
    try:
        model = ModelSpec.parse(spec)
        price_for(model.provider, model.model)
    except (ValueError, UnpricedModelError) as e:
        raise InspectError(f"{what} {spec!r}: {e}") from e
    return model


@contextlib.contextmanager
def _llm_activities(settings: KeelSettings, engine: Engine | None,
                    providers: dict[str, Provider] | None) -> Iterator[LlmActivities]:
    """The worker's LLM activity over the ledger at `engine` (default: the settings' database, opened
    here and closed after) and `providers` (default: the worker's)."""
    from activities.db import init_db, make_engine
    from activities.ledger import Ledger
    from activities.llm import LlmActivities
    from workers.worker import default_providers

    if engine is not None:
        yield LlmActivities(providers or default_providers(settings), Ledger(engine))
        return
    own = make_engine(settings.db_url)
    try:
        init_db(own)
        yield LlmActivities(providers or default_providers(settings), Ledger(own))
    finally:
        own.dispose()


async def what_if(
    client: Client,
    settings: KeelSettings,
    workflow_id: str,
    *,
    prompt_version: str | None = None,
    model: str | None = None,
    small_model: str | None = None,
    large_model: str | None = None,
    engine: Engine | None = None,
    providers: dict[str, Provider] | None = None,
) -> WhatIfReport:
    """Run the task of `workflow_id` again, in this process, with the prompt version and/or models
    replaced: a KeelAgent task of an agent registered in this process (`load_agents`).
    `model` replaces every tier; `small_model`/`large_model` one each (they win over `model`); with none
    of them, the tiers KEEL_MODEL_SMALL / KEEL_MODEL_LARGE set (as every command's tasks).
    `engine`: the ledger's database (default: the settings'); `providers`: default the worker's."""
    from starter.agents import command_models

    if model is None and small_model is None and large_model is None:
        tiers = command_models(settings) or {}
        small_model, large_model = (f"{tiers[t].provider}:{tiers[t].model}" if t in tiers else None
                                    for t in ("small", "large"))
    rec = await read_recording(await fetch_history(client, workflow_id), client.data_converter)
    llm = partial(_llm_activities, settings, engine, providers)
    return await _agent_what_if(rec, rec.input, llm, prompt_version, model, small_model, large_model)


def _whatif_id(workflow_id: str) -> tuple[str, list[str]]:
    whatif_id = f"whatif-{workflow_id}-{uuid.uuid4().hex[:8]}"
    return whatif_id, [f"model calls are in the ledger under workflow id {whatif_id} (feature {WHAT_IF_FEATURE!r}); "
                       "tool results were served from the original history: no tool ran"]


async def _agent_what_if(rec: Recording, old: AgentInput, llm: LlmFactory, prompt_version: str | None,
                         model: str | None, small_model: str | None, large_model: str | None) -> WhatIfReport:
    """A KeelAgent task again, through the agent workflow's own steps (AgentWorkflow.make_runner and
    run_task: triage, the tool loop, the answer and output checks), with the what-if's calls."""
    from workflows.agent import AgentWorkflow, close_task, final_result

    agent = registry.find(old.agent)
    if agent is None:
        raise _not_loaded(rec.workflow_id, old.agent)
    old_version = old.prompt_version or agent.prompt_version
    version = prompt_version or old_version
    if version not in agent.prompt_versions():
        raise InspectError(f"agent {agent.name!r} has no prompt version {version!r} ({agent.prompt_path(version)} "
                           f"not found); its versions: {', '.join(agent.prompt_versions())}")
    before: dict[Tier, ModelSpec] = {**agent.model_specs, **(old.models or {})}
    after = dict(before)
    tier: Tier
    for tier, one, flag in (("small", small_model, "--small-model"), ("large", large_model, "--large-model")):
        if spec := one or (model if tier in before else None):
            after[tier] = _parse_model(spec, flag if one else "--model")
    changes: dict[str, tuple[str, str]] = {}
    if version != old_version:
        changes["prompt_version"] = (old_version, version)
    for tier in after:
        if before.get(tier) != after[tier]:
            changes[f"{tier}_model"] = (before[tier].label if tier in before else "", after[tier].label)
    inp = old.model_copy(update={
        "prompt_version": version, "models": after, "feature": WHAT_IF_FEATURE,
        # The sim seeds on the task's key, else its workflow id: the original's, so the same version and
        # models take the same path. No breaker: a what-if is not admitted as a task of the agent.
        "key": old.key or rec.workflow_id, "breaker": False, "prices": {**old.prices, **user_prices()},
        "sim": old.sim.model_copy(update={"latency_ms_min": 0, "latency_ms_max": 0}),
    })
    whatif_id, notes = _whatif_id(rec.workflow_id)
    approvals = RecordedApprovals(rec, notes, agent.approvers)

    async def finish(runner: AgentRunner, result: AgentResult, status: AgentStatus, reason: str) -> AgentResult:
        close_task(runner, status, reason)  # no finishing activity: no outcome row, nothing queued
        return final_result(runner, result, status, reason, approvals.records)

    with llm() as activities:
        calls = WhatIfCalls(activities, rec.tools, rec.tool_names)
        runner = AgentWorkflow.make_runner(agent, inp, whatif_id, "", calls)
        runner.approval_gate, runner.approval_mode = approvals, inp.approval_mode
        try:
            result = await AgentWorkflow.run_task(agent, inp, runner, finish)
        except ApplicationError as e:
            raise InspectError(f"the what-if run failed at step {runner.progress.step}: {e.type}: {e.message}") from e
    attach_refusals(((s.step, s.content) for s in calls.steps if s.content is not None), result.decisions)
    return WhatIfReport(
        workflow_id=rec.workflow_id,
        whatif_workflow_id=whatif_id,
        changes=changes,
        old=_summary(rec.workflow_id, rec.result, rec.close_status, old_version, rec.steps, old.agent),
        new=_summary(whatif_id, result, "completed", version, calls.steps, old.agent, calls.served),
        not_executed=calls.not_executed,
        notes=notes,
    )


# -- prompts ----------------------------------------------------------------------------------------------


class PromptInfo(BaseModel):
    name: str
    version: str
    sha256: str
    size: int
    """Bytes of the file."""
    path: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


def _version_key(version: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version))


def _agent_prompts(agent: Agent) -> list[tuple[str, str]]:
    """(shown name, file name stem) of an agent's prompts: its own, and its triage's."""
    out = [(agent.name, agent.prompt_name)]
    if agent.triage is not None:
        out.append((f"{agent.name}/triage", agent.triage.prompt_name))
    return out


def list_prompts(agents: Sequence[Agent] | None = None) -> list[PromptInfo]:
    """Every version of the registered agents' prompts (`<name>.<version>.md` beside each agent's module),
    with the content hash the ledger stamps on each model call."""
    out = []
    for agent in agents if agents is not None else registry.registered():
        for shown, stem in _agent_prompts(agent):
            for path in agent.prompt_dir.glob(f"{stem}.*.md"):
                version = path.name.removesuffix(".md").removeprefix(f"{stem}.")
                if not version or "." in version:
                    continue
                # The hash activities.prompts.load_prompt_at stamps on every call: of the text, stripped.
                sha = hashlib.sha256(path.read_text(encoding="utf-8").strip().encode()).hexdigest()
                out.append(PromptInfo(name=shown, version=version, sha256=sha, size=path.stat().st_size,
                                      path=str(path)))
    return sorted(out, key=lambda p: (p.name, _version_key(p.version)))


def _parse_ref(ref: str) -> tuple[str, str]:
    name, at, version = ref.rpartition("@")
    if not at or not name or not version:
        raise InspectError(f"{ref!r}: name a prompt version as AGENT@VERSION, e.g. support_desk@v1 "
                           "(an agent's triage: support_desk/triage@v1)")
    return name, version


def diff_prompts(a: str, b: str) -> str:
    """A unified diff of two prompt versions of registered agents, e.g. `support_desk@v1` and
    `support_desk@v2` (the text the model is given: the file, stripped). Empty when they are identical."""
    known = {(i.name, i.version): i for i in list_prompts()}
    texts = []
    for ref in (a, b):
        info = known.get(_parse_ref(ref))
        if info is None:
            raise InspectError(f"unknown prompt {ref!r}; known: "
                               f"{', '.join(f'{n}@{v}' for n, v in known) or 'none (load agents with --agents)'}")
        text = Path(info.path).read_text(encoding="utf-8").strip()
        texts.append((f"{ref} ({info.short_hash})", text))
    (fa, ta), (fb, tb) = texts
    return "".join(difflib.unified_diff(ta.splitlines(keepends=True), tb.splitlines(keepends=True), fa, fb))


# -- commands ---------------------------------------------------------------------------------------------


history_app = typer.Typer(help="Task histories: export one for tests/histories/.", no_args_is_help=True)
prompts_app = typer.Typer(help="The agents' prompt versions: list them, compare two.", no_args_is_help=True)


def _fail(msg: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]{escape(msg)}[/red]")
    return typer.Exit(code)


def _run(fn: Any) -> Any:
    try:
        return asyncio.run(fn())
    except InspectError as e:
        raise _fail(str(e)) from e
    except RPCError as e:
        raise _fail(f"Temporal: {e.message}") from e


def replay_cmd(
    workflow_id: Annotated[str, typer.Argument(help="The task's workflow id")],
    prompt_version: Annotated[str | None, typer.Option(
        "--prompt-version", help="What-if: run the task again on this prompt version (tools served from the "
                                 "history)")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="What-if: provider:model for every tier, e.g. sim:sim-large")] = None,
    small_model: Annotated[str | None, typer.Option("--small-model", help="What-if: provider:model, small tier")
                           ] = None,
    large_model: Annotated[str | None, typer.Option("--large-model", help="What-if: provider:model, large tier")
                           ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    content: Annotated[bool, typer.Option(
        "--content", help="What-if: what the model said at each call of both runs, side by side (its text and "
                          "tool calls). Off by default: it may hold personal data.")] = False,
    agents: Annotated[str, typer.Option(
        "--agents", help="Comma-separated modules whose agents to load first (and KEEL_AGENTS), as for "
                         "`keel worker`: a KeelAgent task's history replays (and a what-if re-runs) with its "
                         "agent's definition")] = "",
) -> None:
    """Replay a task's history against today's workflow code (exit 1 on a divergence); with
    --prompt-version or --model, run the task again on them (tools served from the history, nothing
    executed) and show the old and new path side by side."""
    settings = load_settings()
    whatif = any(v is not None for v in (prompt_version, model, small_model, large_model))
    try:
        load_agents(settings, agents)
    except InspectError as e:
        raise _fail(str(e), 2) from e
    if content and not whatif:
        raise _fail("--content shows what the model said in a what-if: use it with --prompt-version or --model", 2)

    async def run() -> int:
        client = await client_or_exit(settings)
        if whatif:
            report = await what_if(client, settings, workflow_id, prompt_version=prompt_version, model=model,
                                   small_model=small_model, large_model=large_model)
            if as_json:
                print(json.dumps(report.to_json(content), indent=2))
            else:
                print_what_if(report, content)
            return 0
        rep = await replay_workflow(client, workflow_id)
        if as_json:
            print(json.dumps(rep.model_dump(mode="json"), indent=2))
        elif rep.ok:
            console.print(f"{escape(workflow_id)}: [green]replays cleanly[/green] ({rep.events} events)")
        else:
            where = ""
            if rep.event_id is not None:
                where = f" at event {rep.event_id} ({', '.join(filter(None, [rep.event_type, rep.event_detail]))})"
            err.print(f"[red]{escape(workflow_id)}: diverges from today's code{escape(where)}[/red] "
                      f"({rep.events} events)\n  {rep.error_type}: {escape(rep.error or '')}")
        return 0 if rep.ok else 1

    if _run(run):
        raise typer.Exit(1)


SIDE_BY_SIDE_WIDTH = 100
"""Narrower consoles show the old and new calls' content one after the other instead of in two columns."""


def _said(s: PathStep | None) -> str:
    if s is None:
        return "[dim](no such call)[/dim]"
    head = f"[bold]step {s.step}[/bold] {escape(s.label)}  [dim]{escape(s.model)}[/dim]"
    return "\n".join([head, *content_lines(s.content)]) if s.content is not None else head


def _same_said(a: PathStep | None, b: PathStep | None) -> bool:
    if a is None or b is None or a.content is None or b.content is None:
        return False
    return (a.content.text, a.content.tool_calls) == (b.content.text, b.content.tool_calls)


def print_contents(r: WhatIfReport) -> None:
    """What the model said at each call of the old and new runs, call by call: a table of two columns,
    or (a narrow console) one panel after the other."""
    pairs = list(zip_longest([s for s in r.old.steps if s.kind != "tool"],
                             [s for s in r.new.steps if s.kind != "tool"]))
    if console.width >= SIDE_BY_SIDE_WIDTH:
        t = Table(box=box.SIMPLE_HEAD, title="what the model said: old  |  new", show_lines=True)
        t.add_column("#", justify="right")
        t.add_column(f"old: {escape(r.old.workflow_id)}", ratio=1)
        t.add_column("", justify="center")
        t.add_column(f"new: {escape(r.new.workflow_id)}", ratio=1)
        for i, (a, b) in enumerate(pairs):
            t.add_row(str(i + 1), _said(a), "=" if _same_said(a, b) else "≠", _said(b))
        console.print(t)
        return
    console.print("[bold]what the model said[/bold] (old, then new, call by call)")
    for i, (a, b) in enumerate(pairs):
        mark = "same" if _same_said(a, b) else "changed"
        console.print(Panel(_said(a), title=f"call {i + 1}: old", title_align="left"))
        console.print(Panel(_said(b), title=f"call {i + 1}: new ({mark})", title_align="left"))


def print_what_if(r: WhatIfReport, content: bool = False) -> None:
    changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in r.changes.items()) or "nothing (the same prompts and models)"
    console.print(f"What-if of [bold]{escape(r.workflow_id)}[/bold]: {escape(changed)}")
    t = Table(box=box.SIMPLE_HEAD, title="old path  |  new path")
    for col, justify in (("#", "right"), ("old: call", "left"), ("model", "left"), ("tokens", "right"),
                         ("", "center"), ("new: call", "left"), ("model", "left"), ("tokens", "right")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    first = r.first_difference
    for i, (a, b) in enumerate(zip_longest(r.old.steps, r.new.steps)):
        same = a is not None and b is not None and a.label == b.label
        mark = "=" if same else "≠"
        cells = []
        for s in (a, b):
            if s is None:
                cells += ["", "", ""]
                continue
            label = s.label + ("" if s.ok or s.kind != "tool" else f" ({s.note})" if s.note else " (failed)")
            cells += [escape(label), escape(s.model), f"{s.tokens:,}" if s.kind != "tool" else ""]
        style = "bold" if first is not None and i == first else None
        t.add_row(str(i + 1), *cells[:3], mark, *cells[3:], style=style)
    console.print(t)
    if content:
        print_contents(r)
    s = Table(box=box.SIMPLE_HEAD, title="outcome")
    for col in ("", "old", "new"):
        s.add_column(col)
    o, n = r.old, r.new
    for label, a, b in (
        ("workflow id", o.workflow_id, n.workflow_id),
        ("agent", o.agent or "", n.agent or ""),
        ("prompt version", o.prompt_version, n.prompt_version),
        ("status", o.status, n.status),
        ("route", o.route or "", n.route or ""),
        ("category", o.category or "", n.category or ""),
        ("steps", str(len(o.steps)), str(len(n.steps))),
        ("tokens", f"{o.tokens:,}", f"{n.tokens:,}"),
        ("cost", f"${o.cost_usd:.5f}", f"${n.cost_usd:.5f}"),
        ("tool calls", ", ".join(o.tools_executed), ", ".join(n.tools_executed)),
        ("models", ", ".join(o.models), ", ".join(n.models)),
        ("reason", o.reason, n.reason),
        ("answer", o.answer, n.answer),
    ):
        if a or b:
            s.add_row(label, escape(a), escape(b))
    console.print(s)
    if r.same_path:
        console.print("[green]same path[/green] (every step's kind, tool and requested tools)")
    else:
        console.print(f"[yellow]the path changed at row {(first or 0) + 1}[/yellow]")
    for x in r.not_executed:
        console.print(f"  not recorded, not executed: {escape(x)}")
    for note in r.notes:
        console.print(f"  {escape(note)}")


@history_app.command("export")
def history_export(
    workflow_id: Annotated[str, typer.Argument(help="The task's workflow id")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File to write (default: <ID>.json)")] = None,
) -> None:
    """Write a task's history as JSON, as tests/histories/ holds it (CI replays every file there)."""
    settings = load_settings()

    async def run() -> tuple[Path, int, bool]:
        client = await client_or_exit(settings)
        path, events = await export_history(client, workflow_id, out)
        return path, events, client.data_converter.payload_codec is not None

    path, events, encrypted = _run(run)
    console.print(f"wrote {escape(str(path))} ({events} events)")
    if encrypted:
        console.print("[yellow]note:[/yellow] payloads are encrypted (KEEL_ENCRYPT): the file replays only with "
                      "these keys; tests/histories/ is replayed without keys, so record those unencrypted.")


@prompts_app.command("list")
def prompts_list(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    agents: Annotated[str, typer.Option("--agents", help="Agent modules to load (default KEEL_AGENTS)")] = "",
) -> None:
    """Every prompt version of the loaded agents: name, version, short content hash (as in the ledger), size."""
    load_agents(load_settings(), agents)
    infos = list_prompts()
    if as_json:
        print(json.dumps({"prompts": [{**i.model_dump(), "short_hash": i.short_hash} for i in infos]}, indent=2))
        return
    t = Table(box=box.SIMPLE_HEAD)
    for col, justify in (("name", "left"), ("version", "left"), ("hash", "left"), ("bytes", "right")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for i in infos:
        t.add_row(escape(i.name), escape(i.version), i.short_hash, f"{i.size:,}")
    console.print(t)
    if not infos:
        console.print("no agents loaded: pass --agents MODULES or set KEEL_AGENTS")


@prompts_app.command("diff")
def prompts_diff(
    a: Annotated[str, typer.Argument(help="AGENT@VERSION, e.g. support_desk@v1")],
    b: Annotated[str, typer.Argument(help="AGENT@VERSION, e.g. support_desk@v2")],
    agents: Annotated[str, typer.Option("--agents", help="Agent modules to load (default KEEL_AGENTS)")] = "",
) -> None:
    """A unified diff of two prompt versions of an agent (the text the model is given)."""
    load_agents(load_settings(), agents)
    try:
        diff = diff_prompts(a, b)
    except InspectError as e:
        raise _fail(str(e), 2) from e
    if not diff:
        console.print(f"{escape(a)} and {escape(b)} are identical")
        return
    for line in diff.splitlines():
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else \
            "cyan" if line.startswith("@@") else None
        console.print(escape(line), style=style, highlight=False, soft_wrap=True)
