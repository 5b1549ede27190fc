"""`Agent` and `@tool`: how a team declares its own agent.

An agent is data plus a few pure functions: a stable name, a versioned prompt file, tools (each an
async or sync function taking one pydantic arguments model), models per tier, a budget, approvers of
its `confirm` tools, guardrail hooks and an optional structured answer. The definition is checked when
it is made: a mistake is an `AgentDefinitionError` at import, never a task that fails later.

Workers register agents (`keel worker --agents my_pkg.agents`); the one generic agent workflow runs
any of them with every control, and each tool runs as its own activity named `<agent>.<tool>`.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints, overload

from pydantic import BaseModel, ConfigDict

from keel.errors import AgentDefinitionError
from keel.pricing import UnpricedModelError, price_for
from keel.types import Budget, ModelSpec, Permission, StepKind, Tier, ToolSpec

NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
"""Agent and tool names: they are activity names and ledger tags, stored in histories."""


class Args(BaseModel):
    """Base of a tool's arguments model: unknown fields are refused (a model's extra "force": true
    never slips through)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class ToolContext:
    """What a tool function is handed besides its arguments."""

    agent: str
    tool: str
    workflow_id: str
    step: int
    idempotency_key: str
    """`<workflow id>/<step>`: the same on every retry of this call. A write keyed on it happens once."""
    attempt: int
    tenant: str
    """The chargeback tag of the task (who it is done for)."""
    key: str
    """The task's business key (`keel run --key`), or empty."""
    dry_run: bool = False
    """Always False inside a tool: a dry-run write is recorded by Keel and the function is not called."""


ToolFunction = Callable[..., Any]


@dataclass(frozen=True)
class Tool:
    """A tool an agent may call. Made by `@keel.tool`."""

    name: str
    description: str
    args: type[BaseModel]
    permission: Permission
    fn: ToolFunction
    claims: tuple[str, ...] = ()
    """Words of the actions this tool performs ("restarted", "restart"): an answer that claims one of
    them when no call of this tool was executed is unfounded."""
    hands_off: bool = False
    """A successful call hands the task to a human: the loop stops after it and the task ends
    `escalated` (human queue), with the reason the tool returned (`"reason"` in its result, else in
    its arguments, else the tool's name)."""

    @property
    def writes(self) -> bool:
        return self.permission != "read_only"

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def spec(self) -> ToolSpec:
        return _spec(self)


_SPECS: dict[int, ToolSpec] = {}


def _spec(t: Tool) -> ToolSpec:
    # A JSON schema costs about a millisecond; the spec is asked for on every model call.
    cached = _SPECS.get(id(t))
    if cached is None:
        schema = t.args.model_json_schema()
        schema.pop("title", None)
        cached = ToolSpec(name=t.name, description=t.description, parameters=schema, permission=t.permission)
        _SPECS[id(t)] = cached
    return cached


@overload
def tool(fn: ToolFunction, /) -> Tool: ...


@overload
def tool(
    *, name: str | None = None, description: str | None = None, permission: Permission = "read_only",
    claims: Sequence[str] = (), hands_off: bool = False,
) -> Callable[[ToolFunction], Tool]: ...


def tool(
    fn: ToolFunction | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    permission: Permission = "read_only",
    claims: Sequence[str] = (),
    hands_off: bool = False,
) -> Tool | Callable[[ToolFunction], Tool]:
    """Declare a tool: `async def f(ctx: ToolContext, args: MyArgs) -> dict` (or a plain `def`).

    `permission`: `read_only` (reads only), `confirm` (a write that runs only after a listed approver
    approves these exact arguments) or `autonomous` (a write the agent may make alone, sparingly).
    `hands_off`: a successful call ends the task in the human queue (see `Tool.hands_off`).
    The description is the docstring's first paragraph unless given. Returns a `Tool`."""

    def make(f: ToolFunction) -> Tool:
        tool_name = name or f.__name__
        if not NAME.match(tool_name):
            raise AgentDefinitionError(f"tool name {tool_name!r} must match {NAME.pattern}")
        if permission not in ("read_only", "confirm", "autonomous"):
            raise AgentDefinitionError(f"tool {tool_name!r}: permission {permission!r} must be read_only, confirm "
                                       "or autonomous")
        params = list(inspect.signature(f).parameters.values())
        if len(params) != 2:
            raise AgentDefinitionError(f"tool {tool_name!r} must take (ctx: keel.ToolContext, args: <pydantic model>),"
                                       f" not {len(params)} parameter(s)")
        try:
            hints = get_type_hints(f)
        except NameError as e:
            raise AgentDefinitionError(f"tool {tool_name!r}: cannot resolve its annotations ({e})") from e
        args_type = hints.get(params[1].name)
        if not (isinstance(args_type, type) and issubclass(args_type, BaseModel)):
            raise AgentDefinitionError(f"tool {tool_name!r}: its second parameter {params[1].name!r} must be "
                                       f"annotated with a pydantic model (keel.Args), not {args_type!r}")
        doc = description or (inspect.getdoc(f) or "").split("\n\n")[0].replace("\n", " ").strip()
        if not doc:
            raise AgentDefinitionError(f"tool {tool_name!r} needs a description (a docstring or description=...)")
        return Tool(name=tool_name, description=doc, args=args_type, permission=permission, fn=f,
                    claims=tuple(claims), hands_off=bool(hands_off))

    return make(fn) if fn is not None else make


# --- guardrail hooks -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolOutcome:
    """A tool call this task executed, with what it returned."""

    tool: str
    arguments: Mapping[str, Any]
    content: Mapping[str, Any]


@dataclass(frozen=True)
class ProposedAction:
    """What an action validator sees: a schema-valid call the model proposed, before anything runs."""

    tool: str
    arguments: Mapping[str, Any]
    permission: Permission
    input: str
    """The task's input text."""
    tenant: str
    executed: tuple[ToolOutcome, ...]
    """This task's executed calls so far, in order."""
    context: tuple[str, ...] = ()
    """The task's context (`AgentInput.context`: e.g. the answers a parent orchestration gave it)."""


@dataclass(frozen=True)
class FinalOutput:
    """What an output check sees: the answer about to leave, after redaction."""

    text: str
    structured: BaseModel | None
    input: str
    tenant: str
    executed: tuple[ToolOutcome, ...]
    context: tuple[str, ...] = ()
    """The task's context, as ProposedAction.context."""
    triage: BaseModel | None = None
    """The agent's triage of the task (`Agent.triage`'s output_type), when it has one."""


ActionValidator = Callable[[ProposedAction], str | None]
"""Returns why the call must not run, or None. Runs in workflow code: pure and deterministic."""
OutputCheck = Callable[[FinalOutput], str | Sequence[str] | None]
"""Returns the problems that keep the answer from leaving (the task goes to a human), or None."""
EvidenceCheck = Callable[[FinalOutput], str | None]
"""Returns what the answer states without the evidence it needs (e.g. "the account was not read"), or
None. The model is told and may call its tools again; an answer still without it ends the task
escalated (human queue) with the reason. Runs in workflow code: pure and deterministic."""


# --- the agent -----------------------------------------------------------------------------------
PROMPT_FILE = re.compile(r"^(?P<name>[A-Za-z0-9_-]+)\.(?P<version>v[0-9A-Za-z_-]+)\.md$")


@dataclass(frozen=True)
class Triage:
    """A first, cheap model call that sorts the request before the agent works on it.

    Its answer must be `output_type` (JSON; an invalid one is sent back, up to `attempts` calls, then
    the task goes to a human). It is in the result (`AgentResult.triage`) and the agent's context
    ("Triage: {...}") from then on; `acknowledge` turns it into the fast acknowledgement the progress
    query shows while the agent works; `route` may send the task to a human before any tool runs.
    The prompt file sits beside the agent's prompt, with the same versions. Hooks run in workflow code:
    keep them pure."""

    prompt: str | Path
    output_type: type[BaseModel]
    route: Callable[[Any], str | None] | None = None
    """Why a human must take this task at once (a kind of request never automated, low confidence...),
    or None to go on."""
    acknowledge: Callable[[Any], str] | None = None
    """What the requester may be told as soon as the triage is known."""
    tier: Tier = "small"
    attempts: int = 2
    sim: Callable[..., Any] | None = None
    """How the `sim` model plays the triage (`keel.sim.SimTurn -> keel.sim.SimReply`); default an answer
    built from `output_type`'s schema."""
    prompt_dir: Path = field(init=False)
    prompt_name: str = field(init=False)

    def __post_init__(self) -> None:
        path = Path(self.prompt)
        if not path.is_absolute():
            path = _caller_dir(3) / path
        m = PROMPT_FILE.match(path.name)
        if m is None:
            raise AgentDefinitionError(f"triage prompt {path.name!r} must be named <name>.<version>.md")
        if not (isinstance(self.output_type, type) and issubclass(self.output_type, BaseModel)):
            raise AgentDefinitionError("triage output_type must be a pydantic model class")
        for hook in (self.route, self.acknowledge, self.sim):
            if hook is not None and not callable(hook):
                raise AgentDefinitionError(f"triage hook {hook!r} is not callable")
        if self.attempts < 1:
            raise AgentDefinitionError("triage attempts must be >= 1")
        object.__setattr__(self, "prompt_dir", path.parent)
        object.__setattr__(self, "prompt_name", m["name"])

ModelsArg = str | ModelSpec | Mapping[str, str | ModelSpec]


def _model(spec: str | ModelSpec, where: str) -> ModelSpec:
    try:
        m = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    except ValueError as e:
        raise AgentDefinitionError(f"{where}: {e}") from e
    try:
        price_for(m.provider, m.model)
    except UnpricedModelError as e:
        raise AgentDefinitionError(f"{where}: {e}") from e
    return m


def _caller_dir(depth: int) -> Path:
    module_file = sys._getframe(depth).f_globals.get("__file__")
    return Path(module_file).resolve().parent if module_file else Path.cwd()


@dataclass
class Agent:
    """An agent, declared once in the team's code and registered with a worker.

    `prompt` is a file `<name>.<version>.md` (relative paths are from the module that declares the
    agent); other versions are its siblings, chosen per task (`keel run --prompt-version v2`)."""

    name: str
    prompt: str | Path
    tools: Sequence[Tool] = ()
    models: ModelsArg = field(default_factory=lambda: {"small": "sim:sim-small", "large": "sim:sim-large"})
    """A `provider:model` for both tiers, or one per tier ("small", "large")."""
    fallbacks: Sequence[str | ModelSpec] = ()
    """Models tried in order when a call's retries are exhausted on a retryable provider error."""
    budget: Budget = field(default_factory=lambda: Budget(max_tokens=8_000, max_usd=0.05))
    max_steps: int = 8
    """Model calls of the tool loop before the agent must answer without tools."""
    approvers: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """`confirm` tool -> the people whose decision counts. A confirm tool nobody may approve goes to
    the human queue."""
    approval_timeout_s: float = 86_400
    validators: Sequence[ActionValidator] = ()
    output_checks: Sequence[OutputCheck] = ()
    evidence: Sequence[EvidenceCheck] = ()
    """What an answer must rest on (see `EvidenceCheck`): checked on every valid answer, before the output
    checks."""
    checks: Mapping[str, OutputCheck] = field(default_factory=dict)
    """Named deterministic checks of this agent's answer that a supervision's rules run by name
    (`keel.Rule(op="check", value=NAME)`): an answer with a problem goes back to the agent with it.
    Same signature as an output check (run in workflow code: pure); `executed` is empty there."""
    output_type: type[BaseModel] | None = None
    """A pydantic model the final answer must be (JSON); invalid answers are sent back to the model."""
    description: str = ""
    step_kind: StepKind = "reason"
    tier: Tier = "large"
    """The tier the tool loop runs on."""
    expected_tokens: int = 5_000
    """Tokens a task of this agent normally takes: the cost circuit breaker trips at 2x over a window."""
    max_output_tokens: int = 800
    max_invalid_outputs: int = 3
    """Invalid calls or answers tolerated before the task goes to a human."""
    sim: Callable[..., Any] | None = None
    """How the offline `sim` model plays this agent (`keel.sim.SimTurn -> keel.sim.SimReply`); default
    a generic behaviour that calls the offered read tools from their schemas, then answers."""
    feature: str = ""
    """Chargeback tag of its ledger rows; default the agent's name."""
    triage: Triage | None = None
    """A first, cheap call that sorts the request (see `Triage`)."""
    prompt_dir: Path = field(init=False)
    prompt_name: str = field(init=False)
    prompt_version: str = field(init=False)
    model_specs: dict[Tier, ModelSpec] = field(init=False)
    fallback_specs: list[ModelSpec] = field(init=False)
    tool_map: dict[str, Tool] = field(init=False)

    def __post_init__(self) -> None:
        where = f"agent {self.name!r}"
        if not isinstance(self.name, str) or not NAME.match(self.name):
            raise AgentDefinitionError(f"agent name {self.name!r} must match {NAME.pattern}")
        path = Path(self.prompt)
        if not path.is_absolute():
            path = _caller_dir(3) / path
        m = PROMPT_FILE.match(path.name)
        if m is None:
            raise AgentDefinitionError(f"{where}: prompt file {path.name!r} must be named <name>.<version>.md, "
                                       "e.g. oncall.v1.md")
        if not path.is_file():
            raise AgentDefinitionError(f"{where}: prompt file {path} not found")
        self.prompt_dir, self.prompt_name, self.prompt_version = path.parent, m["name"], m["version"]
        self.tool_map = {}
        for t in self.tools:
            if not isinstance(t, Tool):
                raise AgentDefinitionError(f"{where}: {t!r} is not a tool; decorate the function with @keel.tool")
            if t.name in self.tool_map:
                raise AgentDefinitionError(f"{where}: two tools named {t.name!r}")
            self.tool_map[t.name] = t
        self.model_specs = self._tiers(where)
        self.fallback_specs = [_model(f, f"{where} fallback") for f in self.fallbacks]
        for tool_name, people in self.approvers.items():
            approved = self.tool_map.get(tool_name)
            if approved is None:
                raise AgentDefinitionError(f"{where}: approvers name unknown tool {tool_name!r}; "
                                           f"its tools: {sorted(self.tool_map)}")
            if approved.permission != "confirm":
                raise AgentDefinitionError(f"{where}: approvers given for {tool_name!r}, which is "
                                           f"{approved.permission}, not confirm")
            if isinstance(people, str) or not all(isinstance(p, str) and p for p in people):
                raise AgentDefinitionError(f"{where}: approvers of {tool_name!r} must be a list of names")
        if self.max_steps < 1 or self.max_output_tokens < 16 or self.max_invalid_outputs < 0:
            raise AgentDefinitionError(f"{where}: max_steps >= 1, max_output_tokens >= 16, max_invalid_outputs >= 0")
        for hook in (*self.validators, *self.output_checks, *self.evidence):
            if not callable(hook):
                raise AgentDefinitionError(f"{where}: guardrail hook {hook!r} is not callable")
        for check_name, check in self.checks.items():
            if not (isinstance(check_name, str) and NAME.match(check_name)) or not callable(check):
                raise AgentDefinitionError(f"{where}: check {check_name!r} must be named like {NAME.pattern} "
                                           f"and callable (keel.FinalOutput -> problems)")
        if self.output_type is not None and not (isinstance(self.output_type, type)
                                                 and issubclass(self.output_type, BaseModel)):
            raise AgentDefinitionError(f"{where}: output_type must be a pydantic model class")
        if self.triage is not None:
            if not isinstance(self.triage, Triage):
                raise AgentDefinitionError(f"{where}: triage must be a keel.Triage")
            if self.triage.prompt_dir != self.prompt_dir:
                raise AgentDefinitionError(f"{where}: the triage prompt must sit beside the agent's prompt "
                                           f"({self.prompt_dir}), so that their versions go together")
            for version in self.prompt_versions():
                if not (self.prompt_dir / f"{self.triage.prompt_name}.{version}.md").is_file():
                    raise AgentDefinitionError(f"{where}: prompt version {version} has no triage prompt "
                                               f"{self.triage.prompt_name}.{version}.md")
            if self.triage.prompt_name == self.prompt_name:
                raise AgentDefinitionError(f"{where}: the triage prompt must not be the agent's own prompt")
        if self.sim is not None and not callable(self.sim):
            raise AgentDefinitionError(f"{where}: sim must be callable (keel.sim.SimTurn -> keel.sim.SimReply)")

    def _tiers(self, where: str) -> dict[Tier, ModelSpec]:
        if isinstance(self.models, str | ModelSpec):
            spec = _model(self.models, f"{where} model")
            return {"small": spec, "large": spec}
        unknown = set(self.models) - {"small", "large"}
        if unknown or not self.models:
            raise AgentDefinitionError(f"{where}: models must name the tiers 'small' and/or 'large', "
                                       f"not {sorted(unknown) or 'nothing'}")
        specs = {tier: _model(spec, f"{where} model {tier}") for tier, spec in self.models.items()}
        return {"small": specs.get("small") or specs["large"], "large": specs.get("large") or specs["small"]}

    @property
    def task_feature(self) -> str:
        return self.feature or self.name

    def activity_name(self, tool_name: str) -> str:
        """The activity a tool runs as: `<agent>.<tool>` (stable once deployed)."""
        return f"{self.name}.{tool_name}"

    def prompt_path(self, version: str | None = None) -> Path:
        return self.prompt_dir / f"{self.prompt_name}.{version or self.prompt_version}.md"

    def prompt_versions(self) -> list[str]:
        return sorted(m["version"] for p in self.prompt_dir.glob(f"{self.prompt_name}.*.md")
                      if (m := PROMPT_FILE.match(p.name)) is not None)

    def tool_specs(self, names: Iterable[str]) -> list[ToolSpec]:
        return [self.tool_map[n].spec() for n in names]

    def permission_of(self, tool_name: str) -> Literal["read_only", "confirm", "autonomous"] | None:
        t = self.tool_map.get(tool_name)
        return t.permission if t is not None else None

    def __hash__(self) -> int:
        return id(self)
