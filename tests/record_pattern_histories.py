"""Record the multi-agent patterns' histories for tests/histories/ (run when a deliberate, patched change of
one of their workflows lands):

    .venv/bin/python -m tests.record_pattern_histories

Starts a throwaway dev server from the installed binary and runs, on the sim model, a shadowed refund
ticket. Writes its history (pattern_*.json); test_replay replays every file there against today's code.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from temporalio.client import Client

from keel.dataset import sample_tickets
from keel.settings import KeelSettings
from keel.shadow import CandidateSpec, ShadowComparison, shadow_workflow_id
from keel.types import SimConfig
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
