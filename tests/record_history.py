"""Record a ticket history for tests/histories/ (run when a deliberate, patched workflow change lands):

    .venv/bin/python -m tests.record_history NAME [--approval]

Starts a throwaway dev server from the installed binary, runs one sim ticket that exercises tools,
a blocked write and a spiral (with --approval: a refund that waits for a human, a signal from an
unlisted approver that is ignored, and an approval by update), and writes tests/histories/NAME.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.db import init_db, make_engine
from keel.dataset import sample_tickets
from keel.names import APPROVAL_SIGNAL
from keel.policy import budget_for
from keel.settings import KeelSettings
from keel.types import ApprovalDecision
from starter.approvals_cli import decide, pending_action
from starter.tickets import start_ticket
from tests.conftest import SEARCH_ATTRIBUTE_KEYS, _binary, run_ticket, ticket
from workers.worker import build_worker


@contextlib.asynccontextmanager
async def recording_stack() -> AsyncIterator[tuple[Client, KeelSettings]]:
    """A throwaway dev server from the installed binary, a fresh ledger and a Keel worker."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/keel.db")
        init_db(engine)
        settings = KeelSettings(home=Path(tmp), task_queue="record")
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=_binary("temporal"), data_converter=pydantic_data_converter,
            search_attributes=SEARCH_ATTRIBUTE_KEYS,
        )
        async with env, build_worker(env.client, settings, engine=engine):
            yield env.client, settings


async def main(name: str, approval: bool = False) -> None:
    sample = next(t for t in sample_tickets(16) if t.category == "refund_request")
    async with recording_stack() as (client, settings):
        inp = ticket(sample.customer_id, sample.text, ticket_id=f"TK-{name}", spiral_rate=1.0,
                     approval_mode="wait" if approval else "escalate")
        inp.budget = budget_for(inp.task_type)  # pinned, as the CLI does: policy changes must not alter replay
        if approval:
            handle = await start_ticket(client, settings, inp)
            while (action := await pending_action(client, handle.id)) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await handle.signal(APPROVAL_SIGNAL, ApprovalDecision(action_id=action.action_id, approver="mallory",
                                                                  decision="approve"))
            await decide(client, handle.id, "alice", "approve", comment="recorded for the replay tests")
            res = await handle.result()
        else:
            res = await run_ticket(client, settings, inp)
        history = await client.get_workflow_handle(res.workflow_id).fetch_history()
    out = Path(__file__).parent / "histories" / f"{name}.json"
    out.write_text(history.to_json())
    print(f"wrote {out} ({len(history.events)} events; {res.status}, {res.route}, {res.tokens} tokens)")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(main(args[0] if args else "ticket_v1", approval="--approval" in sys.argv))
    # See starter.cli.main: skip an interpreter teardown that the Temporal client's threads can abort.
    os._exit(0)
