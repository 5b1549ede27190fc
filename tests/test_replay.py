"""Replay: recorded histories under tests/histories/ must replay against today's workflow code, and a
history that no longer matches the code must be caught.

The agents' histories (agent_*.json, recorded by tests/record_agent_history.py) replay the generic agent
workflow, which looks its agent up in keel.registry at run time: the agents are registered here as a
worker registers them (`keel worker --agents agents.oncall` registers the same definitions)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner
from temporalio.workflow import NondeterminismError

import keel
from agents.dr_plan import AGENTS as DR_PLAN_AGENTS
from agents.oncall import oncall, service_status
from agents.research import AGENTS as RESEARCH_AGENTS
from agents.support_desk import store as desk_store
from agents.support_desk import support_desk
from agents.triage import triage
from keel import registry
from keel.testing import agent_environment
from workers.worker import SANDBOX, STRICT_SANDBOX
from workflows.registry import WORKFLOWS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
TAMPERED_HISTORY = Path(__file__).parent / "histories" / "agent_support_desk_v1.json"
"""The history the tampering test changes (recorded under its file name as the workflow id)."""
REPLAYED_AGENTS = [oncall, triage, support_desk, *DR_PLAN_AGENTS, *RESEARCH_AGENTS]
"""The agents whose histories are recorded here (agent_<name>_*.json; triage: pattern_swarm_triage_*.json;
supervisor_dr_plan_*.json: `keel plan`'s supervision, whose rules run the planner's checks in the workflow;
orchestrator_research_*.json: `keel research`'s orchestration and two of its children)."""
ONCALL_HEALTHY = Path(__file__).parent / "histories" / "agent_oncall_v1.json"
"""The on-call agent on a healthy service: the status is read (oncall.service_status), then the answer."""
ONCALL_APPROVAL = Path(__file__).parent / "histories" / "agent_oncall_v1_approval.json"
"""The on-call agent on a service that is down: status read, restart approved by update, restart run."""


@pytest.fixture(autouse=True)
def _agents_registered() -> None:
    registry.register(*REPLAYED_AGENTS)  # idempotent: the same definitions may be registered again


def replayer(runner: SandboxedWorkflowRunner = STRICT_SANDBOX) -> Replayer:
    return Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter, workflow_runner=runner)


def load(path: Path) -> WorkflowHistory:
    # The recorded workflow id (a pattern's children's ids derive from it): the file name, `__` for `/`.
    return WorkflowHistory.from_json(path.stem.replace("__", "/"), path.read_text())


def test_there_are_recorded_histories() -> None:
    assert HISTORIES, "tests/histories/ should hold recorded histories"
    assert ONCALL_HEALTHY in HISTORIES and ONCALL_APPROVAL in HISTORIES, "the on-call agent's histories"
    assert any(p.stem == "supervisor_dr_plan_v1" for p in HISTORIES), "keel plan's supervision"
    assert {"agent_support_desk_v1", "agent_support_desk_v1_refund"} <= {p.stem for p in HISTORIES}, "the desk"
    assert any(p.stem == "orchestrator_research_v1" for p in HISTORIES), "keel research's orchestration"


@pytest.mark.parametrize("runner", [STRICT_SANDBOX, SANDBOX], ids=["strict", "shared"])
@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays(path: Path, runner: SandboxedWorkflowRunner) -> None:
    # Both sandboxes: the tests' strict one checks the modules, the workers' shared one is what runs.
    await replayer(runner).replay_workflow(load(path))


async def test_changed_history_is_detected() -> None:
    """A history whose commands differ from what the code does now must fail replay, loudly."""
    path = TAMPERED_HISTORY
    doc = json.loads(path.read_text())
    for event in doc["events"]:
        attrs = event.get("activityTaskScheduledEventAttributes")
        if attrs and attrs["activityType"]["name"].startswith("support_desk."):
            attrs["activityType"]["name"] = "support_desk.close_account"
            break
    else:
        raise AssertionError("the recorded history has no tool call to tamper with")
    history = WorkflowHistory.from_json(path.stem, json.dumps(doc))
    with pytest.raises(NondeterminismError):
        await replayer().replay_workflow(history)


async def test_run_then_replay(client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spiralling task with hallucinated tools, run now, replays against the same code."""
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    monkeypatch.setenv("KEEL_DATABASE_URL", url)
    desk_store.reset()
    async with agent_environment(support_desk, client=client, db_url=url) as env:
        res = await env.run("support_desk", "Customer: C-1003\n\nMy card keeps getting declined online.",
                            tenant="C-1003", sim=keel.SimConfig(spiral_rate=1.0, hallucinated_tool_rate=0.3))
    desk_store.reset()
    history = await client.get_workflow_handle(res.workflow_id).fetch_history()
    await replayer().replay_workflow(history)


def _refuse_every_call(action: keel.ProposedAction) -> str | None:
    return "refused"


def oncall_variant(**changes: Any) -> keel.Agent:
    """The on-call agent's definition with some fields changed (the prompt given as an absolute path)."""
    return dataclasses.replace(oncall, **{"prompt": oncall.prompt_path(), **changes})


# What a changed agent definition does to replay, as observed (not assumed): Temporal compares the
# commands (activity types, timers, search attribute upserts...), never an activity's input. So a change
# is caught exactly when, fed the recorded model and tool results, the workflow would now issue other
# commands; a change the recorded path never exercises, or one that only alters activity inputs, replays.
@pytest.mark.parametrize(("history", "changes", "detected"), [
    # Without restart_service, the recorded call of it is refused as an unknown tool: another model call
    # where the approval wait was.
    (ONCALL_APPROVAL, {"tools": [service_status], "approvers": {}}, True),
    # The healthy path never used restart_service: the tool list is only in the llm_call's input.
    (ONCALL_HEALTHY, {"tools": [service_status], "approvers": {}}, False),
    # A validator that refuses the recorded status read: a model call where the tool activity was.
    (ONCALL_HEALTHY, {"validators": [_refuse_every_call]}, True),
    # One model call in the tool loop: the second is the step-limit call without tools, the recorded
    # restart call in its result is not acted on, and a model call comes where the approval wait was.
    (ONCALL_APPROVAL, {"max_steps": 1}, True),
    # The prompt is read by the llm_call activity: its version is only in the activity's input.
    (ONCALL_HEALTHY, {"prompt": oncall.prompt_path("v2")}, False),
    # The approver list is checked by the update's validator, which replay does not run (the update
    # was accepted in the history).
    (ONCALL_APPROVAL, {"approvers": {}}, False),
], ids=["approval-no-restart-tool", "healthy-no-restart-tool", "healthy-validator-refuses",
        "approval-max-steps-1", "healthy-prompt-v2", "approval-no-approvers"])
async def test_a_changed_agent_definition_is_caught_only_when_the_commands_change(
        monkeypatch: pytest.MonkeyPatch, history: Path, changes: dict[str, Any], detected: bool) -> None:
    # A worker refuses another definition under a taken name; the test swaps it in, then restores it.
    monkeypatch.setitem(registry._AGENTS, "oncall", oncall_variant(**changes))
    if detected:
        with pytest.raises(NondeterminismError):
            await replayer().replay_workflow(load(history))
    else:
        await replayer().replay_workflow(load(history))


async def test_an_agent_history_needs_its_agent_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the agent, the workflow fails the task at its first step: not what was recorded."""
    monkeypatch.delitem(registry._AGENTS, "oncall")
    with pytest.raises(NondeterminismError):
        await replayer().replay_workflow(load(ONCALL_HEALTHY))


async def test_the_dr_plan_supervision_replays_only_with_its_planners_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervision's rules run the planner's checks in workflow code: checks that let round 1's plan
    pass would start its review where the recorded history sent it back (another child workflow)."""
    history = load(Path(__file__).parent / "histories" / "supervisor_dr_plan_v1.json")
    planner = registry.get("dr_planner")
    lenient = dataclasses.replace(planner, prompt=planner.prompt_path(),
                                  checks={name: (lambda out: None) for name in planner.checks})
    monkeypatch.setitem(registry._AGENTS, "dr_planner", lenient)
    with pytest.raises(NondeterminismError):
        await replayer().replay_workflow(history)
    monkeypatch.delitem(registry._AGENTS, "dr_planner")
    with pytest.raises(NondeterminismError):
        await replayer().replay_workflow(history)
