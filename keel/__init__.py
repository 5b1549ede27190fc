"""Keel: durable, budgeted, observable LLM agents on Temporal. The public API.

Declare an agent with `Agent` and `@tool`, register it with a worker (`keel worker --agents
my_pkg.agents`), run it with `keel run NAME "input"`. Everything here is pure: nothing does I/O, reads
the clock or draws random numbers, so workflow code may use it (it is passed through the sandbox).
The modules behind these names are Keel's contract; only the names below are the supported API.
"""

from keel.agent import (
    ActionValidator,
    Agent,
    Args,
    EvidenceCheck,
    FinalOutput,
    OutputCheck,
    ProposedAction,
    Tool,
    ToolContext,
    ToolOutcome,
    Triage,
    tool,
)
from keel.commands import BatchItem, Command, CommandGroup, models_line
from keel.errors import AgentDefinitionError, AgentNotRegistered, KeelError, ScriptExhausted, ToolError
from keel.evals import EvalCase
from keel.orchestration import ChildTask, OrchestratorInput, OrchestratorResult, Plan, SwarmInput, SwarmResult
from keel.sim import SimCall, SimReply, SimTurn
from keel.supervision import Review, Rule, SupervisorInput, SupervisorResult
from keel.types import AgentInput, AgentResult, ApprovalDecision, Budget, ModelSpec, SimConfig

__all__ = [
    "ActionValidator",
    "Agent",
    "AgentDefinitionError",
    "AgentInput",
    "AgentNotRegistered",
    "AgentResult",
    "ApprovalDecision",
    "Args",
    "BatchItem",
    "Budget",
    "ChildTask",
    "Command",
    "CommandGroup",
    "EvalCase",
    "EvidenceCheck",
    "FinalOutput",
    "KeelError",
    "ModelSpec",
    "OrchestratorInput",
    "OrchestratorResult",
    "OutputCheck",
    "Plan",
    "ProposedAction",
    "Review",
    "Rule",
    "ScriptExhausted",
    "SimCall",
    "SimConfig",
    "SimReply",
    "SimTurn",
    "SupervisorInput",
    "SupervisorResult",
    "SwarmInput",
    "SwarmResult",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolOutcome",
    "Triage",
    "models_line",
    "tool",
]
