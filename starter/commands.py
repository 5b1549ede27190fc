"""Verbs of agent packages on the `keel` command line (keel.Command): a module's `COMMANDS`, each made a
command that builds what to start from its options, starts it, prints its id and UI link, waits, and
prints the result with the command's `show` (or as JSON with --json).

The command line adds the verbs of every built-in agent package's `cli` module (`agents/<name>/cli.py`
with a COMMANDS list; found without importing the agents) and of the modules named in KEEL_COMMANDS
(comma-separated; such a module must list COMMANDS)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape

from keel.commands import Command, Startable
from keel.errors import AgentDefinitionError
from keel.orchestration import OrchestratorInput, SwarmInput
from keel.supervision import SupervisorInput
from keel.types import AgentInput
from starter import views
from starter.agents import start_agent, start_orchestration, start_supervision, start_swarm
from starter.console import client_or_exit, console, err, load_settings, run_task

_OWN = {"as_json", "watch"}


def commands_of(module_name: str) -> list[Command]:
    """A module's `COMMANDS`; a module that cannot be imported or lists something else is an error."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise AgentDefinitionError(f"cannot import command module {module_name!r}: {e}") from e
    found = list(getattr(module, "COMMANDS", None) or [])
    if not found or not all(isinstance(c, Command) for c in found):
        raise AgentDefinitionError(f"module {module_name!r} must list its keel.Command verbs in COMMANDS")
    return found


def builtin_command_modules() -> list[str]:
    """The built-in agent packages' `cli` modules that list COMMANDS (`agents.<name>.cli`)."""
    import agents

    found: list[str] = []
    for root in agents.__path__:
        for pkg in pkgutil.iter_modules([root]):
            if pkg.ispkg and (Path(root) / pkg.name / "cli.py").is_file():
                module = importlib.import_module(f"agents.{pkg.name}.cli")
                if getattr(module, "COMMANDS", None):
                    found.append(module.__name__)
    return sorted(found)


def add_commands(app: typer.Typer, modules: Iterable[str] | None = None) -> list[str]:
    """Add every command of the modules (default: the built-in ones and KEEL_COMMANDS) to `app`; their names."""
    if modules is None:
        modules = [*builtin_command_modules(), *os.environ.get("KEEL_COMMANDS", "").split(",")]
    added: list[str] = []
    for name in dict.fromkeys(m.strip() for m in modules if m.strip()):
        for cmd in commands_of(name):
            app.command(cmd.name, help=cmd.help or None)(command_function(cmd))
            added.append(cmd.name)
    return added


async def _start(client: Any, settings: Any, inp: Startable) -> Any:
    if isinstance(inp, SupervisorInput):
        return await start_supervision(client, settings, inp)
    if isinstance(inp, OrchestratorInput):
        return await start_orchestration(client, settings, inp)
    if isinstance(inp, SwarmInput):
        return await start_swarm(client, settings, inp)
    if isinstance(inp, AgentInput):
        return await start_agent(client, settings, inp)
    raise TypeError(f"a command's build returned {type(inp).__name__}, not an AgentInput or a pattern's input")


def command_function(cmd: Command) -> Callable[..., None]:
    """A typer command: the parameters of `cmd.build`, plus --json and --watch."""
    sig = inspect.signature(cmd.build, eval_str=True)
    clash = _OWN & set(sig.parameters)
    if clash:
        raise AgentDefinitionError(f"command {cmd.name!r}: parameters {sorted(clash)} are the CLI's own")

    def run(**kwargs: Any) -> None:
        as_json, watch = kwargs.pop("as_json"), kwargs.pop("watch")
        settings = load_settings()
        try:
            inp = cmd.build(**kwargs)
        except (ValueError, ValidationError) as e:
            err.print(f"[red]{cmd.name} refused:[/red] {escape(str(e))}")
            raise typer.Exit(2) from e

        async def main() -> None:
            client = await client_or_exit(settings)
            handle = await _start(client, settings, inp)
            if not as_json:
                console.print(f"started [bold]{handle.id}[/bold]")
                console.print(f"  {views.workflow_url(settings, handle.id)}")
            if watch and not as_json:
                from starter import patterns

                res = await patterns.watch(client, console, handle)
            else:
                res = await handle.result()
            if as_json or cmd.show is None:
                print(json.dumps(res.model_dump(mode="json"), indent=2))
                return
            for item in cmd.show(res):
                console.print(item)

        run_task(main, cmd.name)

    own = [
        inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]),
        inspect.Parameter("watch", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=Annotated[bool, typer.Option("--watch", help="Draw the live progress.")]),
    ]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()] + own
    run.__signature__ = sig.replace(parameters=params, return_annotation=None)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = inspect.getdoc(cmd.build)
    run.__name__ = cmd.name.replace("-", "_")
    return run
