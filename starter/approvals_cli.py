"""`keel approvals`, `keel approve`, `keel reject`, `keel resolve`: the humans in the loop.

Approvals go through the workflow's `decide` update, whose validator refuses at once (and leaves no
trace in the history) a decision with no pending action, a wrong action id or an unlisted approver.
The same decision can be sent as the `approval` signal (the Temporal UI, `temporal workflow signal`):
a signal cannot be refused, so one that does not count is recorded in the task and ignored.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from keel import names
from keel.types import ApprovalDecision, ApprovalRecord, ApprovalVerdict, PendingAction
from starter.console import client_or_exit, console, err, load_settings

AWAITING = f"{names.SA_AWAITING_APPROVAL} = true AND ExecutionStatus = 'Running'"
AWAITING_HUMAN = f"{names.SA_STATUS} = 'awaiting_human' AND ExecutionStatus = 'Running'"


class ApprovalError(Exception):
    """A decision that cannot be sent or was refused; the message says why."""


@dataclass
class Waiting:
    workflow_id: str
    action: PendingAction | None


async def pending_approvals(client: Client) -> list[Waiting]:
    """Tasks waiting for an approval (from visibility, then each one's pending action by query)."""
    ids = sorted({wf.id async for wf in client.list_workflows(AWAITING)})
    actions = await asyncio.gather(*(pending_action(client, i) for i in ids), return_exceptions=True)
    return [Waiting(i, a if isinstance(a, PendingAction) else None) for i, a in zip(ids, actions, strict=True)]


async def pending_action(client: Client, workflow_id: str) -> PendingAction | None:
    handle = client.get_workflow_handle(workflow_id)
    action: PendingAction | None = await handle.query(names.PENDING_ACTION_QUERY, result_type=PendingAction)
    return action


async def decide(
    client: Client, workflow_id: str, approver: str, verdict: ApprovalVerdict, comment: str = "",
    arguments: dict[str, Any] | None = None,
) -> tuple[PendingAction, ApprovalRecord]:
    """Decide on the task's pending action, bound to the exact arguments the approver was shown."""
    try:
        action = await pending_action(client, workflow_id)
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise ApprovalError(f"no task {workflow_id!r}") from e
        raise
    if action is None:
        raise ApprovalError(f"task {workflow_id!r} has no action waiting for approval")
    decision = ApprovalDecision(action_id=action.action_id, approver=approver, decision=verdict, comment=comment,
                                arguments=arguments, arguments_digest=action.arguments_digest)
    try:
        record: ApprovalRecord = await client.get_workflow_handle(workflow_id).execute_update(
            names.DECIDE_UPDATE, decision, result_type=ApprovalRecord)
    except WorkflowUpdateFailedError as e:
        raise ApprovalError(f"refused: {e.cause or e}") from e
    return action, record



# -- commands -------------------------------------------------------------------------------------


def approvals(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Tasks waiting for a human's approval, with the proposed action."""
    settings = load_settings()

    async def run() -> list[Waiting]:
        return await pending_approvals(await client_or_exit(settings))

    waiting = asyncio.run(run())
    if json_out:
        print(json.dumps([{"workflow_id": w.workflow_id,
                           "action": w.action.model_dump(mode="json") if w.action else None} for w in waiting],
                         indent=2))
        return
    if not waiting:
        console.print("No task is waiting for approval.")
        return
    t = Table(box=box.SIMPLE_HEAD, title=f"{len(waiting)} task(s) waiting for approval")
    for c in ("workflow", "action", "tool", "arguments", "reason", "approvers", "expires (UTC)"):
        # The ids are what `keel approve` takes: never folded (the other columns wrap first).
        t.add_column(c, overflow="fold", no_wrap=c in ("workflow", "action", "tool"))
    for w in waiting:
        a = w.action
        if a is None:
            t.add_row(w.workflow_id, "?", "(no answer to the query: is a worker running?)", "", "", "", "")
            continue
        t.add_row(w.workflow_id, a.action_id, a.tool, escape(json.dumps(a.arguments, sort_keys=True)),
                  escape(a.reason), ", ".join(a.approvers), f"{a.expires_at:%Y-%m-%d %H:%M}" if a.expires_at else "")
    console.print(t)
    console.print("Approve with `keel approve WORKFLOW_ID --as NAME`, reject with `keel reject WORKFLOW_ID --as NAME`.")


def _decide(workflow_id: str, approver: str, verdict: ApprovalVerdict, comment: str,
            arguments: dict[str, Any] | None) -> None:
    settings = load_settings()

    async def run() -> tuple[PendingAction, ApprovalRecord]:
        return await decide(await client_or_exit(settings), workflow_id, approver, verdict, comment, arguments)

    try:
        action, record = asyncio.run(run())
    except ApprovalError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(1) from e
    args = arguments if arguments is not None else action.arguments
    console.print(f"{record.decision} recorded for {action.action_id} ({action.tool} "
                  f"{escape(json.dumps(args, sort_keys=True))}) by {record.approver} on {workflow_id}")


def approve(
    workflow_id: Annotated[str, typer.Argument(help="The task's workflow id.")],
    approver: Annotated[str, typer.Option("--as", help="Your name, as listed in the approval policy.")],
    comment: Annotated[str, typer.Option("--comment", help="Why (recorded).")] = "",
    edit: Annotated[str | None, typer.Option("--edit", help="Approve with these arguments instead (JSON).")] = None,
) -> None:
    """Approve the task's pending action (executed once, with exactly the arguments shown)."""
    arguments = None
    if edit is not None:
        try:
            arguments = json.loads(edit)
        except json.JSONDecodeError as e:
            raise typer.BadParameter(f"--edit is not valid JSON: {e}") from e
        if not isinstance(arguments, dict):
            raise typer.BadParameter("--edit must be a JSON object of arguments")
    _decide(workflow_id, approver, "edit" if arguments is not None else "approve", comment, arguments)


def reject(
    workflow_id: Annotated[str, typer.Argument(help="The task's workflow id.")],
    approver: Annotated[str, typer.Option("--as", help="Your name, as listed in the approval policy.")],
    comment: Annotated[str, typer.Option("--comment", help="Why (recorded, and shown to the agent).")] = "",
) -> None:
    """Reject the task's pending action: it never runs, and the agent is told."""
    _decide(workflow_id, approver, "reject", comment, None)
