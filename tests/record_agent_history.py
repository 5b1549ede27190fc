"""Record the on-call agent's histories for tests/histories/ (run when a deliberate, patched change of the
generic agent workflow or of the on-call agent's definition lands):

    .venv/bin/python -m tests.record_agent_history

Starts a throwaway dev server from the installed binary (keel.testing.agent_environment), the demo
service-status API, and a worker serving agents.oncall on the sim model, then runs:

- agent_oncall_v1: "Is the api service healthy?": the status is read, the agent answers (completed);
- agent_oncall_v1_approval: "The payments service is down": the status is read, a restart waits for
  the listed approver, a signal from an unlisted one is ignored, sre-lead approves by update, the
  restart runs once and the agent answers (completed).

and, with a worker serving agents.dr_plan, `keel plan`'s supervision (the generic KeelSupervisor):

- supervisor_dr_plan_v1 (and its first planner child, supervisor_dr_plan_v1__worker-1): sim seed 1, the
  payments database failover: round 1 breaks a runbook rule (sent back unreviewed), round 2 keeps the
  rules and the reviewer asks for a verification, round 3 is approved (completed).

and, with a worker serving agents.support_desk on a database of its own:

- agent_support_desk_v1: a fee question: the triage (small tier), the account, transactions and fees
  policy read, the answer (completed);
- agent_support_desk_v1_refund: a duplicate charge: triage, reads, a refund waits for a listed
  approver, an unlisted one's signal is ignored, alice approves by update, the refund runs once (completed).

and, with a worker serving agents.research on a database of its own:

- orchestrator_research_v1 (and its planner and retrieval children, orchestrator_research_v1__planner,
  orchestrator_research_v1__retrieval): `keel research`'s orchestration of the question of the tests:
  the planner's plan, retrieval and analysis in parallel, the writer's cited report (completed).

The workflow ids are the file names: test_replay replays every file there against today's code, with
the on-call agent registered (the workflow looks its agent up in keel.registry at run time).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from temporalio.client import Client

from agents.dr_plan import AGENTS as DR_PLAN_AGENTS
from agents.dr_plan import supervision
from agents.oncall import oncall
from agents.oncall.status_service import StatusService
from agents.research import AGENTS as RESEARCH_AGENTS
from agents.research import orchestration as research_orchestration
from agents.research import store as research_store
from agents.support_desk import support_desk
from agents.support_desk.data import build_seed
from keel.names import APPROVAL_SIGNAL
from keel.orchestration import OrchestratorResult
from keel.settings import KeelSettings
from keel.supervision import SupervisorResult
from keel.testing import agent_environment
from keel.types import AgentInput, AgentResult, ApprovalDecision
from starter.agents import start_agent, start_orchestration, start_supervision
from starter.approvals_cli import decide, pending_action

OUT = Path(__file__).parent / "histories"
HEALTHY = "agent_oncall_v1"
APPROVAL = "agent_oncall_v1_approval"
DR_PLAN = "supervisor_dr_plan_v1"
DESK = "agent_support_desk_v1"
DESK_REFUND = "agent_support_desk_v1_refund"
RESEARCH = "orchestrator_research_v1"
QUESTION = "Why did refunds rise in Q3 2024, and what did the duplicate charges cost us?"


async def record_healthy(client: Client, settings: KeelSettings) -> AgentResult:
    inp = AgentInput(agent="oncall", input="Is the api service healthy?", tenant="team-web", key="recorded")
    handle = await start_agent(client, settings, inp, workflow_id=HEALTHY)
    res: AgentResult = await handle.result()
    assert res.status == "completed" and res.tools_executed == ["service_status"], res
    return res


async def record_approval(client: Client, settings: KeelSettings, status: StatusService) -> AgentResult:
    inp = AgentInput(agent="oncall", input="The payments service is down, please fix it.", tenant="team-payments",
                     key="recorded-approval")
    handle = await start_agent(client, settings, inp, workflow_id=APPROVAL)
    while (action := await pending_action(client, handle.id)) is None:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert action.tool == "restart_service" and status.restarts == {}, action
    await handle.signal(APPROVAL_SIGNAL, ApprovalDecision(action_id=action.action_id, approver="intern",
                                                          decision="approve"))  # not an approver: ignored
    await decide(client, handle.id, "sre-lead", "approve", comment="recorded for the replay tests")
    res: AgentResult = await handle.result()
    assert res.status == "completed", res
    assert res.tools_executed == ["service_status", "restart_service"] and len(status.restarts) == 1, res
    return res


async def record_dr_plan(client: Client, settings: KeelSettings) -> SupervisorResult:
    inp = supervision("payments-db primary in eu-west-1 is down: storage controller failure", key="recorded",
                      sim_seed=1)
    res: SupervisorResult = await (await start_supervision(client, settings, inp, workflow_id=DR_PLAN)).result()
    assert res.status == "completed" and len(res.rounds) == 3, res
    for child in (DR_PLAN, f"{DR_PLAN}/worker-1"):
        history = await client.get_workflow_handle(child).fetch_history()
        out = OUT / f"{child.replace('/', '__')}.json"
        out.write_text(history.to_json())
        print(f"wrote {out} ({len(history.events)} events)")
    return res


async def record_desk(client: Client, settings: KeelSettings) -> AgentResult:
    inp = AgentInput(agent="support_desk", input="Customer: C-1003\n\nWhy was I charged a fee on my statement?",
                     tenant="C-1003", key="recorded")
    res: AgentResult = await (await start_agent(client, settings, inp, workflow_id=DESK)).result()
    assert res.status == "completed" and res.triage and "lookup_policy" in res.tools_executed, res
    return res


async def record_desk_refund(client: Client, settings: KeelSettings) -> AgentResult:
    dup = next(t for t in build_seed()["transactions"] if t["customer_id"] == "C-1001" and t["duplicate_of"])
    inp = AgentInput(agent="support_desk", tenant="C-1001", key="recorded-refund",
                     input=f"Customer: C-1001\n\nI was charged twice at {dup['merchant']} for {dup['amount']:.2f} "
                           "EUR. Please refund the duplicate charge.")
    handle = await start_agent(client, settings, inp, workflow_id=DESK_REFUND)
    while (action := await pending_action(client, handle.id)) is None:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert action.tool == "issue_refund", action
    await handle.signal(APPROVAL_SIGNAL, ApprovalDecision(action_id=action.action_id, approver="mallory",
                                                          decision="approve"))  # not an approver: ignored
    await decide(client, handle.id, "alice", "approve", comment="recorded for the replay tests")
    res: AgentResult = await handle.result()
    assert res.status == "completed" and res.tools_executed[-1] == "issue_refund", res
    return res


async def record_research(client: Client, settings: KeelSettings) -> None:
    inp = research_orchestration(QUESTION, key="recorded")
    res: OrchestratorResult = await (await start_orchestration(client, settings, inp, workflow_id=RESEARCH)).result()
    assert res.status == "completed", res
    for wid in (RESEARCH, f"{RESEARCH}/planner", f"{RESEARCH}/retrieval"):
        history = await client.get_workflow_handle(wid).fetch_history()
        out = OUT / f"{wid.replace('/', '__')}.json"
        out.write_text(history.to_json())
        print(f"wrote {out} ({len(history.events)} events)")


async def save(client: Client, workflow_id: str, res: AgentResult) -> None:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    out = OUT / f"{workflow_id}.json"
    out.write_text(history.to_json())
    print(f"wrote {out} ({len(history.events)} events; {res.status}, {res.tokens} tokens, "
          f"tools {res.tools_executed})")


async def main(only: list[str]) -> None:
    with StatusService() as status:
        os.environ["ONCALL_STATUS_URL"] = status.url
        async with agent_environment(oncall) as env:
            if not only or HEALTHY in only:
                await save(env.client, HEALTHY, await record_healthy(env.client, env.settings))
            if not only or APPROVAL in only:
                await save(env.client, APPROVAL, await record_approval(env.client, env.settings, status))
    if not only or DR_PLAN in only:
        async with agent_environment(*DR_PLAN_AGENTS) as env:
            await record_dr_plan(env.client, env.settings)
    if not only or DESK in only or DESK_REFUND in only:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["KEEL_DATABASE_URL"] = url = f"sqlite:///{tmp}/keel.db"
            async with agent_environment(support_desk, db_url=url) as env:
                if not only or DESK in only:
                    await save(env.client, DESK, await record_desk(env.client, env.settings))
                if not only or DESK_REFUND in only:
                    await save(env.client, DESK_REFUND, await record_desk_refund(env.client, env.settings))
    if not only or RESEARCH in only:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["KEEL_DATABASE_URL"] = url = f"sqlite:///{tmp}/keel.db"
            research_store.reset()
            async with agent_environment(*RESEARCH_AGENTS, db_url=url) as env:
                await record_research(env.client, env.settings)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
    # See starter.cli.main: skip an interpreter teardown that the Temporal client's threads can abort.
    os._exit(0)
