"""Every inspection verb works for a KeelAgent task as for a ticket: `keel status`, `keel watch`,
`keel result`, `keel approvals`, `keel trace` and `keel replay --agents`, on the real Temporal server
with the on-call agent (agents/oncall); and `status`/`watch`/`result` still serve tickets and patterns."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, Worker

import keel
from agents.oncall import oncall
from agents.oncall.status_service import StatusService
from agents.triage import triage
from keel import registry
from keel.orchestration import ChildTask
from keel.settings import KeelSettings
from keel.testing import SCRIPTED, ScriptedModel, Step, answer
from keel.types import ToolCall
from starter.agents import start_swarm
from starter.approvals_cli import pending_action
from tests.agents.test_oncall import cli_env, env_for, keel_cli
from tests.agents.test_triage import CLEAR, swarm_of
from tests.conftest import assert_eventually
from workflows.registry import WORKFLOWS


@pytest.fixture
def status(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatusService]:
    with StatusService() as svc:
        monkeypatch.setenv("ONCALL_STATUS_URL", svc.url)
        yield svc


WATCH_S = 30.0
"""`keel watch` of a finished or waiting task must return; a hang fails the test instead of the suite."""


async def watch(env: dict[str, str], workflow_id: str) -> Any:
    return await asyncio.wait_for(keel_cli(env, "watch", workflow_id), WATCH_S)


async def test_status_result_watch_and_trace_of_a_finished_agent_task(
        client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client) as env:
        res = await env.run("oncall", "Is the api service healthy?", tenant="team-web", key=uuid.uuid4().hex[:10])
        cli = cli_env(env, tmp_path)
        as_json = await keel_cli(cli, "result", res.workflow_id, "--json")
        shown = await keel_cli(cli, "result", res.workflow_id)
        now = await keel_cli(cli, "status", res.workflow_id)
        watched = await watch(cli, res.workflow_id)
        trace = await keel_cli(cli, "trace", res.workflow_id)
        trace_json = await keel_cli(cli, "trace", res.workflow_id, "--json")
    assert res.status == "completed", res.reason

    assert as_json.exit_code == 0, as_json.output
    got = keel.AgentResult.model_validate_json(as_json.output.strip().splitlines()[-1])
    assert got == res
    assert (got.workflow_id, got.agent, got.status) == (res.workflow_id, "oncall", "completed")
    assert got.tools_executed == ["service_status"] and got.llm_calls == 2 and got.steps == 3
    assert got.tokens == got.input_tokens + got.output_tokens > 0 and got.cost_usd > 0
    assert "api is healthy" in got.output and got.budget.max_tokens == 6_000

    # One renderer: the result, the status of a finished task and its watch print the same lines.
    assert shown.exit_code == 0, shown.output
    for text in (shown.output, now.output, watched.output):
        assert f"{res.workflow_id}  agent oncall  completed  answered by the agent" in text, text
        assert "steps 3 · 2 model calls" in text and "tools service_status" in text
        assert "sim (offline simulator)" in text  # the model label's brackets are not taken for markup
        assert "budget ok:" in text and "/6,000 tokens" in text and "api is healthy" in text
    assert now.exit_code == 0 and watched.exit_code == 0, (now.output, watched.output)

    assert trace.exit_code == 0, trace.output
    head, *lines = trace.output.splitlines()
    assert f"{res.workflow_id}  KeelAgent  COMPLETED  agent oncall  completed  {res.tokens:,} tokens" in head
    assert "2 LLM calls, 1 tools" in head
    order = [next(i for i, line in enumerate(lines) if want in line) for want in (
        "step  1  llm reason", "step  2  tool oncall.service_status ok", "step  3  llm reason",
        "decision route: reply: answered by the agent", "step  4  finish")]
    assert order == sorted(order), trace.output
    assert "outcome resolved -> reply" in trace.output and "keel.finish" not in trace.output
    nodes = json.loads(trace_json.stdout)["nodes"]
    assert [(n["kind"], n["step"]) for n in nodes] == [
        ("llm", 1), ("tool", 2), ("llm", 3), ("decision", 3), ("finish", 4)]


LONG = "api is healthy (error rate 0.002). " + "The detail of every check follows. " * 60
"""An answer longer than the trace shows without --full."""


async def test_trace_content_shows_what_the_model_said_only_when_asked(
        client: Client, status: StatusService, tmp_path: Path) -> None:
    model = ScriptedModel([
        Step(text="I will read the api's status first.",
             tool_calls=[ToolCall(id="", name="service_status", arguments_json='{"service": "api"}')]),
        answer('<tool_call>{"name": "service_status", "arguments": {"service": "search"}}</tool_call>'),
        answer(LONG),
    ])
    async with env_for(client, model=model) as env:
        res = await env.run("oncall", "Is the api service healthy?", models={"small": SCRIPTED, "large": SCRIPTED})
        cli = cli_env(env, tmp_path)
        plain = await keel_cli(cli, "trace", res.workflow_id)
        plain_json = await keel_cli(cli, "trace", res.workflow_id, "--json")
        shown = await keel_cli(cli, "trace", res.workflow_id, "--content")
        shown_json = await keel_cli(cli, "trace", res.workflow_id, "--content", "--json")
        full = await keel_cli(cli, "trace", res.workflow_id, "--content", "--full")
        alone = await keel_cli(cli, "trace", res.workflow_id, "--full")
    model.assert_all_used()
    assert res.status == "completed" and res.tools_executed == ["service_status", "service_status"], res

    # Off by default: not a word the model said, in the tree or its JSON.
    assert plain.exit_code == plain_json.exit_code == 0, plain.output
    for said in ("read the api's status", "<tool_call>", "The detail of every check"):
        assert said not in plain.output and said not in plain_json.stdout
    assert all("content" not in n for n in json.loads(plain_json.stdout)["nodes"])

    assert shown.exit_code == 0, shown.output
    out = shown.output
    lines = out.splitlines()

    def line(want: str, after: int = 0) -> int:
        return next(i for i, text in enumerate(lines) if want in text and i >= after)

    # Under each model call, in order: its text and its call; the text-written call with its raw text
    # and the repair; the long answer cut, with its full length.
    assert line("step  1  llm reason") < line("said (35 characters): I will read the api's status first.") < line(
        'calls service_status {"service": "api"}') < line("step  2  tool oncall.service_status ok")
    third = line("step  3  llm reason")
    assert third < line("repaired: 1 tool call(s) written as text (hermes); the raw text:") < line(
        "said (", third) < line('calls service_status {"service": "search"}') < line("step  4  tool")
    assert '<tool_call>{"name": "service_status"' in out
    flat = " ".join(out.replace("│", " ").split())  # the console wraps long lines (under the tree's guides)
    assert f"[cut: 1,500 of {len(LONG):,} characters]" in flat and LONG[:1_500] in flat and LONG not in flat
    assert "refused" not in out  # nothing was

    nodes = json.loads(shown_json.stdout)["nodes"]
    llm = [n for n in nodes if n["kind"] == "llm"]
    assert [n["content"]["tool_calls"] for n in llm] == [
        [{"name": "service_status", "arguments": '{"service": "api"}'}],
        [{"name": "service_status", "arguments": '{"service": "search"}'}], []]
    assert llm[1]["content"]["repaired"] == "1 tool call(s) written as text (hermes)"
    assert llm[1]["content"]["text"].startswith("<tool_call>") and llm[2]["content"]["chars"] == len(LONG)
    assert all("content" not in n for n in nodes if n["kind"] != "llm")

    # --full: nothing cut, and what each call answered (the task's input, then the tool's result).
    assert full.exit_code == 0, full.output
    whole = " ".join(full.output.replace("│", " ").split())
    assert LONG.strip() in whole and "[cut:" not in whole
    assert "sent (user" in whole and "Is the api service healthy?" in whole and "sent (tool" in whole
    assert alone.exit_code == 2 and "use it with --content" in alone.output


async def test_a_waiting_agent_task_is_listed_shown_watched_then_approved(
        client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client) as env:
        cli = cli_env(env, tmp_path)
        handle = await env.start("oncall", "The payments service is down, please fix it.", tenant="team-pay")
        action = await assert_eventually(lambda: pending_action(client, handle.id), lambda a: a is not None)
        assert action is not None

        def ours(out: Any) -> list[dict[str, Any]]:
            return [w for w in json.loads(out.stdout) if w["workflow_id"] == handle.id] if out.exit_code == 0 else []

        # Visibility (the KeelAwaitingApproval search attribute) follows the workflow's upsert shortly after.
        listed = await assert_eventually(lambda: keel_cli(cli, "approvals", "--json"), lambda o: bool(ours(o)))
        [entry] = ours(listed)
        assert entry["action"]["tool"] == "restart_service" and entry["action"]["approvers"] == ["sre-lead"]
        assert entry["action"]["arguments"]["service"] == "payments"
        assert entry["action"]["action_id"] == action.action_id
        table = await keel_cli(cli, "approvals")
        assert table.exit_code == 0 and handle.id in table.output and "restart_service" in table.output
        assert "sre-lead" in table.output

        now = await keel_cli(cli, "status", handle.id)
        assert now.exit_code == 0, now.output
        assert "agent     oncall" in now.output and "awaiting_approval" in now.output
        assert "category" not in now.output  # a ticket's field, not an agent's
        assert f"{action.action_id}: restart_service" in now.output and "sre-lead" in now.output
        watched = await watch(cli, handle.id)  # returns at once: the task waits for a person
        assert watched.exit_code == 0, watched.output
        assert f"{handle.id} is awaiting_approval" in watched.output
        assert f"keel approve {handle.id} --as NAME" in watched.output and "keel resolve" not in watched.output
        assert status.restarts == {}

        ok = await keel_cli(cli, "approve", handle.id, "--as", "sre-lead", "--comment", "go")
        assert ok.exit_code == 0, ok.output
        out = await keel_cli(cli, "result", handle.id, "--json")  # waits for the end
        trace = await keel_cli(cli, "trace", handle.id)
    assert out.exit_code == 0, out.output
    res = keel.AgentResult.model_validate_json(out.output.strip().splitlines()[-1])
    assert res.status == "completed" and res.tools_executed == ["service_status", "restart_service"]
    assert [(a.approver, a.decision, a.accepted) for a in res.approvals] == [("sre-lead", "approve", True)]
    assert len(status.restarts) == 1
    assert trace.exit_code == 0, trace.output
    assert "update decide" in trace.output and "tool oncall.restart_service ok" in trace.output
    assert trace.output.index("update decide") < trace.output.index("tool oncall.restart_service ok")


async def test_replay_of_an_agent_task_loads_its_agent_with_agents_or_keel_agents(
        client: Client, status: StatusService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with env_for(client) as env:
        res = await env.run("oncall", "Is the api service healthy?")
        cli = cli_env(env, tmp_path)
    assert res.status == "completed", res.reason
    # As in a fresh `keel` process: no agent registered (the worker of this test process registered oncall).
    monkeypatch.setattr(registry, "_AGENTS", {})

    missing = await keel_cli(cli, "replay", res.workflow_id)
    said = " ".join(missing.output.split())
    assert missing.exit_code == 1, said
    assert "runs agent 'oncall', not loaded in this process" in said and "pass --agents MODULES" in said
    assert "diverges" not in said  # not reported as a change of the code

    ok = await keel_cli(cli, "replay", res.workflow_id, "--agents", "agents.oncall.agent")
    assert ok.exit_code == 0, ok.output
    assert f"{res.workflow_id}: replays cleanly" in ok.output
    as_json = await keel_cli(cli, "replay", res.workflow_id, "--agents", "agents.oncall.agent", "--json")
    assert json.loads(as_json.stdout)["ok"] is True

    monkeypatch.setattr(registry, "_AGENTS", {})
    from_env = await keel_cli({**cli, "KEEL_AGENTS": "agents.oncall"}, "replay", res.workflow_id)
    assert from_env.exit_code == 0 and "replays cleanly" in from_env.output, from_env.output

    bad = await keel_cli(cli, "replay", res.workflow_id, "--agents", "no_such_module_xyz")
    assert bad.exit_code == 2 and "cannot import agent module 'no_such_module_xyz'" in bad.output

    # `keel history export` writes what tests/histories/ holds: the Replayer accepts the file.
    out_file = tmp_path / f"{res.workflow_id}.json"
    exported = await keel_cli(cli, "history", "export", res.workflow_id, "--out", str(out_file))
    assert exported.exit_code == 0 and out_file.is_file(), exported.output
    registry.register(oncall)
    history = WorkflowHistory.from_json(res.workflow_id, out_file.read_text())
    await Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter).replay_workflow(history)
    missing_task = await keel_cli(cli, "history", "export", "no-such-task", "--out", str(tmp_path / "x.json"))
    assert missing_task.exit_code != 0 and not (tmp_path / "x.json").exists()

    # The what-if of an agent task (--prompt-version, --model): tests/agents/test_whatif.py.


async def test_status_watch_and_result_serve_a_swarm(
        client: Client, settings: KeelSettings,
        worker_factory: Callable[..., AbstractAsyncContextManager[Worker]], db_engine: Engine) -> None:
    cli = {"TEMPORAL_ADDRESS": client.service_client.config.target_host, "KEEL_TASK_QUEUE": settings.task_queue,
           "KEEL_DATABASE_URL": str(db_engine.url), "COLUMNS": "200"}
    async with worker_factory(client, agents=[triage]):
        swarm = await (await start_swarm(client, settings, swarm_of(CLEAR, peers=3))).result()
        swarm_json = await keel_cli(cli, "result", swarm.workflow_id, "--json")
        swarm_shown = await keel_cli(cli, "result", swarm.workflow_id)
        swarm_now = await keel_cli(cli, "status", swarm.workflow_id)
    assert swarm_json.exit_code == 0, swarm_json.output
    sdoc = json.loads(swarm_json.stdout)
    assert (sdoc["workflow_id"], sdoc["status"], sdoc["value"]) == (swarm.workflow_id, swarm.status, swarm.value)
    assert swarm_shown.exit_code == 0 and "agreement" in swarm_shown.output, swarm_shown.output
    assert swarm_now.exit_code == 0 and "phase" in swarm_now.output, swarm_now.output


async def test_status_and_result_of_an_orchestration_of_agents(
        client: Client, status: StatusService, tmp_path: Path) -> None:
    async with env_for(client) as env:
        res = await env.orchestrate("Check api", tasks=[ChildTask(agent="oncall", name="api",
                                                                  input="Is the api service healthy?")])
        cli = cli_env(env, tmp_path)
        now = await keel_cli(cli, "status", res.workflow_id)
        shown = await keel_cli(cli, "result", res.workflow_id, "--json")
        child = await keel_cli(cli, "result", res.children[0].workflow_id, "--json")
        traced = await keel_cli(cli, "trace", res.workflow_id, "--content", "--json")
        untraced = await keel_cli(cli, "trace", res.workflow_id, "--json")
    assert res.status == "completed", res.reason
    # The trace draws each child nested; --content shows what the child's model said, too.
    assert traced.exit_code == untraced.exit_code == 0, traced.output
    [nested] = [n["child"] for n in json.loads(traced.stdout)["nodes"] if n["kind"] == "child"]
    said = [n["content"] for n in nested["nodes"] if n["kind"] == "llm"]
    assert said and said[-1]["text"] == res.results["api"].output, said
    [bare] = [n["child"] for n in json.loads(untraced.stdout)["nodes"] if n["kind"] == "child"]
    assert bare["nodes"] and all("content" not in n for n in bare["nodes"])
    assert now.exit_code == 0 and "phase" in now.output and "api" in now.output, now.output
    assert shown.exit_code == 0, shown.output
    assert keel.OrchestratorResult.model_validate_json(shown.stdout.strip()).workflow_id == res.workflow_id
    # Each child is a KeelAgent task of its own.
    assert keel.AgentResult.model_validate_json(child.stdout.strip()) == res.results["api"]
