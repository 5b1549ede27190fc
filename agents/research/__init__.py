"""The research assistant: a planner, retrieval and analysis workers with narrow tools and tiers, and a
writer that publishes the report, run by the generic orchestrator. Written only against `keel`'s public
API; `keel worker --agents agents.research` serves it and `keel research "QUESTION"` runs it.
"""

from agents.research.agent import (
    AGENTS,
    BUDGET,
    NAME,
    PLANNER,
    SYNTHESIZER,
    Report,
    orchestration,
    research_analysis,
    research_planner,
    research_retrieval,
    research_writer,
)

__all__ = ["AGENTS", "BUDGET", "NAME", "PLANNER", "SYNTHESIZER", "Report", "orchestration", "research_analysis",
           "research_planner", "research_retrieval", "research_writer"]
