"""Record the swarm classifier's histories for tests/histories/ (run when a deliberate, patched change of
the generic swarm or agent workflow, or of the triage agent's definition, lands):

    .venv/bin/python -m tests.record_swarm_history

Starts a throwaway dev server from the installed binary (keel.testing.agent_environment) and a worker
serving agents.triage on the sim model, then runs `keel swarm`'s configuration on the demo's ambiguous
message (make demo): five triage peers over sim-small/sim-large at temperatures 0 to 1 split it
card_issue 2 / refund_request 3, no quorum, a human decides. Writes the parent's history
(pattern_swarm_triage_v1, KeelSwarm) and its first peer's (pattern_swarm_triage_v1__peer-1, KeelAgent);
the workflow ids are the file names (`__` for `/`), and test_replay replays them with triage registered.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import keel
from agents.triage import triage
from keel.orchestration import SwarmInput, SwarmResult
from keel.testing import agent_environment
from starter.agents import start_swarm
from starter.swarm_cli import spread

OUT = Path(__file__).parent / "histories"
PARENT = "pattern_swarm_triage_v1"
TEXT = "My card is declined at the ATM and I was charged twice at ShopNow."


async def main() -> None:
    async with agent_environment(triage) as env:
        inp = SwarmInput(agent="triage", input=TEXT, field="category", peers=5, quorum=0.6, temperatures=spread(5),
                         models=[keel.ModelSpec(model="sim-small"), keel.ModelSpec(model="sim-large")],
                         key="TK-DEMO-SWARM", tenant="C-1001")
        handle = await start_swarm(env.client, env.settings, inp, workflow_id=PARENT)
        res: SwarmResult = await handle.result()
        assert res.status == "escalated" and res.votes == {'"refund_request"': 3, '"card_issue"': 2}, res
        for wid in (PARENT, f"{PARENT}/peer-1"):
            history = await env.client.get_workflow_handle(wid).fetch_history()
            out = OUT / f"{wid.replace('/', '__')}.json"
            out.write_text(history.to_json())
            print(f"wrote {out} ({len(history.events)} events)")


if __name__ == "__main__":
    asyncio.run(main())
    # See starter.cli.main: skip an interpreter teardown that the Temporal client's threads can abort.
    os._exit(0)
