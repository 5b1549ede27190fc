"""Verbs an agent package adds to the `keel` command line, without touching the CLI.

A module lists its `COMMANDS` (`keel.Command`). `build` is a function whose parameters are typer
arguments and options (annotate them with `typing.Annotated[..., typer.Option(...)]` or give plain
defaults) and which returns what to start: an `AgentInput` (one agent) or the input of a pattern
(`SupervisorInput`, `OrchestratorInput`, `SwarmInput`). A `ValueError` from it is bad input: the
command exits 2 with its message. The CLI starts the task, prints its id and Temporal UI link, waits,
and prints the result with `show` (each item it yields is printed: text with rich markup, or a rich
renderable), or as JSON with `--json`. The command line adds the verbs of the built-in agent packages'
`cli` modules and of the modules named in `KEEL_COMMANDS` (comma-separated).

A batch command (`show_batch` given) builds a list of inputs: the CLI starts them, at most
`--concurrency` at a time, waits for each to settle (it ended, or it waits for a person: an approval,
a human's resolution; a batch never sits behind one) and prints the `BatchItem`s with `show_batch`, or
one JSON array with `--json`. A `CommandGroup` makes a verb group (`keel GROUP VERB ...`). With
`idempotent=True`, an input whose workflow id (from its key) already exists, running or closed, starts
nothing: the command waits for and shows that run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keel.agent import NAME
from keel.errors import AgentDefinitionError
from keel.orchestration import OrchestratorInput, SwarmInput
from keel.supervision import SupervisorInput
from keel.types import AgentInput, AgentResult, PatternProgress, PendingAction, Progress

Startable = AgentInput | SupervisorInput | OrchestratorInput | SwarmInput

WAITING_FOR_PEOPLE = ("awaiting_approval", "awaiting_human")
"""Progress statuses of a task that waits for a person: it counts as settled in a batch."""


@dataclass(frozen=True)
class Command:
    """A `keel NAME ...` verb: `build(**options) -> what to start`, `show(result) -> what to print`."""

    name: str
    build: Callable[..., Startable | Sequence[Startable]]
    show: Callable[[Any], Iterable[Any]] | None = None
    help: str = ""
    """Default: the first paragraph of `build`'s docstring."""
    show_batch: Callable[[list[BatchItem]], Iterable[Any]] | None = None
    """Makes it a batch command: `build` returns a list of inputs, `show_batch` what to print of them all."""
    idempotent: bool = False
    """An input whose workflow id (from its key) exists already is not started again: its run is shown."""

    def __post_init__(self) -> None:
        _check_name("command", self.name)
        if not callable(self.build) or any(f is not None and not callable(f) for f in (self.show, self.show_batch)):
            raise AgentDefinitionError(f"command {self.name!r}: build, show and show_batch must be callable")
        if self.show is not None and self.show_batch is not None:
            raise AgentDefinitionError(f"command {self.name!r}: give show (one task) or show_batch (a batch), "
                                       "not both")

    @property
    def batch(self) -> bool:
        return self.show_batch is not None


@dataclass(frozen=True)
class CommandGroup:
    """A verb group, `keel NAME SUB ...`: its commands (and groups) under one name."""

    name: str
    commands: Sequence[Command | CommandGroup]
    help: str = ""

    def __post_init__(self) -> None:
        _check_name("command group", self.name)
        names = [c.name for c in self.commands]
        if not names or not all(isinstance(c, Command | CommandGroup) for c in self.commands):
            raise AgentDefinitionError(f"command group {self.name!r} must list keel.Command (or CommandGroup) items")
        if len(set(names)) != len(names):
            raise AgentDefinitionError(f"command group {self.name!r} lists a name twice: {names}")


def _check_name(what: str, name: str) -> None:
    if not NAME.match(name.replace("-", "_")):
        raise AgentDefinitionError(f"{what} name {name!r} must match {NAME.pattern} (dashes allowed)")


@dataclass(frozen=True)
class BatchItem:
    """One task of a batch command, once settled: its result, or its progress while it waits for a person,
    or the error that ended it (it failed, or could not start)."""

    input: Startable
    workflow_id: str
    result: Any = None
    """The task's result (an AgentResult, or the pattern's result) when it ended."""
    progress: Progress | PatternProgress | None = None
    """Its progress when it waits for a person (status in WAITING_FOR_PEOPLE)."""
    error: str = ""
    existing: bool = False
    """The workflow id had run already (an idempotent command): this is that run, nothing was started."""

    @property
    def status(self) -> str:
        if self.result is not None:
            return str(getattr(self.result, "status", "completed"))
        if self.progress is not None:
            return self.progress.status
        return "failed"

    @property
    def waiting(self) -> bool:
        return self.result is None and self.progress is not None

    @property
    def pending_action(self) -> PendingAction | None:
        """The write awaiting approval, when the task waits for one."""
        return self.progress.pending_action if isinstance(self.progress, Progress) else None

    def to_json(self) -> dict[str, Any]:
        return {"workflow_id": self.workflow_id, "status": self.status, "existing": self.existing,
                "error": self.error or None,
                "result": self.result.model_dump(mode="json") if self.result is not None else None,
                "progress": self.progress.model_dump(mode="json") if self.progress is not None else None}


def models_line(results: Mapping[str, AgentResult]) -> str:
    """A pattern command's last line: its children's models, with what their costs are (simulated: the
    sim; an estimate: self-hosted). Rich markup: the model labels' brackets are escaped."""
    models = sorted({m for res in results.values() for m in res.models})
    notes = ["sim: simulated tokens and costs"] if any("[sim" in m for m in models) else []
    if any("[self-hosted]" in m for m in models):
        notes.append("self-hosted: costs are your declared estimate (KEEL_PRICES)")
    shown = ", ".join(models).replace("[", "\\[") or "-"
    return f"models: {shown}" + (f"  [dim]({'; '.join(notes)})[/dim]" if notes else "")
