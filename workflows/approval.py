"""The approval gate (layer 1): a `confirm` call waits for a listed approver's decision on exactly
its arguments. One implementation for every workflow that runs an agent loop: the workflow class
declares the signal, update and query (their names are part of its history) and delegates here.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from keel import names
    from keel.types import ApprovalDecision, ApprovalPolicy, ApprovalRecord, PendingAction

from workflows.agent_loop import AgentRunner

SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_AWAITING = SearchAttributeKey.for_bool(names.SA_AWAITING_APPROVAL)


class ApprovalGate:
    def __init__(self, policy: ApprovalPolicy) -> None:
        self.policy = policy
        self.runner: AgentRunner | None = None
        self.pending: PendingAction | None = None
        self.decision: ApprovalDecision | None = None
        self.records: list[ApprovalRecord] = []

    def problem(self, d: ApprovalDecision) -> str | None:
        """Why a decision does not count, or None."""
        p = self.pending
        if p is None:
            return "no action is waiting for approval"
        if self.decision is not None:
            return f"{p.action_id} has already been decided by {self.decision.approver}"
        if d.action_id != p.action_id:
            return f"action {d.action_id!r} is not pending; the pending action is {p.action_id!r}"
        if d.approver not in p.approvers:
            listed = ", ".join(p.approvers) or "nobody"
            return f"{d.approver!r} is not an approver of {p.tool} (approvers: {listed})"
        if d.arguments_digest is not None and d.arguments_digest != p.arguments_digest:
            return f"the decision was made on other arguments than those of {p.action_id} (digest mismatch)"
        if d.decision == "edit" and not d.arguments:
            return "an edit decision needs the edited arguments"
        return None

    def record(self, d: ApprovalDecision, problem: str | None) -> ApprovalRecord:
        rec = ApprovalRecord(action_id=d.action_id, approver=d.approver, decision=d.decision, accepted=problem is None,
                             note=problem or "", comment=d.comment, at=workflow.now())
        self.records.append(rec)
        if self.runner is not None:
            detail = f"{d.action_id}: {d.decision} by {d.approver}" + (f" ignored: {problem}" if problem else "")
            tool = self.pending.tool if self.pending else None
            self.runner.guardrail("approval", tool, detail, ok=problem is None)
        if problem is None:
            self.decision = d
        return rec

    def signal(self, d: ApprovalDecision) -> None:
        # A signal cannot be refused: one that does not count is recorded, with why, and ignored.
        self.record(d, self.problem(d))

    def validate(self, d: ApprovalDecision) -> None:
        problem = self.problem(d)
        if problem is not None:
            raise ValueError(problem)

    async def request(self, action: PendingAction) -> ApprovalDecision | None:
        """Pause until a listed approver decides (None: the timeout passed)."""
        runner, policy = self.runner, self.policy
        assert runner is not None
        now = workflow.now()
        self.pending = action.model_copy(update={
            "approvers": list(policy.approvers.get(action.tool, [])), "requested_at": now,
            "expires_at": now + timedelta(seconds=policy.timeout_s),
        })
        self.decision = None
        runner.progress.pending_action, runner.progress.status = self.pending, "awaiting_approval"
        workflow.upsert_search_attributes([SA_AWAITING.value_set(True), SA_STATUS.value_set("awaiting_approval")])
        try:
            await workflow.wait_condition(lambda: self.decision is not None,
                                          timeout=timedelta(seconds=policy.timeout_s),
                                          timeout_summary=f"approval of {action.action_id}")
        except TimeoutError:
            pass
        decision, self.pending, self.decision = self.decision, None, None
        runner.progress.pending_action, runner.progress.status = None, "running"
        workflow.upsert_search_attributes([SA_AWAITING.value_set(False), SA_STATUS.value_set("running")])
        return decision
