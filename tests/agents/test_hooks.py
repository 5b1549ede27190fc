"""A bug in an agent's own hooks, or a definition that cannot run, met in workflow code: the task FAILS at
once with a clear, non-retryable error naming the agent, the hook and the exception. It never becomes a
workflow task retried forever (a task that hangs, silently, until someone looks).

Each test runs the generic agent workflow on the real dev server with a throwaway agent, under a short
execution timeout: a regression shows as a timed-out workflow (a failed assertion), not a hung test.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.workflow import _Definition

import keel
from keel import errors, names
from keel.testing import AgentEnvironment, ScriptedModel, agent_environment, answer, call
from keel.types import AgentInput, AgentResult
from workflows.agent import AgentWorkflow

TIMEOUT = timedelta(seconds=20)
"""Far above what a failing task takes (well under a second). A workflow task that fails instead is
retried without end: the workflow then times out here, and the test fails (seen, with the fix undone)."""


class PingArgs(keel.Args):
    host: str


PINGED: list[str] = []


@keel.tool
def ping(ctx: keel.ToolContext, args: PingArgs) -> dict[str, object]:
    """Whether a host answers."""
    PINGED.append(args.host)
    return {"host": args.host, "up": True}


def exploding_validator(action: keel.ProposedAction) -> str | None:
    return {"ping": None}[action.arguments["host"]]  # the bug: a KeyError for any other host


def exploding_check(out: keel.FinalOutput) -> str | None:
    raise RuntimeError("the check's own bug")


def boolean_check(out: keel.FinalOutput) -> bool:
    return True  # the contract is a problem (str), a list of problems, or None


@pytest.fixture
def prompt(tmp_path: Path) -> Path:
    path = tmp_path / "probe.v1.md"
    path.write_text("You check hosts with the ping tool, then answer in one sentence.\n")
    return path


def make(prompt: Path, **kw: object) -> keel.Agent:
    # A fresh name per test: the process's registry refuses another definition under a taken name.
    return keel.Agent(**{"name": f"hooks_{uuid.uuid4().hex[:10]}", "prompt": prompt, "tools": [ping],
                         "models": "scripted:scripted", **kw})  # type: ignore[arg-type]


async def failure_of(env: AgentEnvironment, agent: keel.Agent, text: str) -> tuple[ApplicationError, str]:
    """Run a task that must fail; return its failure and its workflow id."""
    wid = f"{agent.name}-{uuid.uuid4().hex[:8]}"
    handle = await env.client.start_workflow(
        names.AGENT_WORKFLOW, AgentInput(agent=agent.name, input=text), id=wid,
        task_queue=env.settings.task_queue, result_type=AgentResult, execution_timeout=TIMEOUT)
    with pytest.raises(WorkflowFailureError) as e:
        await handle.result()
    cause = e.value.cause
    assert isinstance(cause, ApplicationError), f"the workflow did not fail with an ApplicationError: {cause!r}"
    return cause, wid


async def assert_failed_at_first_attempt(client: Client, wid: str) -> None:
    history = await client.get_workflow_handle(wid).fetch_history()
    kinds = [ev.event_type for ev in history.events]
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED in kinds
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED not in kinds, "a workflow task failed (and was retried)"


async def test_a_validator_that_raises_fails_the_task_with_a_config_error(client: Client, prompt: Path) -> None:
    PINGED.clear()
    agent = make(prompt, validators=[exploding_validator])
    model = ScriptedModel([call("ping", host="db-1")])
    async with agent_environment(agent, model=model, client=client) as env:
        err, wid = await failure_of(env, agent, "Is db-1 up?")
        await assert_failed_at_first_attempt(client, wid)
    assert err.type == errors.AGENT_CONFIG_ERROR and err.non_retryable
    assert f"agent {agent.name!r}" in err.message
    assert "action validator exploding_validator raised KeyError: 'db-1'" in err.message
    assert "ping" in err.message
    model.assert_all_used()
    assert PINGED == []  # the call the validator could not judge never ran


async def test_an_output_check_that_raises_fails_the_task_with_a_config_error(client: Client, prompt: Path) -> None:
    agent = make(prompt, output_checks=[exploding_check])
    model = ScriptedModel([answer("db-1 is up.")])
    async with agent_environment(agent, model=model, client=client) as env:
        err, wid = await failure_of(env, agent, "Is db-1 up?")
        await assert_failed_at_first_attempt(client, wid)
    assert err.type == errors.AGENT_CONFIG_ERROR and err.non_retryable
    assert f"agent {agent.name!r}: output check exploding_check raised RuntimeError: the check's own bug" \
        in err.message
    model.assert_all_used()


async def test_an_output_check_returning_something_else_fails_the_task(client: Client, prompt: Path) -> None:
    agent = make(prompt, output_checks=[boolean_check])
    model = ScriptedModel([answer("db-1 is up.")])
    async with agent_environment(agent, model=model, client=client) as env:
        err, _ = await failure_of(env, agent, "Is db-1 up?")
    assert err.type == errors.AGENT_CONFIG_ERROR
    assert "output check boolean_check returned bool: True" in err.message


async def test_output_checks_that_work_still_hold_an_answer_back(client: Client, prompt: Path) -> None:
    """The wrapper changes nothing for a hook that works: its problems (a str or a list) hold the answer."""
    def two(out: keel.FinalOutput) -> Sequence[str]:
        return ["first problem", "second problem"] if "down" in out.text else []

    agent = make(prompt, output_checks=[two])
    model = ScriptedModel([answer("db-1 is down.")])
    async with agent_environment(agent, model=model, client=client) as env:
        result = await env.run(agent.name, "Is db-1 up?")
    assert result.status == "escalated" and "first problem; second problem" in result.reason


class BrokenAgent(keel.Agent):
    """A definition that only goes wrong when the workflow reads it (stands for any KeelError met in
    workflow code)."""

    @property
    def task_feature(self) -> str:
        raise keel.AgentDefinitionError("this agent's feature tag cannot be read")


def test_the_agent_workflow_declares_keel_errors_as_failures() -> None:
    assert list(_Definition.must_from_class(AgentWorkflow).failure_exception_types) == [errors.KeelError]


async def test_a_keel_error_in_workflow_code_fails_the_task(client: Client, prompt: Path) -> None:
    agent = BrokenAgent(name=f"hooks_{uuid.uuid4().hex[:10]}", prompt=prompt, tools=[ping],
                        models="scripted:scripted")
    async with agent_environment(agent, model=ScriptedModel([]), client=client) as env:
        err, wid = await failure_of(env, agent, "Is db-1 up?")
        await assert_failed_at_first_attempt(client, wid)
    assert err.type == "AgentDefinitionError"
    assert "this agent's feature tag cannot be read" in err.message
