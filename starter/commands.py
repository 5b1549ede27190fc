"""Verbs of agent packages on the `keel` command line (keel.Command): a module's `COMMANDS`, each made a
command that builds what to start from its options, starts it, prints its id and UI link, waits, and
prints the result with the command's `show` (or as JSON with --json). A batch command starts every input
it builds, at most --concurrency at a time, and prints them all with its `show_batch`; a task that waits
for a person (an approval) counts as settled. A command with idempotent=True starts each keyed input once
(its workflow id from its key): run again, it finds the runs it has. Calls to Temporal ride out a server
restart (starter.rpc); Ctrl-C or SIGTERM stops a batch printing what finished and what is pending (the same
batch run again resumes it). A keel.CommandGroup is a verb group (`keel GROUP VERB`).

The command line adds the verbs of every built-in agent package's `cli` module (`agents/<name>/cli.py`
with a COMMANDS list; found without importing the agents) and of the modules named in KEEL_COMMANDS
(comma-separated; such a module must list COMMANDS)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import signal
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from temporalio.client import Client, WorkflowHandle, WorkflowQueryFailedError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from keel import names
from keel.commands import WAITING_FOR_PEOPLE, BatchItem, Command, CommandGroup, Startable
from keel.errors import AgentDefinitionError
from keel.orchestration import OrchestratorInput, OrchestratorResult, SwarmInput, SwarmResult
from keel.settings import KeelSettings
from keel.supervision import SupervisorInput, SupervisorResult
from keel.types import AgentInput, AgentResult, PatternProgress, Progress
from starter import views
from starter.agents import (
    agent_workflow_id,
    is_existing,
    orchestration_id,
    start_agent,
    start_orchestration,
    start_supervision,
    start_swarm,
    supervision_id,
    swarm_id,
)
from starter.console import client_or_exit, console, err, failure_text, load_settings, run_task
from starter.rpc import Temporal
from starter.settling import Settler

_OWN = {"as_json", "watch"}
_OWN_BATCH = {"as_json", "concurrency"}
SUBMIT_CONCURRENCY = 50
"""A batch's start calls in flight at once, whatever its --concurrency (tasks in flight)."""

def commands_of(module_name: str) -> list[Command | CommandGroup]:
    """A module's `COMMANDS` (verbs and verb groups); a module that cannot be imported or lists something
    else is an error."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise AgentDefinitionError(f"cannot import command module {module_name!r}: {e}") from e
    found = list(getattr(module, "COMMANDS", None) or [])
    if not found or not all(isinstance(c, Command | CommandGroup) for c in found):
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
            add_command(app, cmd)
            added.append(cmd.name)
    return added


def add_command(app: typer.Typer, cmd: Command | CommandGroup, label: str | None = None) -> None:
    """Add a verb (or a verb group, as a sub-command of its own) to `app`."""
    label = label or cmd.name
    if isinstance(cmd, Command):
        app.command(cmd.name, help=cmd.help or None)(command_function(cmd, label))
        return
    group = typer.Typer(help=cmd.help or None, no_args_is_help=True)
    for sub in cmd.commands:
        add_command(group, sub, f"{label} {sub.name}")
    app.add_typer(group, name=cmd.name)


RESULT_TYPES: dict[type[Any], type[Any]] = {AgentInput: AgentResult, SupervisorInput: SupervisorResult,
                                            OrchestratorInput: OrchestratorResult, SwarmInput: SwarmResult}


def workflow_id_of(inp: Startable) -> str:
    """The workflow id the input starts under: from its key, else a new random one."""
    if isinstance(inp, AgentInput):
        return agent_workflow_id(inp)
    if isinstance(inp, OrchestratorInput):
        return orchestration_id(inp)
    if isinstance(inp, SupervisorInput):
        return supervision_id(inp)
    if isinstance(inp, SwarmInput):
        return swarm_id(inp)
    raise TypeError(f"a command's build returned {type(inp).__name__}, not an AgentInput or a pattern's input")


async def _start(client: Client, settings: KeelSettings, inp: Startable, workflow_id: str) -> WorkflowHandle[Any, Any]:
    if isinstance(inp, SupervisorInput):
        return await start_supervision(client, settings, inp, workflow_id)
    if isinstance(inp, OrchestratorInput):
        return await start_orchestration(client, settings, inp, workflow_id)
    if isinstance(inp, SwarmInput):
        return await start_swarm(client, settings, inp, workflow_id)
    if isinstance(inp, AgentInput):
        return await start_agent(client, settings, inp, workflow_id)
    raise TypeError(f"a command's build returned {type(inp).__name__}, not an AgentInput or a pattern's input")


async def start_task(client: Client, settings: KeelSettings, inp: Startable, idempotent: bool = False,
                     workflow_id: str | None = None, temporal: Temporal | None = None
                     ) -> tuple[WorkflowHandle[Any, Any], bool]:
    """Start what a command built: (its handle, False). Idempotent with a key: when a workflow with its id
    exists (running or closed), nothing is started: (that workflow's handle, True). The calls ride out a
    restarting server (`temporal`, default from the settings) and a timeout names the call."""
    temporal = temporal or Temporal(settings)
    wid = workflow_id or workflow_id_of(inp)
    existing = client.get_workflow_handle(wid, result_type=RESULT_TYPES[type(inp)])
    keyed = idempotent and bool(getattr(inp, "key", ""))
    if keyed:
        async def describe() -> bool:
            try:
                await existing.describe(rpc_timeout=timedelta(seconds=temporal.timeout_s))
                return True
            except RPCError as e:
                if e.status != RPCStatusCode.NOT_FOUND:
                    raise
                return False

        if await temporal.call(f"describe of {wid}", describe):
            return existing, True
    try:
        # A key starts exactly once (starter.agents.start_once): a start made again after a lost answer
        # finds the run the first one made.
        handle = await temporal.call(f"start of {wid}", lambda: _start(client, settings, inp, wid))
        return handle, keyed and is_existing(handle)
    except WorkflowAlreadyStartedError:
        if not keyed:
            raise
        return existing, True  # started meanwhile by another submission of the same key


POLL_FIRST_S, POLL_MAX_S = 0.5, 5.0
"""How often a settling task's progress is asked for: soon, then less and less often (a batch of any size
makes at most concurrency / POLL_MAX_S queries a second once its tasks run a while)."""


async def settle(client: Client, handle: WorkflowHandle[Any, Any], inp: Startable, existing: bool = False,
                 poll_s: float = POLL_FIRST_S, temporal: Temporal | None = None,
                 settings: KeelSettings | None = None) -> BatchItem:
    """Wait until the task ends (its result) or waits for a person (its progress then), asking for its
    progress less and less often. A failed task raises (WorkflowFailureError); a server that restarts
    meanwhile is waited for (`temporal`)."""
    temporal = temporal or Temporal(settings or KeelSettings())
    kind = Progress if isinstance(inp, AgentInput) else PatternProgress
    result = asyncio.ensure_future(temporal.call(f"result of {handle.id}", handle.result))
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=poll_s)
            if done:
                return BatchItem(inp, handle.id, result=result.result(), existing=existing)
            poll_s = min(poll_s * 2, POLL_MAX_S)
            with contextlib.suppress(RPCError, WorkflowQueryFailedError):  # not answering yet: ask again
                p = await handle.query(names.PROGRESS_QUERY, result_type=kind,
                                       rpc_timeout=timedelta(seconds=temporal.timeout_s))
                if p.status in WAITING_FOR_PEOPLE:
                    return BatchItem(inp, handle.id, progress=p, existing=existing)
    finally:
        if not result.done():
            result.cancel()


async def run_batch(client: Client, settings: KeelSettings, inputs: list[Startable], concurrency: int,
                    idempotent: bool = False, temporal: Temporal | None = None,
                    settled: dict[int, BatchItem] | None = None, ids: list[str] | None = None) -> list[BatchItem]:
    """Start every input (at most `concurrency` started and settling at once), each until it settles; the
    items in input order. A task that fails, or cannot start, is an item with its error: the others go on.
    `settled` (by input index) fills as items settle: what an interrupted batch reports as finished."""
    temporal = temporal or Temporal(settings)
    settled = {} if settled is None else settled
    sem = asyncio.Semaphore(max(1, concurrency))
    submit = asyncio.Semaphore(SUBMIT_CONCURRENCY)
    settler = Settler()  # one visibility listing a round for every task, not a progress query per task
    ids = ids or [workflow_id_of(inp) for inp in inputs]

    async def one(i: int, inp: Startable, wid: str) -> BatchItem:
        async with sem:
            item = await attempt(inp, wid)
        settled[i] = item
        return item

    async def attempt(inp: Startable, wid: str) -> BatchItem:
        try:
            async with submit:
                handle, existing = await start_task(client, settings, inp, idempotent, wid, temporal)
        except Exception as e:  # reported in the batch's table, and the command exits 1
            return BatchItem(inp, wid, error=f"not started: {e}")
        try:
            return await settler.settle(client, handle, inp, existing)
        except Exception as e:
            return BatchItem(inp, wid, error=failure_text(e), existing=existing)

    return list(await asyncio.gather(*(one(i, inp, wid) for i, (inp, wid) in enumerate(zip(inputs, ids, strict=True)))))


def waiting_lines(item: BatchItem) -> list[str]:
    """What to do about a task that waits for a person."""
    wid, a = item.workflow_id, item.pending_action
    if a is not None:
        who = a.approvers[0] if a.approvers else "NAME"
        return [f"{wid} waits for the approval of {a.action_id} ({a.tool}): `keel approvals`; "
                f"`keel approve {wid} --as {who}` or `keel reject {wid} --as {who}`"]
    return [f"{wid} is {item.status}: it waits for a person"]


def _build(cmd: Command, label: str, kwargs: dict[str, Any]) -> Any:
    try:
        return cmd.build(**kwargs)
    except (ValueError, ValidationError) as e:
        err.print(f"[red]{escape(label)} refused:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e


def command_function(cmd: Command, label: str | None = None) -> Callable[..., None]:
    """A typer command: the parameters of `cmd.build`, plus --json and --watch (a batch: --json and
    --concurrency). `label`: how errors name it (default its name; `GROUP VERB` in a group)."""
    label = label or cmd.name
    sig = inspect.signature(cmd.build, eval_str=True)
    clash = (_OWN_BATCH if cmd.batch else _OWN) & set(sig.parameters)
    if clash:
        raise AgentDefinitionError(f"command {cmd.name!r}: parameters {sorted(clash)} are the CLI's own")

    def run(**kwargs: Any) -> None:
        as_json, watch = kwargs.pop("as_json"), kwargs.pop("watch")
        settings = load_settings()
        inp = _build(cmd, label, kwargs)

        async def main() -> None:
            client = await client_or_exit(settings)
            temporal = Temporal(settings, say=lambda text: err.print(f"[yellow]{escape(text)}[/yellow]"))
            handle, existing = await start_task(client, settings, inp, cmd.idempotent, temporal=temporal)
            if not as_json:
                said = " (it exists already: nothing new was started)" if existing else ""
                console.print(f"{'found' if existing else 'started'} [bold]{handle.id}[/bold]{said}")
                console.print(f"  {views.workflow_url(settings, handle.id)}")
            if isinstance(inp, AgentInput):
                if watch and not as_json:
                    from starter.run_cli import watch_agent

                    res = await watch_agent(client, handle.id, inp.agent)
                    if res is None:
                        return  # it waits for a person: watch_agent said how to decide
                else:
                    item = await settle(client, handle, inp, existing, temporal=temporal)
                    if item.waiting:
                        if as_json:
                            print(json.dumps(item.to_json(), indent=2))
                            return
                        console.print(views.progress_panel(handle.id, item.progress, inp.agent))  # type: ignore[arg-type]
                        for line in waiting_lines(item):
                            console.print(escape(line))
                        return
                    res = item.result
            elif watch and not as_json:
                from starter import patterns

                res = await patterns.watch(client, console, handle)
            else:
                ended: Any = await temporal.call(f"result of {handle.id}", lambda: handle.result())
                res = ended
            if as_json or cmd.show is None:
                print(json.dumps(res.model_dump(mode="json"), indent=2))
                return
            for shown in cmd.show(res):
                console.print(shown)

        run_task(main, label)

    def run_many(**kwargs: Any) -> None:
        as_json, concurrency = kwargs.pop("as_json"), kwargs.pop("concurrency")
        settings = load_settings()
        built = _build(cmd, label, kwargs)
        inputs = list(built) if isinstance(built, list | tuple) else None
        if inputs is None:
            raise TypeError(f"batch command {cmd.name!r}: build returned {type(built).__name__}, not a list of inputs")
        if not inputs:
            err.print(f"[red]{escape(label)} refused:[/red] nothing to start")
            raise typer.Exit(2)
        items: list[BatchItem] = []
        settled: dict[int, BatchItem] = {}
        ids = [workflow_id_of(inp) for inp in inputs]
        stopped: list[str] = []  # the signal that interrupted the batch

        async def main() -> None:
            client = await client_or_exit(settings)
            temporal = Temporal(settings, say=lambda text: err.print(f"[yellow]{escape(text)}[/yellow]"))
            if not as_json:
                console.print(f"starting {len(inputs)} tasks, at most {concurrency} at a time")
            work = asyncio.ensure_future(run_batch(client, settings, inputs, concurrency, cmd.idempotent,
                                                   temporal, settled, ids))
            loop = asyncio.get_running_loop()
            def interrupt(sig: signal.Signals) -> None:
                stopped.append(sig.name)
                work.cancel()

            handled: list[signal.Signals] = []
            for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, kill: say what finished, then stop
                with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
                    loop.add_signal_handler(sig, interrupt, sig)
                    handled.append(sig)
            try:
                with contextlib.nullcontext() if as_json else console.status("working...", spinner="dots") as st:
                    while not work.done():
                        await asyncio.wait({work}, timeout=1.0)
                        if st is not None:
                            st.update(f"working... {len(settled)} of {len(inputs)} settled")
                    items.extend(work.result())
            except asyncio.CancelledError:
                if not stopped:
                    raise
            finally:
                for sig in handled:
                    loop.remove_signal_handler(sig)
            if stopped:
                report_interrupted(stopped[0])
                return
            if as_json:
                print(json.dumps([i.to_json() for i in items], indent=2))
                return
            assert cmd.show_batch is not None
            for shown in cmd.show_batch(items):
                console.print(shown)

        def report_interrupted(signame: str) -> None:
            """What finished and what is still pending (its id: the same batch run again resumes it)."""
            done = [settled[i] for i in sorted(settled)]
            pending = [wid for i, wid in enumerate(ids) if i not in settled]
            if as_json:
                print(json.dumps({"interrupted": signame, "finished": [i.to_json() for i in done],
                                  "pending": pending}, indent=2))
            elif done:
                assert cmd.show_batch is not None
                for shown in cmd.show_batch(done):
                    console.print(shown)
            err.print(f"[yellow]interrupted ({signame}): {len(done)} of {len(inputs)} tasks finished, "
                      f"{len(pending)} pending[/yellow]")
            for wid in pending:
                err.print(f"  pending {escape(wid)}")
            if pending:
                resume = ("run the same command again to resume: started tasks are found by their ids, not run "
                          "twice" if cmd.idempotent else "tasks already started go on; see `keel status`")
                err.print(escape(resume))

        run_task(main, label)
        if stopped:
            raise typer.Exit(130 if stopped[0] == "SIGINT" else 143)
        failed = [i for i in items if i.error]
        if failed:
            for i in failed:
                err.print(f"[red]{escape(i.workflow_id)} failed:[/red] {escape(i.error)}")
            err.print(f"[red]{len(failed)} of {len(items)} tasks failed[/red]")
            raise typer.Exit(1)

    if cmd.batch:
        own = [
            inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False,
                              annotation=Annotated[bool, typer.Option("--json", help="Print the results as one "
                                                                                     "JSON array.")]),
            inspect.Parameter("concurrency", inspect.Parameter.KEYWORD_ONLY, default=10,
                              annotation=Annotated[int, typer.Option("--concurrency", "-k", min=1,
                                                                     help="Tasks in flight at once.")]),
        ]
        fn = run_many
    else:
        own = [
            inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False,
                              annotation=Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]),
            inspect.Parameter("watch", inspect.Parameter.KEYWORD_ONLY, default=False,
                              annotation=Annotated[bool, typer.Option("--watch", help="Draw the live progress.")]),
        ]
        fn = run
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()] + own
    fn.__signature__ = sig.replace(parameters=params, return_annotation=None)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    fn.__doc__ = inspect.getdoc(cmd.build)
    fn.__name__ = cmd.name.replace("-", "_")
    return fn
