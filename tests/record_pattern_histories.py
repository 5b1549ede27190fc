"""Record the multi-agent patterns' histories for tests/histories/ (run when a deliberate, patched change of
one of their workflows lands):

    .venv/bin/python -m tests.record_pattern_histories

Starts a throwaway dev server from the installed binary and runs, on the sim model: a research report whose
analysis child fails once and is retried alone,
and a shadowed refund ticket. Writes the parents' histories and one child's (pattern_*.json); test_replay
replays every file there against today's code. A parent's children's ids derive from its own, so the
recorded workflow ids are the file names (`__` for `/`: pattern_research_v1__analysis is a child's).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from temporalio.client import Client

from keel import names
from keel.dataset import sample_tickets
from keel.research import ROLE_POLICIES, ResearchInput, ResearchResult
from keel.settings import KeelSettings
from keel.shadow import CandidateSpec, ShadowComparison, shadow_workflow_id
from keel.types import InjectedFailure, SimConfig
from starter import tickets
from tests.conftest import ticket
from tests.record_history import recording_stack

OUT = Path(__file__).parent / "histories"
SIM = SimConfig(spiral_rate=0.0)


async def save(client: Client, workflow_id: str, name: str) -> None:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    (OUT / f"{name}.json").write_text(history.to_json())
    print(f"wrote {name}.json ({len(history.events)} events) from {workflow_id}")


async def run(client: Client, settings: KeelSettings, workflow: str, inp: Any, wid: str, result_type: type) -> Any:
    handle = await client.start_workflow(workflow, inp, id=wid, task_queue=settings.task_queue,
                                         result_type=result_type)
    return await handle.result()


async def main() -> None:
    async with recording_stack() as (c, settings):
        research: ResearchResult = await run(
            c, settings, names.RESEARCH_REPORT_WORKFLOW,
            ResearchInput(question="Why did refunds rise in Q3, and what did the duplicate charges cost us?",
                          sim=SIM, roles=dict(ROLE_POLICIES),
                          child_failures={"analysis": InjectedFailure(at_step=2, runs=1)}),
            "pattern_research_v1", ResearchResult)
        assert research.status == "completed", research.status
        await save(c, research.workflow_id, "pattern_research_v1")
        await save(c, f"{research.workflow_id}/analysis", "pattern_research_v1__analysis")


        refund = next(t for t in sample_tickets(16) if t.category == "refund_request")
        inp = ticket(refund.customer_id, refund.text, ticket_id="TK-shadow-recorded")
        handle = await tickets.start_shadowed(c, settings, inp, CandidateSpec.parse("prompt=v2"))
        await handle.result()
        comparison: ShadowComparison = await c.get_workflow_handle(
            shadow_workflow_id(handle.id), result_type=ShadowComparison).result()
        await save(c, comparison.shadow_workflow_id, "pattern_shadow_v1")


if __name__ == "__main__":
    asyncio.run(main())
    # See starter.cli.main: skip an interpreter teardown that the Temporal client's threads can abort.
    os._exit(0)
