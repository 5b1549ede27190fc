"""The agents this process serves, by name.

A worker registers the agents it is given (`keel worker --agents my_pkg.agents`); the generic agent
workflow, the LLM activity and the sim look them up here. Workflow code reads it through the
sandbox's pass-through of `keel`, so a definition is the same object everywhere in the worker.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

from keel.agent import Agent
from keel.errors import AgentDefinitionError, AgentNotRegistered

_AGENTS: dict[str, Agent] = {}


def register(*agents: Agent) -> None:
    """Make agents known to this process. The same definition may be registered twice; another
    definition under a taken name is an error (two teams' agents never shadow each other)."""
    for a in agents:
        if not isinstance(a, Agent):
            raise AgentDefinitionError(f"{a!r} is not a keel.Agent")
        known = _AGENTS.get(a.name)
        if known is not None and known is not a:
            raise AgentDefinitionError(f"another agent named {a.name!r} is already registered "
                                       f"(from {known.prompt_dir})")
        _AGENTS[a.name] = a


def get(name: str) -> Agent:
    try:
        return _AGENTS[name]
    except KeyError:
        raise AgentNotRegistered(f"no agent named {name!r} is registered on this worker "
                                 f"(registered: {sorted(_AGENTS) or 'none'}); start the worker with "
                                 f"--agents <module> or KEEL_AGENTS") from None


def find(name: str) -> Agent | None:
    return _AGENTS.get(name)


def registered() -> list[Agent]:
    return [_AGENTS[n] for n in sorted(_AGENTS)]


def agents_of(module: ModuleType) -> list[Agent]:
    """A module's agents: its `AGENTS` list if it has one, else every `Agent` at its top level."""
    listed = getattr(module, "AGENTS", None)
    if listed is not None:
        found = list(listed)
    else:
        found = [v for v in vars(module).values() if isinstance(v, Agent)]
    if not found:
        raise AgentDefinitionError(f"module {module.__name__!r} defines no keel.Agent (and no AGENTS list)")
    return found


def load(modules: Iterable[str]) -> list[Agent]:
    """Import agent modules by name (`my_pkg.agents`) and register their agents. An import error or a
    bad definition stops here, before the worker starts."""
    out: list[Agent] = []
    for name in modules:
        name = name.strip()
        if not name:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise AgentDefinitionError(f"cannot import agent module {name!r}: {e}") from e
        found = agents_of(module)
        register(*found)
        out += [a for a in found if a not in out]
    return out
