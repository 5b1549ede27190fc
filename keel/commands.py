"""Verbs an agent package adds to the `keel` command line, without touching the CLI.

A module lists its `COMMANDS` (`keel.Command`). `build` is a function whose parameters are typer
arguments and options (annotate them with `typing.Annotated[..., typer.Option(...)]` or give plain
defaults) and which returns what to start: an `AgentInput` (one agent) or the input of a pattern
(`SupervisorInput`, `OrchestratorInput`, `SwarmInput`). A `ValueError` from it is bad input: the
command exits 2 with its message. The CLI starts the task, prints its id and Temporal UI link, waits,
and prints the result with `show` (each item it yields is printed: text with rich markup, or a rich
renderable), or as JSON with `--json`. The command line adds the verbs of the built-in agent packages'
`cli` modules and of the modules named in `KEEL_COMMANDS` (comma-separated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from keel.agent import NAME
from keel.errors import AgentDefinitionError
from keel.orchestration import OrchestratorInput, SwarmInput
from keel.supervision import SupervisorInput
from keel.types import AgentInput

Startable = AgentInput | SupervisorInput | OrchestratorInput | SwarmInput


@dataclass(frozen=True)
class Command:
    """A `keel NAME ...` verb: `build(**options) -> what to start`, `show(result) -> what to print`."""

    name: str
    build: Callable[..., Startable]
    show: Callable[[Any], Iterable[Any]] | None = None
    help: str = ""
    """Default: the first paragraph of `build`'s docstring."""

    def __post_init__(self) -> None:
        if not NAME.match(self.name.replace("-", "_")):
            raise AgentDefinitionError(f"command name {self.name!r} must match {NAME.pattern} (dashes allowed)")
        if not callable(self.build) or (self.show is not None and not callable(self.show)):
            raise AgentDefinitionError(f"command {self.name!r}: build and show must be callable")
