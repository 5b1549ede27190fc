"""Verbs of agent packages on the command line (keel.Command, starter.commands): a module's COMMANDS become
`keel` commands that build what to start from their options, start it, wait and print it."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from temporalio.client import Client
from typer.testing import CliRunner

import keel
from agents.oncall.agent import incident_note
from keel.testing import agent_environment
from starter.commands import add_command, add_commands, builtin_command_modules, command_function, commands_of
from tests.agents.test_oncall import cli_env


def note(
    text: Annotated[str, typer.Argument(help="What the note is about")],
    tenant: Annotated[str, typer.Option("--tenant")] = "default",
) -> keel.AgentInput:
    """Write an incident note."""
    if not text.strip():
        raise ValueError("nothing to write about")
    return keel.AgentInput(agent="incident_note", input=text, tenant=tenant)


def show_note(res: keel.AgentResult) -> list[str]:
    return [f"note: {res.status}", f"severity {(res.structured or {}).get('severity')}"]


COMMANDS = [keel.Command(name="note", build=note, show=show_note)]


def test_a_module_must_list_its_commands() -> None:
    assert [c.name for c in commands_of(__name__)] == ["note"]
    with pytest.raises(keel.AgentDefinitionError, match=r"must list its keel\.Command verbs in COMMANDS"):
        commands_of("agents.oncall.sim")
    with pytest.raises(keel.AgentDefinitionError, match=r"cannot import command module 'no_such_pkg\.cli'"):
        commands_of("no_such_pkg.cli")
    with pytest.raises(keel.AgentDefinitionError, match="command name 'Bad Verb' must match"):
        keel.Command(name="Bad Verb", build=note)

    def clash(as_json: bool = False) -> keel.AgentInput:
        raise AssertionError

    with pytest.raises(keel.AgentDefinitionError, match=r"parameters \['as_json'\] are the CLI's own"):
        command_function(keel.Command(name="clash", build=clash))


async def test_a_verb_starts_what_it_builds_and_shows_the_result(client: Client, tmp_path: Path) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, as `keel` is: the verb is named on the command line
    assert add_commands(app, [__name__, " "]) == ["note"]

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, ["note", *args], env=cli_env(env, tmp_path))

    async with agent_environment(incident_note, client=client, home=tmp_path) as env:
        shown = await asyncio.to_thread(run, "api 502s after the deploy", "--tenant", "ops")
        as_json = await asyncio.to_thread(run, "api 502s after the deploy", "--json")
        refused = await asyncio.to_thread(run, " ")
    assert shown.exit_code == 0, shown.output
    assert "started incident_note-" in shown.output and "note: completed" in shown.output
    assert "severity none" in shown.output
    assert as_json.exit_code == 0 and json.loads(as_json.output)["agent"] == "incident_note"
    assert refused.exit_code == 2 and "note refused: nothing to write about" in refused.output


def test_the_built_in_verbs_and_keel_commands_are_added(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "agents.dr_plan.cli" in builtin_command_modules()
    monkeypatch.setenv("KEEL_COMMANDS", f" {__name__} ,")
    app = typer.Typer()
    assert set(add_commands(app)) >= {"plan", "note"}


# --- verb groups and batch commands ---------------------------------------------------------------------

def notes(
    texts: Annotated[list[str], typer.Argument(help="One note per text")],
    key: Annotated[str, typer.Option("--key", help="A key for every note: the same task each time")] = "",
    agent: Annotated[str, typer.Option("--agent")] = "incident_note",
) -> list[keel.AgentInput]:
    """Write many incident notes."""
    return [keel.AgentInput(agent=agent, input=t, key=key) for t in texts if t.strip()]


SHOWN: list[list[keel.BatchItem]] = []


def show_notes(items: list[keel.BatchItem]) -> list[str]:
    SHOWN.append(items)
    lines = [f"{i.workflow_id}: {i.status}{' (existing)' if i.existing else ''}" for i in items]
    return [*lines, f"{len(items)} notes"]


GROUP = keel.CommandGroup("incident", [
    keel.Command("note", note, show_note, idempotent=True),
    keel.Command("notes", notes, show_batch=show_notes, idempotent=True),
], help="Incident notes.")


def test_groups_and_batch_commands_are_checked() -> None:
    with pytest.raises(keel.AgentDefinitionError, match=r"must list keel\.Command"):
        keel.CommandGroup("empty", [])
    with pytest.raises(keel.AgentDefinitionError, match="lists a name twice"):
        keel.CommandGroup("twice", [keel.Command("a", note), keel.Command("a", note)])
    with pytest.raises(keel.AgentDefinitionError, match="command group name 'Bad Group' must match"):
        keel.CommandGroup("Bad Group", [keel.Command("a", note)])
    with pytest.raises(keel.AgentDefinitionError, match=r"give show .* or show_batch .*, not both"):
        keel.Command("both", notes, show_note, show_batch=show_notes)
    assert keel.Command("notes", notes, show_batch=show_notes).batch and not keel.Command("note", note).batch

    def clash(concurrency: int = 1) -> list[keel.AgentInput]:
        raise AssertionError

    with pytest.raises(keel.AgentDefinitionError, match=r"parameters \['concurrency'\] are the CLI's own"):
        command_function(keel.Command("clash", clash, show_batch=show_notes))
    command_function(keel.Command("fine", clash))  # a one-task command may take a --concurrency of its own


def test_a_group_becomes_a_sub_command_and_refuses_an_empty_batch() -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    add_command(app, GROUP)
    assert [g.name for g in app.registered_groups] == ["incident"]
    nowhere = {"TEMPORAL_ADDRESS": "127.0.0.1:1"}  # refused before any connection
    out = CliRunner().invoke(app, ["incident", "notes", " ", "--concurrency", "2"], env=nowhere)
    assert out.exit_code == 2 and "incident notes refused: nothing to start" in out.output, out.output
    out = CliRunner().invoke(app, ["incident", "note", " "], env=nowhere)
    assert out.exit_code == 2 and "incident note refused: nothing to write about" in out.output, out.output
    out = CliRunner().invoke(app, ["incident", "notes", "x", "--concurrency", "0"])
    assert out.exit_code == 2  # typer's own range check


async def test_a_batch_starts_every_input_and_settles_on_an_approval(
        client: Client, status: Any, tmp_path: Path) -> None:
    """The batch returns once every task ended or waits for a person; the items keep the input order."""
    from agents.oncall.agent import oncall

    app = typer.Typer()
    app.callback()(lambda: None)
    from starter.commands import run_batch

    add_command(app, GROUP)
    key = uuid.uuid4().hex[:8]
    async with agent_environment(oncall, incident_note, client=client, home=tmp_path) as env:
        inputs: list[keel.commands.Startable] = [
            keel.AgentInput(agent="oncall", input="Is the api service healthy?"),
            keel.AgentInput(agent="oncall", input="The payments service is down, please fix it."),
            keel.AgentInput(agent="oncall", input="Is the api service healthy?", key=f"twice-{key}"),
            keel.AgentInput(agent="oncall", input="Is the api service healthy?", key=f"twice-{key}"),
        ]
        items = await asyncio.wait_for(run_batch(env.client, env.settings, inputs, 2, idempotent=True), 60)
        cli = cli_env(env, tmp_path)
        SHOWN.clear()
        shown = await asyncio.to_thread(CliRunner().invoke, app, [
            "incident", "notes", "api 502s", "db slow", "--concurrency", "1", "--key", f"n-{key}"], env=cli)
        again = await asyncio.to_thread(CliRunner().invoke, app, [
            "incident", "notes", "api 502s", "--key", f"n-{key}", "--json"], env=cli)
        waiting = items[1]
        if waiting.workflow_id:
            await env.client.get_workflow_handle(waiting.workflow_id).terminate("test over")
    assert [i.input for i in items] == inputs
    assert [i.status for i in items] == ["completed", "awaiting_approval", "completed", "completed"]
    assert waiting.waiting and waiting.result is None and waiting.pending_action is not None
    assert waiting.pending_action.tool == "restart_service" and waiting.pending_action.approvers == ["sre-lead"]
    assert waiting.to_json()["progress"]["pending_action"]["tool"] == "restart_service"
    # The same key twice: one task, and the second item is that task (idempotent).
    assert items[2].workflow_id == items[3].workflow_id == f"oncall-twice-{key}"
    assert sorted([items[2].existing, items[3].existing]) == [False, True]
    assert status.restarts == {}

    # Through the command line: show_batch gets every item; --json is one array.
    assert shown.exit_code == 0, shown.output
    assert "starting 2 tasks, at most 1 at a time" in shown.output
    assert f"incident_note-n-{key}: completed\n" in shown.output
    assert f"incident_note-n-{key}: completed (existing)" in shown.output and "2 notes" in shown.output
    assert [len(s) for s in SHOWN] == [2]
    assert again.exit_code == 0, again.output
    [doc] = json.loads(again.stdout)
    assert doc["workflow_id"] == f"incident_note-n-{key}" and doc["existing"] is True
    assert doc["status"] == "completed" and doc["result"]["agent"] == "incident_note" and doc["error"] is None


async def test_a_failed_task_is_an_item_with_its_error_and_the_batch_exits_1(client: Client, tmp_path: Path) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    add_command(app, GROUP)
    async with agent_environment(incident_note, client=client, home=tmp_path) as env:
        cli = cli_env(env, tmp_path)
        # A batch naming an agent no worker serves: that task fails; the batch reports it and exits 1.
        out = await asyncio.to_thread(CliRunner().invoke, app, [
            "incident", "notes", "x", "y", "--agent", "no_such_agent"], env=cli)
    assert out.exit_code == 1, out.output
    assert "failed" in out.output and "no agent named 'no_such_agent'" in out.output
    assert "2 of 2 tasks failed" in out.output
