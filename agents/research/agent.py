"""The research assistant: four agents on the public API, run as a configuration of the generic
orchestrator (`keel research "QUESTION"` or `keel orchestrate "QUESTION" --planner research_planner
--synthesizer research_writer --name research`).

- research_planner (large tier, no tools): its structured answer is a `keel.Plan` of worker tasks;
- research_retrieval (small tier: lookup work at about 6% of the large's price): search_documents and
  read_document only; it may cite only what its own calls returned;
- research_analysis (large tier): transaction_stats only, aggregates over an extract with no identifiers;
- research_writer (large tier), the synthesizer: writes the report from the workers' answers, publishes
  it once (publish_report) and answers a structured `Report`; it may cite only documents its context
  carries, checked before publishing and on its answer.

Each child is a full agent task (budget, guardrails, ledger rows under the orchestration); the
orchestration's budget bounds them all.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

import keel
from agents.research.guardrails import (
    analysis_used_data,
    publish_cites_its_context,
    report_cites_its_context,
    report_figures_found,
    retrieval_cites_what_it_read,
    retrieval_found_documents,
)
from agents.research.sim import analysis_sim, planner_sim, retrieval_sim, writer_sim
from agents.research.tools import publish_report, read_document, search_documents, transaction_stats

MODELS = {"small": "sim:sim-small", "large": "sim:sim-large"}

NAME = "research"
"""The orchestration's name: its ledger task type and workflow id prefix (`research-<key>`)."""
BUDGET = keel.Budget(max_tokens=40_000, max_usd=0.20, soft_ratio=0.8, hard_ratio=0.95)
"""The whole family's: planner, workers (with room for a retried one) and writer."""


class Report(BaseModel):
    """The writer's structured answer."""

    title: str = Field(max_length=200)
    report: str = Field(min_length=1, description="The report in Markdown")
    sources: list[str] = Field(default_factory=list, description="Document ids cited, e.g. D-002")
    gaps: list[str] = Field(default_factory=list, description="What is missing and why")
    report_id: str | None = Field(None, description="The id publish_report returned")


research_planner = keel.Agent(
    name="research_planner",
    description="Plans a research question into retrieval and analysis tasks (a keel.Plan).",
    prompt="prompts/research_planner.v1.md",
    models=MODELS,
    budget=keel.Budget(max_tokens=3_000, max_usd=0.02),
    step_kind="plan",
    max_output_tokens=600,
    output_type=keel.Plan,
    sim=planner_sim,
)

research_retrieval = keel.Agent(
    name="research_retrieval",
    description="Searches and reads the internal documents; cites each document id.",
    prompt="prompts/research_retrieval.v1.md",
    tools=[search_documents, read_document],
    models=MODELS,
    tier="small",
    budget=keel.Budget(max_tokens=12_000, max_usd=0.01),
    max_steps=6,
    max_output_tokens=700,
    evidence=[retrieval_found_documents],
    output_checks=[retrieval_cites_what_it_read],
    sim=retrieval_sim,
)

research_analysis = keel.Agent(
    name="research_analysis",
    description="Computes aggregate figures over the transaction extract (no customer data).",
    prompt="prompts/research_analysis.v1.md",
    tools=[transaction_stats],
    evidence=[analysis_used_data],
    models=MODELS,
    budget=keel.Budget(max_tokens=10_000, max_usd=0.05),
    max_steps=5,
    max_output_tokens=700,
    sim=analysis_sim,
)

research_writer = keel.Agent(
    name="research_writer",
    description="Writes and publishes the research report from the workers' answers.",
    prompt="prompts/research_writer.v1.md",
    tools=[publish_report],
    models=MODELS,
    budget=keel.Budget(max_tokens=10_000, max_usd=0.06),
    step_kind="synthesize",
    max_steps=3,
    max_output_tokens=1_500,
    validators=[publish_cites_its_context],
    evidence=[report_figures_found],
    output_checks=[report_cites_its_context],
    output_type=Report,
    sim=writer_sim,
)

AGENTS = [research_planner, research_retrieval, research_analysis, research_writer]
PLANNER, SYNTHESIZER = research_planner.name, research_writer.name


def orchestration(question: str, *, budget: keel.Budget | None = None,
                  child_budgets: dict[str, keel.Budget] | None = None, key: str = "", tenant: str = "internal",
                  sim: keel.SimConfig | None = None) -> keel.OrchestratorInput:
    """The research assistant as an input of the generic orchestrator."""
    return keel.OrchestratorInput(
        input=question, planner=PLANNER, synthesizer=SYNTHESIZER, name=NAME, feature=NAME,
        budget=budget or BUDGET, child_budgets=child_budgets or {}, key=key, tenant=tenant,
        sim=sim or keel.SimConfig(spiral_rate=0.0))
