"""Verbs of agent packages on the command line (keel.Command, starter.commands): a module's COMMANDS become
`keel` commands that build what to start from their options, start it, wait and print it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from temporalio.client import Client
from typer.testing import CliRunner

import keel
from agents.oncall.agent import incident_note
from keel.testing import agent_environment
from starter.commands import add_commands, builtin_command_modules, command_function, commands_of
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
